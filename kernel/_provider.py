"""Effect providers that plug into the kernel: a capability kind, its syscalls, how a capability
of that kind covers a call, and the effect itself. The kernel does the rest (caller identity,
capability lookup, budgets, logging before the effect, running it off the kernel thread).

Built-in providers (rpc, ...) and Runtime Modules register the same way, at kernel start only.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from agentlibos.bus._errors import KernelError
from agentlibos.kernel._table import SyscallSpec

_INT_MIN, _INT_MAX = -(1 << 63), (1 << 64) - 1  # what the bus (msgpack) can carry


def check_bus_value(value: Any, what: str) -> None:
    """A provider's result must be something the bus can carry (JSON values, 64-bit integers);
    anything else is EIO naming `what` produced it."""
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, bool) or v is None or isinstance(v, (str, float)):
            continue
        if isinstance(v, int):
            if not _INT_MIN <= v <= _INT_MAX:
                raise KernelError("EIO", f"{what} result has an integer out of range")
        elif isinstance(v, list):
            stack.extend(v)
        elif isinstance(v, dict):
            stack.extend(v.values())


@dataclass(frozen=True, slots=True)
class CallInfo:
    """What an effect may know about its caller: never more than the kernel decided."""

    pid: int
    sys: str
    handle: str
    scope: Mapping[str, Any]
    seq: int = 0


@dataclass(frozen=True, slots=True)
class Provider:
    kind: str
    syscalls: tuple[SyscallSpec, ...]
    #: covers(scope, sys, args) -> True when a capability with this scope authorizes the call
    #: (the kernel has already checked the right named in the syscall's row).
    covers: Callable[[Mapping[str, Any], str, Mapping[str, Any]], bool]
    #: run(args, info) -> value, on an effect worker thread; raise KernelError for a typed failure.
    run: Callable[[Mapping[str, Any], CallInfo], Any]
    #: The kernel's own rendering of the effect for the log and for approvers (never the model's words).
    describe: Callable[[str, Mapping[str, Any]], dict[str, Any]] | None = None
    #: Scope fields of this kind and their types ("str", "num", "list[str]", ...), for validation.
    scope_keys: Mapping[str, str] = field(default_factory=dict)
    #: Narrowing check for derived capabilities; default: generic (lists subset, numbers <=, strings equal).
    within: Callable[[Mapping[str, Any], Mapping[str, Any]], bool] | None = None
    close: Callable[[], None] | None = None
    #: Called once at kernel start with sink(body); the provider may call it from any thread for
    #: notices the kernel logs (kind "<kind>.notice") and publishes on "<kind>/".
    attach: Callable[[Callable[[dict[str, Any]], None]], None] | None = None
    #: Called (on the kernel thread) when a process ends, to release what it held (sessions...).
    on_exit: Callable[[int], None] | None = None
    #: needs_approval(sys, args) -> True when this call waits for a human whatever its capability
    #: says (a push, a payment...). An error in it counts as True.
    needs_approval: Callable[[str, Mapping[str, Any]], bool] | None = None
