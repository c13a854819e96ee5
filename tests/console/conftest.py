"""Fixtures for the console: an embedded Runtime with a scripted model, served on 127.0.0.1:0."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from agentlibos.actors import ScriptedModel
from agentlibos.bus import Topic
from agentlibos.console import ConsoleServer
from agentlibos.runtime import Grant, Runtime
from tests.conftest import REPO

ARTIFACTS = REPO / "test-artifacts" / "console"

#: Agent-supplied text that must show as written and never execute.
SCRIPT = "<script>document.title='pwned';alert('xss')</script>"
HTML = "<b id=injected>bold</b><img src=x onerror=\"document.title='pwned'\">"
ANSI = "\x1b[31mred\x1b[0m"
PAYLOAD = SCRIPT + HTML + ANSI
EVIL_NAME = "<img src=x onerror=alert(1)>.txt"


@dataclass
class Env:
    rt: Runtime
    server: ConsoleServer
    model: ScriptedModel
    world: Path

    def image(self, name: str, steps: Sequence[Mapping[str, Any]]) -> str:
        """Register image NAME whose processes play STEPS (one tool call per model turn)."""
        self.model.scripts[name] = [dict(s) for s in steps]
        self.rt.register_image(name, prompt="You work.", tools=["fs_write", "fs_read"])
        return name

    def start(self, image: str, caps: Sequence[Grant], budget: Mapping[str, float] | None = None) -> int:
        pid = self.rt.spawn(image, caps=list(caps), budget=dict(budget or {"llm_calls": 50, "syscalls": 200}))
        self.rt.send(pid, "Do the work.")
        return pid

    def pending(self, pid: int | None = None) -> list[dict[str, Any]]:
        return [a for a in self.rt.operator.call("op.approvals")["approvals"] if pid is None or a["pid"] == pid]

    def wait_for(self, predicate: Callable[[], Any], timeout_s: float = 15, what: str = "condition",
                 topic: Topic = Topic.approval()) -> Any:
        """PREDICATE's first truthy value, checked again on each kernel event on TOPIC (and every
        half second, for an event sent before the subscription took hold)."""
        deadline = time.monotonic() + timeout_s
        with self.rt.events(topic) as events:
            while True:
                value = predicate()
                if value:
                    return value
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"timed out waiting for {what}")
                events.next_event(min(left, 0.5))


def ws() -> Grant:
    return Grant("fs", {"root": "workspace"}, ["read", "write", "create"], name="ws")


def gate() -> Grant:
    """A capability whose every use waits for a human."""
    return Grant("fs", {"root": "outbox"}, ["write", "create"], name="gate", approval="always")


def start_evil(env: Env) -> int:
    """An agent whose file names, contents and approval request carry script, HTML and ANSI;
    returns its pid once it waits for a human."""
    path = f"workspace/{EVIL_NAME}"
    env.image("evil", [
        {"tool": "fs_write", "args": {"path": path, "data": PAYLOAD}, "cap": "ws"},
        {"tool": "fs_read", "args": {"path": path}, "cap": "ws"},
        {"tool": "fs_write", "args": {"path": f"outbox/{EVIL_NAME}", "data": PAYLOAD}, "cap": "gate"},
    ])
    pid = env.start("evil", [ws(), gate()])
    env.wait_for(lambda: env.pending(pid), what="a pending approval")
    return pid


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    world = tmp_path / "world"
    (world / "workspace").mkdir(parents=True)
    (world / "outbox").mkdir()
    model = ScriptedModel({})
    with Runtime(tmp_path / "state", world_root=world, models={"scripted": model}, ipc=False) as rt:
        with ConsoleServer(rt) as server:
            yield Env(rt, server, model, world)


@pytest.fixture(scope="session")
def artifacts() -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return ARTIFACTS
