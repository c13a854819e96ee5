"""Agents as actors: the AgentProcess, the process host that runs them, and model adapters."""

from agentlibos.actors._host import ProcessHost
from agentlibos.actors._llm import (
    AnthropicModel,
    LLMTurn,
    OpenAIChatModel,
    ReplayModel,
)
from agentlibos.bus._observe import call_record, estimate_cost, redact
from agentlibos.actors._jit import JitResult, JitRunner, JitSourceError, validate_source
from agentlibos.actors._messages import Input, ProcessSpec, Stop
from agentlibos.actors._process import AgentProcess, ToolObserver
from agentlibos.actors._scripted import END_TURN, ModelTurn, ScriptedModel
from agentlibos.actors._tools import syscall_for, tool_definitions

__all__ = [
    "AgentProcess",
    "AnthropicModel",
    "LLMTurn",
    "OpenAIChatModel",
    "ReplayModel",
    "call_record",
    "estimate_cost",
    "redact",
    "END_TURN",
    "Input",
    "JitResult",
    "JitRunner",
    "JitSourceError",
    "ModelTurn",
    "ProcessHost",
    "ProcessSpec",
    "ScriptedModel",
    "Stop",
    "ToolObserver",
    "syscall_for",
    "tool_definitions",
    "validate_source",
]
