"""JIT tool latency: cold start (host start to first result), warm latency of a tool making one
syscall (answered in-process), and calls/s back to back and from several threads.

Usage: python bench/jit.py [--calls N] [--threads T] [--no-os-sandbox]
Prints one JSON object. "warm" calls are spaced so the host's pool of fresh Workers has refilled
(an agent's tool calls come between model turns); "back_to_back" shows the sustained rate, where
every call waits for a Worker to be created.
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from typing import Any

from agentlibos.actors._jit import JitRunner

TOOL = """export default async function (input: {path: string}, sys: any) {
  const r = await sys.call("fs.read", {path: input.path});
  return r.text.length;
}
"""


def _sys(name: str, args: dict[str, Any]) -> tuple[bool, Any, str | None, str]:
    return True, {"text": "hello world"}, None, ""


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return round(xs[min(len(xs) - 1, int(q * len(xs)))], 2)


def _timed(runner: JitRunner, pause_s: float, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t = time.perf_counter()
        res = runner.call(TOOL, {"path": "a.txt"}, _sys)
        out.append((time.perf_counter() - t) * 1000)
        assert res.ok and res.value == 11, res
        if pause_s:
            time.sleep(pause_s)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", type=int, default=300)
    ap.add_argument("--threads", type=int, default=4)
    ap.add_argument("--no-os-sandbox", action="store_true")
    a = ap.parse_args()

    runner = JitRunner(os_sandbox=not a.no_os_sandbox)
    t0 = time.perf_counter()
    runner.start()
    started = time.perf_counter()
    first = runner.call(TOOL, {"path": "a.txt"}, _sys)
    cold_ms = (time.perf_counter() - t0) * 1000
    assert first.ok, first
    try:
        _timed(runner, 0.02, 20)  # warm-up: JIT-compile the host's paths
        warm = _timed(runner, 0.02, a.calls)
        t = time.perf_counter()
        b2b = _timed(runner, 0.0, a.calls)
        b2b_rate = a.calls / (time.perf_counter() - t)

        per_thread = max(1, a.calls // a.threads)
        lat: list[float] = []
        lock = threading.Lock()

        def worker() -> None:
            xs = _timed(runner, 0.0, per_thread)
            with lock:
                lat.extend(xs)

        threads = [threading.Thread(target=worker) for _ in range(a.threads)]
        t = time.perf_counter()
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        mt_rate = per_thread * a.threads / (time.perf_counter() - t)
    finally:
        runner.close()

    print(
        json.dumps(
            {
                "os_sandbox": not a.no_os_sandbox,
                "cold_start_ms": round(cold_ms, 1),
                "host_start_ms": round((started - t0) * 1000, 1),
                "warm_one_syscall_ms": {"p50": _pct(warm, 0.5), "p99": _pct(warm, 0.99), "n": len(warm)},
                "back_to_back_ms": {"p50": _pct(b2b, 0.5), "p99": _pct(b2b, 0.99), "calls_per_s": round(b2b_rate, 1)},
                f"threads_{a.threads}": {
                    "p50": _pct(lat, 0.5),
                    "p99": _pct(lat, 0.99),
                    "calls_per_s": round(mt_rate, 1),
                },
            }
        )
    )


if __name__ == "__main__":
    main()
