"""The log's value types and the backend contract every log store implements.

An entry's hash covers its metadata and its payload's digest, never the payload itself.
"""

from __future__ import annotations

import abc
import hashlib
import math
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from typing import Any, Final, Literal, Self

from ._canonical import canonical, pack_record_head

__all__ = [
    "ENTRY_VERSION",
    "NO_PAYLOAD",
    "ZERO_HASH",
    "LogBackend",
    "LogEntry",
    "RetentionPolicy",
    "VerifyReport",
    "entry_hash",
]

#: Schema version of an entry (the `v` field); part of the hash.
ENTRY_VERSION: Final = 1

#: prev_hash of seq 1.
ZERO_HASH: Final = bytes(32)


class _NoPayload:
    """Marker type: the entry carries no payload (distinct from a payload of None)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "NO_PAYLOAD"

    def __reduce__(self) -> str:
        # Copies and unpickles resolve to the module's one instance, so `is` checks hold.
        return "NO_PAYLOAD"


NO_PAYLOAD: Final = _NoPayload()

# msgpack fixarray header for the 8-element hashed record
# [v, seq, ts, pid, kind, cause, body, payload_digest].
_ARRAY8: Final = b"\x98"


def entry_hash(
    prev_hash: bytes,
    v: int,
    seq: int,
    ts: float,
    pid: int | None,
    kind: str,
    cause: int | None,
    body_bytes: bytes,
    payload_digest: str | None,
) -> bytes:
    """sha256(prev_hash + canonical([v, seq, ts, pid, kind, cause, body, payload_digest])).

    `body_bytes` must already be `canonical(body)`: splicing it in saves re-encoding the body,
    which is both the hot path (stage) and the bulk of verify.
    """
    head = pack_record_head(v, seq, ts, pid, kind, cause)
    if payload_digest is None:
        tail = b"\xc0"
    elif type(payload_digest) is str and len(payload_digest) == 64 and payload_digest.isascii():
        # A sha256 hex digest is always a 64-byte str8: msgpack writes it as d9 40 <bytes>.
        tail = b"\xd9\x40" + payload_digest.encode()
    else:
        tail = canonical(payload_digest)
    # head[0] is the 6-element fixarray header; the record is an 8-element one.
    return hashlib.sha256(b"".join((prev_hash, _ARRAY8, head[1:], body_bytes, tail))).digest()


@dataclass(frozen=True, slots=True)
class LogEntry:
    """One log entry as hashed and stored (its payload is stored apart; see `payload`)."""

    seq: int
    ts: float
    pid: int | None
    kind: str
    cause: int | None
    body: dict[str, Any]
    payload_digest: str | None
    prev_hash: bytes
    hash: bytes
    v: int = ENTRY_VERSION


@dataclass(frozen=True, slots=True)
class VerifyReport:
    """Outcome of a chain check: `first_bad_seq` and `reason` are set when `ok` is False."""

    ok: bool
    checked: int
    first_bad_seq: int | None
    reason: str | None
    head_seq: int


RetentionMode = Literal["keep", "digest", "purge_after"]


@dataclass(frozen=True, slots=True)
class RetentionPolicy:
    """What to keep of payloads: all (`keep`), none (`digest`), or the last `days` (`purge_after`)."""

    mode: RetentionMode = "keep"
    days: float | None = None

    def __post_init__(self) -> None:
        if self.mode not in ("keep", "digest", "purge_after"):
            raise ValueError(f"unknown retention mode {self.mode!r}")
        if self.mode == "purge_after":
            if self.days is None or not math.isfinite(self.days) or self.days < 0:
                raise ValueError("purge_after needs a finite days >= 0")
        elif self.days is not None:
            raise ValueError(f"retention mode {self.mode!r} takes no days")


class LogBackend(abc.ABC):
    """A hash-chained, append-only log with payloads stored apart and derived projections.

    Writers `stage` entries (seq and hash assigned at once) and `flush` them in one durable
    transaction; an entry is acknowledged only once `flush` has returned. After a failed write
    every later `stage`/`flush` raises LogWriteError.
    """

    @abc.abstractmethod
    def stage(
        self,
        kind: str,
        body: dict[str, Any],
        *,
        pid: int | None = None,
        cause: int | None = None,
        payload: Any = NO_PAYLOAD,
        ts: float | None = None,
    ) -> LogEntry: ...

    @abc.abstractmethod
    def flush(self) -> int: ...

    def append(
        self,
        kind: str,
        body: dict[str, Any],
        *,
        pid: int | None = None,
        cause: int | None = None,
        payload: Any = NO_PAYLOAD,
        ts: float | None = None,
    ) -> LogEntry:
        """Stage one entry and flush it (with anything staged before it)."""
        entry = self.stage(kind, body, pid=pid, cause=cause, payload=payload, ts=ts)
        self.flush()
        return entry

    @abc.abstractmethod
    def head(self) -> tuple[int, bytes]: ...

    @abc.abstractmethod
    def get(self, seq: int) -> LogEntry | None: ...

    @abc.abstractmethod
    def entries(
        self,
        start: int = 1,
        end: int | None = None,
        *,
        kinds: Collection[str] | None = None,
        pid: int | None = None,
    ) -> Iterator[LogEntry]: ...

    @abc.abstractmethod
    def payload(self, seq: int) -> tuple[bool, Any]: ...

    @abc.abstractmethod
    def verify(self) -> VerifyReport: ...

    @abc.abstractmethod
    def apply_retention(self, policy: RetentionPolicy, now: float | None = None) -> int: ...

    @abc.abstractmethod
    def rebuild_projections(self) -> None: ...

    @abc.abstractmethod
    def projection(self, name: str, upto: int | None = None) -> list[dict[str, Any]]: ...

    @abc.abstractmethod
    def close(self) -> None: ...

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
