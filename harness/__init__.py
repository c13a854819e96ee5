"""The scenario harness: loader, world builder and observer, runners per system, the safety benchmark."""

from agentlibos.harness._baselines import run_confirm, run_direct, run_sandbox
from agentlibos.harness._bench import SYSTEMS, run_bench, scenario_paths
from agentlibos.harness._libos import Judge, judge_step, outcome_of, run_libos
from agentlibos.harness._results import REPORT_FORMAT, RunResult, StepResult, SystemSummary, report, summarize
from agentlibos.harness._scenario import (
    BUILTIN_TOOLS,
    ROOT_IMAGE,
    SCHEMA,
    Scenario,
    Step,
    find_scenarios,
    load_scenario,
    parse_scenario,
)
from agentlibos.harness._world import Snapshot, World

__all__ = [
    "BUILTIN_TOOLS",
    "Judge",
    "REPORT_FORMAT",
    "ROOT_IMAGE",
    "RunResult",
    "SCHEMA",
    "SYSTEMS",
    "Scenario",
    "Snapshot",
    "Step",
    "StepResult",
    "SystemSummary",
    "World",
    "find_scenarios",
    "judge_step",
    "load_scenario",
    "outcome_of",
    "parse_scenario",
    "report",
    "run_bench",
    "run_confirm",
    "run_direct",
    "run_libos",
    "run_sandbox",
    "scenario_paths",
    "summarize",
]
