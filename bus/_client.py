"""KernelClient (request/reply over a DEALER) and EventStream (a SUB socket on kernel events).

Both are confined to the thread that created them, like the ZeroMQ sockets under them.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from typing import Any

import zmq

from agentlibos.bus._envelope import Hello, Reply, Request, decode
from agentlibos.bus._errors import BusError, KernelError, ProtocolError
from agentlibos.bus._topics import Topic, decode_event


class KernelClient:
    """Talks to a kernel: `hello` once to bind the connection, then `call` syscalls."""

    def __init__(
        self,
        endpoint: str,
        *,
        context: zmq.Context[Any] | None = None,
        token: str | None = None,
        role: str = "process",
        timeout_s: float | None = 60.0,
    ) -> None:
        self._own_ctx = context is None
        self._ctx = context or zmq.Context()
        self._sock = self._ctx.socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.connect(endpoint)
        self._ids = itertools.count(1)
        self.timeout_s = timeout_s
        self.identity: dict[str, Any] = {}
        if token is not None:
            try:
                self.identity = self.hello(token, role)
            except BaseException:
                self.close()
                raise

    def hello(self, token: str, role: str = "process") -> dict[str, Any]:
        rid = next(self._ids)
        self._sock.send(Hello(id=rid, token=token, role=role).encode())
        reply = self._wait(rid, self.timeout_s)
        value = reply.unwrap()
        return value if isinstance(value, dict) else {}

    def request(
        self,
        sys: str,
        args: dict[str, Any] | None = None,
        *,
        cap: str | None = None,
        cause: int | None = None,
        timeout_s: float | None | bool = False,
    ) -> Reply:
        rid = next(self._ids)
        self._sock.send(Request(id=rid, sys=sys, args=args or {}, cap=cap, cause=cause).encode())
        return self._wait(rid, self.timeout_s if timeout_s is False else timeout_s)

    def call(self, sys: str, args: dict[str, Any] | None = None, **kw: Any) -> Any:
        """Make a syscall and return its value; a refusal or failure raises KernelError."""
        return self.request(sys, args, **kw).unwrap()

    def _wait(self, rid: int, timeout_s: float | None) -> Reply:
        timeout_ms = None if timeout_s is None else int(timeout_s * 1000)
        while True:
            if not self._sock.poll(timeout_ms):
                raise BusError(f"no reply from the kernel within {timeout_s} s (request {rid})")
            try:
                msg = decode(self._sock.recv())
            except ProtocolError as exc:
                raise BusError(f"unreadable reply from the kernel: {exc}") from None
            if isinstance(msg, Reply) and msg.id in (rid, 0):
                if msg.id == 0 and msg.ok:
                    continue
                return msg
            # A reply to an earlier request that timed out on our side: skip it.

    def close(self) -> None:
        self._sock.close(0)
        if self._own_ctx:
            self._ctx.term()

    def __enter__(self) -> KernelClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class EventStream:
    """Subscribe to kernel events by topic prefix; iterate or call `next_event(timeout_s)`."""

    def __init__(
        self,
        endpoint: str,
        topics: Iterable[Topic | str] = ("",),
        *,
        context: zmq.Context[Any] | None = None,
    ) -> None:
        self._own_ctx = context is None
        self._ctx = context or zmq.Context()
        self._sock = self._ctx.socket(zmq.SUB)
        self._sock.setsockopt(zmq.LINGER, 0)
        for t in topics:
            self._sock.setsockopt(zmq.SUBSCRIBE, str(t).encode())
        self._sock.connect(endpoint)

    def next_event(self, timeout_s: float | None = None) -> tuple[Topic, dict[str, Any]] | None:
        if not self._sock.poll(None if timeout_s is None else int(timeout_s * 1000)):
            return None
        return decode_event(self._sock.recv())

    def __iter__(self) -> Iterator[tuple[Topic, dict[str, Any]]]:
        while True:
            ev = self.next_event()
            if ev is not None:
                yield ev

    def close(self) -> None:
        self._sock.close(0)
        if self._own_ctx:
            self._ctx.term()

    def __enter__(self) -> EventStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["KernelClient", "EventStream", "KernelError"]
