"""Throughput of SQLiteLog: stage 100 entries, flush, repeat; prints one JSON line.

Run: PYTHONPATH=<dir holding agentlibos/> python bench/log_append.py [total_entries]
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

from agentlibos.storage import SQLiteLog

BATCH = 100


def main() -> None:
    total = int(sys.argv[1]) if len(sys.argv) > 1 else 100_000
    with tempfile.TemporaryDirectory() as tmp, SQLiteLog(Path(tmp) / "log.db") as log:
        # Shaped like the kernel's pair per syscall: a request with args, a result with a digest.
        start = time.perf_counter()
        for i in range(0, total, 2):
            req = log.stage(
                "sys.request",
                {"call": "fs.read", "cap": "c-17", "req": i},
                pid=42,
                payload={"path": "/work/notes.txt"},
            )
            log.stage("sys.result", {"code": "OK", "req": i}, pid=42, cause=req.seq,
                      payload={"text": "hello world"})  # fmt: skip
            if (i + 2) % BATCH == 0:
                log.flush()
        log.flush()
        elapsed = time.perf_counter() - start
        verify_start = time.perf_counter()
        report = log.verify()
        verify_s = time.perf_counter() - verify_start
    print(
        json.dumps(
            {
                "entries_per_s": round(total / elapsed),
                "batch": BATCH,
                "entries": total,
                "verify_s": round(verify_s, 3),
                "verify_ok": report.ok,
            }
        )
    )


if __name__ == "__main__":
    main()
