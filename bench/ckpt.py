"""Checkpoint create / restore / fork times at several state sizes, and the replay rate.

Usage: python bench/ckpt.py [--repeat N]
Prints one JSON object: {"checkpoint": [{"state_bytes", "create_ms", "restore_ms", "fork_ms"}],
"replay": {"entries", "seconds", "entries_per_s", "read_only_entries_per_s"},
"replay_checkpoint_log": {...}}. Times are medians of --repeat calls through the real kernel
(ZeroMQ, durable SQLite commit included). `replay` is a log of --decisions mem.get calls, each one
re-decided; `read_only_entries_per_s` reads and checks the same entries and payloads without
deciding anything; `replay_checkpoint_log` replays the checkpoint runs (megabytes of snapshots).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from agentlibos.kernel import replay_log
from agentlibos.runtime import Runtime
from agentlibos.storage import SQLiteLog

VALUE = "x" * (60 << 10)  # under the 64 KiB memory value limit


def _ms(fn: Any, repeat: int) -> float:
    out = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t) * 1000)
    return round(statistics.median(out), 2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--decisions", type=int, default=20_000, help="mem.get calls in the replayed log")
    opts = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="alo-ckpt-") as tmp:
        with Runtime(Path(tmp) / "state", world_root=Path(tmp) / "world", ipc=False) as rt:
            rt.register_image("b")
            for size in (10 << 10, 1 << 20, 10 << 20):
                pid, token = rt.spawn_external("b", caps=[
                    {"kind": "checkpoint", "scope": {"target": "self"}, "rights": ["create", "restore", "fork"]},
                ])
                with rt.client(token) as c:
                    n = max(1, size // len(VALUE))
                    chunk = VALUE[: size // n]
                    for i in range(n):
                        c.call("mem.put", {"key": f"k{i}", "value": chunk})
                    cp = c.call("ckpt.create", {"label": "base"})["checkpoint"]
                    create = _ms(lambda c=c: c.call("ckpt.create", {}), opts.repeat)
                    restore = _ms(lambda c=c, cp=cp: c.call("ckpt.restore", {"checkpoint": cp}), opts.repeat)
                    fork = _ms(lambda c=c, cp=cp: c.call("ckpt.fork", {"checkpoint": cp}), opts.repeat)
                rows.append({"state_bytes": n * len(chunk), "create_ms": create, "restore_ms": restore, "fork_ms": fork})
        full = _replay_rate(Path(tmp) / "state" / "log.db")
        # A log of many small decisions: what a replay spends on each, and the floor of only
        # reading and checking the entries and their payloads.
        with Runtime(Path(tmp) / "decisions", world_root=Path(tmp) / "world", ipc=False) as rt:
            rt.register_image("b")
            pid, token = rt.spawn_external("b")
            with rt.client(token) as c:
                c.call("mem.put", {"key": "k", "value": "v"})
                for _ in range(opts.decisions):
                    c.call("mem.get", {"key": "k"})
        decisions = _replay_rate(Path(tmp) / "decisions" / "log.db")
        with SQLiteLog.open_readonly(Path(tmp) / "decisions" / "log.db") as log:
            t = time.perf_counter()
            n = sum(1 for e, blob in log.entries_with_payloads() if SQLiteLog.decode_payload(e, blob))
            read_rate = round(n / (time.perf_counter() - t))
    print(json.dumps({"checkpoint": rows, "replay": {**decisions, "read_only_entries_per_s": read_rate},
                      "replay_checkpoint_log": full}))


def _replay_rate(path: Path) -> dict[str, Any]:
    t = time.perf_counter()
    rep = replay_log(path)
    secs = time.perf_counter() - t
    return {"entries": rep.entries, "seconds": round(secs, 3), "entries_per_s": round(rep.entries / secs)}

if __name__ == "__main__":
    main()
