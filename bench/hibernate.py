"""Idle hosted daemons kept live vs hibernated: threads, memory, and a message's round trip.

Usage: python bench/hibernate.py [--processes N] [--samples K] [--after S]
Prints one JSON object: {"processes": N, "samples": K,
"live": {"threads", "rss_mb", "settle_s", "round_trip_ms": {"p50", "p99"}},
"hibernated": {...the same...}}. `live` runs with hibernation off; `hibernated` with
hibernate_after_s = --after, measured once every daemon is hibernated (`settle_s`: from the last
spawn until then; for `live`, until every first turn has ended). A round trip is `op.send` to an
idle daemon until the `llm/` event of the turn it starts (the scripted model answers at once and
ends the turn), over K distinct daemons one after another; a hibernated one is woken by it. Each
phase runs in its own Python process, since a process does not always give freed memory back.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from agentlibos.bus import Topic
from agentlibos.runtime import Runtime


def _percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 1)
    return 0.0


def _phase(processes: int, samples: int, after: float) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="alo-hib-") as tmp, \
            Runtime(Path(tmp) / "state", world_root=Path(tmp) / "world", ipc=False, hibernate_after_s=after) as rt:
        rt.register_image("d")
        with rt.events(Topic.llm()) as events:
            pids = []
            for i in range(processes):
                pids.append(rt.spawn("d", daemon=True, input="hello"))
                if (i + 1) % 250 == 0:
                    print(f"  spawned {i + 1}", file=sys.stderr)
            t = time.perf_counter()
            answered: set[int] = set()
            while len(answered) < processes:
                ev = events.next_event(timeout_s=120)
                assert ev is not None, f"only {len(answered)} of {processes} first turns ended"
                answered.add(ev[1]["pid"])
            if after > 0:
                for pid in pids:
                    assert rt.host.wait_hibernated(pid, 120), f"process {pid} did not hibernate"
                for th in threading.enumerate():
                    if th.name.startswith("AgentProcess-"):
                        th.join(30)
            settle = time.perf_counter() - t
            threads, rss = threading.active_count(), _rss_mb()
            print(f"  settled: {threads} threads, {rss} MB", file=sys.stderr)
            trips = []
            for pid in random.Random(7).sample(pids, min(samples, processes)):
                assert (pid in rt.host.hibernated) == (after > 0)
                t = time.perf_counter()
                rt.send(pid, "again")
                while True:
                    ev = events.next_event(timeout_s=30)
                    assert ev is not None, f"process {pid} did not answer"
                    if ev[1]["pid"] == pid:
                        break
                trips.append((time.perf_counter() - t) * 1000)
    return {"threads": threads, "rss_mb": rss, "settle_s": round(settle, 2),
            "round_trip_ms": {"p50": round(_percentile(trips, 0.5), 2), "p99": round(_percentile(trips, 0.99), 2)}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--processes", type=int, default=1000, help="idle daemons")
    ap.add_argument("--samples", type=int, default=200, help="round trips, each to a different daemon")
    ap.add_argument("--after", type=float, default=1.0, help="hibernate_after_s of the hibernated phase")
    ap.add_argument("--phase", choices=["live", "hibernated"], help=argparse.SUPPRESS)
    opts = ap.parse_args()
    if opts.phase:
        print(json.dumps(_phase(opts.processes, opts.samples, opts.after if opts.phase == "hibernated" else 0)))
        return
    out: dict[str, Any] = {"processes": opts.processes, "samples": min(opts.samples, opts.processes)}
    for phase in ("live", "hibernated"):
        print(f"{phase}: {opts.processes} idle daemons", file=sys.stderr)
        run = subprocess.run([sys.executable, __file__, "--phase", phase, "--processes", str(opts.processes),
                              "--samples", str(opts.samples), "--after", str(opts.after)],
                             check=True, stdout=subprocess.PIPE, text=True)
        out[phase] = json.loads(run.stdout)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
