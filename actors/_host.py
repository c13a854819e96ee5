"""The process host: starts, feeds and stops AgentProcess actors when the kernel says so.

It holds no authority: it only runs what the kernel decided, connected as role `host`. A process
idle too long is hibernated (its actor stopped, its affordances kept) and started again on its next
message, unseen by the kernel: a live actor costs a thread.
"""

from __future__ import annotations

import logging
import math
import socket
import threading
import time
from dataclasses import dataclass, replace
from typing import Any

import pykka
import zmq

from agentlibos.actors._jit import JitRunner
from agentlibos.actors._messages import Input, Park, ProcessSpec, Restore, Stop
from agentlibos.actors._process import AgentProcess, ToolObserver
from agentlibos.bus import Command, Hello, ProtocolError, Reply, Request, decode

log = logging.getLogger("agentlibos.host")

#: How long a stopping host waits for its processes to say they are idle: an idle one answers at
#: once; one that is mid-turn does not, and ends with the host (interrupted).
PARK_WAIT_S = 1.0
#: How long it waits for the kernel to take what it parked.
PARK_REPLY_S = 5.0
#: How long a process due to hibernate has to confirm it is idle; one that has not answered in
#: time is asked again after another idle period.
HIBERNATE_WAIT_S = 0.5
#: How long a process that confirmed it is idle has to stop (it has nothing else to do first).
HIBERNATE_STOP_S = 10.0


@dataclass(frozen=True, slots=True)
class Hibernated:
    """A process whose actor the host stopped while it was idle: how to start it again."""

    spec: ProcessSpec
    #: What it answered to `Park`: its conversation, JIT tools and Skill instructions.
    affordances: dict[str, Any]


class ProcessHost:
    def __init__(
        self,
        context: zmq.Context[Any],
        endpoint: str,
        host_token: str,
        *,
        observer: ToolObserver | None = None,
        jit_options: dict[str, Any] | None = None,
        hibernate_after_s: float = 0.0,
    ) -> None:
        self._ctx = context
        self._jit: JitRunner | None = None
        self._jit_options = dict(jit_options or {})
        self._endpoint = endpoint
        self._token = host_token
        self.observer = observer
        self.actors: dict[int, pykka.ActorRef[AgentProcess]] = {}
        self.hibernate_after_s = float(hibernate_after_s)
        self.hibernated: dict[int, Hibernated] = {}
        self._specs: dict[int, ProcessSpec] = {}
        # pid -> when it went idle (monotonic), oldest first: the first entry is the next one due.
        self._idle: dict[int, float] = {}
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        # Set while the host thread polls with no deadline: the next process to go idle wakes it.
        self._waits_forever = False
        self._wake_w: socket.socket | None = None
        # Processes that could not run (pid, why), for the host thread to report (host.failed).
        self._failures: list[tuple[int, str]] = []
        self._rid = 1 << 20
        self._ready = threading.Event()
        self._error: str | None = None
        self._thread = threading.Thread(target=self._run, name="agentlibos-host", daemon=True)
        self._stopping = False

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
        # Through the wake pipe, not a new socket: a host at its socket limit must still stop.
        self._stopping = True
        if self._wake_w is not None:
            try:
                self._wake_w.send(b"\0")
            except OSError:  # a byte is already waiting, or the host thread has ended
                pass
        self._thread.join(10)
        if self._thread.is_alive():
            log.error("host: the host thread did not end within 10 s of the stop; its processes end interrupted")
        with self._lock:
            refs = list(self.actors.values())
            self.actors.clear()
            self.hibernated.clear()
            self._idle.clear()
        for ref in refs:
            try:
                ref.stop(block=False)
            except pykka.ActorDeadError:
                pass
        if self._jit is not None:
            self._jit.close()
            self._jit = None

    def wait_hibernated(self, pid: int, timeout: float | None = None) -> bool:
        """Wait until process `pid` is hibernated; False if it was not within `timeout` seconds."""
        with self._changed:
            return self._changed.wait_for(lambda: pid in self.hibernated, timeout)

    def wait_gone(self, pid: int, timeout: float | None = None) -> bool:
        """Wait until the host holds nothing of process `pid` (it ended); False on timeout."""
        with self._changed:
            return self._changed.wait_for(
                lambda: pid not in self.actors and pid not in self.hibernated and pid not in self._specs, timeout)

    def _run(self) -> None:
        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        wake_r, self._wake_w = socket.socketpair()
        wake_r.setblocking(False)
        self._wake_w.setblocking(False)
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
            wake = wake_r.fileno()
            poller.register(wake, zmq.POLLIN)
            while True:
                events = dict(poller.poll(self._next_due_ms()))
                if wake in events:
                    _drain(wake_r)
                # After the drain: stop() sets the flag before its byte, so a byte drained here
                # cannot hide a stop.
                if self._stopping:
                    self._park(sock)
                    return
                if sock in events:
                    try:
                        msg = decode(sock.recv())
                    except ProtocolError as exc:
                        log.error("host: unreadable frame from the kernel: %s", exc)
                        msg = None
                    if isinstance(msg, Command):
                        self._command(msg)
                self._report_failures(sock)
                self._hibernate_due()
        except zmq.ContextTerminated:  # the runtime ended without this thread: nothing left to serve
            log.error("host: the ZeroMQ context ended under the host thread")
        finally:
            sock.close(0)
            wake_r.close()
            self._wake_w.close()

    def _ask_park(self, refs: dict[int, pykka.ActorRef[AgentProcess]], wait: float,
                  ) -> tuple[dict[int, dict[str, Any]], set[int]]:
        """Ask each process at once whether it is idle: the affordances of those that are, and the
        pids that did not answer within `wait` (after one wait has run out, every other has had as long)."""
        asked = {}
        for pid, ref in sorted(refs.items()):
            try:
                asked[pid] = ref.ask(Park(), block=False)
            except pykka.ActorDeadError:
                continue
        idle, late = {}, set()
        for pid, future in asked.items():
            try:
                state = future.get(timeout=wait)
            except pykka.Timeout:
                wait = 0.0
                late.add(pid)
                continue
            except pykka.ActorDeadError:
                continue
            if isinstance(state, dict):
                idle[pid] = state
        return idle, late

    def _park(self, sock: zmq.Socket[Any]) -> None:
        """Send the kernel the affordances of every idle process, live or hibernated. Runs on the
        host thread, which owns the kernel connection."""
        with self._lock:
            refs = dict(self.actors)
            parked = {pid: h.affordances for pid, h in self.hibernated.items()}
        idle, _ = self._ask_park(refs, PARK_WAIT_S)
        parked.update(idle)
        rid, sent = 1, set()
        for pid, state in sorted(parked.items()):
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

    # --- hibernation ---------------------------------------------------------------------------
    def _on_idle(self, pid: int, idle: bool) -> None:
        """From a process's own thread: it went idle between turns, or a turn started."""
        if self.hibernate_after_s <= 0:
            return
        with self._lock:
            self._idle.pop(pid, None)
            if not idle or pid not in self._specs:
                return
            self._idle[pid] = time.monotonic()
            wake, self._waits_forever = self._waits_forever, False
        if wake and self._wake_w is not None:
            try:
                self._wake_w.send(b"\0")
            except OSError:  # a byte is already waiting, or the host thread has ended
                pass

    def _next_due_ms(self) -> int | None:
        """The host thread's poll timeout: until the oldest idle process is due (None: no deadline)."""
        if self.hibernate_after_s <= 0:
            return None
        with self._lock:
            oldest = next(iter(self._idle.values()), None)
            self._waits_forever = oldest is None
        if oldest is None:
            return None
        return max(0, math.ceil((oldest + self.hibernate_after_s - time.monotonic()) * 1000))

    def _hibernate_due(self) -> None:
        """Stop the actors of the processes idle `hibernate_after_s`, once each confirms it is idle,
        and keep what starts them again. On the host thread, the only one that gives a process input,
        so none gets a turn between its answer and its stop."""
        if self.hibernate_after_s <= 0:
            return
        now = time.monotonic()
        with self._lock:
            due = []
            for pid, since in self._idle.items():
                if since + self.hibernate_after_s > now:
                    break
                due.append(pid)
            for pid in due:
                del self._idle[pid]
                if pid not in self.actors:  # went idle in its on_start, before _launch kept its ref
                    self._idle[pid] = now
            refs = {pid: self.actors[pid] for pid in due if pid in self.actors}
            specs = {pid: self._specs[pid] for pid in refs}
        if not refs:
            return
        idle, late = self._ask_park(refs, HIBERNATE_WAIT_S)
        stopping = {pid: refs[pid].stop(block=False) for pid in idle}
        for pid, future in stopping.items():
            # Its stop has run on_stop (so on_exit) when this returns: a wake cannot race with it.
            try:
                stopped = future.get(timeout=HIBERNATE_STOP_S)
            except pykka.Timeout:
                log.error("host: process %s did not stop to hibernate; it is lost", pid)
                continue
            if stopped:
                with self._changed:
                    self.hibernated[pid] = Hibernated(specs[pid], idle[pid])
                    self._changed.notify_all()
        if late:
            with self._lock:
                for pid in late:
                    if pid in self._specs:
                        self._idle[pid] = now

    def _wake(self, pid: int, content: Any) -> bool:
        """Start a hibernated process again with what it had and the input it was sent; it says
        hello with the same token, so the kernel sees the same process."""
        with self._changed:
            h = self.hibernated.pop(pid, None)
            self._changed.notify_all()
        if h is None:
            return False
        a = h.affordances
        self._launch(replace(h.spec, input=content, restored={"messages": a["messages"], "jit_tools": a["jit_tools"]},
                             instructions=tuple(a["instructions"])))
        if content is None:  # an input of None is still an input; a spec's None means none
            self._tell(pid, Input(None))
        return True

    # --- commands ------------------------------------------------------------------------------
    def _command(self, cmd: Command) -> None:
        if cmd.op == "start":
            b = cmd.body
            self._launch(ProcessSpec(
                pid=cmd.pid, ppid=b.get("ppid"), token=b["token"], image=b.get("image", ""), model=b.get("model", ""),
                prompt=b.get("prompt", ""), tools=tuple(b.get("tools") or ()), input=b.get("input"),
                daemon=bool(b.get("daemon")), jit_tools=dict(b.get("jit_tools") or {}), restored=b.get("restored"),
                instructions=tuple(str(i) for i in b.get("instructions") or ()),
            ))
        elif cmd.op == "deliver":
            content = cmd.body.get("input")
            if not self._wake(cmd.pid, content):
                # Its Park, if one is due, would wait behind this turn: it is not idle any more.
                self._on_idle(cmd.pid, False)
                self._tell(cmd.pid, Input(content))
        elif cmd.op == "restore":
            restored = cmd.body.get("restored") or {}
            with self._lock:
                asleep = self.hibernated.get(cmd.pid)
                if asleep is not None:  # it wakes with the checkpoint's affordances
                    a = asleep.affordances
                    self.hibernated[cmd.pid] = replace(asleep, affordances={
                        **a, "messages": list(restored.get("messages") or []),
                        "jit_tools": dict(restored.get("jit_tools") or {})})
            if asleep is None:
                self._tell(cmd.pid, Restore(restored))
        elif cmd.op == "stop":
            with self._lock:
                asleep = self.hibernated.pop(cmd.pid, None)
            if asleep is not None:
                self._gone(cmd.pid)
            else:
                self._tell(cmd.pid, Stop())
        else:
            log.error("host: unknown command %r", cmd.op)

    def _launch(self, spec: ProcessSpec) -> None:
        with self._lock:
            self._specs[spec.pid] = spec
        try:
            ref = AgentProcess.start(spec, self._endpoint, self._ctx, observer=self.observer, on_exit=self._gone,
                                     on_idle=self._on_idle, on_failed=self._failed, jit=self.jit_runner)
        except Exception as exc:  # no thread left for it, say
            log.error("host: could not start process %s: %s", spec.pid, exc)
            self._failed(spec.pid, f"{type(exc).__name__}: {exc}")
            self._gone(spec.pid)
            return
        with self._lock:
            if ref.is_alive():  # else it has ended already, and its on_exit found nothing to drop
                self.actors[spec.pid] = ref

    def _failed(self, pid: int, why: str) -> None:
        """From any thread: process `pid` cannot run here. The host thread tells the kernel."""
        with self._lock:
            self._failures.append((pid, why))
        if self._wake_w is not None:
            try:
                self._wake_w.send(b"\0")
            except OSError:  # a byte is already waiting, or the host thread has ended
                pass

    def _report_failures(self, sock: zmq.Socket[Any]) -> None:
        """host.failed for each process that could not run: the kernel ends it with status error
        (its reply needs no wait: nothing here depends on it)."""
        with self._lock:
            if not self._failures:
                return
            failures, self._failures = self._failures, []
        for pid, why in failures:
            self._rid += 1
            try:
                sock.send(Request(self._rid, "host.failed", {"pid": pid, "reason": why[:1000]}).encode())
            except zmq.ZMQError as exc:
                log.error("host: could not report that process %s cannot run: %s", pid, exc)

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
        """A process's actor ended (it exited, was killed or hibernated), or the kernel ended a
        hibernated one."""
        with self._changed:
            self.actors.pop(pid, None)
            self._specs.pop(pid, None)
            self._idle.pop(pid, None)
            self._changed.notify_all()


def _drain(sock: socket.socket) -> None:
    try:
        while sock.recv(4096):
            pass
    except OSError:  # nothing more to read
        pass
