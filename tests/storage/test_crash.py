"""Crash safety: SIGKILL a real kernel process at random points; no acknowledged entry is lost.

The engine is bench/crash.py (see its docstring for the design); this test runs it with
AGENTLIBOS_CRASH_POINTS kill points (default 200; `tox -e crash` runs 2000) and
AGENTLIBOS_CRASH_SEED (default 1). Every kill point is a separate kernel process killed with
SIGKILL: every AGENTLIBOS_CRASH_EXEC_EVERY-th (default 10) a fresh `agentlibos kernel`
interpreter, the others forked from a zygote that imported agentlibos once (same command, no
import cost). After each kill the log must verify, hold every acknowledged seq with the right
content, and reopen for writing in a kernel that continues the chain; each directory's whole log,
every killed session in it, must replay to the same decisions.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

import pytest

from agentlibos.storage import SQLiteLog

REPO = Path(__file__).resolve().parents[2]
POINTS = int(os.environ.get("AGENTLIBOS_CRASH_POINTS", "200"))
SEED = int(os.environ.get("AGENTLIBOS_CRASH_SEED", "1"))
EXEC_EVERY = int(os.environ.get("AGENTLIBOS_CRASH_EXEC_EVERY", "10"))


def _load_bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("agentlibos_bench_crash", REPO / "bench" / "crash.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up while the class is made
    spec.loader.exec_module(mod)
    return mod


crash = _load_bench()


def _summary(out: dict) -> str:  # type: ignore[type-arg]
    shown = {k: v for k, v in out.items() if k != "failures"}
    return f"{shown}\n" + "\n".join(out["failures"])


# ~0.15-0.4 s a point; the timeout scales so that `tox -e crash` (2000 points) fits too.
@pytest.mark.timeout(max(900, POINTS * 2))
def test_sigkill_never_loses_an_acknowledged_entry() -> None:
    out = crash.run_points(POINTS, seed=SEED, exec_every=EXEC_EVERY)
    assert out["points"] == POINTS, _summary(out)
    assert out["lost"] == 0, _summary(out)
    assert out["verify_failures"] == 0, _summary(out)
    assert out["restart_failures"] == 0, _summary(out)
    assert out["replay_failures"] == 0, _summary(out)
    assert out["traffic_errors"] == 0, _summary(out)
    assert out["failures"] == [], _summary(out)
    # The run exercised what it claims: acknowledgements to check, both launch paths, all modes.
    assert out["acknowledged"] >= 5 * POINTS, _summary(out)
    assert set(out["modes"]) == {"acks", "burst", "delay"} or POINTS < 20, _summary(out)
    assert out["exec_points"] >= 1, _summary(out)
    assert out["replayed_sessions"] >= POINTS // 20 * 21 or POINTS < 20, _summary(out)


def test_the_checks_catch_a_kernel_that_acknowledges_before_the_commit() -> None:
    # Negative control: the same run against kernels patched to reply before their batch
    # commits (and commit 5 ms late) must report lost acknowledgements, or the test above
    # would prove nothing.
    out = crash.run_points(30, seed=SEED, unsafe=True)
    assert out["lost"] > 0, _summary(out)
    assert all("acknowledged but is not in the log" in f or "log has" in f for f in out["failures"]), _summary(out)


def test_check_ack_names_each_kind_of_mismatch(tmp_path: Path) -> None:
    with SQLiteLog(tmp_path / "log.db") as log:
        op = log.stage("op", {"sys": "op.ps", "author": "operator"}, payload={})
        res = log.stage("result", {"sys": "op.ps", "ok": True}, pid=0, cause=op.seq, payload={"processes": []})
        d = log.stage("sys", {"sys": "mem.put", "decision": "allow"}, pid=3, payload={"key": "k", "value": 1})
        r2 = log.stage("result", {"sys": "mem.put", "ok": True}, pid=3, cause=d.seq, payload={})
        log.flush()
        Ack = crash.Ack
        assert crash.check_ack(log, Ack(res.seq, "op.ps", {}, True, {"processes": []}, 0)) is None
        assert crash.check_ack(log, Ack(r2.seq, "mem.put", {"key": "k", "value": 1}, True, {}, 3)) is None
        assert "not in the log" in crash.check_ack(log, Ack(99, "mem.put", {}, True, {}, 3))
        assert "differ from the sent" in crash.check_ack(log, Ack(r2.seq, "mem.put", {"key": "k", "value": 2}, True, {}, 3))
        assert "the reply was for" in crash.check_ack(log, Ack(r2.seq, "fs.write", {}, True, {}, 3))
        assert "differs from the replied" in crash.check_ack(log, Ack(res.seq, "op.ps", {}, True, {"processes": [1]}, 0))
        assert "pid" in crash.check_ack(log, Ack(r2.seq, "mem.put", {"key": "k", "value": 1}, True, {}, 4))
