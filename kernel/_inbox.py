"""The Kernel actor's inbox: pykka messages and the kernel's ROUTER sockets in one poll.

pykka lets an actor class supply its own inbox; this one makes a ZeroMQ request an ordinary
actor message (`Inbound`) without a relay thread, and reports "empty" only when neither the
queue nor any socket has anything, which is the moment the kernel group-commits.
"""

from __future__ import annotations

import collections
import os
import select
import threading
from dataclasses import dataclass
from typing import Any

import zmq
from pykka._envelope import Envelope

from agentlibos.bus import Batch, RouterSet


@dataclass(frozen=True, slots=True)
class Inbound:
    """Requests drained from the kernel's sockets in one poll round."""

    batch: Batch


class KernelInbox:
    """Quacks like the queue.Queue pykka uses: put / get / get_nowait / empty."""

    def __init__(self) -> None:
        self._items: collections.deque[Any] = collections.deque()
        self._lock = threading.Lock()
        self._efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._routers: RouterSet | None = None
        self._poller = zmq.Poller()
        self._poller.register(self._efd, zmq.POLLIN)

    def attach(self, routers: RouterSet) -> None:
        """Called on the kernel's thread once its sockets exist."""
        self._routers = routers
        self._epoll = select.epoll()
        self._epoll.register(self._efd, select.EPOLLIN)
        for sock in routers.sockets:
            self._poller.register(sock, zmq.POLLIN)
            self._epoll.register(int(sock.getsockopt(zmq.FD)), select.EPOLLIN)

    def linger(self, seconds: float) -> bool:
        """Wait up to `seconds` (sub-millisecond) for input; True if some may have arrived.

        ZeroMQ's poll counts in milliseconds; its sockets' notification fds under epoll give the
        finer wait the kernel's group commit needs.
        """
        if self._routers is None or not self.empty():
            return True
        self._epoll.poll(seconds)
        return not self.empty()

    def detach(self) -> None:
        if self._routers is not None:
            self._epoll.close()
            for sock in self._routers.sockets:
                self._poller.unregister(sock)
            self._routers = None

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        with self._lock:
            self._items.append(item)
        os.eventfd_write(self._efd, 1)

    def get_nowait(self) -> Any:
        with self._lock:
            if self._items:
                return self._items.popleft()
        raise IndexError("inbox empty")

    def get(self, block: bool = True, timeout: float | None = None) -> Any:
        while True:
            with self._lock:
                if self._items:
                    return self._items.popleft()
            readable = dict(self._poller.poll())
            if self._efd in readable:
                try:
                    os.eventfd_read(self._efd)
                except BlockingIOError:
                    pass
            if self._routers is not None:
                batch = self._routers.drain(readable)
                if batch:
                    return Envelope(Inbound(batch))

    def empty(self) -> bool:
        with self._lock:
            if self._items:
                return False
        if self._routers is None:
            return True
        for sock in self._routers.sockets:
            if int(sock.getsockopt(zmq.EVENTS)) & zmq.POLLIN:
                return False
        return True

    def close(self) -> None:
        os.close(self._efd)
