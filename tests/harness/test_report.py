"""The benchmark's breakdowns (capability kind, evolution mechanism, ablations), the JSON report
(format 2), and the Markdown report with its chart; the README's scenario example runs.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner

from agentlibos.cli import main
from agentlibos.harness import (
    MECHANISMS,
    REPORT_FORMAT,
    SYSTEMS,
    RunResult,
    StepResult,
    blame,
    by_kind,
    by_mechanism,
    find_scenarios,
    load_scenario,
    markdown,
    mechanisms_of,
    parse_scenario,
    report,
    run_libos,
    step_kind,
    summarize,
    write_chart,
    write_report,
)
from agentlibos.harness import ablations as ablations_of
from tests.conftest import REPO


def _step(index: int, tool: str, expect: str, outcome: str, *, changed: bool = False, pid: int = 1,
          seq: int | None = None, changes: list[str] | None = None) -> StepResult:
    ok = {"allowed": outcome == "allowed", "denied": outcome == "denied" and not changed}.get(expect, False)
    return StepResult(index=index, process="root", tool=tool, expect=expect, outcome=outcome,
                      code=None if outcome == "allowed" else "EPERM", world_changed=changed, ok=ok, pid=pid,
                      seq=seq if seq is not None else index + 1, changes=changes or [])


def _runs() -> list[RunResult]:
    """Three systems on two scenarios, each step's outcome chosen to exercise one rule."""
    s1_steps = lambda outcome, changed: [  # noqa: E731 -- a tiny builder read once
        _step(0, "fs_read", "allowed", "allowed"),
        _step(1, "fs_write", "denied", "denied"),
        _step(2, "peek", "denied", outcome, changed=changed, changes=["+workspace/dropped.txt"] if changed else []),
        _step(3, "tool_define", "allowed", "allowed"),
    ]
    libos_s1 = RunResult("s1", "libos", completed=True, steps=s1_steps("denied", False), mechanisms=("jit",))
    # The JIT tool wrote a file and returned the secret: two unauthorized effects, both the tool's.
    ablated_s1 = RunResult("s1", "libos-no-jit-sandbox", unauthorized=2, steps=s1_steps("allowed", True),
                           leaks=["secret reached the model in the result of peek (pid 1, step 2)"],
                           mechanisms=("jit",))
    s2_steps = lambda: [  # noqa: E731
        _step(0, "shell_exec", "allowed", "denied"),  # a false denial
        _step(1, "rpc_call", "allowed", "allowed", changed=True, changes=["+out/copy.txt", "rpc crm x"]),
        _step(2, "mem_put", "denied", "denied"),
    ]
    libos_s2 = RunResult("s2", "libos", false_denials=1, steps=s2_steps(), mechanisms=("child", "memory"))
    # A secret written to a file an allowed step created, and one no step can be blamed for.
    direct_s2 = RunResult("s2", "direct", unauthorized=2, false_denials=1, steps=s2_steps(),
                          leaks=["secret written to out/copy.txt", "secret written to elsewhere.txt"],
                          mechanisms=("child", "memory"))
    ablated_s2 = RunResult("s2", "libos-no-jit-sandbox", false_denials=1, steps=s2_steps(),
                           mechanisms=("child", "memory"))
    return [libos_s1, ablated_s1, libos_s2, direct_s2, ablated_s2]


# --- classification ----------------------------------------------------------------------------


@pytest.mark.parametrize("tool, kind", [
    ("fs_read", "fs"), ("fs_mkdir", "fs"), ("shell_exec", "shell"), ("mem_put", "memory"),
    ("llm_complete", "llm"), ("proc_spawn", "proc"), ("msg_send", "msg"), ("human_ask", "human"),
    ("ckpt_fork", "checkpoint"), ("image_boot", "image"), ("image_commit", "image"),
    ("rpc_call", "rpc"), ("mcp_list_tools", "mcp"), ("mcp_call", "mcp"), ("pty_open", "pty"),
    ("cap_derive", "none"), ("tool_define", "none"), ("skill_load", "none"), ("msg_recv", "none"),
    ("budget_get", "none"), ("summarize_notes", "jit"),
])
def test_step_kind(tool: str, kind: str) -> None:
    assert step_kind(tool) == kind


def _scenario(**body: Any) -> Any:
    data = {"id": "t-mech", "version": 1, "image": {"prompt": "p", "tools": []}, "script": [], **body}
    return parse_scenario(data)


def test_mechanisms_from_declared_fields_and_steps() -> None:
    assert mechanisms_of(_scenario()) == ("none",)
    assert mechanisms_of(_scenario(world={"skills": {"s": {"instructions": "hi", "tools": {}}}})) == ("skill",)
    shipped_tool = {"t": {"description": "d", "input_schema": {}, "source": "export default async () => 1"}}
    assert mechanisms_of(_scenario(world={"skills": {"s": {"instructions": "hi", "tools": shipped_tool}}})) == (
        "skill", "jit")
    assert mechanisms_of(_scenario(world={"memory": {"team": {"k": "v"}}})) == ("memory",)
    rug = {"m": {"tools": {"send": {"description": "a", "input_schema": {}, "returns": "ok",
                                    "description_after_first_list": "b"}}}}
    assert mechanisms_of(_scenario(world={"mcp": rug})) == ("mcp-rug-pull",)
    plain_mcp = {"m": {"tools": {"send": {"description": "a", "input_schema": {}, "returns": "ok"}}}}
    assert mechanisms_of(_scenario(world={"mcp": plain_mcp})) == ("none",)
    steps = [{"tool": t, "args": {}} for t in ("tool_define", "ckpt_fork", "ckpt_restore", "proc_spawn", "mem_get")]
    assert mechanisms_of(_scenario(script=steps)) == ("jit", "fork", "restore", "child", "memory")


def test_image_from_a_checkpoint_is_not_a_registered_image() -> None:
    committed = [{"tool": "image_commit", "args": {"checkpoint": "$cp.checkpoint", "name": "snap"}},
                 {"tool": "image_boot", "args": {"name": "snap"}}]
    assert mechanisms_of(_scenario(script=committed)) == ("ckpt-image",)
    registered = [{"tool": "image_boot", "args": {"name": "worker"}}]
    assert mechanisms_of(_scenario(script=registered, images={"worker": {"prompt": "w", "tools": []}})) == ("image",)
    # in a child's script too
    both = _scenario(script=committed, images={"w": {"script": [{"tool": "image_show", "args": {"name": "other"}}]}})
    assert mechanisms_of(both) == ("image", "ckpt-image")


def test_every_shipped_scenario_has_mechanisms() -> None:
    seen: set[str] = set()
    for path in find_scenarios(REPO / "scenarios"):
        ms = mechanisms_of(load_scenario(path))
        assert ms and set(ms) <= set(MECHANISMS), (path, ms)
        assert ms == ("none",) or "none" not in ms
        seen.update(ms)
    # the shipped set exercises every mechanism
    assert seen == set(MECHANISMS)


# --- breakdowns --------------------------------------------------------------------------------


def test_blame_charges_each_effect_to_its_step() -> None:
    _, ablated_s1, _, direct_s2, _ = _runs()
    culprits = blame(ablated_s1)
    assert [c.tool if c else None for c in culprits] == ["peek", "peek"]
    culprits = blame(direct_s2)
    assert [c.tool if c else None for c in culprits] == ["rpc_call", None]


def test_by_kind() -> None:
    kinds = by_kind(_runs())
    assert list(kinds) == ["libos", "libos-no-jit-sandbox", "direct"]
    libos = kinds["libos"]
    assert list(libos) == ["fs", "memory", "rpc", "shell", "jit", "none"]
    fs = libos["fs"]
    assert (fs.scenarios, fs.unauthorized, fs.allowed_steps, fs.false_denials, fs.attacks, fs.attacks_blocked) == (
        1, 0, 1, 0, 1, 1)
    assert (libos["jit"].attacks, libos["jit"].attacks_blocked, libos["jit"].unauthorized) == (1, 1, 0)
    shell = libos["shell"]
    assert (shell.allowed_steps, shell.false_denials, shell.false_denial_rate) == (1, 1, 1.0)
    jit = kinds["libos-no-jit-sandbox"]["jit"]
    assert (jit.scenarios, jit.unauthorized, jit.attacks, jit.attacks_blocked) == (1, 2, 1, 0)
    assert kinds["libos-no-jit-sandbox"]["fs"].unauthorized == 0
    direct = kinds["direct"]
    assert direct["rpc"].unauthorized == 1 and direct["unattributed"].unauthorized == 1
    assert direct["unattributed"].scenarios == 1 and direct["unattributed"].allowed_steps == 0
    assert list(direct)[-1] == "unattributed"
    # per system, the kinds' effects add up to the system's total
    for system, rows in kinds.items():
        assert sum(b.unauthorized for b in rows.values()) == summarize(_runs())[system].unauthorized


def test_by_mechanism() -> None:
    mechs = by_mechanism(_runs())
    libos = mechs["libos"]
    assert list(libos) == ["jit", "child", "memory"]
    assert (libos["jit"].scenarios, libos["jit"].completed, libos["jit"].allowed_steps, libos["jit"].attacks) == (
        1, 1, 2, 2)
    assert (libos["child"].scenarios, libos["child"].false_denials, libos["memory"].false_denials) == (1, 1, 1)
    assert mechs["libos-no-jit-sandbox"]["jit"].unauthorized == 2
    assert mechs["libos-no-jit-sandbox"]["jit"].attacks_blocked == 1
    assert mechs["direct"]["memory"].unauthorized == 2
    # a run made outside run_bench falls back to tags naming a mechanism, else none
    assert list(by_mechanism([RunResult("x", "libos", tags=("fs", "fork"))])["libos"]) == ["fork"]
    assert list(by_mechanism([RunResult("x", "libos", tags=("fs",))])["libos"]) == ["none"]


def test_ablations_name_what_each_mechanism_prevents() -> None:
    abl = ablations_of(_runs())
    assert list(abl) == ["libos-no-jit-sandbox"]
    a = abl["libos-no-jit-sandbox"]
    assert (a.mechanism, a.unauthorized, a.prevented, a.scenarios, a.completed, a.false_denials) == (
        "jit-sandbox", 2, 2, 2, 0, 1)
    assert a.added == {"s1": 2}
    # what libos itself lets through is not credited to the ablation
    runs = _runs()
    runs[0].unauthorized = 1
    assert ablations_of(runs)["libos-no-jit-sandbox"].added == {"s1": 1}


def test_json_report_format_2() -> None:
    rep = json.loads(json.dumps(report(_runs())))
    assert rep["format"] == REPORT_FORMAT == 2
    assert set(rep) == {"format", "systems", "kinds", "mechanisms", "ablations", "runs"}
    # every format-1 field is still there, unchanged
    assert {"scenarios", "completed", "unauthorized", "allowed_steps", "false_denials", "denied_steps", "approvals",
            "wall_s"} <= set(rep["systems"]["libos"])
    assert rep["systems"]["libos"]["false_denial_rate"] == 0.25
    assert rep["systems"]["libos"]["attacks_blocked"] == 3
    assert rep["kinds"]["libos-no-jit-sandbox"]["jit"] == {
        "scenarios": 1, "completed": 0, "unauthorized": 2, "allowed_steps": 0, "false_denials": 0, "attacks": 1,
        "attacks_blocked": 0}
    assert rep["mechanisms"]["direct"]["child"]["unauthorized"] == 2
    assert rep["ablations"] == {"libos-no-jit-sandbox": {"mechanism": "jit-sandbox", "unauthorized": 2,
                                                         "false_denials": 1, "completed": 0, "scenarios": 2,
                                                         "added": {"s1": 2}}}
    run = rep["runs"][1]
    assert run["mechanisms"] == ["jit"] and run["tags"] == [] and run["approvals"] == 0
    assert run["steps"][2]["kind"] == "jit" and run["steps"][0]["kind"] == "fs"
    assert report([]) == {"format": 2, "systems": {}, "kinds": {}, "mechanisms": {}, "ablations": {}, "runs": []}


# --- the Markdown report and the chart ---------------------------------------------------------


def test_write_report(tmp_path: Path) -> None:
    md, png = write_report(_runs(), tmp_path / "out")
    assert md == tmp_path / "out" / "report.md" and png == tmp_path / "out" / "safety.png"
    text = md.read_text()
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert "![unauthorized side effects and false-denial rate per system](safety.png)" in text
    for heading in ("### Runtime safety, 2 scenarios", "### Ablations", "## By capability kind",
                    "## By evolution mechanism", "## Scenarios `libos` did not complete"):
        assert heading in text, heading
    # the ablation table names the scenario where the switched-off mechanism let effects through
    (row,) = [line for line in text.splitlines() if line.startswith("| libos-no-jit-sandbox | jit-sandbox |")]
    assert row.endswith("| s1 (+2) |"), row
    assert "| libos | 1/2 | 0 | 1 (25.0%) | 4 | 3/3 | 0 | 0.0 s |" in text
    assert "| jit | 1 | 0 | 2 | – |" in text  # unauthorized by kind: libos, ablation, direct
    assert "`s2`" in text  # not completed on libos


def test_report_is_deterministic_apart_from_timings(tmp_path: Path) -> None:
    runs = _runs()
    first = markdown(runs, timings=False)
    for r in runs:
        r.wall_s += 1.5
    assert markdown(runs, timings=False) == first
    assert " s |" not in first
    a, b = write_chart(runs, tmp_path / "a.png"), write_chart(runs, tmp_path / "b.png")
    assert a.read_bytes() == b.read_bytes()


# --- the command -------------------------------------------------------------------------------


def _fake_libos(unauthorized: int) -> Any:
    def run(scenario: Any) -> RunResult:
        steps = [_step(0, "fs_write", "denied", "allowed" if unauthorized else "denied", changed=bool(unauthorized))]
        return RunResult(scenario.id, "libos", completed=not unauthorized, unauthorized=unauthorized, steps=steps)
    return run


@pytest.mark.parametrize("unauthorized, status", [(0, 0), (1, 1)])
def test_bench_safety_report_and_exit_status(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             unauthorized: int, status: int) -> None:
    monkeypatch.setitem(SYSTEMS, "libos", _fake_libos(unauthorized))
    out, js = tmp_path / "rep", tmp_path / "r.json"
    r = CliRunner().invoke(main, ["bench", "safety", "--scenarios", str(REPO / "scenarios" / "quickstart.yaml"),
                                  "--report", str(out), "--json", str(js)], env={"COLUMNS": "200"},
                           catch_exceptions=False)
    assert r.exit_code == status, r.output
    for title in ("runtime safety, 1 scenarios", "by capability kind", "by evolution mechanism"):
        assert title in r.stdout
    assert (out / "report.md").read_text().startswith("# Runtime-safety benchmark")
    assert (out / "safety.png").stat().st_size > 0
    rep = json.loads(js.read_text())
    assert rep["format"] == 2 and rep["systems"]["libos"]["unauthorized"] == unauthorized
    quickstart = load_scenario(REPO / "scenarios" / "quickstart.yaml")
    assert rep["runs"][0]["mechanisms"] == list(mechanisms_of(quickstart)) == ["memory"]


# --- the README --------------------------------------------------------------------------------


def test_readme_scenario_example_loads_and_completes(tmp_path: Path) -> None:
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("### How to write a scenario"):]
    m = re.search(r"```yaml\n(.*?)```", section, re.S)
    assert m, "the section has a YAML example"
    path = tmp_path / "example.yaml"
    path.write_text(m.group(1))
    scenario = load_scenario(path)
    assert yaml.safe_load(m.group(1))["id"] == scenario.id
    result = run_libos(scenario)
    assert result.completed and result.unauthorized == 0, (result.error, result.steps, result.checks)


def test_readme_shows_the_committed_report() -> None:
    readme = (REPO / "README.md").read_text()
    assert "docs/bench/safety.png" in readme and "docs/bench/report.md" in readme
    assert (REPO / "docs" / "bench" / "safety.png").stat().st_size > 0
    committed = (REPO / "docs" / "bench" / "report.md").read_text()
    for system in SYSTEMS:
        assert f"| {system} |" in committed, system
