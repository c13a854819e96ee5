"""Checkpoint create / restore / fork times at several state sizes, and the replay rate.

Usage: python bench/ckpt.py [--repeat N]
Prints one JSON object: {"checkpoint": [{"state_bytes", "create_ms", "restore_ms", "fork_ms"}],
"replay": {"entries", "seconds", "entries_per_s"}}. Times are medians of --repeat calls through the
real kernel (ZeroMQ, durable SQLite commit included).
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
            # A long log for the replay rate: many small decisions.
            pid, token = rt.spawn_external("b")
            with rt.client(token) as c:
                c.call("mem.put", {"key": "k", "value": "v"})
                for _ in range(20_000):
                    c.call("mem.get", {"key": "k"})
        t = time.perf_counter()
        rep = replay_log(Path(tmp) / "state" / "log.db")
        secs = time.perf_counter() - t
    print(json.dumps({"checkpoint": rows, "replay": {"entries": rep.entries, "seconds": round(secs, 3),
                                                      "entries_per_s": round(rep.entries / secs)}}))


if __name__ == "__main__":
    main()
