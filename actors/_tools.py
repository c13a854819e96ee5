"""Builtin tools: the model-visible face of syscalls (`fs.read` -> `fs_read`)."""

from __future__ import annotations

from typing import Any

#: Tools whose syscall name is not simply the first '_' turned into '.'.
_SPECIAL = {"mcp_list_tools": "mcp.list_tools"}


def syscall_for(tool: str) -> str:
    if tool in _SPECIAL:
        return _SPECIAL[tool]
    head, sep, rest = tool.partition("_")
    return f"{head}.{rest}" if sep else tool


def tool_definitions(tools: tuple[str, ...]) -> list[dict[str, Any]]:
    """Definitions handed to the model. Input is free-form here: the kernel validates arguments."""
    return [
        {
            "name": t,
            "description": f"Make the {syscall_for(t)} syscall. Pass `cap` to name the capability handle to use.",
            "input_schema": {"type": "object", "additionalProperties": True},
        }
        for t in tools
    ]
