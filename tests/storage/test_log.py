"""SQLiteLog: staging and flushing, reopening, failure state, reads, retention, read-only."""

from __future__ import annotations

import copy
import hashlib
import pickle
import sqlite3
from pathlib import Path

import pytest

from agentlibos import storage
from agentlibos.bus._errors import LogCorruptError, LogWriteError, StorageError
from agentlibos.storage import (
    NO_PAYLOAD,
    ZERO_HASH,
    LogBackend,
    RetentionPolicy,
    SQLiteLog,
    canonical,
    digest,
)


def test_public_surface() -> None:
    assert set(storage.__all__) == {
        "ENTRY_VERSION",
        "NO_PAYLOAD",
        "SCHEMA_VERSION",
        "ZERO_HASH",
        "LogBackend",
        "LogEntry",
        "RetentionPolicy",
        "SQLiteLog",
        "VerifyReport",
        "canonical",
        "digest",
    }
    exported = {n for n in dir(storage) if not n.startswith("_")}
    assert exported == set(storage.__all__)
    assert issubclass(SQLiteLog, LogBackend)


def test_empty_log(log: SQLiteLog) -> None:
    assert log.head() == (0, ZERO_HASH)
    assert log.get(1) is None
    assert list(log.entries()) == []
    report = log.verify()
    assert report.ok and report.checked == 0 and report.head_seq == 0


def test_stage_assigns_seq_and_hash_at_once(log: SQLiteLog) -> None:
    e1 = log.stage("a", {"x": 1}, pid=7, payload={"big": "data"}, ts=10.0)
    e2 = log.stage("b", {"y": (1, 2)}, cause=e1.seq, ts=11.0)
    assert (e1.seq, e2.seq) == (1, 2)
    assert e1.prev_hash == ZERO_HASH and e2.prev_hash == e1.hash
    record = [e1.v, 1, 10.0, 7, "a", None, {"x": 1}, digest({"big": "data"})]
    assert e1.hash == hashlib.sha256(ZERO_HASH + canonical(record)).digest()
    assert e2.body == {"y": [1, 2]} and e2.payload_digest is None
    # Staged is not acknowledged: nothing readable, head unchanged.
    assert log.head() == (0, ZERO_HASH) and log.get(1) is None
    assert log.flush() == 2
    assert log.flush() == 0
    assert log.head() == (2, e2.hash)
    assert log.get(1) == e1 and log.get(2) == e2


def test_stage_rejects_bad_input_without_using_a_seq(log: SQLiteLog) -> None:
    with pytest.raises(TypeError):
        log.stage("k", {"x": object()})
    with pytest.raises(TypeError):
        log.stage("k", {}, payload={1: 2})
    with pytest.raises(TypeError):
        log.stage("k", {}, pid="1")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        log.stage("k", [])  # type: ignore[arg-type]
    assert log.append("k", {}).seq == 1


def test_body_is_a_copy(log: SQLiteLog) -> None:
    body = {"list": [1]}
    entry = log.stage("k", body)
    body["list"].append(2)
    assert entry.body == {"list": [1]}
    log.flush()
    assert log.verify().ok


def test_reopen_continues_chain_and_drops_unflushed(log_path: Path) -> None:
    with SQLiteLog(log_path) as lg:
        acked = [lg.append("k", {"i": i}) for i in range(3)]
        lg.stage("lost", {"i": 99})
        lg.stage("lost", {"i": 100})
    with SQLiteLog(log_path) as lg:
        assert lg.head() == (3, acked[-1].hash)
        assert [e.kind for e in lg.entries()] == ["k"] * 3
        nxt = lg.append("k", {"i": 3})
        assert nxt.seq == 4 and nxt.prev_hash == acked[-1].hash
    with SQLiteLog(log_path) as lg:
        assert [e.seq for e in lg.entries()] == [1, 2, 3, 4]
        assert lg.verify().ok


def test_migrations_recorded(log_path: Path) -> None:
    SQLiteLog(log_path).close()
    SQLiteLog(log_path).close()
    with sqlite3.connect(log_path) as conn:
        names = [r[0] for r in conn.execute("SELECT name FROM _migrations ORDER BY name")]
        mode = conn.execute("PRAGMA journal_mode").fetchone()[0]
    conn.close()
    assert len(names) == storage.SCHEMA_VERSION and names == sorted(set(names))
    assert mode == "wal"


def test_newer_schema_refused(log_path: Path) -> None:
    SQLiteLog(log_path).close()
    conn = sqlite3.connect(log_path)
    with conn:
        conn.execute("INSERT INTO _migrations (name, applied_at) VALUES ('9999_future', 0)")
    conn.close()
    with pytest.raises(StorageError, match="newer schema"):
        SQLiteLog(log_path)


def test_writer_refuses_truncated_file(log_path: Path) -> None:
    with SQLiteLog(log_path) as lg:
        for i in range(3):
            lg.append("k", {"i": i})
    conn = sqlite3.connect(log_path)
    with conn:
        conn.execute("DELETE FROM log WHERE seq = 3")
    conn.close()
    with pytest.raises(LogCorruptError) as info:
        SQLiteLog(log_path)
    assert info.value.seq == 3


def test_write_error_when_connection_is_gone(log: SQLiteLog) -> None:
    log.append("k", {})
    log._conn.close()  # the file vanishing under us, as far as the log can tell
    log.stage("k", {})
    with pytest.raises(LogWriteError):
        log.flush()
    with pytest.raises(LogWriteError):
        log.stage("k", {})
    with pytest.raises(LogWriteError):
        log.flush()
    with pytest.raises(LogWriteError):
        log.append("k", {})


def test_write_error_when_disk_full(log_path: Path) -> None:
    with SQLiteLog(log_path) as lg:
        acked = lg.append("k", {"i": 0})
        pages = lg._conn.execute("PRAGMA page_count").fetchone()[0]
        lg._conn.execute(f"PRAGMA max_page_count = {pages}")
        for i in range(50):
            lg.stage("k", {"i": i}, payload=b"x" * 4096)
        with pytest.raises(LogWriteError, match="full"):
            lg.flush()
        with pytest.raises(LogWriteError):
            lg.stage("k", {})
        with pytest.raises(LogWriteError):
            lg.apply_retention(RetentionPolicy("digest"))
        # Reads still work: a failed log can be inspected.
        assert lg.get(1) == acked
    with SQLiteLog(log_path) as lg:
        assert lg.head() == (1, acked.hash)
        assert lg.verify().ok


def test_entries_filters_and_pages(log: SQLiteLog) -> None:
    for i in range(1200):
        log.stage("even" if i % 2 == 0 else "odd", {"i": i}, pid=i % 3)
    log.flush()
    assert [e.seq for e in log.entries()] == list(range(1, 1201))
    assert [e.seq for e in log.entries(600, 605)] == list(range(600, 606))
    assert all(e.kind == "odd" for e in log.entries(kinds=["odd"]))
    assert len(list(log.entries(kinds={"odd"}))) == 600
    assert list(log.entries(kinds=[])) == []
    got = list(log.entries(10, 30, kinds=("even",), pid=1))
    assert got and all(e.pid == 1 and e.kind == "even" and 10 <= e.seq <= 30 for e in got)


def test_payloads_stored_apart(log: SQLiteLog) -> None:
    a = log.append("k", {}, payload={"text": "hello"})
    b = log.append("k", {}, payload=None)
    c = log.append("k", {})
    assert log.payload(a.seq) == (True, {"text": "hello"})
    assert log.payload(b.seq) == (True, None)
    assert b.payload_digest == digest(None)
    assert log.payload(c.seq) == (False, None) and c.payload_digest is None
    assert log.payload(99) == (False, None)
    assert repr(NO_PAYLOAD) == "NO_PAYLOAD"
    assert copy.deepcopy(NO_PAYLOAD) is NO_PAYLOAD
    assert pickle.loads(pickle.dumps(NO_PAYLOAD)) is NO_PAYLOAD


def test_retention_digest_drops_all_payloads(log: SQLiteLog) -> None:
    for i in range(10):
        log.append("k", {"i": i}, payload={"i": i})
    assert log.apply_retention(RetentionPolicy("keep")) == 0
    assert log.apply_retention(RetentionPolicy("digest")) == 10
    assert all(log.payload(s) == (False, None) for s in range(1, 11))
    assert all(e.payload_digest is not None for e in log.entries())
    assert log.verify().ok


def test_retention_purge_after(log: SQLiteLog) -> None:
    day = 86400.0
    for i in range(10):
        log.stage("k", {"i": i}, payload={"i": i}, ts=1000 * day + i * day)
    log.flush()
    dropped = log.apply_retention(RetentionPolicy("purge_after", 3.0), now=1010 * day)
    assert dropped == 7
    assert [log.payload(s)[0] for s in range(1, 11)] == [False] * 7 + [True] * 3
    assert log.verify().ok


def test_retention_policy_validation() -> None:
    with pytest.raises(ValueError):
        RetentionPolicy("purge_after")
    with pytest.raises(ValueError):
        RetentionPolicy("digest", 3)
    with pytest.raises(ValueError):
        RetentionPolicy("forever")  # type: ignore[arg-type]


def test_readonly_reader_beside_writer(log_path: Path) -> None:
    with SQLiteLog(log_path) as writer:
        writer.append("k", {"i": 0})
        with SQLiteLog.open_readonly(log_path) as reader:
            assert reader.head()[0] == 1
            writer.append("k", {"i": 1}, payload="p")
            assert reader.head() == writer.head()
            assert [e.seq for e in reader.entries()] == [1, 2]
            assert reader.payload(2) == (True, "p")
            assert reader.verify().ok
            with pytest.raises(StorageError):
                reader.stage("k", {})
            with pytest.raises(StorageError):
                reader.rebuild_projections()


def test_readonly_missing_file(tmp_path: Path) -> None:
    with pytest.raises(sqlite3.Error):
        SQLiteLog.open_readonly(tmp_path / "absent.db")


def test_closed_log_refuses(log: SQLiteLog) -> None:
    log.close()
    log.close()
    with pytest.raises(StorageError):
        log.stage("k", {})
    with pytest.raises(StorageError):
        log.head()
