"""The kernel: the Kernel actor, capabilities, the syscall table, budgets and effect providers."""

from agentlibos.kernel._budget import DIMENSIONS, BudgetNode, BudgetTree, parse_budget
from agentlibos.kernel._caps import GRANT_FIELDS, KIND_RIGHTS, KINDS, CapRecord, CapTable, Narrow, scope_within, validate_scope
from agentlibos.kernel._config import KernelConfig
from agentlibos.kernel._inbox import Inbound
from agentlibos.kernel._kagent import read_skill_folder
from agentlibos.kernel._kernel import LIVE, EffectDone, Inspect, Kernel
from agentlibos.kernel._mcp import McpToolChange, make_mcp_provider, mcp_within, tool_hash
from agentlibos.kernel._models import Completion, CompletionRequest, ModelBackend
from agentlibos.kernel._provider import CallInfo, Provider
from agentlibos.kernel._pty import make_pty_provider
from agentlibos.kernel._replay import ReplayReport, replay, replay_log
from agentlibos.kernel._rpc import make_rpc_provider, normalize_url, rpc_within
from agentlibos.kernel._table import ADDITIONS, NOT_YET, SYSCALLS, ArgSpec, SyscallSpec, tool_name

__all__ = [
    "ADDITIONS",
    "LIVE",
    "read_skill_folder",
    "ArgSpec",
    "BudgetNode",
    "BudgetTree",
    "CapRecord",
    "CallInfo",
    "CapTable",
    "Completion",
    "CompletionRequest",
    "DIMENSIONS",
    "EffectDone",
    "GRANT_FIELDS",
    "Inbound",
    "Inspect",
    "KINDS",
    "KIND_RIGHTS",
    "Kernel",
    "KernelConfig",
    "McpToolChange",
    "ModelBackend",
    "NOT_YET",
    "Narrow",
    "Provider",
    "ReplayReport",
    "SYSCALLS",
    "SyscallSpec",
    "make_mcp_provider",
    "make_pty_provider",
    "make_rpc_provider",
    "mcp_within",
    "normalize_url",
    "parse_budget",
    "replay",
    "replay_log",
    "rpc_within",
    "scope_within",
    "tool_hash",
    "tool_name",
    "validate_scope",
]
