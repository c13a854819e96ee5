"""`bench safety`: every scenario on every requested system (baselines and ablations included); the
runs feed the JSON report (_results) and the Markdown report with its chart (_report)."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from pathlib import Path

from agentlibos.bus import ScenarioError
from agentlibos.harness._baselines import run_confirm, run_direct, run_sandbox
from agentlibos.harness._libos import run_libos
from agentlibos.harness._results import RunResult, mechanisms_of
from agentlibos.harness._scenario import Scenario, find_scenarios, load_scenario

SYSTEMS: dict[str, Callable[[Scenario], RunResult]] = {
    "libos": run_libos, "direct": run_direct, "confirm": run_confirm, "sandbox": run_sandbox,
}
#: Ablations: libos with one mechanism switched off (KernelConfig.ablate), to show what each one prevents.
ABLATIONS = ("attenuation", "approvals", "confinement", "cascade", "jit-sandbox")
for _mechanism in ABLATIONS:
    SYSTEMS[f"libos-no-{_mechanism}"] = functools.partial(run_libos, ablate=(_mechanism,))


def run_bench(
    paths: Iterable[Path],
    systems: Iterable[str],
    *,
    progress: Callable[[str, str, RunResult], None] | None = None,
) -> list[RunResult]:
    runs: list[RunResult] = []
    systems = list(systems)
    for path in paths:
        try:
            scenario: Scenario | None = load_scenario(path)
            sid = scenario.id if scenario else path.stem
            load_error = None
        except ScenarioError as exc:
            scenario, sid, load_error = None, path.stem, str(exc)
        for system in systems:
            if scenario is None:
                r = RunResult(scenario=sid, system=system, error=load_error)
            else:
                try:
                    r = SYSTEMS[system](scenario)
                except Exception as exc:  # one broken run must not stop the benchmark
                    r = RunResult(scenario=sid, system=system, error=f"{type(exc).__name__}: {exc}",
                                  tags=scenario.tags)
                r.mechanisms = mechanisms_of(scenario)
            runs.append(r)
            if progress:
                progress(sid, system, r)
    return runs


def scenario_paths(root: str | Path) -> list[Path]:
    return find_scenarios(root)
