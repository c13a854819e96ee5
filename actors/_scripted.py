"""ScriptedModel: a model that plays a fixed script of tool calls, one step per turn.

Scenarios and tests drive agents with it; it fits the same backend interface as a real model
(`complete(request)` -> turn with `to_value()`), so the kernel mediates it exactly like one.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from agentlibos.bus._turn import Completion


#: A scripted model turn (the kernel's `Completion`; scripted turns say model "scripted").
ModelTurn = Completion


END_TURN = ModelTurn(content=[{"type": "text", "text": ""}], stop_reason="end_turn", model="scripted", final=True)


@dataclass(slots=True)
class _Cursor:
    script: str | None
    index: int = 0
    explicit_call_pending: bool = False


class ScriptedModel:
    """Plays `scripts[name]` for each process; a process plays the script named after its image
    unless `assign(pid, name)` chose another. Steps are `{tool, args, cap?, ...}` or `{operator: ...}`.
    """

    def __init__(
        self,
        scripts: Mapping[str, Sequence[Mapping[str, Any]]],
        *,
        on_step: Callable[[int, str, int, Mapping[str, Any]], None] | None = None,
        on_operator: Callable[[int, str, int, Mapping[str, Any]], None] | None = None,
        substitute: Callable[[Any], Any] | None = None,
        choose: Callable[[int, str], str | None] | None = None,
    ) -> None:
        self.scripts = {k: list(v) for k, v in scripts.items()}
        self._on_step = on_step
        self._on_operator = on_operator
        self._substitute = substitute or (lambda a: a)
        # Which script a new process plays (default: the one named after its image).
        self._choose = choose
        self._cursors: dict[int, _Cursor] = {}
        self._assigned: dict[int, str | None] = {}
        self._lock = threading.Lock()

    def assign(self, pid: int, script: str | None) -> None:
        with self._lock:
            self._assigned[pid] = script

    def explicit_refused(self, pid: int) -> None:
        """An explicit llm_complete step was refused before it reached the model: the next
        completion for `pid` is its own turn again."""
        with self._lock:
            cur = self._cursors.get(pid)
            if cur is not None:
                cur.explicit_call_pending = False

    def position(self, pid: int) -> tuple[str | None, int] | None:
        with self._lock:
            c = self._cursors.get(pid)
            return None if c is None else (c.script, c.index)

    def complete(self, request: Any) -> ModelTurn:
        pid, image = request.pid, request.image
        with self._lock:
            cur = self._cursors.get(pid)
            if cur is None:
                if pid in self._assigned:
                    name = self._assigned.pop(pid)
                elif self._choose is not None:
                    name = self._choose(pid, image)
                else:
                    name = image
                cur = self._cursors[pid] = _Cursor(name if name in self.scripts else None)
            if cur.explicit_call_pending:
                cur.explicit_call_pending = False
                return ModelTurn(content=[{"type": "text", "text": ""}], stop_reason="end_turn", model="scripted")
        steps = self.scripts.get(cur.script, []) if cur.script else []
        while cur.index < len(steps) and "operator" in steps[cur.index]:
            idx = cur.index
            cur.index += 1
            if self._on_operator is not None:
                self._on_operator(pid, cur.script or "", idx, steps[idx])
        if cur.index >= len(steps):
            return END_TURN
        idx = cur.index
        step = steps[idx]
        cur.index += 1
        args = self._substitute(dict(step.get("args") or {}))
        if step.get("cap") is not None:
            args["cap"] = step["cap"]
        if step.get("tool") == "llm_complete":
            cur.explicit_call_pending = True
        if self._on_step is not None:
            self._on_step(pid, cur.script or "", idx, step)
        return ModelTurn(
            content=[{"type": "tool_use", "id": f"toolu_{pid}_{idx}", "name": step["tool"], "input": args}],
            stop_reason="tool_use",
            model="scripted",
            final=cur.index >= len(steps),
        )
