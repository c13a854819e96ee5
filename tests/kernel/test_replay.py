"""Deterministic replay: golden logs, one of them deliberately non-deterministic, and every
shipped scenario's run replayed to the same decisions and final state hash."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from agentlibos.bus import NondeterminismError
from agentlibos.cli import main
from agentlibos.harness import find_scenarios, load_scenario, run_libos
from agentlibos.kernel import replay_log
from tests.conftest import REPO

GOLDEN = REPO / "tests" / "golden"


def _copy(name: str, tmp_path: Path) -> Path:
    # Opening a WAL database creates side files: replay a copy, never the checked-in file.
    dst = tmp_path / name
    shutil.copy(GOLDEN / name, dst)
    return dst


@pytest.mark.parametrize("name", ["quickstart.db", "ckpt-fork-after-revoke.db"])
def test_golden_logs_replay_identically(name: str, tmp_path: Path) -> None:
    report = replay_log(_copy(name, tmp_path))
    assert report.recorded_hash is not None
    assert report.state_hash == report.recorded_hash
    assert report.stimuli > 10


def test_non_deterministic_golden_log_names_the_first_differing_entry(tmp_path: Path) -> None:
    seq = int((GOLDEN / "nondeterministic.seq").read_text())
    with pytest.raises(NondeterminismError, match=f"seq {seq}:"):
        replay_log(_copy("nondeterministic.db", tmp_path))


def test_cli_replay_exit_codes(tmp_path: Path) -> None:
    ok = CliRunner().invoke(main, ["replay", str(_copy("quickstart.db", tmp_path))])
    assert ok.exit_code == 0, ok.output
    assert "identical" in ok.output
    bad = CliRunner().invoke(main, ["replay", str(_copy("nondeterministic.db", tmp_path))])
    assert bad.exit_code == 1, bad.output
    assert "non-deterministic" in bad.output


@pytest.mark.parametrize("path", find_scenarios(REPO / "scenarios"), ids=lambda p: str(p.relative_to(REPO / "scenarios")))
def test_every_scenario_run_replays_to_its_state_hash(path: Path, tmp_path: Path) -> None:
    result = run_libos(load_scenario(path), keep_state=str(tmp_path / "state"))
    assert result.error is None, result.error
    report = replay_log(tmp_path / "state" / "log.db")
    assert report.recorded_hash is not None, report.notes
    assert report.state_hash == report.recorded_hash
