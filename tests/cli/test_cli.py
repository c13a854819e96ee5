"""The `agentlibos` command, driven with click's CliRunner."""

from __future__ import annotations

import json
import time
import sqlite3
from pathlib import Path
from typing import Any

import click
import pytest
from click.testing import CliRunner, Result

from agentlibos.cli import main
from tests.conftest import REPO

QUICKSTART = str(REPO / "scenarios" / "quickstart.yaml")
WIDE = {"COLUMNS": "250"}


def invoke(*args: str, env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(main, list(args), env=env, catch_exceptions=False)


@pytest.fixture
def state(tmp_path: Path) -> Path:
    s = tmp_path / "s"
    r = invoke("run", QUICKSTART, "--state", str(s), env=WIDE)
    assert r.exit_code == 0, r.output
    return s


def _entries(state: Path) -> list[dict[str, Any]]:
    r = invoke("log", "show", "--state", str(state), "--json")
    assert r.exit_code == 0, r.output
    return [json.loads(line) for line in r.stdout.splitlines() if line.strip()]


# --- run ---------------------------------------------------------------------------------------


def test_run_quickstart(tmp_path: Path) -> None:
    out = tmp_path / "run.json"
    r = invoke("run", QUICKSTART, "--state", str(tmp_path / "s"), "--json", str(out), env=WIDE)
    assert r.exit_code == 0, r.output
    for tool in ("fs_read", "fs_write", "shell_exec", "mem_put", "mem_get"):
        assert tool in r.stdout
    assert "completed" in r.stdout and "not completed" not in r.stdout
    assert "allow" in r.stdout and "deny" in r.stdout and "EPERM" in r.stdout
    assert list((tmp_path / "s" / "runs").glob("*/log.db"))
    rep = json.loads(out.read_text())
    assert rep["format"] == 2 and rep["runs"][0]["scenario"] == "quickstart" and rep["runs"][0]["completed"] is True


def test_run_failing_scenario_exits_1(tmp_path: Path) -> None:
    f = tmp_path / "fail.yaml"
    f.write_text("id: fails\nversion: 1\nworld: {files: {workspace/a.txt: a}}\nimage: {prompt: p, tools: [fs_read]}\n"
                 "script:\n  - {tool: fs_read, args: {path: workspace/a.txt}, expect: allowed}\n")
    r = invoke("run", str(f), "--state", str(tmp_path / "s"), env=WIDE)
    assert r.exit_code == 1, r.output
    assert "not completed" in r.stdout
    assert "false denials: 1" in r.stdout


def test_run_bad_yaml_exits_2(tmp_path: Path) -> None:
    f = tmp_path / "bad.yaml"
    f.write_text("id: [unclosed\n")
    r = invoke("run", str(f), "--state", str(tmp_path / "s"), env=WIDE)
    assert r.exit_code == 2
    assert "error:" in r.output
    assert "bad YAML" in r.output


def test_run_missing_file_is_a_usage_error(tmp_path: Path) -> None:
    r = invoke("run", str(tmp_path / "nope.yaml"), "--state", str(tmp_path / "s"))
    assert r.exit_code == 2


# --- log ---------------------------------------------------------------------------------------


def test_log_show_lists_entries(state: Path) -> None:
    r = invoke("log", "show", "--state", str(state), env=WIDE)
    assert r.exit_code == 0, r.output
    for kind in ("sys", "result", "proc.state", "cap.create"):
        assert kind in r.stdout
    kinds = {e["kind"] for e in _entries(state)}
    assert {"sys", "result", "proc.state", "cap.create"} <= kinds


def test_log_show_json_is_json_lines(state: Path) -> None:
    entries = _entries(state)
    assert len(entries) > 10
    assert [e["seq"] for e in entries] == list(range(1, len(entries) + 1))
    for e in entries:
        assert {"seq", "ts", "pid", "kind", "cause", "body", "hash"} <= set(e)


def test_log_show_filters(state: Path) -> None:
    r = invoke("log", "show", "--state", str(state), "--json", "--kind", "sys", "--limit", "3")
    assert r.exit_code == 0, r.output
    lines = [json.loads(x) for x in r.stdout.splitlines() if x.strip()]
    assert len(lines) == 3 and all(e["kind"] == "sys" for e in lines)


def test_log_tail(state: Path) -> None:
    head = len(_entries(state))
    r = invoke("log", "tail", "--state", str(state), "-n", "5", env=WIDE)
    assert r.exit_code == 0, r.output
    assert str(head) in r.stdout
    assert f" {head - 10} " not in r.stdout


def test_log_without_a_log_exits_2(tmp_path: Path) -> None:
    r = invoke("log", "show", "--state", str(tmp_path / "empty"))
    assert r.exit_code == 2
    assert "error:" in r.output


def test_log_verify_and_tamper(state: Path) -> None:
    r = invoke("log", "verify", "--state", str(state), env=WIDE)
    assert r.exit_code == 0, r.output
    assert "ok" in r.stdout
    (db,) = list(state.glob("runs/*/log.db"))
    con = sqlite3.connect(db)
    try:
        (body,) = con.execute("SELECT body FROM log WHERE seq = 5").fetchone()
        assert body
        with con:
            con.execute("UPDATE log SET body = ? WHERE seq = 5", (bytes(body).replace(b"operator", b"attacker"),))
        assert con.execute("SELECT body FROM log WHERE seq = 5").fetchone()[0] != body
    finally:
        con.close()
    r = invoke("log", "verify", "--state", str(state), env=WIDE)
    assert r.exit_code == 1, r.output
    assert "seq 5" in r.stdout


# --- explain -----------------------------------------------------------------------------------


def _allowed_notes_seq(state: Path) -> int:
    for e in _entries(state):
        if e["kind"] == "sys" and e["body"].get("decision") == "allow" and e["body"].get("handle") == "notes":
            return int(e["seq"])
    raise AssertionError("no allowed sys entry by 'notes'")


def test_explain_allowed(state: Path) -> None:
    seq = _allowed_notes_seq(state)
    r = invoke("explain", str(seq), "--state", str(state), env=WIDE)
    assert r.exit_code == 0, r.output
    assert "causal chain" in r.stdout
    assert "llm.complete" in r.stdout  # the model turn that asked for it
    assert f"decision at seq {seq}: allow" in r.stdout
    assert "capability derivation" in r.stdout
    rows = [line for line in r.stdout.splitlines() if " notes " in line]
    assert rows, r.stdout
    assert "operator" in rows[-1], rows  # the derivation row: handle notes, via operator


def test_explain_derivation_readable_at_80_columns(state: Path) -> None:
    # A plain 80-column terminal (or a pipe) must still show that the grant came from the operator.
    seq = _allowed_notes_seq(state)
    r = invoke("explain", str(seq), "--state", str(state), env={"COLUMNS": "80"})
    assert r.exit_code == 0, r.output
    rows = [line for line in r.stdout.splitlines() if " notes " in line]
    assert rows, r.stdout
    # the title says "operator grant"; the row itself must say where the cap came from
    assert "operator" in rows[-1], r.stdout


def test_explain_denied(state: Path) -> None:
    seq = next(e["seq"] for e in _entries(state) if e["kind"] == "sys" and e["body"].get("decision") == "deny")
    r = invoke("explain", str(seq), "--state", str(state), env=WIDE)
    assert r.exit_code == 0, r.output
    assert "deny" in r.stdout
    assert "EPERM" in r.stdout


def test_explain_unknown_seq_exits_2(state: Path) -> None:
    r = invoke("explain", "999999", "--state", str(state))
    assert r.exit_code == 2
    assert "error:" in r.output


# --- bench -------------------------------------------------------------------------------------


def test_bench_safety(tmp_path: Path) -> None:
    out = tmp_path / "out.json"
    r = invoke("bench", "safety", "--scenarios", str(REPO / "scenarios"), "--systems", "libos", "--json", str(out),
               env=WIDE)
    assert r.exit_code == 0, r.output
    assert "libos" in r.stdout
    rep = json.loads(out.read_text())
    assert rep["format"] == 2
    assert rep["systems"]["libos"]["unauthorized"] == 0
    assert rep["systems"]["libos"]["scenarios"] == len(list((REPO / "scenarios").rglob("*.yaml")))


def test_bench_unknown_system_exits_2(tmp_path: Path) -> None:
    r = invoke("bench", "safety", "--scenarios", str(REPO / "scenarios"), "--systems", "nosuch")
    assert r.exit_code == 2
    assert "nosuch" in r.output


# --- help and docs -----------------------------------------------------------------------------


def _command_paths(cmd: click.Command, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    out = [prefix]
    if isinstance(cmd, click.Group):
        for name, sub in sorted(cmd.commands.items()):
            out += _command_paths(sub, (*prefix, name))
    return out


COMMAND_PATHS = _command_paths(main)


def test_command_tree() -> None:
    for path in [("run",), ("log", "show"), ("log", "tail"), ("log", "verify"), ("explain",), ("bench", "safety")]:
        assert path in COMMAND_PATHS


@pytest.mark.parametrize("path", COMMAND_PATHS, ids=[" ".join(p) or "main" for p in COMMAND_PATHS])
def test_help(path: tuple[str, ...]) -> None:
    r = invoke(*path, "--help")
    assert r.exit_code == 0, r.output
    assert "Usage:" in r.stdout
    assert len(r.stdout.strip().splitlines()) > 3


def test_readme_documents_every_command() -> None:
    readme = (REPO / "README.md").read_text()
    leaves = [p for p in COMMAND_PATHS if p and not isinstance(_lookup(p), click.Group)]
    assert len(leaves) >= 6
    for p in leaves:
        if len(p) == 1:
            needle = f"agentlibos {p[0]}"
            assert needle in readme, needle
        else:
            # `agentlibos log show|tail|verify` documents the whole group on one line
            group, leaf = p
            assert f"agentlibos {group} " in readme
            assert (f"agentlibos {group} {leaf}" in readme
                    or any(leaf in line.split("|") or f"{group} {leaf}" in line or f"|{leaf}" in line
                           or f"{leaf}|" in line for line in readme.splitlines() if f"agentlibos {group}" in line)), p


def _lookup(path: tuple[str, ...]) -> click.Command:
    cmd: click.Command = main
    for name in path:
        assert isinstance(cmd, click.Group)
        cmd = cmd.commands[name]
    return cmd


def test_operator_commands_on_a_stale_connection_file_exit_2_at_once(tmp_path: Path) -> None:
    """A kernel killed with SIGKILL leaves connection.json behind: say so instead of waiting."""
    state = tmp_path / "s"
    state.mkdir()
    (state / "kernel.lock").write_text("12345")
    (state / "connection.json").write_text(json.dumps({"endpoint": f"ipc://{tmp_path}/gone.sock",
                                                       "operator_token": "x"}))
    t0 = time.monotonic()
    r = invoke("ps", "--state", str(state))
    assert r.exit_code == 2
    assert "no kernel is running" in r.output and time.monotonic() - t0 < 5
