"""verify(): any single edit, deletion, swap, truncation or payload tamper is found and located."""

from __future__ import annotations

import os
import sqlite3
import tempfile
from pathlib import Path
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from agentlibos.storage import NO_PAYLOAD, SQLiteLog, canonical

ints = st.integers(min_value=-(2**63), max_value=2**64 - 1)
bodies = st.dictionaries(
    st.text(max_size=5),
    st.none() | ints | st.text(max_size=10) | st.lists(ints, max_size=3),
    max_size=4,
)
entry_specs = st.tuples(
    st.sampled_from(["sys.request", "sys.result", "llm.call", "proc.state"]),
    bodies,
    st.none() | st.integers(min_value=0, max_value=50),
    st.just(NO_PAYLOAD) | st.text(max_size=20) | st.binary(max_size=20),
)
COLUMNS = ["body", "kind", "ts", "pid", "cause", "payload_digest", "prev_hash", "hash"]
mutations = st.one_of(
    st.tuples(st.just("edit"), st.sampled_from(COLUMNS)),
    st.tuples(st.just("delete"), st.none()),
    st.tuples(st.just("swap"), st.none()),
    st.tuples(st.just("truncate"), st.none()),
    st.tuples(st.just("payload"), st.none()),
)


def _changed(column: str, old: Any) -> Any:
    """A value for `column` that differs from `old`."""
    if column == "body":
        return canonical({"tampered": True, "was": old})
    if column == "kind":
        return str(old) + "x"
    if column == "ts":
        return old + 1.0
    if column in ("pid", "cause"):
        return 1 if old is None else (None if old == 1 else old + 1)
    if column == "payload_digest":
        return "0" * 64 if old != "0" * 64 else "1" * 64
    # prev_hash / hash: flip the first byte.
    return bytes([old[0] ^ 1]) + old[1:]


def _mutate(path: Path, mutation: tuple[str, str | None], n: int, data: st.DataObject) -> int:
    """Apply one mutation with raw sqlite3; return the seq verify must name."""
    what, column = mutation
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        if what == "edit":
            assert column is not None
            seq = data.draw(st.integers(1, n), label="seq")
            (old,) = conn.execute(f"SELECT {column} FROM log WHERE seq = ?", (seq,)).fetchone()
            conn.execute(f"UPDATE log SET {column} = ? WHERE seq = ?", (_changed(column, old), seq))
            return seq
        if what == "delete":
            seq = data.draw(st.integers(1, n), label="seq")
            conn.execute("DELETE FROM log WHERE seq = ?", (seq,))
            return seq
        if what == "swap":
            a = data.draw(st.integers(1, n - 1), label="a")
            b = data.draw(st.integers(a + 1, n), label="b")
            cols = "ts, pid, kind, cause, body, payload_digest, payload, prev_hash, hash, v"
            ra = conn.execute(f"SELECT {cols} FROM log WHERE seq = ?", (a,)).fetchone()
            rb = conn.execute(f"SELECT {cols} FROM log WHERE seq = ?", (b,)).fetchone()
            sets = ", ".join(f"{c.strip()} = ?" for c in cols.split(","))
            conn.execute("BEGIN")
            conn.execute(f"UPDATE log SET {sets} WHERE seq = ?", (*rb, a))
            conn.execute(f"UPDATE log SET {sets} WHERE seq = ?", (*ra, b))
            conn.execute("COMMIT")
            return a
        if what == "truncate":
            keep = data.draw(st.integers(0, n - 1), label="keep")
            conn.execute("DELETE FROM log WHERE seq > ?", (keep,))
            return keep + 1
        # Tamper a payload; on an entry without one, plant a payload it never had.
        seq = data.draw(st.integers(1, n), label="seq")
        (old,) = conn.execute("SELECT payload FROM log WHERE seq = ?", (seq,)).fetchone()
        new = b"\xc0" if old is None else old + b"!"
        conn.execute("UPDATE log SET payload = ? WHERE seq = ?", (new, seq))
        return seq
    finally:
        conn.close()


@settings(max_examples=200, deadline=None)
@given(
    specs=st.lists(entry_specs, min_size=5, max_size=40),
    mutation=mutations,
    batch=st.integers(1, 10),
    data=st.data(),
)
def test_single_mutation_is_detected(
    specs: list[tuple[str, dict[str, Any], int | None, Any]],
    mutation: tuple[str, str | None],
    batch: int,
    data: st.DataObject,
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "log.db"
        with SQLiteLog(path) as lg:
            for i, (kind, body, pid, payload) in enumerate(specs):
                lg.stage(kind, body, pid=pid, cause=i or None, payload=payload, ts=1000.0 + i)
                if i % batch == 0:
                    lg.flush()
            lg.flush()
            assert lg.verify().ok
        expected = _mutate(path, mutation, len(specs), data)
        with SQLiteLog.open_readonly(path) as reader:
            report = reader.verify()
        assert not report.ok, mutation
        assert report.first_bad_seq == expected, (mutation, report)
        assert report.reason
        assert report.head_seq == len(specs)
        assert report.checked == expected - 1


def test_verify_reasons_name_the_fault(tmp_path: Path) -> None:
    path = tmp_path / "log.db"
    with SQLiteLog(path) as lg:
        for i in range(5):
            lg.append("k", {"i": i}, payload=i)
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("UPDATE log SET payload = ? WHERE seq = 4", (canonical(99),))
    conn.close()
    with SQLiteLog.open_readonly(path) as reader:
        report = reader.verify()
    assert (report.ok, report.first_bad_seq) == (False, 4)
    assert report.reason is not None and "payload" in report.reason


def test_verify_streams_a_large_log(tmp_path: Path) -> None:
    with SQLiteLog(tmp_path / "log.db") as lg:
        for i in range(20_000):
            lg.stage("k", {"i": i}, payload={"p": i})
            if i % 1000 == 999:
                lg.flush()
        lg.flush()
        report = lg.verify()
    assert report.ok and report.checked == 20_000


def test_mutation_seen_by_writer_reopen_too(tmp_path: Path) -> None:
    path = tmp_path / "log.db"
    with SQLiteLog(path) as lg:
        for i in range(3):
            lg.append("k", {"i": i})
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("UPDATE log SET kind = 'z' WHERE seq = 2")
    conn.close()
    with SQLiteLog(path) as lg:
        report = lg.verify()
    assert (report.ok, report.first_bad_seq) == (False, 2)
    assert not os.path.exists(str(path) + "-journal")
