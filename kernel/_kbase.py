"""The state every part of the Kernel shares, typed in one place: the Kernel's mixins inherit it,
and it declares the core methods (defined on Kernel in _kernel.py) that they call.
"""

from __future__ import annotations

import collections
import concurrent.futures
from typing import TYPE_CHECKING, Any

import msgpack
import pykka
import zmq

from agentlibos.bus import Command, KernelError, Publisher, Reply, Request, RouterSet, Topic
from agentlibos.kernel._budget import BudgetTree
from agentlibos.kernel._caps import CapTable
from agentlibos.kernel._commit import Outputs
from agentlibos.kernel._config import KernelConfig
from agentlibos.kernel._kstate import Approval, Caller, Outcome, Parked, Pending, Proc
from agentlibos.kernel._models import ModelBackend
from agentlibos.kernel._provider import Provider
from agentlibos.kernel._table import SyscallSpec
from agentlibos.storage import LogBackend


class KernelBase(pykka.ThreadingActor):
    """What a Kernel holds: `Kernel.__init__` (and `on_start`, for the sockets) sets each attribute."""

    config: KernelConfig
    _tick: float
    syscalls: dict[str, SyscallSpec]
    _ext: dict[str, Provider]
    kinds: frozenset[str]
    log: LogBackend
    _ctx: zmq.Context[Any]
    _endpoints: list[str]
    _event_endpoints: list[str]
    models: dict[str, ModelBackend]
    caps: CapTable
    budgets: BudgetTree
    procs: dict[int, Proc]
    images: dict[str, dict[str, Any]]
    checkpoints: dict[int, dict[str, Any]]
    unresolved: dict[int, dict[str, Any]]
    _next_ckpt: int
    memory: dict[str, dict[str, Any]]
    approvals: dict[int, Approval]
    _approval_ids: int
    _approval_times: dict[int, list[float]]
    #: (pid, rendering digest) -> approval id: approved after a restart, for one retry of that effect.
    _approved_carried: dict[tuple[int, str], int]
    _conns: dict[bytes, Caller]
    _ended_conns: dict[bytes, tuple[int, str]]
    _tokens: dict[str, int]
    _token_digests: dict[str, int]  # sha256 of a resumed process's token -> pid, until its hello
    _host_conn: bytes | None
    _host_backlog: list[Command]
    _next_pid: int
    _tickets: int
    _pending: dict[int, Pending]
    _parked: dict[int, Parked]
    _exit_waiters: dict[int, list[int]]
    _receivers: dict[tuple[int, str], list[int]]
    queues: dict[int, dict[str, collections.deque[dict[str, Any]]]]
    _out: Outputs
    _dirty: bool
    _round_started: float | None
    _recent: dict[bytes, float]
    failed: str | None
    bound: bool
    _executor: concurrent.futures.ThreadPoolExecutor
    _routers: RouterSet
    _pub: Publisher

    def _post(self, msg: Any) -> None:
        """From any thread (a timer, an effect, a provider): a message for this kernel's own loop;
        a kernel that has stopped takes none."""
        try:
            self.actor_ref.tell(msg)
        except pykka.ActorDeadError:
            pass

    def _check_value_size(self, value: Any, what: str) -> int:
        """A value a process stores or sends (memory, messages) must encode, within the size limit;
        returns its encoded size."""
        try:
            size = len(msgpack.packb(value, use_bin_type=True))
        except Exception:
            raise KernelError("EINVAL", f"the {what} is not msgpack-serializable") from None
        if size > self.config.mem_value_max_bytes:
            raise KernelError("EINVAL", f"{what} of {size} bytes exceeds the {self.config.mem_value_max_bytes}-byte limit")
        return size

    if TYPE_CHECKING:  # defined on Kernel: the clock, the log, replies and the request path
        def clock(self) -> float: ...

        def _stage(self, kind: str, body: dict[str, Any], *, pid: int | None = None, cause: int | None = None,
                   payload: Any = None, has_payload: bool = False) -> int: ...

        def _reply(self, conn: bytes, reply: Reply) -> None: ...

        def _event(self, topic: Topic, body: dict[str, Any]) -> None: ...

        def _request(self, conn: bytes, caller: Caller, req: Request) -> None: ...

        def _carry_out(self, conn: bytes, rid: int, proc: Proc, spec: SyscallSpec, outcome: Outcome,
                       seq: int) -> None: ...

        def _finish(self, conn: bytes, rid: int, pid: int, sys: str, cause: int, value: Any,
                    error: KernelError | None) -> None: ...

        def _skill_instructions(self, names: list[str]) -> list[str]: ...
