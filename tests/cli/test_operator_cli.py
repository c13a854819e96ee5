"""spawn, kill, caps, grant, revoke, wait, budget and mem against a real kernel on a temporary state dir."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from agentlibos.bus import KernelClient
from agentlibos.cli import main
from agentlibos.runtime import Runtime

WIDE = {"COLUMNS": "250"}
WS = '{kind: fs, scope: {root: ws}, rights: [read, write], name: ws}'


@pytest.fixture
def rt(runtime: Runtime) -> Runtime:
    (runtime.config.world_root / "ws").mkdir()
    runtime.register_image("agent", tools=[])
    return runtime


def cli(rt: Runtime, *args: str) -> Result:
    return CliRunner().invoke(main, [*args, "--state", str(rt.state_dir)], env=WIDE, catch_exceptions=False)


def ok(rt: Runtime, *args: str) -> Result:
    r = cli(rt, *args)
    assert r.exit_code == 0, r.output
    return r


def as_json(rt: Runtime, *args: str) -> Any:
    return json.loads(ok(rt, *args, "--json").stdout)


def spawn_external(rt: Runtime, *extra: str) -> tuple[int, str]:
    out = as_json(rt, "spawn", "agent", "--external", "--cap", WS, *extra)
    return int(out["pid"]), str(out["token"])


@pytest.fixture
def process(rt: Runtime) -> Iterator[tuple[int, KernelClient]]:
    """An outside process holding `ws`, and its client (said hello with the token `spawn` printed)."""
    pid, token = spawn_external(rt)
    client = rt.client(token)
    try:
        yield pid, client
    finally:
        client.close()


def caps_by_handle(rt: Runtime, *args: str) -> dict[str, dict[str, Any]]:
    return {c["handle"]: c for c in as_json(rt, "caps", *args)}


# --- spawn and caps ----------------------------------------------------------------------------


def test_spawn_external_prints_pid_and_a_labelled_token(rt: Runtime) -> None:
    r = ok(rt, "spawn", "agent", "--external", "--cap", WS)
    assert "spawned process" in r.stdout
    token_line = next(line for line in r.stdout.splitlines() if "token" in line)
    assert "secret" in token_line
    pid = next(p["pid"] for p in rt.ps() if p["image"] == "agent")
    assert f"process {pid}" in r.stdout


def test_caps_shows_what_the_spawned_process_holds(rt: Runtime, process: tuple[int, KernelClient]) -> None:
    pid, _ = process
    r = ok(rt, "caps", str(pid))
    row = next(line for line in r.stdout.splitlines() if " ws " in line)
    for cell in ("fs", "root: ws", "read, write", "operator", "live"):
        assert cell in row, (cell, row)
    assert f"capabilities of process {pid}" in r.stdout
    everyone = next(line for line in ok(rt, "caps").stdout.splitlines() if " ws " in line)
    assert f" {pid} " in everyone  # the holder's column, when the records are of every process
    ws = caps_by_handle(rt, str(pid))["ws"]
    assert ws["holder"] == pid and ws["kind"] == "fs" and ws["state"] == "live" and ws["parent"] is None


def test_spawn_with_caps_file_and_budget(rt: Runtime, tmp_path: Path) -> None:
    f = tmp_path / "caps.yaml"
    f.write_text("caps:\n  - {kind: memory, scope: {namespace: team}, rights: [read], name: team}\n"
                 "  - {kind: fs, scope: {root: ws}, rights: [read], name: docs, uses: 2}\n")
    pid = as_json(rt, "spawn", "agent", "--external", "--caps-file", str(f), "--budget", "syscalls=50")["pid"]
    held = caps_by_handle(rt, str(pid))
    assert set(held) == {"team", "docs", "self", "model"} and held["docs"]["uses"] == 2
    assert held["self"]["via"] == held["model"]["via"] == "spawn"  # every process's own two
    r = ok(rt, "budget", str(pid))
    row = next(line for line in r.stdout.splitlines() if "syscalls" in line)
    assert "50" in row and "own" in row
    assert "unlimited" in next(line for line in r.stdout.splitlines() if "llm_tokens" in line)
    view = as_json(rt, "budget", str(pid))
    assert view["syscalls"]["limit"] == 50 and view["syscalls"]["remaining"] == 50 - view["syscalls"]["used"]


def test_budget_counts_syscalls(rt: Runtime) -> None:
    (rt.config.world_root / "ws" / "a.txt").write_text("hello")
    pid, token = spawn_external(rt, "--budget", "syscalls=10")
    before = as_json(rt, "budget", str(pid))["syscalls"]
    with rt.client(token) as client:
        assert client.call("fs.read", {"path": "ws/a.txt"}) == {"text": "hello"}
    after = as_json(rt, "budget", str(pid))["syscalls"]
    assert after["used"] == before["used"] + 1 and after["remaining"] == 10 - after["used"]


# --- grant and revoke --------------------------------------------------------------------------


def test_grant_then_revoke_cascades(rt: Runtime, process: tuple[int, KernelClient]) -> None:
    pid, client = process
    r = ok(rt, "grant", str(pid), "fs", "--scope", "{root: ws}", "--rights", "read,list", "--name", "docs")
    assert "docs" in r.stdout
    docs = caps_by_handle(rt, str(pid))["docs"]
    assert docs["rights"] == ["list", "read"] and docs["via"] == "operator" and docs["state"] == "live"
    # The process narrows it for itself: a derived record whose parent is the grant.
    client.call("cap.derive", {"handle": "docs", "narrow": {"rights": ["read"]}, "as": "docs-ro"})
    child = caps_by_handle(rt, str(pid))["docs-ro"]
    assert child["parent"] == docs["cap"] and child["via"] == "cap.derive"
    assert f"cap.derive of {docs['cap']}" in ok(rt, "caps", str(pid)).stdout

    r = ok(rt, "revoke", str(pid), "docs")
    assert "revoked caps" in r.stdout and str(docs["cap"]) in r.stdout and str(child["cap"]) in r.stdout
    after = caps_by_handle(rt, "--all")
    assert after["docs"]["state"] == after["docs-ro"]["state"] == "revoked"
    assert after["ws"]["state"] == "live"
    r = ok(rt, "caps", "--all")
    assert "revoked" in r.stdout


def test_revoke_by_cap_id(rt: Runtime, process: tuple[int, KernelClient]) -> None:
    pid, _ = process
    ws = caps_by_handle(rt, str(pid))["ws"]
    assert as_json(rt, "revoke", "--cap", str(ws["cap"])) == {"revoked": [ws["cap"]]}
    assert caps_by_handle(rt, str(pid))["ws"]["state"] == "revoked"


def test_grant_options_reach_the_record(rt: Runtime, process: tuple[int, KernelClient]) -> None:
    pid, _ = process
    out = as_json(rt, "grant", str(pid), "memory", "--scope", '{"namespace": "team"}', "--rights", "read",
                  "--approval", "always", "--uses", "3", "--expires-in", "0")
    rec = caps_by_handle(rt, str(pid))[out["handle"]]
    assert rec["approval"] == "always" and rec["uses"] == 3
    assert rec["state"] == "expired"  # expires in 0 s: already past when listed
    row = next(line for line in ok(rt, "caps", str(pid)).stdout.splitlines() if f" {out['handle']} " in line)
    assert "asks a human" in row and "3 uses left" in row and "expired" in row


def test_caps_readable_at_80_columns(rt: Runtime, process: tuple[int, KernelClient]) -> None:
    pid, _ = process
    r = CliRunner().invoke(main, ["caps", str(pid), "--state", str(rt.state_dir)], env={"COLUMNS": "80"})
    assert r.exit_code == 0, r.output
    row = next(line for line in r.stdout.splitlines() if " ws " in line)
    assert "operator" in row and "live" in row and "fs" in row


# --- kill and wait -----------------------------------------------------------------------------


def test_kill_ends_a_live_process_and_hides_its_dropped_caps(rt: Runtime, process: tuple[int, KernelClient]) -> None:
    pid, _ = process
    r = ok(rt, "kill", str(pid))
    assert f"killed {pid}" in r.stdout
    assert next(p for p in rt.ps() if p["pid"] == pid)["state"] == "killed"
    assert as_json(rt, "kill", str(pid)) == {"killed": []}  # already ended
    assert "ws" not in caps_by_handle(rt, str(pid))
    assert "holds no capabilities" in ok(rt, "caps", str(pid)).stdout
    assert caps_by_handle(rt, str(pid), "--all")["ws"]["state"] == "dropped"


def test_wait_exit_codes(rt: Runtime, process: tuple[int, KernelClient]) -> None:
    pid, client = process
    r = cli(rt, "wait", str(pid), "--timeout", "0.05")
    assert r.exit_code == 3, r.output
    assert "still running" in r.output
    client.call("proc.exit", {"status": "ok", "result": {"done": 1}})
    r = cli(rt, "wait", str(pid))
    assert r.exit_code == 0, r.output
    assert f"process {pid} ended: ok" in r.stdout and '"done": 1' in r.stdout
    assert as_json(rt, "wait", str(pid)) == {"pid": pid, "status": "ok", "result": {"done": 1}}


def test_wait_on_a_killed_process_exits_1(rt: Runtime, process: tuple[int, KernelClient]) -> None:
    pid, _ = process
    ok(rt, "kill", str(pid))
    r = cli(rt, "wait", str(pid))
    assert r.exit_code == 1, r.output
    assert "killed" in r.stdout


# --- memory ------------------------------------------------------------------------------------


def test_mem_put_get_round_trip(rt: Runtime) -> None:
    value = {"steps": ["draft", "review"], "n": 2, "ok": True, "none": None}
    r = ok(rt, "mem", "put", "team", "plan", json.dumps(value))
    assert "stored plan in team" in r.stdout
    assert json.loads(ok(rt, "mem", "get", "team", "plan").stdout) == value


def test_mem_put_bad_json_is_a_usage_error(rt: Runtime) -> None:
    r = cli(rt, "mem", "put", "team", "plan", "not json")
    assert r.exit_code == 2
    assert "VALUE" in r.output and "not JSON" in r.output


# --- errors ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("cap", "why"), [
    ("{kind: fs, scope: {root: ws}", "bad YAML/JSON"),
    ("[fs, read]", "a capability is a mapping"),
    ("{kind: fs, scope: {root: ws}, rights: [read], expires: 60}", "unknown capability field 'expires'"),
    ("{scope: {root: ws}, rights: [read]}", "needs a kind"),
])
def test_bad_cap_is_a_usage_error_naming_cap(rt: Runtime, cap: str, why: str) -> None:
    before = len(rt.ps())
    r = cli(rt, "spawn", "agent", "--cap", cap)
    assert r.exit_code == 2, r.output
    assert "--cap" in r.output and why in r.output
    assert len(rt.ps()) == before


def test_bad_caps_file_names_the_option(rt: Runtime, tmp_path: Path) -> None:
    f = tmp_path / "caps.yaml"
    f.write_text("- {kind: fs\n")
    r = cli(rt, "spawn", "agent", "--caps-file", str(f))
    assert r.exit_code == 2 and "--caps-file" in r.output


def test_bad_budget_is_a_usage_error(rt: Runtime) -> None:
    r = cli(rt, "spawn", "agent", "--budget", "tokens=5")
    assert r.exit_code == 2 and "--budget" in r.output and "llm_tokens" in r.output


def test_revoke_needs_pid_handle_or_cap(rt: Runtime) -> None:
    for args in ([], ["1"], ["1", "ws", "--cap", "3"]):
        r = cli(rt, "revoke", *args)
        assert r.exit_code == 2, (args, r.output)
        assert "PID HANDLE" in r.output


@pytest.mark.parametrize(("args", "code"), [
    (["revoke", "1", "nosuch"], "ENOENT"),
    (["kill", "999"], "ENOENT"),
    (["wait", "999"], "ENOENT"),
    (["budget", "999"], "ENOENT"),
    (["mem", "get", "team", "nosuch"], "ENOENT"),
    (["spawn", "nosuch-image"], "ENOENT"),
    (["spawn", "agent", "--cap", "{kind: fs, scope: {root: /etc}, rights: [read]}"], "EINVAL"),
    (["grant", "1", "fs", "--scope", "{root: ws}", "--rights", "fly"], "EINVAL"),
])
def test_kernel_refusal_exits_1_with_its_code(rt: Runtime, process: tuple[int, KernelClient], args: list[str],
                                              code: str) -> None:
    r = cli(rt, *args)
    assert r.exit_code == 1, r.output
    assert f"error: {code}:" in r.output


def test_no_kernel_running(tmp_path: Path) -> None:
    for args in (["caps"], ["spawn", "agent"], ["wait", "1"], ["mem", "get", "ns", "k"]):
        r = CliRunner().invoke(main, [*args, "--state", str(tmp_path / "none")])
        assert r.exit_code == 2, r.output
        assert "no running kernel" in r.output and "agentlibos kernel --state" in r.output


def test_image_add_goes_through_the_running_kernel(rt: Runtime, tmp_path: Path) -> None:
    image = tmp_path / "reader.yaml"
    image.write_text("name: reader\nprompt: You read.\ntools: [fs_read]\n")
    assert "registered image reader" in ok(rt, "image", "add", str(image)).stdout
    assert any(i["name"] == "reader" for i in rt.images())
    pid = int(as_json(rt, "spawn", "reader", "--external")["pid"])
    assert any(p["pid"] == pid and p["image"] == "reader" for p in rt.ps())


# --- checkpoints -------------------------------------------------------------------------------


def test_ckpt_create_list_show_restore_and_fork(rt: Runtime, process: tuple[int, KernelClient]) -> None:
    pid, client = process
    client.call("mem.put", {"key": "plan", "value": "first"})
    r = ok(rt, "ckpt", "create", str(pid), "--label", "before")
    assert f"of process {pid} (before)" in r.stdout
    ck = as_json(rt, "ckpt", "list", str(pid))[0]
    assert (ck["pid"], ck["label"], ck["author"]) == (pid, "before", "operator")
    client.call("mem.put", {"key": "plan", "value": "second"})
    ok(rt, "revoke", str(pid), "ws")
    ok(rt, "grant", str(pid), "fs", "--scope", "{root: ws}", "--rights", "read", "--name", "later")

    shown = ok(rt, "ckpt", "show", "before").stdout
    assert "a restore drops what process" in shown and "later" in shown
    row = next(line for line in shown.splitlines() if " ws " in line)
    assert "dead (EREVOKED)" in row
    assert "memory keys: 1" in shown

    r = ok(rt, "ckpt", "restore", str(pid), "before")
    assert f"process {pid} restored to checkpoint {ck['checkpoint']}" in r.stdout
    assert client.call("mem.get", {"key": "plan"})["value"] == "first"
    table = ok(rt, "ckpt", "list").stdout
    assert "operator" in table and "before" in table

    out = as_json(rt, "ckpt", "fork", "before", "--external", "--cap", WS.replace("name: ws", "name: again"))
    with rt.client(out["token"]) as forked:
        assert forked.call("mem.get", {"key": "plan"})["value"] == "first"
        assert sorted(c["handle"] for c in forked.call("cap.list", {})["caps"]) == ["again", "model", "self"]


def test_ckpt_refusals_exit_1_with_their_code(rt: Runtime, process: tuple[int, KernelClient]) -> None:
    pid, _ = process
    other, _ = spawn_external(rt)
    ok(rt, "ckpt", "create", str(other), "--label", "theirs")
    for args, code in ((["restore", str(pid), "theirs"], "ENOENT"), (["restore", str(pid), "1"], "EPERM"),
                       (["show", "nope"], "ENOENT"), (["create", "999"], "ENOENT")):
        r = cli(rt, "ckpt", *args)
        assert r.exit_code == 1 and code in r.stderr, (args, r.output)
    assert cli(rt, "ckpt", "create", "x").exit_code == 2
