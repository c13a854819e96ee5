"""Helpers for tests of processes a host runs across stops, restarts and hibernation: a model that
records what the agent showed it, an observer of tool replies, a world and a runtime on it."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agentlibos.actors import ScriptedModel
from agentlibos.bus import EventStream, KernelClient, Reply, Topic
from agentlibos.kernel._models import CompletionRequest
from agentlibos.runtime import Grant, Runtime

DOCS = Grant("fs", {"root": "docs"}, ["read"], name="docs")
EVERYTHING = Grant("fs", {"root": "."}, ["read"], name="all")


class Observer:
    """Every tool call's reply, in order; tests wait on the count, never on time."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.replies: list[Reply] = []

    def tool_result(self, pid: int, image: str, call: dict[str, Any], reply: Reply) -> None:
        with self.cond:
            self.replies.append(reply)
            self.cond.notify_all()

    def wait_for(self, n: int, timeout_s: float = 30) -> list[Reply]:
        with self.cond:
            assert self.cond.wait_for(lambda: len(self.replies) >= n, timeout_s), f"saw {len(self.replies)} of {n}"
            return list(self.replies)


class Recording:
    """A scripted model that keeps every request: what the agent showed the model. `inner` may be
    replaced to script the next turn."""

    def __init__(self, scripts: dict[str, list[dict[str, Any]]]) -> None:
        self.inner = ScriptedModel(scripts)
        self.requests: list[CompletionRequest] = []

    def complete(self, request: CompletionRequest) -> Any:
        self.requests.append(request)
        return self.inner.complete(request)


def world(tmp_path: Path) -> Path:
    """docs/a.txt ("alpha") and secret.txt under TMP_PATH/world."""
    root = tmp_path / "world"
    (root / "docs").mkdir(parents=True, exist_ok=True)
    (root / "docs" / "a.txt").write_text("alpha")
    (root / "secret.txt").write_text("secret")
    return root


def session(tmp_path: Path, model: Any = None, observer: Observer | None = None, **config: Any) -> Runtime:
    """A runtime on TMP_PATH/state (not started) whose processes ask MODEL."""
    return Runtime(tmp_path / "state", world_root=world(tmp_path), ipc=False,
                   models={"scripted": model or ScriptedModel({})}, observer=observer, **config)


def next_event(events: EventStream, match: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
    while True:
        ev = events.next_event(timeout_s=30)
        assert ev is not None, "the event did not come"
        if match(ev[1]):
            return ev[1]


class Asking:
    """A request that waits for a human's approval, made from another thread: `id` is its
    approval's, `reply()` waits for its answer."""

    def __init__(self, rt: Runtime, client: KernelClient, pid: int, sys: str, args: dict[str, Any],
                 cap: str | None = None) -> None:
        self._replies: list[Reply] = []
        with rt.events(Topic.approval()) as events:
            self._thread = threading.Thread(target=lambda: self._replies.append(client.request(sys, args, cap=cap)),
                                            daemon=True)
            self._thread.start()
            self.id = next_event(events, lambda b: b.get("event") == "asked" and b.get("pid") == pid)["id"]

    def reply(self, timeout_s: float = 30) -> Reply:
        self._thread.join(timeout_s)
        assert self._replies, "the request got no reply"
        return self._replies[0]
