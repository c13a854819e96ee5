"""The PTY provider (`pty.open`, `pty.write`, `pty.read`, `pty.close`): interactive programs on
real pseudo-terminals.

A capability `{kind: pty, scope: {programs: [...]}, rights: [open, ...]}` authorizes opening a
session on a program of the allow-list (argv[0] resolved the way the shell provider resolves it:
a name searches the provider's PATH, a path is relative to the world root, and the result is
compared by real path with the allow-list entries resolved the same way).

A session is a kernel object bound to the process that opened it:
- its owner may read, write and close it with any pty capability that has the right;
- any other process needs a capability on that session, `{kind: pty, scope: {session: ID}}`
  (an operator grant, or one passed on by a holder of such a capability); a capability whose
  scope names no session never reaches another process's session (EPERM);
- when the owner exits, its sessions are closed: the program's whole terminal session (every
  process group in it, job-control jobs included) is killed and the descriptors are closed.

After the program exits, reads return what is left and then `{eof: true}` (with the exit code),
writes are EIO and close is ok. A closed session is ENOENT. Every read is bounded by
`log_bytes`, so each read's output is logged whole (the kernel logs every result payload).
"""

from __future__ import annotations

import codecs
import errno
import fcntl
import itertools
import os
import resource
import select
import signal
import struct
import subprocess
import termios
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from agentlibos.bus._errors import KernelError
from agentlibos.kernel import _shell
from agentlibos.kernel._provider import CallInfo, Provider
from agentlibos.kernel._table import SyscallSpec, _row

__all__ = ["PTY_SYSCALLS", "make_pty_provider"]

PTY_SYSCALLS: tuple[SyscallSpec, ...] = (
    _row("pty.open", "argv:list cols:int? rows:int?", "pty", "open", "syscalls", "ext",
         "start an allowed program on a new pseudo-terminal -> {session}"),
    _row("pty.write", "session:str data:str", "pty", "write", "syscalls", "ext",
         "send input to a PTY session -> {written}"),
    _row("pty.read", "session:str timeout_s:num? max_bytes:int?", "pty", "read", "syscalls", "ext",
         "read a PTY session's output (waits up to timeout_s for some) -> {data} or {data, eof, exit_code}"),
    _row("pty.close", "session:str", "pty", "close", "syscalls", "ext",
         "close a PTY session (its program's terminal session is killed) -> {exit_code}"),
)

_MAX_DIM = 10_000
_REAP_TIMEOUT_S = 5.0
_EXIT_CHECK_S = 0.25  # how often a waiting read looks whether the program has exited


@dataclass(eq=False)
class _Session:
    id: str
    owner: int
    argv: list[str]
    program: str
    proc: subprocess.Popen[bytes]
    master: int
    decoder: codecs.IncrementalDecoder = field(default_factory=lambda: codecs.getincrementaldecoder("utf-8")("replace"))
    users: int = 0
    closed: bool = False
    eof: bool = False
    out_bytes: int = 0
    in_bytes: int = 0
    read_lock: threading.Lock = field(default_factory=threading.Lock)
    write_lock: threading.Lock = field(default_factory=threading.Lock)
    proc_lock: threading.Lock = field(default_factory=threading.Lock)


def _child_setup(mem_bytes: int) -> Callable[[], None]:
    def apply() -> None:  # in the child after setsid, before exec: system calls only
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)  # the pty becomes the controlling terminal
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        if mem_bytes:
            resource.setrlimit(resource.RLIMIT_AS, (mem_bytes, mem_bytes))

    return apply


def _session_members(sid: int) -> list[int]:
    """Live (non-zombie) processes in terminal session `sid`, from /proc."""
    out: list[int] = []
    try:
        names = os.listdir("/proc")
    except OSError:
        return out
    for name in names:
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as fh:
                stat = fh.read()
        except OSError:
            continue
        fields = stat[stat.rfind(b")") + 2:].split()
        # state ppid pgrp session ...
        if len(fields) >= 4 and fields[0] not in (b"Z", b"X") and int(fields[3]) == sid:
            out.append(int(name))
    return out


def _kill_session(sid: int) -> None:
    """SIGKILL every process of the terminal session `sid` (its leader's process group and any
    job-control groups); the caller keeps the leader unreaped, so the id cannot be reused."""
    for _ in range(32):
        try:
            os.killpg(sid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        members = _session_members(sid)
        if not members:
            return
        for pid in members:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


class _PtyProvider:
    def __init__(self, path: Sequence[str], world_root: str, env: Mapping[str, str], log_bytes: int,
                 default_timeout_s: float, max_timeout_s: float, write_timeout_s: float, max_sessions: int,
                 mem_bytes: int) -> None:
        if log_bytes < 1:
            raise ValueError("log_bytes must be positive")
        if not 0 <= default_timeout_s <= max_timeout_s or not write_timeout_s > 0:
            raise ValueError("timeouts must satisfy 0 <= default_timeout_s <= max_timeout_s and write_timeout_s > 0")
        if max_sessions < 1:
            raise ValueError("max_sessions must be positive")
        self.path = tuple(str(p) for p in path)
        self.world_root = os.path.abspath(str(world_root))
        self.env = {str(k): str(v) for k, v in env.items()}
        self.log_bytes = int(log_bytes)
        self.default_timeout_s = float(default_timeout_s)
        self.max_timeout_s = float(max_timeout_s)
        self.write_timeout_s = float(write_timeout_s)
        self.max_sessions = int(max_sessions)
        self.mem_bytes = int(mem_bytes)
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._sessions: dict[str, _Session] = {}
        self._stragglers: list[subprocess.Popen[bytes]] = []

    # --- authorization -------------------------------------------------------------------------
    def _resolve(self, argv: Any) -> str | None:
        if not isinstance(argv, list) or not argv or not all(isinstance(a, str) and "\x00" not in a for a in argv):
            return None
        return _shell.resolve_program(argv[0], self.path, self.world_root)

    def covers(self, scope: Mapping[str, Any], sys: str, args: Mapping[str, Any]) -> bool:
        if sys == "pty.open":
            programs = scope.get("programs")
            exe = self._resolve(args.get("argv"))
            if exe is None or not isinstance(programs, list):
                return False
            return exe in {_shell.resolve_program(p, self.path, self.world_root) for p in programs}
        if sys in ("pty.write", "pty.read", "pty.close"):
            sid = args.get("session")
            if not isinstance(sid, str):
                return False
            # A session capability covers its own session only; one without `session` covers the
            # sessions its holder opened, which only run() can tell (it knows the caller).
            return "session" not in scope or scope["session"] == sid
        return False

    def describe(self, sys: str, args: Mapping[str, Any]) -> dict[str, Any]:
        if sys == "pty.open":
            argv = args.get("argv")
            return {"argv": list(argv) if isinstance(argv, list) else argv, "program": self._resolve(argv),
                    "cols": args.get("cols", 80), "rows": args.get("rows", 24)}
        sid = args.get("session")
        with self._lock:
            s = self._sessions.get(sid) if isinstance(sid, str) else None
        out: dict[str, Any] = {"session": sid, "owner": s.owner if s else None, "argv": s.argv if s else None}
        if sys == "pty.write":
            data = args.get("data")
            out["bytes"] = len(data.encode("utf-8", "replace")) if isinstance(data, str) else None
        elif sys == "pty.read":
            out["max_bytes"] = min(int(args.get("max_bytes") or self.log_bytes), self.log_bytes)
        return out

    # --- sessions ------------------------------------------------------------------------------
    def _acquire(self, args: Mapping[str, Any], info: CallInfo) -> _Session:
        sid = args["session"]
        scoped = info.scope.get("session")
        with self._lock:
            s = self._sessions.get(sid)
            if scoped is None and (s is None or s.owner != info.pid):
                raise KernelError("EPERM", f"PTY session {sid!r} was not opened by process {info.pid}; another "
                                           "process needs a capability on the session ({session: ID})")
            if scoped is not None and scoped != sid:  # covers() already refused this
                raise KernelError("EPERM", f"{info.handle} is a capability on PTY session {scoped!r}, not {sid!r}")
            if s is None:
                raise KernelError("ENOENT", f"no PTY session {sid!r}")
            if s.closed:
                raise KernelError("ENOENT", f"PTY session {sid!r} is closed")
            s.users += 1
            return s

    def _release(self, s: _Session) -> None:
        with self._lock:
            s.users -= 1
            fd = self._take_fd(s)
        if fd >= 0:
            os.close(fd)

    @staticmethod
    def _take_fd(s: _Session) -> int:
        """The master descriptor to close now (closed and no call using it), else -1; under _lock."""
        fd = -1
        if s.closed and s.users == 0 and s.master >= 0:
            fd, s.master = s.master, -1
        return fd

    def _exited(self, s: _Session) -> bool:
        """Whether the program has exited (its leader is left a zombie until _finish)."""
        with s.proc_lock:
            if s.proc.returncode is not None:
                return True
            try:
                return os.waitid(os.P_PID, s.proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
            except ChildProcessError:
                return True

    def _finish(self, s: _Session) -> int | None:
        """Kill the program's whole terminal session and reap it; its exit code."""
        with s.proc_lock:
            p = s.proc
            if p.returncode is None:
                _kill_session(p.pid)  # the leader is alive or an unreaped zombie: its id is still ours
                try:
                    p.wait(timeout=_REAP_TIMEOUT_S)
                except subprocess.TimeoutExpired:
                    with self._lock:
                        self._stragglers.append(p)
            return p.returncode

    def _close(self, s: _Session) -> int | None:
        with self._lock:
            if s.closed:
                return s.proc.returncode
            s.closed = True
        code = self._finish(s)
        with self._lock:
            fd = self._take_fd(s)
        if fd >= 0:
            os.close(fd)
        return code

    # --- the effects ---------------------------------------------------------------------------
    def run(self, args: Mapping[str, Any], info: CallInfo) -> Any:
        if info.sys == "pty.open":
            return self._open(args, info)
        if info.sys not in ("pty.read", "pty.write", "pty.close"):
            raise KernelError("ENOSYS", f"the pty provider has no {info.sys}")
        s = self._acquire(args, info)
        try:
            if info.sys == "pty.read":
                return self._read(s, args)
            if info.sys == "pty.write":
                return self._write(s, args)
            return {"exit_code": self._close(s)}  # the master closes when the last call using it ends
        finally:
            self._release(s)

    def _open(self, args: Mapping[str, Any], info: CallInfo) -> dict[str, Any]:
        argv = args["argv"]
        exe = self._resolve(argv)
        if exe is None:
            raise KernelError("EINVAL", "argv must be a non-empty list of strings naming an installed program")
        cols, rows = args.get("cols", 80), args.get("rows", 24)
        for name, v in (("cols", cols), ("rows", rows)):
            if not isinstance(v, int) or isinstance(v, bool) or not 1 <= v <= _MAX_DIM:
                raise KernelError("EINVAL", f"{name} must be an integer from 1 to {_MAX_DIM}")
        with self._lock:
            live = sum(1 for s in self._sessions.values() if not s.closed)
            if live >= self.max_sessions:
                raise KernelError("EIO", f"too many open PTY sessions (the limit is {self.max_sessions})")
            sid = f"pty-{next(self._ids)}"
        env = dict(self.env)
        env.setdefault("PATH", os.pathsep.join(self.path))
        env.setdefault("TERM", "xterm")
        master, slave = os.openpty()
        try:
            fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
            os.set_blocking(master, False)
            proc = subprocess.Popen(
                list(argv), executable=exe, cwd=self.world_root, env=env,
                stdin=slave, stdout=slave, stderr=slave,
                start_new_session=True, close_fds=True, preexec_fn=_child_setup(self.mem_bytes),
            )
        except OSError as exc:
            os.close(master)
            raise KernelError("EIO", f"could not start {argv[0]!r} on a pty: {exc.strerror or exc}") from None
        finally:
            os.close(slave)  # the program holds the only other end: its exit is our EOF
        s = _Session(sid, info.pid, list(argv), exe, proc, master)
        with self._lock:
            self._sessions[sid] = s
        return {"session": sid}

    def _read(self, s: _Session, args: Mapping[str, Any]) -> dict[str, Any]:
        timeout = args.get("timeout_s")
        timeout = self.default_timeout_s if timeout is None else float(timeout)
        if not timeout >= 0:
            raise KernelError("EINVAL", "timeout_s must not be negative")
        timeout = min(timeout, self.max_timeout_s)
        limit = args.get("max_bytes")
        limit = self.log_bytes if limit is None else int(limit)
        if limit < 1:
            raise KernelError("EINVAL", "max_bytes must be positive")
        limit = min(limit, self.log_bytes)  # each read is logged whole
        with s.read_lock:
            if s.eof:
                return {"data": "", "eof": True, "exit_code": s.proc.returncode}
            deadline = time.monotonic() + timeout
            buf = bytearray()
            eof = False
            while len(buf) < limit:
                wait = 0.0 if buf else max(0.0, min(deadline - time.monotonic(), _EXIT_CHECK_S))
                ready, _, _ = select.select([s.master], [], [], wait)
                if not ready:
                    if buf:
                        break
                    if self._exited(s):
                        # Its group is killed now; what is still in the pty can be read until EIO.
                        self._finish(s)
                        if select.select([s.master], [], [], 0)[0]:
                            continue
                        eof = True
                        break
                    if time.monotonic() >= deadline:
                        break
                    continue
                try:
                    chunk = os.read(s.master, limit - len(buf))
                except BlockingIOError:
                    continue
                except OSError as exc:
                    if exc.errno != errno.EIO:  # EIO: every slave end is closed and the pty drained
                        raise KernelError("EIO", f"reading PTY session {s.id!r} failed: {exc.strerror}") from None
                    eof = True
                    break
                if not chunk:
                    eof = True
                    break
                buf += chunk
            s.out_bytes += len(buf)
            text = s.decoder.decode(bytes(buf), final=eof)
            if not eof:
                return {"data": text}
            s.eof = True
            return {"data": text, "eof": True, "exit_code": self._finish(s)}

    def _write(self, s: _Session, args: Mapping[str, Any]) -> dict[str, Any]:
        data = args["data"].encode("utf-8", "replace")
        with s.write_lock:
            if s.eof or self._exited(s):
                raise KernelError("EIO", f"the program of PTY session {s.id!r} has exited")
            deadline = time.monotonic() + self.write_timeout_s
            written = 0
            while written < len(data):
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                _, ready, _ = select.select([], [s.master], [], left)
                if not ready:
                    break
                try:
                    written += os.write(s.master, data[written:])
                except BlockingIOError:
                    continue
                except OSError as exc:
                    raise KernelError("EIO", f"writing to PTY session {s.id!r} failed: {exc.strerror}") from None
            s.in_bytes += written
            # A short count means the program did not take its input within write_timeout_s.
            return {"written": written}

    # --- lifecycle -----------------------------------------------------------------------------
    def on_exit(self, pid: int) -> None:
        with self._lock:
            owned = [s for s in self._sessions.values() if s.owner == pid and not s.closed]
        for s in owned:
            self._close(s)

    def close(self) -> None:
        with self._lock:
            live = [s for s in self._sessions.values() if not s.closed]
        for s in live:
            self._close(s)
        with self._lock:
            stragglers, self._stragglers = self._stragglers, []
        for p in stragglers:
            try:
                p.wait(timeout=_REAP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                pass


def make_pty_provider(
    *,
    path: Sequence[str],
    world_root: str,
    env: Mapping[str, str],
    log_bytes: int = 64 << 10,
    default_timeout_s: float = 1.0,
    max_timeout_s: float = 30.0,
    write_timeout_s: float = 5.0,
    max_sessions: int = 32,
    mem_bytes: int = 1 << 30,
) -> Provider:
    """The `pty` provider: programs resolved on `path` (names) or under `world_root` (paths), run
    with cwd `world_root` and the environment `env` (plus PATH and TERM=xterm unless given).

    `log_bytes` bounds each read (and so each logged result); a read waits `default_timeout_s`
    unless it says otherwise, never more than `max_timeout_s`; a write gives up after
    `write_timeout_s` (the result's `written` says how much was taken); at most `max_sessions`
    sessions are open at once; `mem_bytes` is the program's address-space limit (0: none).
    Raises ValueError for a malformed configuration."""
    impl = _PtyProvider(path, world_root, env, log_bytes, default_timeout_s, max_timeout_s, write_timeout_s,
                        max_sessions, mem_bytes)
    return Provider(
        kind="pty",
        syscalls=PTY_SYSCALLS,
        covers=impl.covers,
        run=impl.run,
        describe=impl.describe,
        scope_keys={"programs": "list[str]", "session": "str"},
        close=impl.close,
        on_exit=impl.on_exit,
    )
