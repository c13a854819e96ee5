"""Crash safety of the log: SIGKILL a real kernel process at random points, then check the log.

Every kill point: start a kernel subprocess on a state directory (`agentlibos kernel --state`),
spawn an external process over the ipc socket, drive syscalls from 1-4 client threads (mem.put
with increasing counters, fs.write of small files, op.* requests; sometimes pipelined bursts),
record every reply that carries a log seq (an acknowledgement), and SIGKILL the kernel at a
random point: after a random number of acknowledgements, after a random delay, or right after a
burst of requests was sent (so the kill lands while the batch is being committed). Then:

- the log opens read-only and `verify()` passes (chain intact, seqs 1..head with no gap, the
  recorded head matches the last entry);
- every acknowledged seq is in the log, with the right kind, syscall name, pid and arguments
  (and, for a result entry, the value that was replied): no acknowledged entry is lost;
- the next kill point restarts a kernel on the same directory (the writer's tail check must pass
  after any SIGKILL), and its first acknowledged seq continues the chain after the old head;
- once a directory's chain is done, its whole log replays (`agentlibos replay`), session by
  session, to the same decisions.

A state directory carries `--chain` consecutive kill points (so verify stays cheap), ending with
a clean restart that must start, answer a syscall past the old head, and stop on SIGTERM.

Kernels are launched two ways, both a separate OS process killed with a real SIGKILL:
`exec` runs a fresh interpreter (`python -c 'agentlibos.cli.main()' kernel ...`, ~0.25 s of
imports); `fork` asks a zygote process, which imported agentlibos once and holds no threads,
sockets or files, to fork a child that runs the same `agentlibos kernel` command. `--exec-every
K` makes every K-th point an exec (1 = all exec).

Run: python bench/crash.py [--points N] [--seed S] [--chain C] [--exec-every K] [--dir DIR]
Prints one JSON object: {"points", "acknowledged", "lost", "verify_failures", "restart_failures",
"replay_failures", "replayed_sessions", "seconds", ...}; exit status 1 when anything was lost or failed (details on stderr).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
import zmq

from agentlibos.storage import SQLiteLog

CLI = "import sys; from agentlibos.cli import main; sys.exit(main())"
START_DEADLINE_S = 30.0
REPLY_DEADLINE_S = 30.0
POLL_MS = 20
DRAIN_MS = 30  # after the kill: replies the kernel sent before dying are read within this window


# --- launching kernels ---------------------------------------------------------------------------


class Zygote:
    """A single-threaded process that imported agentlibos once and forks kernels on request.

    Protocol on its stdin/stdout, one line each: `fork STATE WORLD ERRFILE` -> `PID`;
    `wait PID` -> `STATUS` (os.waitstatus_to_exitcode); `quit`."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--zygote"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, bufsize=1)

    def _ask(self, line: str) -> str:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        out = self.proc.stdout.readline()
        if not out:
            raise RuntimeError(f"the zygote died (exit {self.proc.poll()})")
        return out.strip()

    def fork(self, state: Path, world: Path, errfile: Path, unsafe: bool = False) -> int:
        return int(self._ask(f"fork {state} {world} {errfile} {int(unsafe)}"))

    def wait(self, pid: int) -> int:
        return int(self._ask(f"wait {pid}"))

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self._ask("quit")
            except (OSError, RuntimeError):
                pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        for f in (self.proc.stdin, self.proc.stdout):
            if f is not None:
                f.close()


def _break_group_commit() -> None:
    """Negative control (`--unsafe`): replies leave before their entries commit, and the commit
    is slowed by 5 ms, as a kernel with an ack-before-durable bug on a slow disk would do. The
    checks must then find lost acknowledgements; if they do not, they prove nothing."""
    from agentlibos.kernel import _kernel

    def unsafe_flush(self: Any) -> None:
        if not (self._out or self._dirty):
            return
        self._dirty = False
        self._round_started = None
        out, self._out = self._out, type(self._out)()
        self._release(out)  # the bug: acknowledged before durable
        time.sleep(0.005)
        self.log.flush()

    _kernel.Kernel._flush = unsafe_flush


def _zygote_main() -> None:
    from agentlibos.cli import main as cli_main  # imported once, before any fork

    assert threading.active_count() == 1, "the zygote must hold no threads when it forks"
    for line in sys.stdin:
        cmd, *rest = line.split()
        if cmd == "quit":
            print("bye", flush=True)
            return
        if cmd == "wait":
            _, status = os.waitpid(int(rest[0]), 0)
            print(os.waitstatus_to_exitcode(status), flush=True)
            continue
        state, world, errfile, unsafe = rest
        pid = os.fork()
        if pid == 0:  # the kernel: exactly `agentlibos kernel --state STATE --world WORLD`
            code = 1
            try:
                if unsafe == "1":
                    _break_group_commit()
                fd = os.open(errfile, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
                null = os.open(os.devnull, os.O_RDONLY)
                os.dup2(null, 0)
                os.dup2(fd, 1)
                os.dup2(fd, 2)
                sys.stdin = open(os.devnull)  # noqa: SIM115 - the child never returns
                try:
                    cli_main(["kernel", "--state", state, "--world", world], standalone_mode=True)
                    code = 0
                except SystemExit as exc:
                    code = exc.code if isinstance(exc.code, int) else 1
            except BaseException:
                import traceback

                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        print(pid, flush=True)


class Kernel:
    """One kernel process on a state directory, launched by exec or through the zygote."""

    def __init__(self, state: Path, world: Path, zygote: Zygote | None, unsafe: bool = False) -> None:
        self.state, self.errfile = state, state / "kernel.err"
        self._zygote = zygote
        self._popen: subprocess.Popen[bytes] | None = None
        self.exit_code: int | None = None
        self.how = "fork" if zygote is not None else "exec"
        # A SIGKILLed kernel leaves its connection.json behind: the new one must be this kernel's.
        (state / "connection.json").unlink(missing_ok=True)
        if zygote is not None:
            self.pid = zygote.fork(state, world, self.errfile, unsafe)
        else:
            with open(self.errfile, "ab") as err:
                self._popen = subprocess.Popen(
                    [sys.executable, "-c", CLI, "kernel", "--state", str(state), "--world", str(world)],
                    stdin=subprocess.DEVNULL, stdout=err, stderr=err)
            self.pid = self._popen.pid

    def alive(self) -> bool:
        if self.exit_code is not None:
            return False
        if self._popen is not None:
            return self._popen.poll() is None
        try:  # a zygote child that died stays a zombie until `wait`: look at its state
            with open(f"/proc/{self.pid}/stat") as fh:
                return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
        except FileNotFoundError:
            return False

    def wait_ready(self) -> dict[str, Any]:
        """connection.json written by this kernel (it is written after the sockets are bound)."""
        path = self.state / "connection.json"
        deadline = time.monotonic() + START_DEADLINE_S
        while time.monotonic() < deadline:
            try:
                conn = json.loads(path.read_text())
            except (FileNotFoundError, ValueError):
                conn = None
            if conn is not None and conn.get("pid") == self.pid:
                return conn
            if not self.alive():
                raise RuntimeError(f"the kernel exited during start ({self.reap()}): {self.stderr_tail()}")
            threading.Event().wait(0.005)  # bounded poll on a condition, not a synchronization sleep
        raise RuntimeError(f"the kernel wrote no connection.json within {START_DEADLINE_S} s: {self.stderr_tail()}")

    def kill(self) -> int:
        os.kill(self.pid, signal.SIGKILL)
        return self.reap()

    def terminate(self) -> int:
        os.kill(self.pid, signal.SIGTERM)
        return self.reap()

    def reap(self) -> int:
        if self.exit_code is None:
            if self._popen is not None:
                self.exit_code = self._popen.wait(timeout=60)
            else:
                assert self._zygote is not None
                self.exit_code = self._zygote.wait(self.pid)
        return self.exit_code

    def stderr_tail(self) -> str:
        try:
            return self.errfile.read_text(errors="replace")[-2000:]
        except FileNotFoundError:
            return ""


# --- clients -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Ack:
    seq: int
    sys: str
    args: dict[str, Any]
    ok: bool
    value: Any
    pid: int  # 0 for an operator request


class Stopped(Exception):
    """The kernel was killed before this connection said hello: not an error."""


class Conn:
    """A raw DEALER speaking docs/protocol.md (one per thread)."""

    def __init__(self, ctx: zmq.Context[Any], endpoint: str, token: str, role: str,
                 stop: threading.Event | None = None) -> None:
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)
        self._id = 1
        self.send_raw({"v": 1, "t": "hello", "id": 1, "token": token, "role": role})
        deadline = time.monotonic() + REPLY_DEADLINE_S
        rep = None
        while rep is None and time.monotonic() < deadline:
            if stop is not None and stop.is_set():
                self.close()
                raise Stopped
            rep = self.recv(POLL_MS)
        if rep is None or not rep.get("ok"):
            self.close()
            raise RuntimeError(f"hello as {role} failed: {rep!r}")
        self.hello = rep["value"]

    def send_raw(self, msg: dict[str, Any]) -> None:
        self.sock.send(msgpack.packb(msg), copy=True)

    def send(self, sys_name: str, args: dict[str, Any]) -> int:
        self._id += 1
        self.send_raw({"v": 1, "t": "req", "id": self._id, "sys": sys_name, "args": args})
        return self._id

    def recv(self, timeout_ms: int) -> dict[str, Any] | None:
        if not self.sock.poll(timeout_ms):
            return None
        return msgpack.unpackb(self.sock.recv(), raw=False)  # type: ignore[no-any-return]

    def call(self, sys_name: str, args: dict[str, Any]) -> dict[str, Any]:
        rid = self.send(sys_name, args)
        deadline = time.monotonic() + REPLY_DEADLINE_S
        while time.monotonic() < deadline:
            rep = self.recv(POLL_MS)
            if rep is not None and rep.get("id") == rid:
                return rep
        raise RuntimeError(f"no reply to {sys_name} within {REPLY_DEADLINE_S} s")

    def close(self) -> None:
        self.sock.close(0)


class Traffic:
    """Client threads that drive syscalls until told to stop, recording every acknowledgement."""

    def __init__(self, ctx: zmq.Context[Any], endpoint: str, op_token: str, token: str, pid: int,
                 threads: int, seed: str) -> None:
        self.ctx, self.endpoint, self.op_token, self.token, self.pid = ctx, endpoint, op_token, token, pid
        self.acks: list[Ack] = []
        self.errors: list[str] = []
        self.cond = threading.Condition()
        self.stop = threading.Event()
        self.burst_wanted = threading.Event()
        self.burst_sent = threading.Event()
        self._burst_claim = threading.Lock()
        self._threads = [threading.Thread(target=self._run, args=(i, random.Random(f"{seed}/{i}")), daemon=True)
                         for i in range(threads)]

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def join(self) -> None:
        self.stop.set()
        for t in self._threads:
            t.join(timeout=60)
            if t.is_alive():
                self.errors.append(f"{t.name} did not stop")

    def count(self) -> int:
        with self.cond:
            return len(self.acks)

    def _request(self, tid: int, n: int, rng: random.Random) -> tuple[str, str, dict[str, Any]]:
        r = rng.random()
        if r < 0.45:
            return "proc", "mem.put", {"ns": "team", "key": f"k{tid}-{n % 64}", "value": {"t": tid, "n": n}}
        if r < 0.8:
            return "proc", "fs.write", {"path": f"ws/t{tid}/f{n % 16}.txt", "data": f"{tid}:{n}\n" * rng.randint(1, 8)}
        if r < 0.85:
            return "proc", "mem.get", {"ns": "team", "key": f"k{tid}-{rng.randint(0, 63)}"}
        if r < 0.93:
            return "op", "op.mem.put", {"ns": "team", "key": f"op{tid}-{n % 8}", "value": n}
        if r < 0.97:
            return "op", "op.ps", {}
        return "op", "op.grant", {"pid": self.pid, "kind": "memory", "scope": {"namespace": f"g{tid}"},
                                  "rights": ["read"]}

    def _run(self, tid: int, rng: random.Random) -> None:
        conns: dict[str, Conn] = {}
        try:
            conns["proc"] = Conn(self.ctx, self.endpoint, self.token, "process", self.stop)
            conns["op"] = Conn(self.ctx, self.endpoint, self.op_token, "operator", self.stop)
            pending: dict[tuple[str, int], tuple[str, dict[str, Any]]] = {}
            n = 0
            while not self.stop.is_set():
                size = 1
                burst = self.burst_wanted.is_set() and self._burst_claim.acquire(blocking=False)
                if burst:
                    size = rng.randint(4, 48)
                elif rng.random() < 0.15:
                    size = rng.randint(2, 6)  # a small pipeline now and then
                for _ in range(size):
                    who, name, args = self._request(tid, n, rng)
                    n += 1
                    pending[(who, conns[who].send(name, args))] = (name, args)
                if burst:
                    self.burst_sent.set()
                self._collect(conns, pending, until_empty=True)
            self._collect(conns, pending, until_empty=False)
        except Stopped:
            pass
        except Exception as exc:  # reported by the caller, never an unhandled thread exception
            self.errors.append(f"thread {tid}: {type(exc).__name__}: {exc}")
        finally:
            for c in conns.values():
                c.close()

    def _collect(self, conns: dict[str, Conn], pending: dict[tuple[str, int], tuple[str, dict[str, Any]]],
                 until_empty: bool) -> None:
        """Read replies: while requests are pending (until stopped), or, once the kernel is dead,
        whatever it sent before dying (drain until a poll window passes with nothing)."""
        poller = zmq.Poller()
        by_sock = {}
        for who, c in conns.items():
            poller.register(c.sock, zmq.POLLIN)
            by_sock[c.sock] = who
        while pending:
            if until_empty and self.stop.is_set():
                return
            ready = dict(poller.poll(POLL_MS if until_empty else DRAIN_MS))
            if not ready:
                if until_empty:
                    continue
                return
            for sock in ready:
                who = by_sock[sock]
                rep = msgpack.unpackb(sock.recv(), raw=False)
                req = pending.pop((who, rep.get("id")), None)
                if req is None:
                    self.errors.append(f"unexpected reply {rep!r}")
                    continue
                if rep.get("seq") is not None:
                    ack = Ack(rep["seq"], req[0], req[1], bool(rep.get("ok")), rep.get("value"),
                              self.pid if who == "proc" else 0)
                    with self.cond:
                        self.acks.append(ack)
                        self.cond.notify_all()


# --- checking ------------------------------------------------------------------------------------


def check_ack(log: SQLiteLog, ack: Ack) -> str | None:
    """Why the log does not hold this acknowledged entry as replied, or None when it does."""
    e = log.get(ack.seq)
    if e is None:
        return f"seq {ack.seq} ({ack.sys}) was acknowledged but is not in the log"
    if e.body.get("sys") != ack.sys:
        return f"seq {ack.seq}: log has {e.kind} {e.body.get('sys')!r}, the reply was for {ack.sys!r}"
    if ack.pid == 0:  # operator: the result of an `op` entry that holds the args
        if e.kind != "result":
            return f"seq {ack.seq}: operator reply points at a {e.kind!r} entry"
        decision = log.get(e.cause) if e.cause is not None else None
        if decision is None or decision.kind != "op" or decision.body.get("sys") != ack.sys:
            return f"seq {ack.seq}: its cause {e.cause} is not the op entry of {ack.sys}"
        logged_args = log.payload(decision.seq)
    else:
        if e.pid != ack.pid or e.kind not in ("sys", "result"):
            return f"seq {ack.seq}: {e.kind} entry of pid {e.pid}, expected a sys/result entry of pid {ack.pid}"
        decision = e if e.kind == "sys" else log.get(e.cause) if e.cause is not None else None
        if decision is None or decision.kind != "sys" or decision.body.get("sys") != ack.sys:
            return f"seq {ack.seq}: no decision entry for {ack.sys} (cause {e.cause})"
        present, p = log.payload(decision.seq)
        inline = decision.body.get("ok") is True
        logged_args = (present, p.get("args") if inline and isinstance(p, dict) else p)
        if inline and ack.ok and (not present or p.get("value") != ack.value):
            return f"seq {ack.seq}: logged value {p!r} differs from the replied {ack.value!r}"
    if logged_args != (True, ack.args):
        return f"seq {ack.seq}: logged args {logged_args!r} differ from the sent {ack.args!r}"
    if e.kind == "result":
        if bool(e.body.get("ok")) != ack.ok:
            return f"seq {ack.seq}: logged ok={e.body.get('ok')} but the reply said ok={ack.ok}"
        if ack.ok and log.payload(e.seq) != (True, ack.value):
            return f"seq {ack.seq}: logged result {log.payload(e.seq)!r} differs from the replied {ack.value!r}"
    return None


@dataclass
class Totals:
    points: int = 0
    acknowledged: int = 0
    lost: int = 0
    verify_failures: int = 0
    restart_failures: int = 0
    replay_failures: int = 0
    replayed_sessions: int = 0
    traffic_errors: int = 0
    exec_points: int = 0
    fork_points: int = 0
    modes: dict[str, int] = field(default_factory=dict)
    max_head: int = 0
    failures: list[str] = field(default_factory=list)

    def fail(self, what: str) -> None:
        if len(self.failures) < 50:
            self.failures.append(what)


def _verify(state: Path, totals: Totals, where: str) -> int | None:
    """verify() on a read-only open; the head seq, or None (counted as a verify failure)."""
    try:
        log = SQLiteLog.open_readonly(state / "log.db")
    except Exception as exc:
        totals.verify_failures += 1
        totals.fail(f"{where}: read-only open failed: {type(exc).__name__}: {exc}")
        return None
    with log:
        report = log.verify()
        if not report.ok:
            totals.verify_failures += 1
            totals.fail(f"{where}: verify failed: {report}")
            return None
        return report.head_seq


class Runner:
    def __init__(self, base: Path, seed: int, chain: int, exec_every: int, max_threads: int = 4,
                 progress: Any = None, unsafe: bool = False) -> None:
        self.base, self.seed, self.chain, self.exec_every = base, seed, chain, exec_every
        self.unsafe = unsafe
        self.max_threads = max_threads
        self.progress = progress
        self.totals = Totals()
        self.ctx: zmq.Context[Any] = zmq.Context()
        self.zygote = Zygote() if exec_every != 1 or unsafe else None

    def close(self) -> None:
        if self.zygote is not None:
            self.zygote.close()
        self.ctx.term()

    def _launch(self, point: int, state: Path, world: Path) -> Kernel:
        use_exec = self.zygote is None or (not self.unsafe and self.exec_every > 0 and point % self.exec_every == 0)
        k = Kernel(state, world, None if use_exec else self.zygote, self.unsafe)
        if use_exec:
            self.totals.exec_points += 1
        else:
            self.totals.fork_points += 1
        return k

    def run(self, points: int) -> Totals:
        t = self.totals
        point = 0
        state_no = 0
        while point < points:
            state_no += 1
            state, world = self.base / f"s{state_no}", self.base / f"s{state_no}" / "world"
            (world / "ws").mkdir(parents=True)
            head = 0
            failures_before = len(t.failures)
            for _ in range(min(self.chain, points - point)):
                new_head = self.kill_point(point, state, world, head)
                point += 1
                if new_head is None:  # the directory cannot go on: start a fresh one
                    break
                head = new_head
            else:
                self.clean_restart(point, state, world, head)
                if not self.unsafe:
                    self.replay(state)
            if self.unsafe or len(t.failures) == failures_before:  # keep a failing directory to look at
                shutil.rmtree(state, ignore_errors=True)
        return t

    def _start(self, point: int, state: Path, world: Path, where: str) -> tuple[Kernel, dict[str, Any]] | None:
        k = self._launch(point, state, world)
        try:
            return k, k.wait_ready()
        except Exception as exc:
            self.totals.restart_failures += 1
            self.totals.fail(f"{where}: the kernel did not restart: {exc}")
            if k.alive():
                k.kill()
            return None

    def kill_point(self, point: int, state: Path, world: Path, head: int) -> int | None:
        t = self.totals
        rng = random.Random(f"{self.seed}:{point}")
        where = f"point {point} ({state.name}, seed {self.seed})"
        started = self._start(point, state, world, where)
        if started is None:
            return None
        k, conn = started
        where += f" [{k.how} kernel {k.pid}]"
        traffic = None
        mode = rng.choice(["acks", "acks", "burst", "delay"])
        acks: list[Ack] = []
        try:
            op = Conn(self.ctx, conn["endpoint"], conn["operator_token"], "operator")
            try:
                setup = [("op.image.register", {"name": "crash", "tools": []}),
                         ("op.spawn", {"image": "crash", "external": True, "caps": [
                             {"kind": "memory", "scope": {"namespace": "team"}, "rights": ["read", "write"]},
                             {"kind": "fs", "scope": {"root": "ws"}, "rights": ["read", "write", "create"]}]})]
                values = []
                for name, args in setup:
                    rep = op.call(name, args)
                    if not rep.get("ok"):
                        raise RuntimeError(f"{name} failed: {rep!r}")
                    acks.append(Ack(rep["seq"], name, args, True, rep["value"], 0))
                    values.append(rep["value"])
            finally:
                op.close()
            if acks[0].seq <= head:
                t.restart_failures += 1
                t.fail(f"{where}: the restarted kernel acknowledged seq {acks[0].seq}, not past the old head {head}")
            pid, token = values[1]["pid"], values[1]["token"]
            traffic = Traffic(self.ctx, conn["endpoint"], conn["operator_token"], token, pid,
                              rng.randint(1, self.max_threads), f"{self.seed}:{point}")
            traffic.start()
            if mode == "delay":
                threading.Event().wait(rng.uniform(0.0, 0.15))  # the kill point itself, drawn from the RNG
            else:
                target = rng.choice([0, rng.randint(1, 20), rng.randint(1, 200)])
                with traffic.cond:
                    traffic.cond.wait_for(lambda: len(traffic.acks) >= target or bool(traffic.errors),
                                          timeout=REPLY_DEADLINE_S)
                if mode == "burst":
                    traffic.burst_wanted.set()
                    traffic.burst_sent.wait(timeout=REPLY_DEADLINE_S)
        except Exception as exc:
            t.traffic_errors += 1
            t.fail(f"{where}: driving the kernel failed: {type(exc).__name__}: {exc}; {k.stderr_tail()}")
        finally:
            if k.alive():
                k.kill()  # SIGKILL, then reap
            else:
                t.fail(f"{where}: the kernel was already dead ({k.reap()}): {k.stderr_tail()}")
                t.traffic_errors += 1
            if traffic is not None:
                traffic.join()
                acks += traffic.acks
                if traffic.errors:
                    t.traffic_errors += 1
                    t.fail(f"{where}: client errors: {traffic.errors[:3]}")
        t.points += 1
        t.modes[mode] = t.modes.get(mode, 0) + 1
        new_head = _verify(state, t, where)
        lost = 0
        try:
            log = SQLiteLog.open_readonly(state / "log.db")
        except Exception as exc:
            t.lost += len(acks)
            t.fail(f"{where}: cannot open the log to check {len(acks)} acknowledgements: {exc}")
            return None
        with log:
            log_head = log.head()[0]
            for ack in acks:
                why = check_ack(log, ack)
                if why is not None:
                    lost += 1
                    t.fail(f"{where}: {why}")
        t.acknowledged += len(acks)
        t.lost += lost
        t.max_head = max(t.max_head, log_head)
        if self.progress is not None:
            self.progress(point, mode, len(acks), log_head)
        return new_head

    def clean_restart(self, point: int, state: Path, world: Path, head: int) -> None:
        """The last restart of a directory: must start, acknowledge past the old head, stop on SIGTERM."""
        t = self.totals
        where = f"final restart of {state.name} (seed {self.seed})"
        started = self._start(point, state, world, where)
        if started is None:
            return
        k, conn = started
        try:
            op = Conn(self.ctx, conn["endpoint"], conn["operator_token"], "operator")
            try:
                rep = op.call("op.ps", {})
            finally:
                op.close()
            if not rep.get("ok") or rep.get("seq") is None or rep["seq"] <= head:
                t.restart_failures += 1
                t.fail(f"{where}: op.ps after restart answered {rep!r} (old head {head})")
        except Exception as exc:
            t.restart_failures += 1
            t.fail(f"{where}: {type(exc).__name__}: {exc}; {k.stderr_tail()}")
        finally:
            code = k.terminate() if k.alive() else k.reap()
            if code != 0:
                t.restart_failures += 1
                t.fail(f"{where}: the kernel exited {code} on SIGTERM: {k.stderr_tail()}")
        _verify(state, t, where)

    def replay(self, state: Path) -> None:
        """The directory's whole log, every kernel session killed on the way, replays: each
        restarted kernel recovers from the earlier sessions and makes the same decisions."""
        from agentlibos.kernel import replay_log

        t = self.totals
        try:
            report = replay_log(state / "log.db", state_dir=state)
        except Exception as exc:
            t.replay_failures += 1
            t.fail(f"replay of {state.name} (seed {self.seed}): {type(exc).__name__}: {exc}")
            return
        t.replayed_sessions += report.sessions


def run_points(points: int, *, seed: int = 1, base: Path | None = None, chain: int = 20, exec_every: int = 10,
               max_threads: int = 4, progress: Any = None, unsafe: bool = False) -> dict[str, Any]:
    """Run `points` kill points; returns the report (see the module docstring)."""
    started = time.perf_counter()
    own = base is None
    base = Path(tempfile.mkdtemp(prefix="alos-crash-")) if base is None else base
    runner = Runner(base, seed, chain, exec_every, max_threads, progress, unsafe)
    keep = True
    try:
        t = runner.run(points)
        keep = bool(t.failures) and not unsafe
    finally:
        runner.close()
        if own and not keep:
            shutil.rmtree(base, ignore_errors=True)
    return {"points": t.points, "acknowledged": t.acknowledged, "lost": t.lost,
            "verify_failures": t.verify_failures, "restart_failures": t.restart_failures,
            "replay_failures": t.replay_failures, "replayed_sessions": t.replayed_sessions,
            "traffic_errors": t.traffic_errors, "seconds": round(time.perf_counter() - started, 2),
            "exec_points": t.exec_points, "fork_points": t.fork_points, "modes": t.modes,
            "max_head": t.max_head, "seed": seed, "failures": t.failures,
            "kept": str(base) if own and keep else None}


def main() -> None:
    if sys.argv[1:] == ["--zygote"]:
        _zygote_main()
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--points", type=int, default=int(os.environ.get("AGENTLIBOS_CRASH_POINTS", "200")))
    ap.add_argument("--seed", type=int, default=int(os.environ.get("AGENTLIBOS_CRASH_SEED", "1")))
    ap.add_argument("--chain", type=int, default=20, help="kill points per state directory")
    ap.add_argument("--exec-every", type=int, default=10,
                    help="every K-th kernel is a fresh interpreter, the rest forked by a zygote (1: all exec)")
    ap.add_argument("--dir", type=Path, help="work directory (default: a temporary one, removed after)")
    ap.add_argument("--unsafe", action="store_true",
                    help="negative control: kernels that reply before their entries commit (must report losses)")
    ap.add_argument("-v", "--verbose", action="store_true", help="one line per kill point on stderr")
    a = ap.parse_args()

    def progress(point: int, mode: str, acks: int, head: int) -> None:
        print(f"point {point}: {mode}, {acks} acknowledged, head {head}", file=sys.stderr)

    out = run_points(a.points, seed=a.seed, base=a.dir, chain=a.chain, exec_every=a.exec_every,
                     progress=progress if a.verbose else None, unsafe=a.unsafe)
    failures = out.pop("failures")
    if out["kept"] is None:
        del out["kept"]
    print(json.dumps(out))
    for f in failures:
        print(f, file=sys.stderr)
    if a.unsafe:  # the control passes when the checks caught the broken kernel
        sys.exit(0 if out["lost"] else 1)
    bad = (out["lost"] or out["verify_failures"] or out["restart_failures"] or out["replay_failures"]
           or out["traffic_errors"])
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
