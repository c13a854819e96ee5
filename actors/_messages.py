"""Messages an AgentProcess actor receives: immutable, the actor's public surface."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, slots=True)
class Input:
    """A message for the agent: starts a turn."""

    content: Any


@dataclass(frozen=True, slots=True)
class Stop:
    """The kernel ended the process (killed); drop everything."""

    reason: str = "killed"


@dataclass(frozen=True, slots=True)
class Park:
    """The host is stopping, or hibernating a process idle too long: an idle process (between
    turns) answers with its affordances, so that it can carry on after a clean restart or when it
    wakes; a busy one answers None (mid-turn, it cannot answer)."""


@dataclass(frozen=True, slots=True)
class Restore:
    """The operator rolled the process back to a checkpoint: from its next turn, the model sees the
    checkpoint's conversation and JIT tools (the kernel restored the authority side already)."""

    affordances: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class ProcessSpec:
    """What the host needs to start a process the kernel has decided to start."""

    pid: int
    ppid: int | None
    token: str
    image: str
    model: str
    prompt: str
    tools: tuple[str, ...]
    input: Any = None
    daemon: bool = False
    jit_tools: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    #: A fork starts from a checkpoint's affordances: its conversation and JIT tools (and a
    #: process resumed after a restart from those its host parked).
    restored: Mapping[str, Any] | None = None
    #: Skill instructions the process had loaded (a process resumed after a restart).
    instructions: tuple[str, ...] = ()
