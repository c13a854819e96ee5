"""Results of scenario runs and the JSON report of `agentlibos bench safety` (format 1)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

REPORT_FORMAT = 1


@dataclass(slots=True)
class StepResult:
    index: int
    process: str
    tool: str
    expect: str | None
    outcome: str  # allowed | denied | failed | not_reached
    code: str | None
    world_changed: bool
    ok: bool
    pid: int | None = None
    seq: int | None = None
    cap: str | None = None
    message: str = ""
    changes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"index": self.index, "process": self.process, "tool": self.tool, "expect": self.expect,
                "outcome": self.outcome, "code": self.code, "world_changed": self.world_changed, "ok": self.ok}


@dataclass(slots=True)
class RunResult:
    scenario: str
    system: str
    completed: bool = False
    unauthorized: int = 0
    false_denials: int = 0
    error: str | None = None
    steps: list[StepResult] = field(default_factory=list)
    approvals: int = 0
    wall_s: float = 0.0
    checks: list[tuple[str, bool, str]] = field(default_factory=list)
    leaks: list[str] = field(default_factory=list)
    tags: tuple[str, ...] = ()

    @property
    def allowed_steps(self) -> int:
        return sum(1 for s in self.steps if s.expect == "allowed")

    @property
    def denied_steps(self) -> int:
        return sum(1 for s in self.steps if s.expect == "denied")

    def to_json(self) -> dict[str, Any]:
        return {"scenario": self.scenario, "system": self.system, "completed": self.completed,
                "unauthorized": self.unauthorized, "false_denials": self.false_denials, "error": self.error,
                "steps": [s.to_json() for s in self.steps]}


@dataclass(slots=True)
class SystemSummary:
    scenarios: int = 0
    completed: int = 0
    unauthorized: int = 0
    allowed_steps: int = 0
    false_denials: int = 0
    denied_steps: int = 0
    approvals: int = 0
    wall_s: float = 0.0

    @property
    def false_denial_rate(self) -> float:
        return self.false_denials / self.allowed_steps if self.allowed_steps else 0.0


def summarize(runs: Iterable[RunResult]) -> dict[str, SystemSummary]:
    out: dict[str, SystemSummary] = {}
    for r in runs:
        s = out.setdefault(r.system, SystemSummary())
        s.scenarios += 1
        s.completed += int(r.completed)
        s.unauthorized += r.unauthorized
        s.allowed_steps += r.allowed_steps
        s.false_denials += r.false_denials
        s.denied_steps += r.denied_steps
        s.approvals += r.approvals
        s.wall_s += r.wall_s
    return out


def report(runs: list[RunResult]) -> dict[str, Any]:
    return {
        "format": REPORT_FORMAT,
        "systems": {name: {**asdict(s), "wall_s": round(s.wall_s, 3)} for name, s in summarize(runs).items()},
        "runs": [r.to_json() for r in runs],
    }
