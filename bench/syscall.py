"""Mediated syscall throughput and latency against a raw ZeroMQ echo and a direct call, same run.

Usage: python bench/syscall.py [--seconds S] [--clients 1,4] [--transports inproc,ipc] [--ops mem.get,fs.read]
Prints one JSON object: {"results": [...], "ratios": {"<op>/<transport>/<clients>": mediated/raw},
"floor_ratios": {...: logged/raw}, "bare_ratios": {...: logged-bare/raw}}.

Modes: `direct` (the effect, unmediated), `raw` (a ZeroMQ echo), `logged` (the echo, but each
request is appended to the project's SQLite log and acknowledged after its group commit, as the
kernel does, with no decision at all), `logged-bare` (the same with one plain sqlite3 row per
request: the most any kernel that acknowledges after a durable SQLite commit could reach here)
and `mediated` (the kernel).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sqlite3
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import msgpack
import zmq

ARGS = {"mem.get": {"key": "k"}, "fs.read": {"path": "ws/small.txt"}}


def _percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


# --- clients (one per thread or per process) -----------------------------------------------------


def _client_loop(endpoint: str, token: str | None, sys_name: str, seconds: float, ctx: zmq.Context | None,
                 barrier: Any, out: Any) -> None:
    own = ctx is None
    ctx = ctx or zmq.Context()
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(endpoint)
    rid = 0
    if token is not None:
        s.send(msgpack.packb({"v": 1, "t": "hello", "id": 0, "token": token, "role": "process"}))
        r = msgpack.unpackb(s.recv())
        assert r["ok"], r
    req_args = ARGS[sys_name]
    lat: list[float] = []
    barrier.wait()
    end = time.perf_counter() + seconds
    pc = time.perf_counter
    while True:
        rid += 1
        frame = msgpack.packb({"v": 1, "t": "req", "id": rid, "sys": sys_name, "args": req_args, "cap": None})
        t0 = pc()
        s.send(frame)
        reply = s.recv()
        t1 = pc()
        lat.append(t1 - t0)
        if token is not None and rid == 1:
            r = msgpack.unpackb(reply)
            assert r["ok"], r
        if t1 > end:
            break
    s.close(0)
    if own:
        ctx.term()
    out.put(lat)


def _proc_client(endpoint: str, token: str | None, sys_name: str, seconds: float, barrier: Any, out: Any) -> None:
    _client_loop(endpoint, token, sys_name, seconds, None, barrier, out)


def _drive(endpoint: str, tokens: list[str | None], sys_name: str, seconds: float, transport: str,
           ctx: zmq.Context) -> tuple[float, list[float]]:
    n = len(tokens)
    if transport == "inproc":
        import queue

        q: Any = queue.Queue()
        barrier: Any = threading.Barrier(n + 1)
        threads = [threading.Thread(target=_client_loop, args=(endpoint, t, sys_name, seconds, ctx, barrier, q))
                   for t in tokens]
        for th in threads:
            th.start()
        barrier.wait()
        t0 = time.perf_counter()
        for th in threads:
            th.join()
        wall = time.perf_counter() - t0
        lats = [x for _ in range(n) for x in q.get()]
        return wall, lats
    mpc = mp.get_context("spawn")
    q = mpc.Queue()
    barrier = mpc.Barrier(n + 1)
    procs = [mpc.Process(target=_proc_client, args=(endpoint, t, sys_name, seconds, barrier, q)) for t in tokens]
    for p in procs:
        p.start()
    barrier.wait()
    t0 = time.perf_counter()
    lats = [x for _ in range(n) for x in q.get()]
    wall = time.perf_counter() - t0
    for p in procs:
        p.join()
    return wall, lats


def _row(op: str, transport: str, clients: int, mode: str, wall: float, lats: list[float]) -> dict[str, Any]:
    return {"op": op, "transport": transport, "clients": clients, "mode": mode,
            "rate_per_s": round(len(lats) / wall, 1), "p50_us": round(_percentile(lats, 0.5) * 1e6, 1),
            "p99_us": round(_percentile(lats, 0.99) * 1e6, 1), "n": len(lats)}


# --- raw echo baseline -----------------------------------------------------------------------------


class Echo:
    """A ROUTER that answers every frame with a reply-sized frame: the floor any kernel pays."""

    def __init__(self, ctx: zmq.Context, endpoint: str) -> None:
        self.ctx, self.endpoint = ctx, endpoint
        self.reply = msgpack.packb({"v": 1, "t": "rep", "id": 1, "ok": True, "seq": 123456, "value": {"value": "v"}})
        self._stop = threading.Event()
        self._ready = threading.Event()
        self.t = threading.Thread(target=self._run, daemon=True)
        self.t.start()
        self._ready.wait()

    def _run(self) -> None:
        r = self.ctx.socket(zmq.ROUTER)
        r.setsockopt(zmq.LINGER, 0)
        r.bind(self.endpoint)
        self._ready.set()
        while not self._stop.is_set():
            if r.poll(100):
                self._round(r)
        r.close(0)

    def _round(self, r: zmq.Socket[Any]) -> None:
        ident, _frame = r.recv_multipart()
        r.send_multipart([ident, self.reply])

    def close(self) -> None:
        self._stop.set()
        self.t.join()


class LoggedEcho(Echo):
    """The echo, plus what durability costs by itself: each request is staged in the project's
    SQLite log (WAL, synchronous=FULL, hash chain) and answered after the commit of the batch that
    drained the socket, the kernel's group commit without any decision. `bare`: one plain
    sqlite3 row per request instead, the least any SQLite-logged kernel can do."""

    def __init__(self, ctx: zmq.Context, endpoint: str, path: Path, *, bare: bool = False) -> None:
        from agentlibos.storage import SQLiteLog

        self.bare = bare
        if bare:
            self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=FULL")
            self.db.execute("CREATE TABLE log (seq INTEGER PRIMARY KEY, body BLOB)")
        else:
            self.log = SQLiteLog(path)
        super().__init__(ctx, endpoint)

    def _round(self, r: zmq.Socket[Any]) -> None:
        batch = []
        while True:
            try:
                batch.append(r.recv_multipart(zmq.NOBLOCK))
            except zmq.Again:
                break
        if self.bare:
            self.db.execute("BEGIN")
            self.db.executemany("INSERT INTO log (body) VALUES (?)", [(frame,) for _ident, frame in batch])
            self.db.execute("COMMIT")
        else:
            for _ident, frame in batch:
                req = msgpack.unpackb(frame)
                self.log.stage("sys", {"sys": req["sys"], "decision": "allow"}, pid=1, payload=req["args"])
            self.log.flush()
        for ident, _frame in batch:
            r.send_multipart([ident, self.reply])

    def close(self) -> None:
        super().close()
        if self.bare:
            self.db.close()
        else:
            self.log.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=2.0, help="duration of each measurement")
    ap.add_argument("--clients", default="1,4")
    ap.add_argument("--transports", default="inproc,ipc")
    ap.add_argument("--ops", default="mem.get,fs.read")
    opts = ap.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from agentlibos.runtime import Runtime

    results: list[dict[str, Any]] = []
    ratios: dict[str, float] = {}
    floor_ratios: dict[str, float] = {}
    bare_ratios: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="alo-bench-") as tmp:
        world = Path(tmp) / "world"
        (world / "ws").mkdir(parents=True)
        (world / "ws" / "small.txt").write_text("x" * 100)
        with Runtime(Path(tmp) / "state", world_root=world) as rt:
            rt.register_image("bench")
            tokens = [rt.spawn_external("bench", caps=[{"kind": "fs", "scope": {"root": "ws"}, "rights": ["read"]}])[1]
                      for _ in range(4)]
            for t in tokens:
                with rt.client(t) as c:
                    c.call("mem.put", {"key": "k", "value": "v"})
            # Direct: the same effects with no mediation at all.
            store = {"k": "v"}
            small = world / "ws" / "small.txt"
            direct = {"mem.get": lambda: store["k"], "fs.read": lambda: small.read_text()}
            for op in opts.ops.split(","):
                lats = []
                t0 = time.perf_counter()
                while time.perf_counter() - t0 < min(1.0, opts.seconds):
                    a = time.perf_counter()
                    direct[op]()
                    lats.append(time.perf_counter() - a)
                results.append(_row(op, "none", 1, "direct", time.perf_counter() - t0, lats))
            for transport in opts.transports.split(","):
                endpoint = rt.inproc_endpoint if transport == "inproc" else rt.endpoint
                echo_ep = (f"inproc://bench-echo-{os.getpid()}" if transport == "inproc"
                           else f"ipc://{tmp}/echo.sock")
                echo = Echo(rt.context, echo_ep)
                logged_ep, bare_ep = echo_ep + "-logged", echo_ep + "-bare"
                logged_echo = LoggedEcho(rt.context, logged_ep, Path(tmp) / f"floor-{transport}.db")
                bare_echo = LoggedEcho(rt.context, bare_ep, Path(tmp) / f"bare-{transport}.db", bare=True)
                try:
                    for n in (int(x) for x in opts.clients.split(",")):
                        for op in opts.ops.split(","):
                            wall, lats = _drive(echo_ep, [None] * n, op, opts.seconds, transport, rt.context)
                            raw = _row(op, transport, n, "raw", wall, lats)
                            wall, lats = _drive(bare_ep, [None] * n, op, opts.seconds, transport, rt.context)
                            bare = _row(op, transport, n, "logged-bare", wall, lats)
                            wall, lats = _drive(logged_ep, [None] * n, op, opts.seconds, transport, rt.context)
                            floor = _row(op, transport, n, "logged", wall, lats)
                            wall, lats = _drive(endpoint, tokens[:n], op, opts.seconds, transport, rt.context)
                            med = _row(op, transport, n, "mediated", wall, lats)
                            results += [raw, bare, floor, med]
                            key = f"{op}/{transport}/{n}"
                            ratios[key] = round(med["rate_per_s"] / raw["rate_per_s"], 3)
                            floor_ratios[key] = round(floor["rate_per_s"] / raw["rate_per_s"], 3)
                            bare_ratios[key] = round(bare["rate_per_s"] / raw["rate_per_s"], 3)
                            print(f"{op:8} {transport:6} clients={n}: mediated {med['rate_per_s']:>8}/s "
                                  f"p50 {med['p50_us']}us p99 {med['p99_us']}us | raw {raw['rate_per_s']:>8}/s "
                                  f"-> {ratios[key]:.0%} | logged echo {floor['rate_per_s']:>8}/s "
                                  f"-> {floor_ratios[key]:.0%} | bare sqlite echo {bare['rate_per_s']:>8}/s "
                                  f"-> {bare_ratios[key]:.0%}", file=sys.stderr)
                finally:
                    echo.close()
                    logged_echo.close()
                    bare_echo.close()
            with rt.log.__class__.open_readonly(Path(tmp) / "state" / "log.db") as log:
                entries = log.head()[0]
    print(json.dumps({"results": results, "ratios": ratios, "floor_ratios": floor_ratios,
                      "bare_ratios": bare_ratios, "log_entries": entries}))


if __name__ == "__main__":
    main()
