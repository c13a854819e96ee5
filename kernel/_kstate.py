"""The Kernel's records and messages: what the actor receives from other threads, what it keeps
per process, approval and waiting request, and the Outcome in which a provider decides a call.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from agentlibos.bus import KernelError, Request
from agentlibos.kernel._caps import CapRecord

if TYPE_CHECKING:
    from agentlibos.kernel._kernel import Kernel

LIVE = ("embryo", "ready", "running", "blocked", "suspended", "needs_attention")
OPERATOR = 0  # the author recorded for operator requests


# --- messages the Kernel actor receives (immutable; the bus thread and workers send them) ------


@dataclass(frozen=True, slots=True)
class EffectDone:
    ticket: int
    value: Any = None
    error: KernelError | None = None


@dataclass(frozen=True, slots=True)
class TimerFired:
    key: int


@dataclass(frozen=True, slots=True)
class ApprovalTimeout:
    id: int


@dataclass(frozen=True, slots=True)
class DeadlineFired:
    pid: int
    token: int


@dataclass(frozen=True, slots=True)
class ProviderNotice:
    """A provider's notice (e.g. an MCP tool description changed): logged and published."""

    kind: str
    body: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Inspect:
    """Run a read-only function on the kernel thread (tests and the runtime use it)."""

    fn: Callable[[Kernel], Any]


# --- kernel-side state -------------------------------------------------------------------------


@dataclass(slots=True)
class Proc:
    pid: int
    ppid: int | None
    image: str
    model: str
    token: str
    daemon: bool
    state: str = "embryo"
    conn: bytes | None = None
    children: set[int] = field(default_factory=set)
    status: str | None = None
    result: Any = None
    input: Any = None
    # Affordances (what the model sees); never authority.
    jit_tools: dict[str, dict[str, Any]] = field(default_factory=dict)
    skills: list[str] = field(default_factory=list)
    conversation: dict[str, Any] = field(default_factory=dict)
    origin: str = "spawn"  # spawn | boot | fork
    held: list[tuple[bytes, Request]] = field(default_factory=list)  # requests waiting while suspended
    resume_state: str = "ready"
    #: The operator interrupted the current turn: the next syscall (other than proc.exit) gets EINTR.
    interrupt: bool = False
    #: What the operator may let this process ask for with cap.request (grant specs); none by default.
    requestable: list[dict[str, Any]] = field(default_factory=list)
    deadline: float | None = None
    #: Run by an outside client (op.spawn external), not by a process host: it can outlive a
    #: clean kernel restart, saying hello again with its token.
    external: bool = False
    deadline_timer: threading.Timer | None = None


@dataclass(slots=True)
class Approval:
    id: int
    pid: int
    sys: str
    kind: str  # effect | question
    rendering: dict[str, Any]
    created: float
    conn: bytes
    rid: int
    decision_seq: int
    outcome: Any
    cap: CapRecord | None
    timer: threading.Timer | None = None
    #: For an approval that outlived a restart: the digest of the effect's rendering, which a
    #: retry of the same request must match to wait on it (or to use its "yes").
    carried: str = ""

    def view(self) -> dict[str, Any]:
        return {"id": self.id, "pid": self.pid, "sys": self.sys, "kind": self.kind, "rendering": self.rendering,
                "created": self.created}


@dataclass(slots=True)
class Caller:
    role: str
    pid: int


@dataclass(slots=True)
class Pending:
    """A request whose reply waits for its effect (or its condition) and the next commit."""

    conn: bytes
    rid: int
    pid: int
    sys: str
    decision_seq: int
    charge_after: Callable[[Any], None] | None = None
    started: float = field(default_factory=time.monotonic)
    observe: dict[str, Any] | None = None


@dataclass(slots=True)
class Parked:
    """A request that waits on a condition (a process's exit, a message); replied to on resume."""

    conn: bytes
    rid: int
    pid: int
    sys: str
    decision_seq: int
    timer: threading.Timer | None = None


class Outcome:
    """What a provider decided: deny with a code, or allow with a value, an effect, or a park."""

    __slots__ = ("code", "message", "cap", "value", "effect", "parked", "extra_charges", "detail", "after", "apply",
                 "park", "check_only", "human_question", "must_approve", "observe")

    def __init__(self) -> None:
        self.code: str | None = None
        self.message = ""
        self.cap: CapRecord | None = None
        self.value: Any = None
        self.effect: Callable[[], Any] | None = None
        self.parked = False
        self.extra_charges: dict[str, float] = {}
        self.check_only: dict[str, float] = {}
        self.human_question: dict[str, Any] | None = None
        #: The provider asks for a human whatever the capability says (git push...).
        self.must_approve = False
        #: For llm.complete: what the call record needs besides the result (model, request, secrets).
        self.observe: dict[str, Any] | None = None
        self.detail: dict[str, Any] | None = None
        self.after: Callable[[Any], None] | None = None
        # Runs on the kernel thread right after the decision is logged; returns the value.
        self.apply: Callable[[int], Any] | None = None
        # Parks the request: called with the park key once the decision is logged.
        self.park: Callable[[int], None] | None = None

    @classmethod
    def deny(cls, code: str, message: str) -> Outcome:
        o = cls()
        o.code, o.message = code, message
        return o

    @classmethod
    def allow(cls, cap: CapRecord | None, *, value: Any = None, effect: Callable[[], Any] | None = None,
              extra: dict[str, float] | None = None, detail: dict[str, Any] | None = None,
              apply: Callable[[int], Any] | None = None) -> Outcome:
        o = cls()
        o.apply = apply
        o.cap, o.value, o.effect = cap, value, effect
        o.extra_charges = extra or {}
        o.detail = detail
        return o

    def close(self) -> None:
        closer = getattr(self.effect, "close", None)
        if closer is not None:
            closer()
