"""Event topics on the PUB socket: validated value objects, always ending with '/'.

Subscriptions match prefixes, so the trailing delimiter keeps `proc/4/` from matching `proc/42/`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from agentlibos.bus._envelope import pack, unpack
from agentlibos.bus._errors import ProtocolError

SEPARATOR = b"\x00"


@dataclass(frozen=True, slots=True)
class Topic:
    value: str

    def __post_init__(self) -> None:
        if not self.value.endswith("/") or "\x00" in self.value or self.value.startswith("/"):
            raise ValueError(f"topic {self.value!r} must end with '/', not start with one, and have no NUL")

    def __str__(self) -> str:
        return self.value

    @classmethod
    def audit(cls) -> Topic:
        return _AUDIT

    @classmethod
    def proc(cls, pid: int) -> Topic:
        return cls(f"proc/{pid}/")

    @classmethod
    def approval(cls) -> Topic:
        return cls("approval/")

    @classmethod
    def llm(cls) -> Topic:
        return cls("llm/")


_AUDIT = Topic("audit/")


def encode_event(topic: Topic, body: dict[str, Any]) -> bytes:
    """One frame: topic bytes, NUL, msgpack body (single-frame PUB is several times faster)."""
    return topic.value.encode() + SEPARATOR + pack(body)


def decode_event(frame: bytes) -> tuple[Topic, dict[str, Any]]:
    head, sep, rest = frame.partition(SEPARATOR)
    if not sep:
        raise ProtocolError("event frame has no topic separator")
    body = unpack(rest)
    if not isinstance(body, dict):
        raise ProtocolError("event body is not a map")
    return Topic(head.decode()), body
