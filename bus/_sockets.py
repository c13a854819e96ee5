"""ZeroMQ sockets of the bus: the kernel-side ROUTER loop, the event publisher, and ipc endpoints.

Both are owned by the kernel's thread: it polls the ROUTERs itself, so a request reaches a
decision without a thread hop, and replies leave from the thread that decided them.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import zmq

from agentlibos.bus._envelope import MAX_FRAME_BYTES, Message, Reply, decode, request_id
from agentlibos.bus._errors import ProtocolError
from agentlibos.bus._topics import Topic, encode_event

#: Transport-level guard: a peer sending more than this is disconnected by libzmq itself.
#: Frames between MAX_FRAME_BYTES and this get a readable EINVAL reply instead.
TRANSPORT_MAX_BYTES = 64 << 20
#: How many frames the server thread drains before handing a batch to the kernel.
MAX_BATCH = 256

Batch = list[tuple[bytes, Message]]


def ipc_dir(state_dir: str | os.PathLike[str]) -> Path:
    """A 0700 directory for ipc sockets: under the state dir when the path fits sun_path."""
    run = Path(state_dir) / "run"
    if len(str(run.absolute())) + len("/kernel.sock") + len("ipc://") < 100:
        run.mkdir(parents=True, exist_ok=True)
        os.chmod(run, 0o700)
        return run.absolute()
    return Path(tempfile.mkdtemp(prefix="agentlibos-"))  # mkdtemp makes it 0700


class RouterSet:
    """The kernel's ROUTER sockets, confined to the thread that created them (the kernel's own).

    `drain` reads what a poll round found, answers undecodable frames with EINVAL at once, and
    returns the rest decoded; `reply` sends on the ROUTER the request came in on.
    """

    def __init__(self, context: zmq.Context[Any], endpoints: Sequence[str]) -> None:
        self.sockets: list[zmq.Socket[Any]] = []
        self.frames_refused = 0
        try:
            for ep in endpoints:
                r = context.socket(zmq.ROUTER)
                r.setsockopt(zmq.LINGER, 0)
                r.setsockopt(zmq.MAXMSGSIZE, TRANSPORT_MAX_BYTES)
                r.setsockopt(zmq.SNDHWM, 0)
                r.bind(ep)
                self.sockets.append(r)
        except BaseException:
            self.close()
            raise

    def drain(self, readable: Iterable[Any], limit: int = MAX_BATCH) -> Batch:
        batch: Batch = []
        for idx, router in enumerate(self.sockets):
            if router not in readable:
                continue
            for _ in range(limit):
                try:
                    frames = router.recv_multipart(zmq.NOBLOCK, copy=True)
                except zmq.Again:
                    break
                ident = frames[0]
                conn = bytes((idx,)) + ident
                if len(frames) != 2:
                    self._refuse(router, ident, 0, f"expected exactly one frame per message, got {len(frames) - 1}")
                    continue
                frame = frames[1]
                if len(frame) > MAX_FRAME_BYTES:
                    self._refuse(router, ident, request_id(frame[:4096]),
                                 f"frame of {len(frame)} bytes exceeds the {MAX_FRAME_BYTES}-byte limit")
                    continue
                try:
                    msg = decode(frame)
                except ProtocolError as exc:
                    self._refuse(router, ident, request_id(frame), str(exc))
                    continue
                batch.append((conn, msg))
        return batch

    def reply(self, conn: bytes, frame: bytes) -> None:
        """Send to a connection; a peer that went away is not an error (the reply goes nowhere)."""
        try:
            self.sockets[conn[0]].send_multipart([conn[1:], frame], zmq.NOBLOCK)
        except (zmq.ZMQError, IndexError):
            pass

    def _refuse(self, router: zmq.Socket[Any], ident: bytes, rid: int, message: str) -> None:
        self.frames_refused += 1
        try:
            router.send_multipart([ident, Reply.failure(rid, "EINVAL", message).encode()], zmq.NOBLOCK)
        except zmq.ZMQError:
            pass

    def close(self) -> None:
        for s in self.sockets:
            s.close(0)
        self.sockets = []


class Publisher:
    """The kernel's event socket (XPUB, so it knows its subscriptions and encodes only events
    someone listens to); used only by the thread that created it.
    """

    def __init__(self, context: zmq.Context[Any], endpoints: Sequence[str]) -> None:
        self._sock = context.socket(zmq.XPUB)
        self._sock.setsockopt(zmq.LINGER, 0)
        for ep in endpoints:
            self._sock.bind(ep)
        self._subs: dict[bytes, int] = {}

    def _update_subscriptions(self) -> None:
        while self._sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:
            try:
                msg = self._sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            if not msg:
                continue
            prefix = msg[1:]
            if msg[0] == 1:
                self._subs[prefix] = self._subs.get(prefix, 0) + 1
            elif msg[0] == 0 and prefix in self._subs:
                self._subs[prefix] -= 1
                if self._subs[prefix] <= 0:
                    del self._subs[prefix]

    def refresh(self) -> None:
        """Read subscription changes (call once per round of publishing)."""
        self._update_subscriptions()

    def wanted(self, topic: Topic) -> bool:
        """Whether any subscriber's prefix matches the topic (as of the last refresh)."""
        t = topic.value.encode()
        return any(t.startswith(p) for p in self._subs)

    def publish(self, topic: Topic, body: dict[str, Any]) -> None:
        if not self.wanted(topic):
            return
        try:
            self._sock.send(encode_event(topic, body), zmq.NOBLOCK)
        except zmq.Again:
            pass  # PUB drops for slow subscribers by design; the log is the record

    def close(self) -> None:
        self._sock.close(0)
