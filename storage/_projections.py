"""The reducer from log entries to the `processes` and `capabilities` tables.

Flush and rebuild both go through `apply_entries`, so the tables never depend on batch bounds.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable
from typing import Any, Final

__all__ = ["PROJECTED_KINDS", "PROJECTIONS", "apply_entries", "clear", "create_tables"]

#: Projection name -> (key column, CREATE TABLE statement).
PROJECTIONS: Final[dict[str, tuple[str, str]]] = {
    "processes": (
        "pid",
        """CREATE TABLE IF NOT EXISTS processes (
            pid INTEGER PRIMARY KEY, ppid INTEGER, image TEXT, state TEXT, status,
            created_seq INTEGER NOT NULL, updated_seq INTEGER NOT NULL)""",
    ),
    "capabilities": (
        "cap",
        """CREATE TABLE IF NOT EXISTS capabilities (
            cap INT PRIMARY KEY, holder INTEGER, handle TEXT, kind TEXT, scope TEXT,
            rights TEXT, approval TEXT, expires REAL, uses INTEGER, parent INTEGER, via TEXT,
            revoked INTEGER NOT NULL DEFAULT 0, dropped INTEGER NOT NULL DEFAULT 0,
            created_seq INTEGER NOT NULL, revoked_seq INTEGER)""",
    ),
}

#: Only these kinds change a projection; every other kind is skipped without a look.
PROJECTED_KINDS: Final = frozenset({"proc.state", "cap.create", "cap.revoke", "cap.drop", "cap.use"})

_PROC_OPTIONAL: Final = ("ppid", "image", "status")
_CAP_COLUMNS: Final = (
    "holder", "handle", "kind", "scope", "rights", "approval", "expires", "uses", "parent", "via",
)  # fmt: skip


def _json(value: Any) -> str:
    # Bytes have no JSON form; hex keeps the column readable and the encoding deterministic.
    return json.dumps(
        value,
        sort_keys=True,
        separators=(",", ":"),
        default=lambda o: o.hex() if isinstance(o, bytes) else repr(o),
    )


def _scalar(value: Any) -> Any:
    """A value SQLite can store; containers become JSON text."""
    if isinstance(value, int) and not -(2**63) <= value < 2**63:
        # SQLite integers are signed 64-bit; msgpack allows up to 2**64 - 1.
        return str(value)
    if value is None or isinstance(value, (bool, int, float, str, bytes)):
        return value
    return _json(value)


def create_tables(conn: sqlite3.Connection) -> None:
    for _key, ddl in PROJECTIONS.values():
        conn.execute(ddl)


def clear(conn: sqlite3.Connection) -> None:
    for name in PROJECTIONS:
        conn.execute(f"DELETE FROM {name}")


def _proc_state(conn: sqlite3.Connection, seq: int, body: dict[str, Any]) -> None:
    pid = body.get("pid")
    if not isinstance(pid, int):
        return
    present = [f for f in _PROC_OPTIONAL if f in body]
    cols = ["pid", "state", *present, "created_seq", "updated_seq"]
    values = [pid, _scalar(body.get("state")), *(_scalar(body[f]) for f in present), seq, seq]
    # Fields absent from the body keep their stored value: only the present ones are updated.
    updates = ", ".join(f"{c}=excluded.{c}" for c in ["state", *present, "updated_seq"])
    conn.execute(
        f"INSERT INTO processes ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))}) "
        f"ON CONFLICT(pid) DO UPDATE SET {updates}",
        values,
    )


def _cap_create(conn: sqlite3.Connection, seq: int, body: dict[str, Any]) -> None:
    cap = body.get("cap")
    if cap is None:
        return
    values = [_scalar(cap)]
    for col in _CAP_COLUMNS:
        v = body.get(col)
        values.append(_json(v) if col in ("scope", "rights") and v is not None else _scalar(v))
    # A re-created id replaces the old row: last write wins, the same on flush and rebuild.
    conn.execute(
        "INSERT OR REPLACE INTO capabilities (cap, holder, handle, kind, scope, rights, approval,"
        " expires, uses, parent, via, revoked, dropped, created_seq, revoked_seq)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 0, 0, ?, NULL)",
        [*values, seq],
    )


def _cap_revoke(conn: sqlite3.Connection, seq: int, body: dict[str, Any]) -> None:
    caps = body.get("caps")
    if not isinstance(caps, list):
        return
    conn.executemany(
        "UPDATE capabilities SET revoked = 1, revoked_seq = ? WHERE cap = ? AND revoked = 0",
        [(seq, _scalar(c)) for c in caps],
    )


def _cap_drop(conn: sqlite3.Connection, seq: int, body: dict[str, Any]) -> None:
    if "cap" in body:
        conn.execute("UPDATE capabilities SET dropped = 1 WHERE cap = ?", (_scalar(body["cap"]),))


def _cap_use(conn: sqlite3.Connection, seq: int, body: dict[str, Any]) -> None:
    if "cap" in body:
        conn.execute(
            "UPDATE capabilities SET uses = ? WHERE cap = ?",
            (_scalar(body.get("uses")), _scalar(body["cap"])),
        )


_REDUCERS: Final = {
    "proc.state": _proc_state,
    "cap.create": _cap_create,
    "cap.revoke": _cap_revoke,
    "cap.drop": _cap_drop,
    "cap.use": _cap_use,
}


def apply_entries(conn: sqlite3.Connection, entries: Iterable[tuple[int, str, Any]]) -> None:
    """Fold `(seq, kind, body)` triples, in seq order, into the projection tables.

    Runs inside the caller's transaction. A malformed body (missing key) is skipped rather than
    raised: a projection must never make the log itself refuse an entry.
    """
    for seq, kind, body in entries:
        reducer = _REDUCERS.get(kind)
        if reducer is not None and isinstance(body, dict):
            reducer(conn, seq, body)
