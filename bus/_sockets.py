"""ZeroMQ sockets of the bus: the kernel-side ROUTER loop, the event publisher, and ipc endpoints.

The ROUTER is owned by one thread; replies reach it through an inproc PUSH/PULL pair, because a
ZeroMQ socket may only be used by one thread at a time.
"""

from __future__ import annotations

import itertools
import os
import tempfile
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import zmq

from agentlibos.bus._envelope import MAX_FRAME_BYTES, Message, Reply, decode, request_id
from agentlibos.bus._errors import BusError, ProtocolError
from agentlibos.bus._topics import Topic, encode_event

#: Transport-level guard: a peer sending more than this is disconnected by libzmq itself.
#: Frames between MAX_FRAME_BYTES and this get a readable EINVAL reply instead.
TRANSPORT_MAX_BYTES = 64 << 20
#: How many frames the server thread drains before handing a batch to the kernel.
MAX_BATCH = 256

_ids = itertools.count(1)

Batch = list[tuple[bytes, Message]]


def ipc_dir(state_dir: str | os.PathLike[str]) -> Path:
    """A 0700 directory for ipc sockets: under the state dir when the path fits sun_path."""
    run = Path(state_dir) / "run"
    if len(str(run.absolute())) + len("/kernel.sock") + len("ipc://") < 100:
        run.mkdir(parents=True, exist_ok=True)
        os.chmod(run, 0o700)
        return run.absolute()
    return Path(tempfile.mkdtemp(prefix="agentlibos-"))  # mkdtemp makes it 0700


class BusServer:
    """Runs the kernel's ROUTER sockets on a thread of its own and hands decoded batches on.

    `handler` is called on the server thread with every frame drained in one poll round; frames
    that do not decode are answered with EINVAL here and never reach the handler.
    """

    def __init__(
        self,
        context: zmq.Context[Any],
        endpoints: Sequence[str],
        handler: Callable[[Batch], None],
    ) -> None:
        self._ctx = context
        self._endpoints = list(endpoints)
        self._handler = handler
        n = next(_ids)
        self._reply_endpoint = f"inproc://agentlibos-replies-{os.getpid()}-{n}"
        self._control_endpoint = f"inproc://agentlibos-control-{os.getpid()}-{n}"
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self.frames_refused = 0

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="agentlibos-bus", daemon=True)
        self._thread.start()
        self._ready.wait(10)
        if self._error is not None:
            raise BusError(f"bus server failed to start: {self._error}") from self._error

    def sender(self) -> ReplySender:
        """A reply channel for the calling thread (create it on the thread that will use it)."""
        return ReplySender(self._ctx, self._reply_endpoint)

    def stop(self) -> None:
        if self._thread is None:
            return
        ctl = self._ctx.socket(zmq.PAIR)
        ctl.setsockopt(zmq.LINGER, 0)
        ctl.connect(self._control_endpoint)
        ctl.send(b"stop")
        self._thread.join(10)
        ctl.close(0)
        self._thread = None

    def _run(self) -> None:
        sockets: list[zmq.Socket[Any]] = []
        try:
            routers = []
            for ep in self._endpoints:
                r = self._ctx.socket(zmq.ROUTER)
                r.setsockopt(zmq.LINGER, 0)
                r.setsockopt(zmq.MAXMSGSIZE, TRANSPORT_MAX_BYTES)
                r.setsockopt(zmq.ROUTER_MANDATORY, 0)
                r.bind(ep)
                routers.append(r)
                sockets.append(r)
            pull = self._ctx.socket(zmq.PULL)
            pull.setsockopt(zmq.LINGER, 0)
            pull.bind(self._reply_endpoint)
            sockets.append(pull)
            control = self._ctx.socket(zmq.PAIR)
            control.setsockopt(zmq.LINGER, 0)
            control.bind(self._control_endpoint)
            sockets.append(control)
        except BaseException as exc:  # reported to start()
            self._error = exc
            for s in sockets:
                s.close(0)
            self._ready.set()
            return
        # A reply must go out through the ROUTER that received the request: route by conn prefix.
        conn_router: dict[bytes, zmq.Socket[Any]] = {}
        poller = zmq.Poller()
        for r in routers:
            poller.register(r, zmq.POLLIN)
        poller.register(pull, zmq.POLLIN)
        poller.register(control, zmq.POLLIN)
        self._ready.set()
        try:
            while True:
                events = dict(poller.poll())
                if control in events:
                    return
                if pull in events:
                    self._forward_replies(pull, routers, conn_router)
                for idx, r in enumerate(routers):
                    if r in events:
                        batch = self._drain(r, idx, conn_router)
                        if batch:
                            self._handler(batch)
        finally:
            for s in sockets:
                s.close(0)

    def _drain(self, router: zmq.Socket[Any], idx: int, conn_router: dict[bytes, zmq.Socket[Any]]) -> Batch:
        batch: Batch = []
        for _ in range(MAX_BATCH):
            try:
                frames = router.recv_multipart(zmq.NOBLOCK, copy=True)
            except zmq.Again:
                break
            ident = frames[0]
            conn = bytes([idx]) + ident
            conn_router[conn] = router
            if len(frames) != 2:
                self._refuse(router, ident, 0, f"expected exactly one frame per message, got {len(frames) - 1}")
                continue
            frame = frames[1]
            if len(frame) > MAX_FRAME_BYTES:
                self._refuse(
                    router, ident, request_id(frame[:4096]),
                    f"frame of {len(frame)} bytes exceeds the {MAX_FRAME_BYTES}-byte limit",
                )
                continue
            try:
                msg = decode(frame)
            except ProtocolError as exc:
                self._refuse(router, ident, request_id(frame), str(exc))
                continue
            batch.append((conn, msg))
        return batch

    def _refuse(self, router: zmq.Socket[Any], ident: bytes, rid: int, message: str) -> None:
        self.frames_refused += 1
        try:
            router.send_multipart([ident, Reply.failure(rid, "EINVAL", message).encode()], zmq.NOBLOCK)
        except zmq.ZMQError:
            pass  # the peer is gone; nothing to tell it

    @staticmethod
    def _forward_replies(
        pull: zmq.Socket[Any], routers: list[zmq.Socket[Any]], conn_router: dict[bytes, zmq.Socket[Any]]
    ) -> None:
        for _ in range(MAX_BATCH * 4):
            try:
                conn, payload = pull.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            router = conn_router.get(conn) or routers[conn[0]]
            try:
                router.send_multipart([conn[1:], payload], zmq.NOBLOCK)
            except zmq.ZMQError:
                pass  # peer disconnected; a reply to nobody is dropped


class ReplySender:
    """Thread-confined channel from the kernel thread to the bus thread's ROUTER."""

    def __init__(self, context: zmq.Context[Any], endpoint: str) -> None:
        self._sock = context.socket(zmq.PUSH)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.SNDHWM, 0)
        self._sock.connect(endpoint)

    def send(self, conn: bytes, payload: bytes) -> None:
        self._sock.send_multipart([conn, payload])

    def close(self) -> None:
        self._sock.close(0)


class Publisher:
    """The kernel's event PUB socket; used only by the thread that created it."""

    def __init__(self, context: zmq.Context[Any], endpoints: Sequence[str]) -> None:
        self._sock = context.socket(zmq.PUB)
        self._sock.setsockopt(zmq.LINGER, 0)
        for ep in endpoints:
            self._sock.bind(ep)

    def publish(self, topic: Topic, body: dict[str, Any]) -> None:
        try:
            self._sock.send(encode_event(topic, body), zmq.NOBLOCK)
        except zmq.Again:
            pass  # PUB drops for slow subscribers by design; the log is the record

    def close(self) -> None:
        self._sock.close(0)
