"""Wire envelope: the value objects that travel between kernel and clients, and their msgpack form.

docs/protocol.md is the normative description; this module is its Python implementation.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import msgpack

from agentlibos.bus._errors import KernelError, ProtocolError

WIRE_VERSION = 1
#: Frames larger than this are refused with EINVAL before they are decoded.
MAX_FRAME_BYTES = 1 << 20

ROLES = ("process", "operator", "host")


def pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def unpack(data: bytes) -> Any:
    return msgpack.unpackb(data, raw=False, strict_map_key=True)


@dataclass(frozen=True, slots=True)
class Hello:
    """First frame on a connection: binds the connection to a process, an operator or a host."""

    id: int
    token: str
    role: str = "process"

    def encode(self) -> bytes:
        return pack({"v": WIRE_VERSION, "t": "hello", "id": self.id, "token": self.token, "role": self.role})


@dataclass(frozen=True, slots=True)
class Request:
    """A syscall request. The caller is never named here: the kernel knows it from the connection."""

    id: int
    sys: str
    args: dict[str, Any] = field(default_factory=dict)
    cap: str | None = None
    cause: int | None = None

    def encode(self) -> bytes:
        return pack(
            {
                "v": WIRE_VERSION,
                "t": "req",
                "id": self.id,
                "sys": self.sys,
                "args": self.args,
                "cap": self.cap,
                "cause": self.cause,
            }
        )


@dataclass(frozen=True, slots=True)
class Reply:
    """The kernel's answer to a Hello or a Request; `seq` cites the log entry that records it."""

    id: int
    ok: bool
    value: Any = None
    error: KernelError | None = None
    seq: int | None = None

    def encode(self) -> bytes:
        msg: dict[str, Any] = {"v": WIRE_VERSION, "t": "rep", "id": self.id, "ok": self.ok, "seq": self.seq}
        if self.ok:
            msg["value"] = self.value
        else:
            assert self.error is not None
            msg["error"] = self.error.to_wire()
        return pack(msg)

    def unwrap(self) -> Any:
        if self.ok:
            return self.value
        assert self.error is not None
        raise self.error

    @classmethod
    def failure(cls, id: int, code: str, message: str, seq: int | None = None) -> Reply:
        return cls(id=id, ok=False, error=KernelError(code, message), seq=seq)


@dataclass(frozen=True, slots=True)
class Command:
    """Kernel -> process host: start, stop or deliver to a process the kernel has decided about."""

    op: str
    pid: int
    body: dict[str, Any] = field(default_factory=dict)

    def encode(self) -> bytes:
        return pack({"v": WIRE_VERSION, "t": "cmd", "op": self.op, "pid": self.pid, "body": self.body})


Message = Hello | Request | Reply | Command


def _field(msg: dict[str, Any], name: str, types: type | tuple[type, ...], *, optional: bool = False) -> Any:
    if name not in msg or msg[name] is None:
        if optional:
            return None
        raise ProtocolError(f"field {name!r} is missing")
    value = msg[name]
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in _astuple(types)):
        raise ProtocolError(f"field {name!r} has type {type(value).__name__}")
    return value


def _astuple(types: type | tuple[type, ...]) -> tuple[type, ...]:
    return types if isinstance(types, tuple) else (types,)


def decode(frame: bytes) -> Message:
    """Decode one frame; raise ProtocolError naming what is wrong with it."""
    if len(frame) > MAX_FRAME_BYTES:
        raise ProtocolError(f"frame of {len(frame)} bytes exceeds the {MAX_FRAME_BYTES}-byte limit")
    try:
        msg = unpack(frame)
    except Exception as exc:  # msgpack raises several unrelated types for bad input
        raise ProtocolError(f"frame is not valid msgpack: {exc}") from None
    if not isinstance(msg, dict):
        raise ProtocolError("frame is not a msgpack map")
    if msg.get("v") != WIRE_VERSION:
        raise ProtocolError(f"unsupported wire version {msg.get('v')!r} (this kernel speaks {WIRE_VERSION})")
    kind = msg.get("t")
    if kind == "req":
        args = msg.get("args")
        if args is None:
            args = {}
        if not isinstance(args, dict):
            raise ProtocolError("field 'args' must be a map")
        return Request(
            id=_field(msg, "id", int),
            sys=_field(msg, "sys", str),
            args=args,
            cap=_field(msg, "cap", str, optional=True),
            cause=_field(msg, "cause", int, optional=True),
        )
    if kind == "rep":
        ok = _field(msg, "ok", bool)
        rid = _field(msg, "id", int)
        seq = _field(msg, "seq", int, optional=True)
        if ok:
            return Reply(id=rid, ok=True, value=msg.get("value"), seq=seq)
        return Reply(id=rid, ok=False, error=KernelError.from_wire(msg.get("error")), seq=seq)
    if kind == "hello":
        role = msg.get("role", "process")
        if role not in ROLES:
            raise ProtocolError(f"unknown role {role!r}")
        return Hello(id=_field(msg, "id", int), token=_field(msg, "token", str), role=role)
    if kind == "cmd":
        body = msg.get("body") or {}
        if not isinstance(body, dict):
            raise ProtocolError("field 'body' must be a map")
        return Command(op=_field(msg, "op", str), pid=_field(msg, "pid", int), body=body)
    raise ProtocolError(f"unknown message type {kind!r}")


def request_id(frame: bytes) -> int:
    """Best-effort id of a frame that failed to decode, so the error reply can be matched (else 0)."""
    try:
        msg = unpack(frame[:MAX_FRAME_BYTES])
    except Exception:
        return 0
    if isinstance(msg, dict) and isinstance(msg.get("id"), int) and not isinstance(msg.get("id"), bool):
        return int(msg["id"])
    return 0
