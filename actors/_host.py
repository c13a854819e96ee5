"""The process host: starts, feeds and stops AgentProcess actors when the kernel says so.

It holds no authority: it only runs what the kernel decided, connected as role `host`.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import pykka
import zmq

from agentlibos.actors._jit import JitRunner
from agentlibos.actors._messages import Input, Park, ProcessSpec, Stop
from agentlibos.actors._process import AgentProcess, ToolObserver
from agentlibos.bus import Command, Hello, ProtocolError, Reply, Request, decode

log = logging.getLogger("agentlibos.host")

#: How long a stopping host waits for its processes to say they are idle: an idle one answers at
#: once; one that is mid-turn does not, and ends with the host (interrupted).
PARK_WAIT_S = 1.0
#: How long it waits for the kernel to take what it parked.
PARK_REPLY_S = 5.0


class ProcessHost:
    def __init__(
        self,
        context: zmq.Context[Any],
        endpoint: str,
        host_token: str,
        *,
        observer: ToolObserver | None = None,
        jit_options: dict[str, Any] | None = None,
    ) -> None:
        self._ctx = context
        self._jit: JitRunner | None = None
        self._jit_options = dict(jit_options or {})
        self._endpoint = endpoint
        self._token = host_token
        self.observer = observer
        self.actors: dict[int, pykka.ActorRef[AgentProcess]] = {}
        self._lock = threading.Lock()
        self._ready = threading.Event()
        self._error: str | None = None
        self._thread = threading.Thread(target=self._run, name="agentlibos-host", daemon=True)
        self._control = f"inproc://agentlibos-host-{id(self)}"

    def jit_runner(self) -> JitRunner:
        """The host's Deno runner for JIT tools, started on first use and shared by its processes."""
        with self._lock:
            if self._jit is None:
                runner = JitRunner(**self._jit_options)
                runner.start()
                self._jit = runner
            return self._jit

    def start(self) -> None:
        self._thread.start()
        if not self._ready.wait(10) or self._error:
            raise RuntimeError(f"process host could not attach to the kernel: {self._error or 'timeout'}")

    def stop(self) -> None:
        """Stop every process; first hand the kernel the affordances of those idle between turns
        (host.park), so that they carry on if the kernel stops cleanly next."""
        ctl = self._ctx.socket(zmq.PAIR)
        ctl.setsockopt(zmq.LINGER, 0)
        ctl.connect(self._control)
        try:
            ctl.send(b"stop", zmq.NOBLOCK)  # a host thread that already died has no peer: never block
        except zmq.Again:
            pass
        self._thread.join(10)
        ctl.close(0)
        with self._lock:
            refs = list(self.actors.values())
            self.actors.clear()
        for ref in refs:
            try:
                ref.stop(block=False)
            except pykka.ActorDeadError:
                pass
        if self._jit is not None:
            self._jit.close()
            self._jit = None

    def _run(self) -> None:
        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        ctl = self._ctx.socket(zmq.PAIR)
        ctl.setsockopt(zmq.LINGER, 0)
        ctl.bind(self._control)
        try:
            sock.connect(self._endpoint)
            sock.send(Hello(id=1, token=self._token, role="host").encode())
            if not sock.poll(10_000):
                self._error = "no answer to hello"
                self._ready.set()
                return
            reply = decode(sock.recv())
            if not isinstance(reply, Reply) or not reply.ok:
                self._error = f"hello refused: {getattr(reply, 'error', reply)}"
                self._ready.set()
                return
            self._ready.set()
            poller = zmq.Poller()
            poller.register(sock, zmq.POLLIN)
            poller.register(ctl, zmq.POLLIN)
            while True:
                events = dict(poller.poll())
                if ctl in events:
                    self._park(sock)
                    return
                if sock in events:
                    try:
                        msg = decode(sock.recv())
                    except ProtocolError as exc:
                        log.error("host: unreadable frame from the kernel: %s", exc)
                        continue
                    if isinstance(msg, Command):
                        self._command(msg)
        finally:
            sock.close(0)
            ctl.close(0)

    def _park(self, sock: zmq.Socket[Any]) -> None:
        """Ask each process whether it is idle; send the kernel the affordances of those that are.
        Runs on the host thread, which owns the kernel connection."""
        with self._lock:
            refs = dict(self.actors)
        asked = {}
        for pid, ref in sorted(refs.items()):
            try:
                asked[pid] = ref.ask(Park(), block=False)
            except pykka.ActorDeadError:
                continue
        # All were asked at once: after one wait has run out, every other has had as long.
        wait: float = PARK_WAIT_S
        rid, sent = 1, set()
        for pid, future in asked.items():
            try:
                state = future.get(timeout=wait)
            except pykka.Timeout:
                wait = 0.0
                continue
            except pykka.ActorDeadError:
                continue
            if not isinstance(state, dict):
                continue
            rid += 1
            try:
                sock.send(Request(rid, "host.park", {"pid": pid, **state}).encode())
            except (TypeError, ValueError, zmq.ZMQError) as exc:  # not encodable: it ends interrupted
                log.error("host: could not park process %s: %s", pid, exc)
                continue
            sent.add(rid)
        while sent and sock.poll(int(PARK_REPLY_S * 1000)):
            try:
                msg = decode(sock.recv())
            except ProtocolError:
                continue
            if isinstance(msg, Reply) and msg.id in sent:
                sent.discard(msg.id)
                if not msg.ok:
                    log.warning("host: the kernel did not take a parked process: %s", msg.error)

    def _command(self, cmd: Command) -> None:
        if cmd.op == "start":
            b = cmd.body
            spec = ProcessSpec(
                pid=cmd.pid, ppid=b.get("ppid"), token=b["token"], image=b.get("image", ""), model=b.get("model", ""),
                prompt=b.get("prompt", ""), tools=tuple(b.get("tools") or ()), input=b.get("input"),
                daemon=bool(b.get("daemon")), jit_tools=dict(b.get("jit_tools") or {}), restored=b.get("restored"),
                instructions=tuple(str(i) for i in b.get("instructions") or ()),
            )
            ref = AgentProcess.start(spec, self._endpoint, self._ctx, observer=self.observer, on_exit=self._gone,
                                     jit=self.jit_runner)
            with self._lock:
                self.actors[cmd.pid] = ref
        elif cmd.op == "deliver":
            self._tell(cmd.pid, Input(cmd.body.get("input")))
        elif cmd.op == "stop":
            self._tell(cmd.pid, Stop())
        else:
            log.error("host: unknown command %r", cmd.op)

    def _tell(self, pid: int, msg: Any) -> None:
        with self._lock:
            ref = self.actors.get(pid)
        if ref is None:
            return
        try:
            ref.tell(msg)
        except pykka.ActorDeadError:
            pass

    def _gone(self, pid: int) -> None:
        with self._lock:
            self.actors.pop(pid, None)
