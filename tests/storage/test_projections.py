"""Projections: what flush maintains equals a rebuild from the log, whatever the batching."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agentlibos.storage import SQLiteLog

pids = st.integers(1, 5)
caps = st.sampled_from(["c1", "c2", "c3", "c4"])
proc_state = st.fixed_dictionaries(
    {"pid": pids, "state": st.sampled_from(["running", "waiting", "exited"])},
    optional={
        "ppid": st.none() | pids,
        "image": st.text(max_size=4),
        "status": st.none() | st.integers(0, 3) | st.text(max_size=3),
        "result": st.dictionaries(st.text(max_size=3), st.integers(-(2**63), 2**63 - 1), max_size=2),
    },
).map(lambda b: ("proc.state", b))
cap_create = st.fixed_dictionaries(
    {
        "cap": caps,
        "holder": pids,
        "handle": st.text(max_size=3),
        "kind": st.sampled_from(["fs", "shell"]),
        "scope": st.dictionaries(st.text(max_size=3), st.text(max_size=3), max_size=2),
        "rights": st.lists(st.sampled_from(["read", "write"]), max_size=2),
        "approval": st.none() | st.just("ask"),
        "expires": st.none() | st.floats(0, 1e6),
        "uses": st.none() | st.integers(0, 9),
        "parent": st.none() | caps,
        "via": st.none() | st.text(max_size=3),
    }
).map(lambda b: ("cap.create", b))
cap_revoke = st.lists(caps, max_size=3).map(lambda cs: ("cap.revoke", {"caps": cs}))
cap_drop = caps.map(lambda c: ("cap.drop", {"cap": c}))
cap_use = st.tuples(caps, st.integers(0, 9)).map(lambda t: ("cap.use", {"cap": t[0], "uses": t[1]}))
other = st.just(("llm.call", {"pid": 1, "state": "ignored"}))
events = st.lists(
    st.one_of(proc_state, cap_create, cap_revoke, cap_drop, cap_use, other), max_size=30
)


def _tables(lg: SQLiteLog) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    return lg.projection("processes"), lg.projection("capabilities")


@settings(max_examples=100, deadline=None)
@given(events=events, cuts=st.sets(st.integers(0, 30)))
def test_flushed_projections_equal_rebuild(
    tmp_path_factory: pytest.TempPathFactory,
    events: list[tuple[str, dict[str, Any]]],
    cuts: set[int],
) -> None:
    path = tmp_path_factory.mktemp("proj") / "log.db"
    with SQLiteLog(path) as lg:
        for i, (kind, body) in enumerate(events):
            lg.stage(kind, body, pid=body.get("pid") if kind == "proc.state" else None)
            if i in cuts:
                lg.flush()
        lg.flush()
        incremental = _tables(lg)
        lg.rebuild_projections()
        assert _tables(lg) == incremental
    # A reopened log rebuilds to the same tables as well.
    with SQLiteLog(path) as lg:
        assert _tables(lg) == incremental
        lg.rebuild_projections()
        assert _tables(lg) == incremental
        assert lg.verify().ok


def test_projection_rows(log: SQLiteLog) -> None:
    s1 = log.append("proc.state", {"pid": 2, "state": "running", "ppid": 1, "image": "img"})
    log.append("proc.state", {"pid": 1, "state": "running"})
    s3 = log.append("proc.state", {"pid": 2, "state": "exited", "status": 0, "result": {"x": 1}})
    create = {
        "cap": "c1", "holder": 2, "handle": "h1", "kind": "fs", "scope": {"root": "/w"},
        "rights": ["read"], "approval": None, "expires": None, "uses": 3, "parent": None,
        "via": "grant",
    }  # fmt: skip
    c1 = log.append("cap.create", create)
    log.append("cap.create", {**create, "cap": "c2", "parent": "c1"})
    log.append("cap.use", {"cap": "c1", "uses": 2})
    log.append("cap.drop", {"cap": "c2"})
    rv = log.append("cap.revoke", {"caps": ["c1", "c9"]})
    log.append("llm.call", {"cap": "c2"})
    procs = log.projection("processes")
    assert [p["pid"] for p in procs] == [1, 2]
    assert procs[1] == {
        "pid": 2, "ppid": 1, "image": "img", "state": "exited", "status": 0,
        "created_seq": s1.seq, "updated_seq": s3.seq,
    }  # fmt: skip
    capt = {c["cap"]: c for c in log.projection("capabilities")}
    assert set(capt) == {"c1", "c2"}
    assert capt["c1"]["uses"] == 2 and capt["c1"]["revoked"] == 1
    assert capt["c1"]["revoked_seq"] == rv.seq and capt["c1"]["created_seq"] == c1.seq
    assert json.loads(capt["c1"]["scope"]) == {"root": "/w"}
    assert json.loads(capt["c1"]["rights"]) == ["read"]
    assert capt["c2"]["dropped"] == 1 and capt["c2"]["revoked"] == 0
    assert capt["c2"]["parent"] == "c1"


def test_malformed_projection_body_does_not_fail_the_log(log: SQLiteLog) -> None:
    log.append("proc.state", {"state": "no pid"})
    log.append("cap.revoke", {"caps": "not a list"})
    log.append("cap.create", {"cap": "c", "holder": 2**64 - 1})
    assert log.projection("processes") == []
    # Out of SQLite's integer range: stored (SQLite coerces it), not a failed flush.
    assert log.projection("capabilities")[0]["cap"] == "c"
    assert log.append("k", {}).seq == 4


def test_unknown_projection(log: SQLiteLog) -> None:
    with pytest.raises(ValueError):
        log.projection("log")


def test_projections_only_see_acknowledged_entries(log_path: Path) -> None:
    with SQLiteLog(log_path) as lg:
        lg.stage("proc.state", {"pid": 1, "state": "running"})
        assert lg.projection("processes") == []
    with SQLiteLog(log_path) as lg:
        assert lg.projection("processes") == []
