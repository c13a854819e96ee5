"""The SQLite log backend: WAL, synchronous=FULL, one transaction per flushed batch.

Schema changes go through numbered migrations recorded in `_migrations`.
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
import threading
import time
import urllib.parse
from collections.abc import Callable, Collection, Iterator
from typing import Any, Final

import msgpack
import sqlite_utils

from agentlibos.bus._errors import LogCorruptError, LogWriteError, StorageError

from ._canonical import canonical, canonical_pair
from ._log import (
    ENTRY_VERSION,
    NO_PAYLOAD,
    ZERO_HASH,
    LogBackend,
    LogEntry,
    RetentionPolicy,
    VerifyReport,
    entry_hash,
)
from ._projections import PROJECTED_KINDS, PROJECTIONS, apply_entries, clear, create_tables

__all__ = ["SCHEMA_VERSION", "SQLiteLog"]

_COLUMNS: Final = "seq, ts, pid, kind, cause, body, payload_digest, prev_hash, hash, v"
_INSERT: Final = (
    "INSERT INTO log (seq, ts, pid, kind, cause, body, payload_digest, payload, prev_hash, hash, v)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
_PAGE: Final = 512


def _m0001_log(db: sqlite_utils.Database) -> None:
    db["log"].create(  # type: ignore[union-attr]
        {
            "seq": int,
            "ts": float,
            "pid": int,
            "kind": str,
            "cause": int,
            "body": bytes,
            "payload_digest": str,
            "payload": bytes,
            "prev_hash": bytes,
            "hash": bytes,
            "v": int,
        },
        pk="seq",
    )
    db.execute(
        "CREATE TABLE meta (id INTEGER PRIMARY KEY CHECK (id = 1),"
        " head_seq INTEGER NOT NULL, head_hash BLOB NOT NULL)"
    )
    db.execute("INSERT INTO meta (id, head_seq, head_hash) VALUES (1, 0, ?)", (ZERO_HASH,))


def _m0002_projections(db: sqlite_utils.Database) -> None:
    create_tables(db.conn)


_MIGRATIONS: Final[tuple[tuple[str, Callable[[sqlite_utils.Database], None]], ...]] = (
    ("0001_log", _m0001_log),
    ("0002_projections", _m0002_projections),
)

#: Number of migrations this code knows; a file with more was written by a newer version.
SCHEMA_VERSION: Final = len(_MIGRATIONS)


def _row_to_entry(row: tuple[Any, ...]) -> LogEntry:
    seq, ts, pid, kind, cause, body, payload_digest, prev_hash, h, v = row
    try:
        decoded = msgpack.unpackb(body, raw=False)
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        raise LogCorruptError(seq, f"body is not msgpack ({exc})") from None
    return LogEntry(
        seq=seq,
        ts=ts,
        pid=pid,
        kind=kind,
        cause=cause,
        body=decoded,
        payload_digest=payload_digest,
        prev_hash=prev_hash,
        hash=h,
        v=v,
    )


def _check_optional_int(name: str, value: Any) -> None:
    if value is not None and type(value) is not int:
        raise TypeError(f"{name} must be an int or None, not {type(value).__name__}")


class SQLiteLog(LogBackend):
    """The log in one SQLite file; see LogBackend for the contract.

    `open_readonly` gives a reader (e.g. the CLI) that can run beside a writing kernel.
    """

    def __init__(self, path: str | os.PathLike[str], *, readonly: bool = False) -> None:
        self._path = os.fspath(path)
        self._readonly = readonly
        self._lock = threading.RLock()
        self._flush_lock = threading.Lock()
        self._staged: list[tuple[Any, ...]] = []
        self._staged_proj: list[tuple[int, str, Any]] = []
        self._failed: BaseException | None = None
        self._closed = False
        if readonly:
            uri = "file:" + urllib.parse.quote(self._path) + "?mode=ro"
            conn = sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False)
        else:
            conn = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False)
        try:
            self._db = sqlite_utils.Database(conn, execute_plugins=False)
            self._conn = conn
            if readonly:
                self._check_schema()
            else:
                self._db.enable_wal()
                conn.execute("PRAGMA synchronous=FULL")
                self._migrate()
            self._head = self._read_head()
            if not readonly:
                self._check_tail()
        except BaseException:
            conn.close()
            raise
        # The tip includes staged entries; the head only acknowledged ones.
        self._tip = self._head

    @classmethod
    def open_readonly(cls, path: str | os.PathLike[str]) -> SQLiteLog:
        """A reader that never writes; WAL lets it run beside a writer."""
        return cls(path, readonly=True)

    # -- schema ---------------------------------------------------------------------------

    def _applied(self) -> set[str]:
        if not self._db["_migrations"].exists():
            return set()
        return {r["name"] for r in self._db.query("SELECT name FROM _migrations")}

    def _check_known(self, applied: set[str]) -> None:
        unknown = applied - {name for name, _ in _MIGRATIONS}
        if unknown:
            raise StorageError(
                f"{self._path}: written by a newer schema (unknown migrations {sorted(unknown)})"
            )

    def _migrate(self) -> None:
        self._db["_migrations"].create(  # type: ignore[union-attr]
            {"name": str, "applied_at": float}, pk="name", if_not_exists=True
        )
        applied = self._applied()
        self._check_known(applied)
        for name, migration in _MIGRATIONS:
            if name in applied:
                continue
            with self._db.atomic():
                migration(self._db)
                self._db.execute(
                    "INSERT INTO _migrations (name, applied_at) VALUES (?, ?)", (name, time.time())
                )

    def _check_schema(self) -> None:
        applied = self._applied()
        self._check_known(applied)
        if len(applied) != SCHEMA_VERSION:
            raise StorageError(f"{self._path}: not a log at schema version {SCHEMA_VERSION}")

    def _read_head(self) -> tuple[int, bytes]:
        row = self._conn.execute("SELECT head_seq, head_hash FROM meta WHERE id = 1").fetchone()
        if row is None:
            raise LogCorruptError(1, "the meta head row is missing")
        return int(row[0]), bytes(row[1])

    def _check_tail(self) -> None:
        # A writer must not extend a chain whose tail disagrees with the recorded head; the full
        # check is verify(), too slow to run on every open.
        head_seq, head_hash = self._head
        row = self._conn.execute("SELECT seq, hash FROM log ORDER BY seq DESC LIMIT 1").fetchone()
        last_seq, last_hash = (0, ZERO_HASH) if row is None else (row[0], row[1])
        if last_seq < head_seq:
            raise LogCorruptError(
                last_seq + 1, f"truncated: head records seq {head_seq}, log ends at {last_seq}"
            )
        if last_seq > head_seq:
            raise LogCorruptError(head_seq + 1, f"entries beyond the recorded head {head_seq}")
        if last_hash != head_hash:
            raise LogCorruptError(head_seq, "last entry's hash differs from the recorded head")

    # -- state ----------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise StorageError("the log is closed")

    def _check_writable(self) -> None:
        self._check_open()
        if self._readonly:
            raise StorageError("the log was opened read-only")
        if self._failed is not None:
            raise LogWriteError(f"the log failed earlier and refuses writes: {self._failed!r}")

    def _write(self, work: Callable[[sqlite3.Connection], int]) -> int:
        """Run `work` in one write transaction; any failure leaves the log failed for good."""
        conn = self._conn
        try:
            conn.execute("BEGIN IMMEDIATE")
            n = work(conn)
            conn.execute("COMMIT")
        except BaseException as exc:
            # After a failed commit or fsync the on-disk state is unknown, and seqs/hashes
            # already handed out may never land: trust nothing from here on.
            self._failed = exc
            self._staged.clear()
            self._staged_proj.clear()
            try:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
            except sqlite3.Error:
                pass
            if isinstance(exc, Exception):
                raise LogWriteError(f"log write failed: {exc}") from exc
            raise
        return n

    # -- writing --------------------------------------------------------------------------

    def stage(
        self,
        kind: str,
        body: dict[str, Any],
        *,
        pid: int | None = None,
        cause: int | None = None,
        payload: Any = NO_PAYLOAD,
        ts: float | None = None,
    ) -> LogEntry:
        """Assign the next seq and hash now; the entry is durable only after `flush`."""
        if type(kind) is not str or type(body) is not dict:
            raise TypeError(f"kind must be a str and body a dict, not {kind!r}, {type(body)}")
        if pid is not None and type(pid) is not int:
            _check_optional_int("pid", pid)
        if cause is not None and type(cause) is not int:
            _check_optional_int("cause", cause)
        # Encode before taking a seq, so a bad body costs no gap and no failure.
        norm, body_bytes = canonical_pair(body)
        if payload is NO_PAYLOAD:
            payload_blob: bytes | None = None
            payload_digest: str | None = None
        else:
            payload_blob = canonical(payload)
            payload_digest = hashlib.sha256(payload_blob).hexdigest()
        t = time.time() if ts is None else float(ts)
        with self._lock:
            if self._failed is not None or self._closed or self._readonly:
                self._check_writable()
            seq, prev = self._tip[0] + 1, self._tip[1]
            h = entry_hash(prev, ENTRY_VERSION, seq, t, pid, kind, cause, body_bytes, payload_digest)
            self._staged.append(
                (seq, t, pid, kind, cause, body_bytes, payload_digest, payload_blob, prev, h,
                 ENTRY_VERSION)
            )  # fmt: skip
            if kind in PROJECTED_KINDS:
                self._staged_proj.append((seq, kind, norm))
            self._tip = (seq, h)
        return LogEntry(seq, t, pid, kind, cause, norm, payload_digest, prev, h, ENTRY_VERSION)

    def flush(self) -> int:
        """Write every staged entry, its payload, the projections and the head in one commit."""
        # Staging goes on while a batch is written (the kernel overlaps its work with the fsync);
        # flushes themselves are serialized so batches land in seq order.
        with self._flush_lock:
            with self._lock:
                self._check_writable()
                if not self._staged:
                    return 0
                rows, proj, tip = self._staged, self._staged_proj, self._tip
                self._staged, self._staged_proj = [], []

            def work(conn: sqlite3.Connection) -> int:
                conn.executemany(_INSERT, rows)
                conn.execute("UPDATE meta SET head_seq = ?, head_hash = ? WHERE id = 1", tip)
                if proj:
                    apply_entries(conn, proj)
                return len(rows)

            try:
                n = self._write(work)
            except BaseException:
                with self._lock:
                    self._staged.clear()
                    self._staged_proj.clear()
                raise
            with self._lock:
                self._head = tip
            return n

    def apply_retention(self, policy: RetentionPolicy, now: float | None = None) -> int:
        """Drop payloads as `policy` says; digests stay in the chain, so verify still passes."""
        with self._lock:
            self._check_writable()
            if policy.mode == "keep":
                return 0
            params: tuple[float, ...] = ()
            if policy.mode == "digest":
                sql = "UPDATE log SET payload = NULL WHERE payload IS NOT NULL"
            else:
                assert policy.days is not None
                cutoff = (time.time() if now is None else now) - policy.days * 86400.0
                sql = "UPDATE log SET payload = NULL WHERE payload IS NOT NULL AND ts < ?"
                params = (cutoff,)
            return self._write(lambda conn: conn.execute(sql, params).rowcount)

    def rebuild_projections(self) -> None:
        """Recompute every projection table from the whole log."""
        kinds = sorted(PROJECTED_KINDS)
        select = (
            f"SELECT seq, kind, body FROM log WHERE kind IN ({', '.join('?' * len(kinds))})"
            " ORDER BY seq"
        )

        def work(conn: sqlite3.Connection) -> int:
            clear(conn)
            rows = conn.execute(select, kinds)
            apply_entries(
                conn, ((s, k, msgpack.unpackb(b, raw=False)) for s, k, b in rows)
            )
            return 0

        with self._lock:
            self._check_writable()
            self._write(work)

    # -- reading --------------------------------------------------------------------------

    def head(self) -> tuple[int, bytes]:
        """`(seq, hash)` of the last acknowledged entry; `(0, ZERO_HASH)` when empty."""
        with self._lock:
            self._check_open()
            if self._readonly:
                # A writer elsewhere moves the head: read it fresh.
                self._head = self._read_head()
            return self._head

    def get(self, seq: int) -> LogEntry | None:
        with self._lock:
            self._check_open()
            row = self._conn.execute(f"SELECT {_COLUMNS} FROM log WHERE seq = ?", (seq,)).fetchone()
        return None if row is None else _row_to_entry(row)

    def entries(
        self,
        start: int = 1,
        end: int | None = None,
        *,
        kinds: Collection[str] | None = None,
        pid: int | None = None,
    ) -> Iterator[LogEntry]:
        """Acknowledged entries with start <= seq <= end (inclusive), ascending, a page at a time."""
        where, params = ["seq > ?"], [start - 1]
        if end is not None:
            where.append("seq <= ?")
            params.append(end)
        if kinds is not None:
            kind_list = list(kinds)
            if not kind_list:
                return
            where.append(f"kind IN ({', '.join('?' * len(kind_list))})")
            params.extend(kind_list)  # type: ignore[arg-type]
        if pid is not None:
            where.append("pid = ?")
            params.append(pid)
        sql = f"SELECT {_COLUMNS} FROM log WHERE {' AND '.join(where)} ORDER BY seq LIMIT {_PAGE}"
        while True:
            # One page per lock hold: never keep a read open across a yield to the caller.
            with self._lock:
                self._check_open()
                rows = self._conn.execute(sql, params).fetchall()
            for row in rows:
                yield _row_to_entry(row)
            if len(rows) < _PAGE:
                return
            params[0] = rows[-1][0]

    def entries_with_payloads(self, start: int = 1) -> Iterator[tuple[LogEntry, bytes | None]]:
        """Every entry from `start` with its stored payload bytes (None: no payload or purged), a
        page at a time: a replay reads the log in one pass instead of one query per payload.
        Check a payload with `decode_payload`."""
        sql = f"SELECT {_COLUMNS}, payload FROM log WHERE seq >= ? ORDER BY seq LIMIT {_PAGE}"
        after = start
        while True:
            with self._lock:
                self._check_open()
                rows = self._conn.execute(sql, (after,)).fetchall()
            for row in rows:
                yield _row_to_entry(row[:-1]), row[-1]
            if len(rows) < _PAGE:
                return
            after = rows[-1][0] + 1

    @staticmethod
    def decode_payload(entry: LogEntry, blob: bytes | None) -> tuple[bool, Any]:
        """`(True, value)` for a stored payload that matches the entry's digest, `(False, None)`
        when none is stored; LogCorruptError when it does not match."""
        if blob is None:
            return False, None
        if not isinstance(blob, bytes) or hashlib.sha256(blob).hexdigest() != entry.payload_digest:
            raise LogCorruptError(entry.seq, "payload does not match its digest")
        return True, msgpack.unpackb(blob, raw=False)

    def payload(self, seq: int) -> tuple[bool, Any]:
        """`(True, value)` if the entry's payload is stored, else `(False, None)`."""
        with self._lock:
            self._check_open()
            row = self._conn.execute(
                "SELECT payload_digest, payload FROM log WHERE seq = ?", (seq,)
            ).fetchone()
        if row is None or row[1] is None:
            return False, None
        digest_, blob = row
        if not isinstance(blob, bytes) or hashlib.sha256(blob).hexdigest() != digest_:
            raise LogCorruptError(seq, "payload does not match its digest")
        return True, msgpack.unpackb(blob, raw=False)

    def verify(self) -> VerifyReport:
        """Check the whole chain in one read snapshot, streaming; stop at the first bad entry."""
        with self._lock:
            self._check_open()
            conn = self._conn
            conn.execute("BEGIN")
            try:
                return self._verify(conn)
            finally:
                conn.execute("COMMIT")

    def _verify(self, conn: sqlite3.Connection) -> VerifyReport:
        meta = conn.execute("SELECT head_seq, head_hash FROM meta WHERE id = 1").fetchone()
        head_seq = int(meta[0]) if meta is not None else 0

        def bad(seq: int, checked: int, reason: str) -> VerifyReport:
            return VerifyReport(False, checked, seq, reason, head_seq)

        expected, prev = 1, ZERO_HASH
        rows = conn.execute(
            "SELECT seq, ts, pid, kind, cause, body, payload_digest, payload, prev_hash, hash, v"
            " FROM log ORDER BY seq"
        )
        for seq, ts, pid, kind, cause, body, pdig, payload, prev_hash, h, v in rows:
            checked = expected - 1
            if seq != expected:
                if seq > expected:
                    return bad(expected, checked, f"seq {expected} is missing (next is {seq})")
                return bad(seq, checked, f"unexpected seq {seq} (expected {expected})")
            if prev_hash != prev:
                return bad(seq, checked, "prev_hash does not match the previous entry's hash")
            try:
                recomputed = entry_hash(prev, v, seq, ts, pid, kind, cause, body, pdig)
            except (TypeError, ValueError) as exc:
                return bad(seq, checked, f"malformed row: {exc}")
            if recomputed != h:
                return bad(seq, checked, "hash does not match the entry's contents")
            if payload is not None:
                if pdig is None:
                    return bad(seq, checked, "payload stored without a digest")
                if not isinstance(payload, bytes) or hashlib.sha256(payload).hexdigest() != pdig:
                    return bad(seq, checked, "payload does not match its digest")
            prev = h
            expected += 1
        last = expected - 1
        if meta is None:
            return bad(1, last, "the meta head row is missing")
        if head_seq > last:
            return bad(last + 1, last, f"truncated: head records seq {head_seq}, log ends at {last}")
        if head_seq < last:
            return bad(head_seq + 1, head_seq, f"entries beyond the recorded head {head_seq}")
        if meta[1] != prev:
            return bad(max(last, 1), last - 1, "the recorded head hash differs from the last entry's")
        return VerifyReport(True, last, None, None, head_seq)

    def projection(self, name: str, upto: int | None = None) -> list[dict[str, Any]]:
        """Rows of projection `name` ("processes" or "capabilities"), ordered by key; with
        `upto`, as they stood after entry `upto` (folded again from the log up to there)."""
        if name not in PROJECTIONS:
            raise ValueError(f"unknown projection {name!r} (known: {sorted(PROJECTIONS)})")
        key = PROJECTIONS[name][0]
        if upto is not None:
            scratch = sqlite3.connect(":memory:")
            try:
                create_tables(scratch)
                apply_entries(scratch, ((e.seq, e.kind, e.body)
                                        for e in self.entries(1, upto, kinds=sorted(PROJECTED_KINDS))))
                cur = scratch.execute(f"SELECT * FROM {name} ORDER BY {key}")
                cols = [d[0] for d in cur.description]
                return [dict(zip(cols, row, strict=True)) for row in cur.fetchall()]
            finally:
                scratch.close()
        with self._lock:
            self._check_open()
            return list(self._db.query(f"SELECT * FROM {name} ORDER BY {key}"))

    # -- lifetime -------------------------------------------------------------------------

    def close(self) -> None:
        """Close the file; entries staged but not flushed are dropped, never written."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._staged.clear()
            self._staged_proj.clear()
            self._conn.close()

    def __repr__(self) -> str:
        mode = "ro" if self._readonly else "rw"
        return f"SQLiteLog({self._path!r}, {mode}, head={self._head[0]})"
