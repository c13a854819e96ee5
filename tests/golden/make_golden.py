"""Regenerate the golden logs replayed by tests/kernel/test_replay.py.

    python tests/golden/make_golden.py

Two are real recorded runs of shipped scenarios; the third is the first one with a single
decision rewritten (deny instead of allow) and the hash chain recomputed, so it verifies as a log
but cannot have come from this kernel: its replay must raise NondeterminismError at that entry.
"""

from __future__ import annotations

import shutil
import sqlite3
import sys
import tempfile
from pathlib import Path

from agentlibos.harness import load_scenario, run_libos
from agentlibos.storage import SQLiteLog, canonical
from agentlibos.storage._log import entry_hash

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent


def record(scenario: str, out: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        result = run_libos(load_scenario(REPO / "scenarios" / scenario), keep_state=tmp)
        assert result.completed, result.error
        src = sqlite3.connect(Path(tmp) / "log.db")
        out.unlink(missing_ok=True)
        dst = sqlite3.connect(out)
        src.backup(dst)
        src.close()
        dst.close()


def tamper_decision(src: Path, out: Path) -> int:
    """Turn the first allowed mem.put (a decision the kernel re-derives in full) into a denial
    and re-chain every hash after it."""
    shutil.copy(src, out)
    conn = sqlite3.connect(out)
    rows = conn.execute("SELECT seq, ts, pid, kind, cause, body, payload_digest, prev_hash, v FROM log ORDER BY seq").fetchall()
    import msgpack

    target = None
    prev = None
    for seq, ts, pid, kind, cause, body, pdig, prev_hash, v in rows:
        b = msgpack.unpackb(body)
        if target is None and kind == "sys" and b.get("sys") == "mem.put" and b.get("decision") == "allow":
            target = seq
            b = {"sys": "mem.put", "decision": "deny", "code": "EPERM", "message": "rewritten"}
            body = canonical(b)
        if target is not None:
            prev_hash = prev if prev is not None else prev_hash
            h = entry_hash(prev_hash, v, seq, ts, pid, kind, cause, body, pdig)
            conn.execute("UPDATE log SET body = ?, prev_hash = ?, hash = ? WHERE seq = ?", (body, prev_hash, h, seq))
            prev = h
    head = conn.execute("SELECT seq, hash FROM log ORDER BY seq DESC LIMIT 1").fetchone()
    conn.execute("UPDATE meta SET head_seq = ?, head_hash = ? WHERE id = 1", head)
    conn.commit()
    conn.close()
    assert target is not None
    with SQLiteLog.open_readonly(out) as log:
        assert log.verify().ok
    return target


if __name__ == "__main__":
    record("quickstart.yaml", HERE / "quickstart.db")
    record("ckpt/fork-after-revoke.yaml", HERE / "ckpt-fork-after-revoke.db")
    seq = tamper_decision(HERE / "quickstart.db", HERE / "nondeterministic.db")
    (HERE / "nondeterministic.seq").write_text(f"{seq}\n")
    print("golden logs written; the non-deterministic one differs at seq", seq, file=sys.stderr)
