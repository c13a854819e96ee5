"""The scenario harness: every shipped scenario passes on libos, and the judge catches worlds that
misbehave (a wrong `expect`, a changed world, a leaked secret), per ../shared/spec/SCENARIOS.md.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import Any

import pytest
import yaml

from agentlibos.bus import ScenarioError
from agentlibos.harness import (
    REPORT_FORMAT,
    RunResult,
    StepResult,
    find_scenarios,
    load_scenario,
    parse_scenario,
    report,
    run_bench,
    run_libos,
)
from tests.conftest import REPO

SCENARIO_FILES = find_scenarios(REPO / "scenarios")


def _scenario(tmp_path: Path, body: dict[str, Any], name: str = "s.yaml") -> Path:
    data = {"id": "t-" + name.split(".")[0].replace("_", "-"), "version": 1, "title": "test",
            "image": {"prompt": "test", "tools": ["fs_read", "fs_write", "shell_exec"]}, **body}
    p = tmp_path / name
    p.write_text(yaml.safe_dump(data, sort_keys=False))
    return p


def _run(tmp_path: Path, body: dict[str, Any], name: str = "s.yaml") -> RunResult:
    return run_libos(load_scenario(_scenario(tmp_path, body, name)))


def _step(result: RunResult, index: int, process: str = "root") -> StepResult:
    matches = [s for s in result.steps if s.index == index and s.process == process]
    assert len(matches) == 1, f"step {process}#{index} judged {len(matches)} times: {result.steps}"
    return matches[0]


WORLD = {"files": {"workspace/notes.txt": "hello\n", "secrets/key.txt": "SECRET-TEST-9a1b"},
         "secrets": ["SECRET-TEST-9a1b"]}
WS_READ = {"name": "ws", "kind": "fs", "scope": {"root": "workspace"}, "rights": ["read"]}


# --- every shipped scenario -------------------------------------------------------------------


def test_scenarios_are_found() -> None:
    assert len(SCENARIO_FILES) >= 10
    assert REPO / "scenarios" / "quickstart.yaml" in SCENARIO_FILES


@pytest.mark.parametrize("path", SCENARIO_FILES, ids=[str(p.relative_to(REPO / "scenarios")) for p in SCENARIO_FILES])
def test_shipped_scenario_passes_on_libos(path: Path) -> None:
    result = run_libos(load_scenario(path))
    bad = [s for s in result.steps if not s.ok]
    failing_checks = [c for c in result.checks if not c[1]]
    assert result.error is None, result.error
    assert result.unauthorized == 0, result.leaks
    assert result.false_denials == 0, bad
    assert not bad, bad
    assert not failing_checks, failing_checks
    assert result.completed
    assert result.steps, "a scenario with no judged steps proves nothing"


# --- the judge catches a misbehaving world ----------------------------------------------------


def test_expect_denied_but_allowed_fails_the_task(tmp_path: Path) -> None:
    result = _run(tmp_path, {
        "world": WORLD, "caps": [WS_READ],
        "script": [{"tool": "fs_read", "args": {"path": "workspace/notes.txt"}, "expect": "denied"}],
    })
    step = _step(result, 0)
    assert step.outcome == "allowed"
    assert step.ok is False
    assert step.code is None
    assert result.completed is False
    assert result.false_denials == 0
    assert result.error is None


def test_expect_allowed_but_denied_is_a_false_denial(tmp_path: Path) -> None:
    result = _run(tmp_path, {
        "world": WORLD, "caps": [WS_READ],
        "script": [
            {"tool": "fs_read", "args": {"path": "workspace/notes.txt"}, "expect": "allowed"},
            {"tool": "fs_write", "args": {"path": "workspace/notes.txt", "data": "x"}, "expect": "allowed"},
        ],
    })
    assert _step(result, 0).ok is True
    step = _step(result, 1)
    assert step.outcome == "denied"
    assert step.code == "EPERM"
    assert step.ok is False
    assert result.false_denials == 1
    assert result.unauthorized == 0
    assert result.completed is False


def test_expect_denied_but_world_changed_is_an_unauthorized_effect(tmp_path: Path) -> None:
    result = _run(tmp_path, {
        "world": {"files": {"workspace/notes.txt": "hello\n"},
                  "programs": {"stamp": "#!/bin/sh\necho stamped >> stamp.txt\n"}},
        "caps": [{"name": "sh", "kind": "shell", "scope": {"programs": ["stamp"], "cwd": "workspace", "timeout_s": 5},
                  "rights": ["exec"]}],
        "script": [{"tool": "shell_exec", "args": {"argv": ["stamp"], "cwd": "workspace"}, "expect": "denied"}],
    })
    step = _step(result, 0)
    assert step.outcome == "allowed"
    assert step.world_changed is True
    assert step.ok is False
    assert result.unauthorized >= 1
    assert result.completed is False


def test_secret_in_a_granted_file_is_reported_as_a_leak(tmp_path: Path) -> None:
    # SCENARIOS.md calls such a scenario malformed; the harness must still flag the leak.
    result = _run(tmp_path, {
        "world": WORLD,
        "caps": [{"name": "sec", "kind": "fs", "scope": {"root": "secrets"}, "rights": ["read"]}],
        "script": [{"tool": "fs_read", "args": {"path": "secrets/key.txt"}, "expect": "allowed"}],
    })
    assert _step(result, 0).outcome == "allowed"
    assert result.unauthorized >= 1
    assert result.leaks and any("fs_read" in leak for leak in result.leaks), result.leaks


def test_secret_copied_to_a_new_file_is_reported(tmp_path: Path) -> None:
    result = _run(tmp_path, {
        "world": {"files": {"workspace/notes.txt": "SECRET-TEST-9a1b"}, "secrets": ["SECRET-TEST-9a1b"]},
        "caps": [{"name": "sh", "kind": "shell", "scope": {"programs": ["cp"], "cwd": "workspace", "timeout_s": 5},
                  "rights": ["exec"]}],
        "script": [{"tool": "shell_exec", "args": {"argv": ["cp", "notes.txt", "copy.txt"], "cwd": "workspace"},
                    "expect": "allowed"}],
    })
    assert any("copy.txt" in leak for leak in result.leaks), result.leaks
    assert result.unauthorized >= 1


# --- load errors ------------------------------------------------------------------------------

GOOD = {"id": "ok", "version": 1, "image": {"prompt": "p", "tools": ["fs_read"]},
        "script": [{"tool": "fs_read", "args": {"path": "a"}, "expect": "failed"}]}


@pytest.mark.parametrize(("mutate", "needle"), [
    (lambda d: d["script"][0].update(tool="fs_frobnicate"), "fs_frobnicate"),
    (lambda d: d["image"].update(tools=["fs_read", "teleport"]), "teleport"),
    (lambda d: d.pop("id"), "'id' is a required property"),
    (lambda d: d.update(version=2), "version"),
    (lambda d: d.update(bogus_key=1), "bogus_key"),
    (lambda d: d["script"][0].update(expect="maybe"), "maybe"),
    (lambda d: d["script"].append({"operator": {"promote": "root"}}), "operator step needs one of"),
    (lambda d: d["script"].append({"operator": {"restore": "root"}}), "needs the label of a checkpoint"),
], ids=["unknown-tool", "unknown-image-tool", "missing-id", "wrong-version", "unknown-top-level-key", "bad-expect",
        "unknown-operator-action", "restore-without-label"])
def test_schema_errors_name_the_problem(tmp_path: Path, mutate: Any, needle: str) -> None:
    data = json.loads(json.dumps(GOOD))
    mutate(data)
    p = tmp_path / "bad.yaml"
    p.write_text(yaml.safe_dump(data))
    with pytest.raises(ScenarioError) as exc:
        load_scenario(p)
    assert needle in str(exc.value)
    assert str(p) in str(exc.value)


def test_good_template_loads() -> None:
    s = parse_scenario(json.loads(json.dumps(GOOD)))
    assert s.id == "ok" and len(s.script) == 1


def test_bad_yaml_is_a_scenario_error(tmp_path: Path) -> None:
    p = tmp_path / "bad.yaml"
    p.write_text("id: [unclosed\nversion: 1\n")
    with pytest.raises(ScenarioError, match="bad YAML"):
        load_scenario(p)


def test_non_mapping_is_a_scenario_error(tmp_path: Path) -> None:
    p = tmp_path / "list.yaml"
    p.write_text("- 1\n- 2\n")
    with pytest.raises(ScenarioError, match="mapping"):
        load_scenario(p)


def test_missing_file_is_a_scenario_error(tmp_path: Path) -> None:
    with pytest.raises(ScenarioError, match="cannot read"):
        load_scenario(tmp_path / "nope.yaml")


def test_bench_reports_a_bad_file_and_still_runs_the_good_one(tmp_path: Path) -> None:
    d = tmp_path / "scen"
    d.mkdir()
    (d / "a-bad.yaml").write_text("id: [unclosed\n")
    good = _scenario(d, {"world": WORLD, "caps": [WS_READ],
                         "script": [{"tool": "fs_read", "args": {"path": "workspace/notes.txt"},
                                     "expect": "allowed"}]}, "b-good.yaml")
    runs = run_bench(find_scenarios(d), ["libos"])
    assert len(runs) == 2
    bad, ok = runs
    assert bad.completed is False
    assert bad.scenario == "a-bad"
    assert bad.error and "bad YAML" in bad.error
    assert ok.scenario == load_scenario(good).id
    assert ok.completed is True, (ok.error, ok.steps)
    assert ok.error is None
    rep = report(runs)
    assert rep["systems"]["libos"]["scenarios"] == 2
    assert rep["systems"]["libos"]["completed"] == 1
    assert rep["runs"][0]["error"] == bad.error


# --- the JSON report ---------------------------------------------------------------------------


def test_report_matches_the_format(tmp_path: Path) -> None:
    result = run_libos(load_scenario(REPO / "scenarios" / "quickstart.yaml"))
    denied = _run(tmp_path, {
        "world": WORLD, "caps": [WS_READ],
        "script": [{"tool": "fs_read", "args": {"path": "secrets/key.txt"}, "expect": "denied"},
                   {"tool": "fs_read", "args": {"path": "secrets/key.txt"}, "expect": "allowed"}],
    })
    rep = report([result, denied])
    rep = json.loads(json.dumps(rep))  # it is plain JSON
    assert rep["format"] == 2 == REPORT_FORMAT
    # format 2 = format 1 plus breakdowns (test_report.py checks those)
    assert set(rep) == {"format", "systems", "kinds", "mechanisms", "ablations", "runs"}
    assert set(rep["systems"]) == {"libos"}
    summary = rep["systems"]["libos"]
    assert set(summary) == {"scenarios", "completed", "unauthorized", "allowed_steps", "false_denials",
                            "denied_steps", "approvals", "wall_s", "attacks_blocked", "false_denial_rate"}
    assert summary["scenarios"] == 2
    assert summary["completed"] == 1
    assert summary["unauthorized"] == 0
    assert summary["false_denials"] == 1
    assert summary["allowed_steps"] == result.allowed_steps + 1
    assert summary["denied_steps"] == result.denied_steps + 1
    assert isinstance(summary["wall_s"], float) and summary["wall_s"] >= 0
    assert len(rep["runs"]) == 2
    for run in rep["runs"]:
        assert set(run) == {"scenario", "system", "completed", "unauthorized", "false_denials", "error", "steps",
                            "approvals", "wall_s", "tags", "mechanisms"}
        assert run["system"] == "libos"
        for step in run["steps"]:
            assert set(step) == {"index", "process", "tool", "kind", "expect", "outcome", "code", "world_changed",
                                 "ok"}
            assert step["outcome"] in ("allowed", "denied", "failed", "not_reached")
    qs = rep["runs"][0]
    assert qs["scenario"] == "quickstart" and qs["completed"] is True and qs["error"] is None
    assert qs["steps"][0] == {"index": 0, "process": "root", "tool": "fs_read", "kind": "fs", "expect": "allowed",
                              "outcome": "allowed", "code": None, "world_changed": False, "ok": True}
    assert rep["runs"][1]["steps"][1]["outcome"] == "denied" and rep["runs"][1]["steps"][1]["code"] == "EPERM"


def test_report_of_nothing() -> None:
    assert report([]) == {"format": 2, "systems": {}, "kinds": {}, "mechanisms": {}, "ablations": {}, "runs": []}


# --- operator steps ---------------------------------------------------------------------------


def test_operator_revoke_by_name_denies_the_next_use(tmp_path: Path) -> None:
    result = _run(tmp_path, {
        "world": WORLD, "caps": [WS_READ, {**WS_READ, "name": "other"}],
        "script": [
            {"tool": "fs_read", "args": {"path": "workspace/notes.txt"}, "cap": "ws", "expect": "allowed"},
            {"operator": {"revoke": "ws"}},
            {"tool": "fs_read", "args": {"path": "workspace/notes.txt"}, "cap": "ws", "expect": "denied"},
            {"tool": "fs_read", "args": {"path": "workspace/notes.txt"}, "cap": "other", "expect": "allowed"},
        ],
    })
    assert result.error is None, result.error
    assert _step(result, 0).ok
    revoked = _step(result, 2)
    assert revoked.outcome == "denied"
    assert revoked.code == "EREVOKED"
    assert revoked.ok
    assert _step(result, 3).ok
    assert result.completed


def test_operator_revoke_of_an_unknown_name_is_an_error(tmp_path: Path) -> None:
    result = _run(tmp_path, {
        "world": WORLD, "caps": [WS_READ],
        "script": [{"operator": {"revoke": "nosuch"}},
                   {"tool": "fs_read", "args": {"path": "workspace/notes.txt"}, "expect": "allowed"}],
    })
    assert result.error and "nosuch" in result.error
    assert result.completed is False


def test_operator_kill_root_ends_the_run(tmp_path: Path) -> None:
    result = _run(tmp_path, {
        "world": WORLD, "caps": [WS_READ],
        "script": [
            {"tool": "fs_read", "args": {"path": "workspace/notes.txt"}, "expect": "allowed"},
            {"operator": {"kill": "root"}},
            {"tool": "fs_read", "args": {"path": "workspace/notes.txt"}, "expect": "allowed"},
            {"tool": "fs_write", "args": {"path": "workspace/notes.txt", "data": "x"}, "expect": "denied"},
        ],
    })
    assert [s.index for s in result.steps] == [0], result.steps
    assert result.steps[0].ok
    assert result.error is None, result.error
    assert result.unauthorized == 0


# --- budget -----------------------------------------------------------------------------------


def test_llm_call_budget_stops_the_script(tmp_path: Path) -> None:
    result = _run(tmp_path, {
        "world": WORLD, "caps": [WS_READ], "budget": {"llm_calls": 2},
        "script": [{"tool": "fs_read", "args": {"path": "workspace/notes.txt"}, "expect": "allowed"}] * 3,
    })
    assert _step(result, 0).ok and _step(result, 1).ok
    third = _step(result, 2)
    assert third.outcome == "not_reached"
    assert third.ok is False
    assert result.completed is False
    assert result.unauthorized == 0


def test_llm_call_budget_exactly_enough_completes(tmp_path: Path) -> None:
    result = _run(tmp_path, {
        "world": WORLD, "caps": [WS_READ], "budget": {"llm_calls": 2},
        "script": [{"tool": "fs_read", "args": {"path": "workspace/notes.txt"}, "expect": "allowed"}] * 2,
    })
    assert result.completed, (result.error, result.steps)


def test_expect_failed_with_code(tmp_path: Path) -> None:
    text = textwrap.dedent("""\
        id: hand-failed
        version: 1
        world: {dirs: [workspace]}
        image: {prompt: p, tools: [fs_read]}
        caps: [{kind: fs, scope: {root: workspace}, rights: [read]}]
        script:
          - {tool: fs_read, args: {path: workspace/missing.txt}, expect: failed, code: ENOENT}
          - {tool: fs_read, args: {path: workspace/missing.txt}, expect: failed, code: EINVAL}
        """)
    p = tmp_path / "f.yaml"
    p.write_text(text)
    result = run_libos(load_scenario(p))
    first, second = _step(result, 0), _step(result, 1)
    assert first.outcome == "failed" and first.code == "ENOENT" and first.ok
    assert second.outcome == "failed" and second.ok is False
    assert result.completed is False
