"""The error hierarchy of agent-libos, and the wire form of errors that cross the bus.

It lives in `bus` because every error the kernel returns travels as a reply; `storage` imports
this module and nothing else of ours (docs/architecture.md records that departure).
"""

from __future__ import annotations

from typing import Any

#: ABI error codes (../shared/spec/ABI.md, "Error codes"), plus EINTR (docs/protocol.md: an
#: operator interrupted the caller's turn).
ERROR_CODES: frozenset[str] = frozenset(
    {
        "EPERM",
        "EREVOKED",
        "EEXPIRED",
        "EBUDGET",
        "EDENIED",
        "EINVAL",
        "ENOENT",
        "EEXIST",
        "ETIMEDOUT",
        "EIO",
        "ENOSYS",
        "ECONFLICT",
        "EINTR",
    }
)

#: Codes that mean "refused by policy" rather than "failed".
DENIAL_CODES: frozenset[str] = frozenset({"EPERM", "EREVOKED", "EEXPIRED", "EBUDGET", "EDENIED"})


class AgentLibOSError(Exception):
    """Root of every error raised by agent-libos."""


class KernelError(AgentLibOSError):
    """A syscall failed or was refused; `.code` is the ABI error code."""

    def __init__(self, code: str, message: str = "") -> None:
        if code not in ERROR_CODES:
            raise ValueError(f"unknown ABI error code {code!r}")
        super().__init__(f"{code}: {message}" if message else code)
        self.code = code
        self.message = message

    @property
    def is_denial(self) -> bool:
        return self.code in DENIAL_CODES

    def to_wire(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message}

    @classmethod
    def from_wire(cls, error: Any) -> KernelError:
        if not isinstance(error, dict):
            return cls("EIO", f"malformed error reply: {error!r}")
        code = error.get("code")
        message = error.get("message", "")
        if code not in ERROR_CODES:
            return cls("EIO", f"unknown error code {code!r}: {message}")
        return cls(code, str(message))


class BusError(AgentLibOSError):
    """The bus itself failed: a socket closed, a peer did not answer, a frame was unreadable."""


class ProtocolError(BusError):
    """A frame did not follow docs/protocol.md."""


class StorageError(AgentLibOSError):
    """The log or a projection could not be read or written."""


class LogCorruptError(StorageError):
    """The log's hash chain does not verify; `.seq` is the first bad entry."""

    def __init__(self, seq: int, reason: str) -> None:
        super().__init__(f"log corrupt at seq {seq}: {reason}")
        self.seq = seq
        self.reason = reason


class LogWriteError(StorageError):
    """An append could not be made durable; the log refuses further appends."""


class ReplayError(AgentLibOSError):
    """A recorded run could not be replayed."""


class NondeterminismError(ReplayError):
    """Replay produced a different decision or state than the recorded run."""


class ScenarioError(AgentLibOSError):
    """A scenario file could not be loaded or run."""
