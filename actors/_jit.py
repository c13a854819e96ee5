"""JIT tools: runs an agent's own TypeScript tool in a fresh, permission-less Deno Worker whose only
way to affect anything is `sys.call`, which the calling process forwards to the kernel as itself.

Layers (each one alone should hold): the source may not import anything; the host runs with no
`--allow-*` flag, `--deny-*` everything and code generation from strings disabled; each call gets a
new Worker with `permissions: "none"` and a prelude that withholds Workers, WebAssembly, stdio and
Deno's internals; the host process lives in a user+mount+net namespace whose root is an empty,
read-only tmpfs holding only the deno binary, its libraries and the host script.

`JitRunner(sandbox=False)` switches every layer off (the benchmark's `jit-sandbox` ablation only).
"""

from __future__ import annotations

import base64
import collections
import itertools
import json
import logging
import queue
import re
import shutil
import subprocess  # noqa: TID251 -- the sandbox itself is a subprocess; tools reach nothing through it
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

log = logging.getLogger("agentlibos.actors.jit")

SysCall = Callable[[str, dict[str, Any]], tuple[bool, Any, str | None, str]]

HOST_SCRIPT = Path(__file__).with_name("_jit_host.js")
MAX_SOURCE_BYTES = 64 * 1024
#: Extra time the Python side allows the host, past the tool's limit, before it declares the host hung.
HOST_GRACE_S = 3.0
START_TIMEOUT_S = 30.0

# Run inside `unshare --user --map-root-user --mount --net --ipc --uts --pid --fork --mount-proc`:
# build a root that holds only deno, its shared libraries and the host script; pivot into it, detach
# the old root and make the new one read-only, then exec deno. The /proc kept is the new PID
# namespace's (it shows only the sandbox): deno panics without /proc/self/exe.
_NAMESPACE_SCRIPT = r"""
set -eu
R="$1"; DENO="$2"; HOST="$3"; shift 3
ulimit -c 0
mount -t tmpfs -o size=16m,mode=755 jitroot "$R"
mkdir -p "$R/bin" "$R/dev" "$R/app" "$R/deno_dir" "$R/.old" "$R/.t" "$R/proc"
touch "$R/bin/deno" "$R/dev/null" "$R/dev/urandom"
mount --bind "$DENO" "$R/bin/deno"
mount --bind /dev/null "$R/dev/null"
mount --bind /dev/urandom "$R/dev/urandom"
mount --rbind /proc "$R/proc"
cp "$HOST" "$R/app/host.js"
UM=$(command -v umount); MO=$(command -v mount)
cp "$UM" "$R/.t/umount"; cp "$MO" "$R/.t/mount"
for l in $( (ldd "$DENO"; ldd "$UM"; ldd "$MO") | grep -o '/[^ ]*' | sort -u); do
  mkdir -p "$R$(dirname "$l")"; cp -L "$l" "$R$l"
done
cd "$R"
pivot_root . .old
/.t/umount -l /.old
/.t/mount -o remount,bind,ro,nosuid,nodev /
/.t/mount -o remount,bind,ro,nosuid,nodev,noexec /proc
DENO_DIR=/deno_dir exec /bin/deno "$@"
"""

_DEAD = object()


@dataclass(frozen=True, slots=True)
class JitResult:
    """The outcome of one tool call. `refusals` lists what the sandbox refused during it (to be logged)."""

    ok: bool
    value: Any = None
    code: str | None = None
    message: str = ""
    elapsed_ms: float = 0.0
    refusals: tuple[str, ...] = ()


class JitSourceError(ValueError):
    """A tool source the runner will not run; `code` is EINVAL (malformed) or EPERM (reaches outside)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


_EXPORT_DEFAULT = re.compile(r"\bexport\s+default\b")
# Every way a module names another module: import declarations, import(), import.meta, re-exports,
# and the comment pragmas Deno follows. Matched on the raw text (strings and comments included):
# a false refusal is a clear message; a missed import would be a door.
_FORBIDDEN = (
    (re.compile(r"\bimport\b"), "JIT tools may not import modules (the word `import` is reserved)"),
    (re.compile(r"\bexport\b(?!\s+default\b)"), "a JIT tool exports only its default function"),
    (re.compile(r"\brequire\s*\("), "JIT tools may not load modules"),
    (re.compile(r"<reference\b|@(?:deno-types|ts-types|jsxImportSource)\b"), "module pragmas are not allowed"),
)


def _check_shape(source: str | bytes, max_bytes: int) -> str:
    if isinstance(source, bytes):
        try:
            source = source.decode("utf-8")
        except UnicodeDecodeError as e:
            raise JitSourceError("EINVAL", f"tool source is not valid UTF-8: {e}") from None
    if not isinstance(source, str):
        raise JitSourceError("EINVAL", f"tool source must be a string, not {type(source).__name__}")
    try:
        size = len(source.encode("utf-8"))
    except UnicodeEncodeError as e:
        raise JitSourceError("EINVAL", f"tool source is not valid UTF-8: {e}") from None
    if size > max_bytes:
        raise JitSourceError("EINVAL", f"tool source is {size} bytes; the limit is {max_bytes}")
    if "\x00" in source:
        raise JitSourceError("EINVAL", "tool source contains a NUL character")
    if not _EXPORT_DEFAULT.search(source):
        raise JitSourceError("EINVAL", "a tool module must `export default async function (input, sys)`")
    return source


def _check_imports(source: str) -> None:
    for pattern, why in _FORBIDDEN:
        m = pattern.search(source)
        if m:
            line = source.count("\n", 0, m.start()) + 1
            raise JitSourceError("EPERM", f"{why} (line {line}: {m.group(0)!r})")


def validate_source(source: str, *, max_bytes: int = MAX_SOURCE_BYTES) -> None:
    """Raise JitSourceError (a ValueError) when `source` cannot be a JIT tool: too large, not UTF-8,
    no `export default`, or any module import (EPERM)."""
    _check_imports(_check_shape(source, max_bytes))


def _encode(value: Any) -> Any:
    if isinstance(value, bytes | bytearray | memoryview):
        return {"__bytes__": base64.b64encode(bytes(value)).decode("ascii")}
    raise TypeError(f"{type(value).__name__} is not JSON-able")


def _decode_hook(d: dict[str, Any]) -> Any:
    if len(d) == 1 and isinstance(d.get("__bytes__"), str):
        return base64.b64decode(d["__bytes__"])
    return d


def _loads(text: Any) -> Any:
    return json.loads(text, object_hook=_decode_hook) if isinstance(text, str) else text


def find_deno() -> str | None:
    try:
        import deno  # type: ignore[import-untyped]

        path = deno.find_deno_bin()
        if path and Path(path).is_file():
            return str(path)
    except Exception:  # noqa: BLE001 -- the package is optional; fall back to PATH
        pass
    return shutil.which("deno")


class _Host:
    """One host subprocess and the calls in flight on it."""

    def __init__(self, argv: list[str], env: dict[str, str], root_dir: str | None) -> None:
        self.root_dir = root_dir
        self.pending: dict[int, queue.Queue[Any]] = {}
        self.pending_lock = threading.Lock()
        self.write_lock = threading.Lock()
        self.ready = threading.Event()
        self.alive = True
        self.stderr_tail: collections.deque[str] = collections.deque(maxlen=40)
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
            cwd="/",
            close_fds=True,
            start_new_session=True,
        )
        assert self.proc.stdout is not None and self.proc.stderr is not None
        self._reader = threading.Thread(target=self._read, args=(self.proc.stdout,), name="jit-host-out", daemon=True)
        self._errs = threading.Thread(target=self._drain, args=(self.proc.stderr,), name="jit-host-err", daemon=True)
        self._reader.start()
        self._errs.start()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _read(self, stream: IO[bytes]) -> None:
        try:
            for raw in stream:
                try:
                    msg = json.loads(raw)
                except ValueError:
                    log.warning("jit host wrote a non-protocol line: %r", raw[:200])
                    continue
                if not isinstance(msg, dict):
                    continue
                if msg.get("t") == "ready":
                    self.ready.set()
                    continue
                with self.pending_lock:
                    q = self.pending.get(msg.get("id"))  # type: ignore[arg-type]
                if q is not None:  # a finished call's stray message goes nowhere
                    q.put(msg)
        finally:
            self.alive = False
            self.ready.set()
            with self.pending_lock:
                queues = list(self.pending.values())
            for q in queues:
                q.put(_DEAD)

    def _drain(self, stream: IO[bytes]) -> None:
        for raw in stream:
            self.stderr_tail.append(raw.decode("utf-8", "replace").rstrip())

    def send(self, msg: dict[str, Any]) -> None:
        line = json.dumps(msg, default=_encode, ensure_ascii=False).encode("utf-8") + b"\n"
        with self.write_lock:
            assert self.proc.stdin is not None
            self.proc.stdin.write(line)
            self.proc.stdin.flush()

    def why_dead(self) -> str:
        rc = self.proc.poll()
        tail = " | ".join(line for line in self.stderr_tail if line.strip())[-500:]
        return f"the JIT host exited (status {rc})" + (f": {tail}" if tail else "")

    def kill(self) -> None:
        self.alive = False
        if self.proc.poll() is None:
            self.proc.kill()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            log.error("jit host %d did not exit after SIGKILL", self.proc.pid)
        for s in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            try:
                if s is not None:
                    s.close()
            except OSError:
                pass
        self._reader.join(timeout=5)
        self._errs.join(timeout=5)
        if self.root_dir:
            shutil.rmtree(self.root_dir, ignore_errors=True)

    def close(self) -> None:
        if self.proc.poll() is None and self.proc.stdin is not None:
            try:
                with self.write_lock:
                    self.proc.stdin.close()
                self.proc.wait(timeout=3)
            except (OSError, subprocess.TimeoutExpired):
                pass
        self.kill()


class JitRunner:
    """A long-lived Deno host subprocess; each call runs in a fresh isolate (Worker) with no permissions.

    Thread-safe: calls from several threads are multiplexed by id over the host's stdin/stdout, and
    each call's syscalls are made by `sys_call` on the calling thread. A host that dies (a tool's
    runaway allocation kills the whole V8 process) is restarted on the next call.
    """

    def __init__(
        self,
        *,
        deno_path: str | None = None,
        time_limit_ms: int = 5000,
        memory_mb: int = 128,
        os_sandbox: bool = True,
        sandbox: bool = True,
        _lexical_guard: bool = True,
    ) -> None:
        self.deno_path = deno_path
        self.time_limit_ms = time_limit_ms
        self.memory_mb = memory_mb
        # sandbox=False exists only for the benchmark's `jit-sandbox` ablation, which shows what the
        # sandbox prevents: tools get every Deno permission, may import and build code from strings,
        # and run outside the OS namespace. The prelude keeps only what guards the host's own
        # protocol (stdio, console, exit). Never a default, never a deployment setting.
        self.sandbox = sandbox
        self.os_sandbox = os_sandbox and sandbox
        # Off only in tests that prove the deeper layers hold without the import ban.
        self._lexical_guard = _lexical_guard and sandbox
        self._lock = threading.Lock()
        self._host: _Host | None = None
        self._ids = itertools.count(1)
        self._closed = False

    # -- lifecycle -------------------------------------------------------------------------------

    def _argv(self, deno: str, root_dir: str | None) -> list[str]:
        if not self.sandbox:
            return [
                deno, "run", "--quiet", "--no-prompt", "--no-config", "--no-lock", "--no-remote", "--no-npm",
                "--unstable-worker-options", "--allow-all", f"--v8-flags=--max-old-space-size={int(self.memory_mb)}",
                str(HOST_SCRIPT), "--unsandboxed",
            ]
        deno_args = [
            "run",
            "--quiet",
            "--no-prompt",
            "--no-config",
            "--no-lock",
            "--no-remote",
            "--no-npm",
            "--unstable-worker-options",
            "--deny-read",
            "--deny-write",
            "--deny-net",
            "--deny-env",
            "--deny-run",
            "--deny-ffi",
            "--deny-sys",
            "--deny-import",
            f"--v8-flags=--disallow-code-generation-from-strings,--max-old-space-size={int(self.memory_mb)}",
        ]
        if not self.os_sandbox:
            return [deno, *deno_args, str(HOST_SCRIPT)]
        unshare = shutil.which("unshare")
        if unshare is None or shutil.which("pivot_root") is None:
            raise RuntimeError(
                "the JIT OS sandbox needs util-linux `unshare` and `pivot_root` (or pass os_sandbox=False)"
            )
        assert root_dir is not None
        return [
            unshare,
            "--user",
            "--map-root-user",
            "--mount",
            "--net",
            "--ipc",
            "--uts",
            "--pid",
            "--fork",
            "--kill-child",
            "--mount-proc",
            "sh",
            "-c",
            _NAMESPACE_SCRIPT,
            "jit-sandbox",
            root_dir,
            str(Path(deno).resolve()),
            str(HOST_SCRIPT),
            *deno_args,
            "/app/host.js",
        ]

    def _spawn(self) -> _Host:
        deno = self.deno_path or find_deno()
        if not deno or not Path(deno).is_file():
            raise RuntimeError(
                "deno not found: `pip install deno` (the PyPI package ships the binary) or pass deno_path"
            )
        if not HOST_SCRIPT.is_file():
            raise RuntimeError(f"the JIT host program is missing: {HOST_SCRIPT} (package data not installed?)")
        root_dir = tempfile.mkdtemp(prefix="agentlibos-jit-") if self.os_sandbox else None
        env = {
            "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "NO_COLOR": "1",
            "DENO_NO_UPDATE_CHECK": "1",
        }
        if not self.os_sandbox:
            env["DENO_DIR"] = tempfile.mkdtemp(prefix="agentlibos-jit-deno-")
        # The host removes its scratch directory (the sandbox root, or Deno's cache dir) when it dies.
        host = _Host(self._argv(deno, root_dir), env, root_dir or env.get("DENO_DIR"))
        if not host.ready.wait(START_TIMEOUT_S) or not host.alive:
            why = host.why_dead() if not host.alive else "the JIT host did not become ready"
            host.kill()
            raise RuntimeError(f"cannot start the JIT host: {why}")
        return host

    def start(self) -> None:
        with self._lock:
            if self._closed:
                raise RuntimeError("the JIT runner is closed")
            if self._host is None or not self._host.alive:
                if self._host is not None:
                    self._host.kill()
                self._host = self._spawn()

    @property
    def host_pid(self) -> int | None:
        host = self._host
        return host.pid if host is not None and host.alive else None

    def _live_host(self, dead: _Host | None = None) -> _Host:
        with self._lock:
            if self._closed:
                raise RuntimeError("the JIT runner is closed")
            host = self._host
            if host is None or not host.alive or host is dead or host.proc.poll() is not None:
                if host is not None:
                    host.kill()
                self._host = host = self._spawn()
            return host

    def close(self) -> None:
        with self._lock:
            self._closed = True
            host, self._host = self._host, None
        if host is not None:
            host.close()

    def __enter__(self) -> JitRunner:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- calls -----------------------------------------------------------------------------------

    def call(self, source: str, input: Any, sys_call: SysCall, *, time_limit_ms: int | None = None) -> JitResult:
        t0 = time.perf_counter()

        def done(
            ok: bool, value: Any = None, code: str | None = None, message: str = "", refusals: Any = ()
        ) -> JitResult:
            refused = tuple(str(r) for r in refusals) if isinstance(refusals, list | tuple) else ()
            return JitResult(ok, value, code, message, (time.perf_counter() - t0) * 1000.0, refused)

        try:
            text = _check_shape(source, MAX_SOURCE_BYTES)
            if self._lexical_guard:
                _check_imports(text)
        except JitSourceError as e:
            return done(False, code=e.code, message=str(e), refusals=(str(e),) if e.code == "EPERM" else ())
        limit = int(time_limit_ms if time_limit_ms is not None else self.time_limit_ms)
        call_id = next(self._ids)
        msg = {"t": "call", "id": call_id, "src": text, "input": input, "limit_ms": limit}
        try:
            json.dumps(input, default=_encode)
        except (TypeError, ValueError) as e:
            return done(False, code="EINVAL", message=f"tool input is not JSON-able: {e}")

        q: queue.Queue[Any] = queue.Queue()
        host = self._live_host()
        for attempt in (1, 2):
            with host.pending_lock:
                host.pending[call_id] = q
            try:
                host.send(msg)
                break
            except (OSError, ValueError):
                # The host died before this call reached it: nothing ran, so one retry is safe.
                with host.pending_lock:
                    host.pending.pop(call_id, None)
                if attempt == 2:
                    return done(False, code="EIO", message=host.why_dead())
                host = self._live_host(dead=host)
        try:
            return self._await(host, call_id, q, sys_call, t0 + limit / 1000.0 + HOST_GRACE_S, done)
        finally:
            with host.pending_lock:
                host.pending.pop(call_id, None)

    def _await(
        self,
        host: _Host,
        call_id: int,
        q: queue.Queue[Any],
        sys_call: SysCall,
        deadline: float,
        done: Callable[..., JitResult],
    ) -> JitResult:
        while True:
            remaining = deadline - time.perf_counter()
            try:
                msg = q.get(timeout=max(remaining, 0.0)) if remaining > 0 else q.get_nowait()
            except queue.Empty:
                log.error("jit host %d missed a call's deadline; restarting it", host.pid)
                with self._lock:
                    if self._host is host:
                        self._host = None
                host.kill()
                return done(False, code="ETIMEDOUT", message="the JIT host stopped answering; restarted")
            if msg is _DEAD:
                return done(False, code="EIO", message=host.why_dead())
            kind = msg.get("t")
            if kind == "result":
                if msg.get("ok"):
                    try:
                        value = _loads(msg.get("value"))
                    except ValueError as e:
                        return done(False, code="EIO", message=f"unreadable tool value: {e}")
                    return done(True, value, refusals=msg.get("refusals") or ())
                return done(
                    False,
                    code=str(msg.get("code") or "EIO"),
                    message=str(msg.get("message") or ""),
                    refusals=msg.get("refusals") or (),
                )
            if kind == "sys":
                reply = self._syscall(sys_call, msg)
                try:
                    host.send(reply)
                except (OSError, ValueError):
                    pass  # the reader reports the host's death to this queue
            # anything else is ignored: the host only ever sends sys and result for a call

    @staticmethod
    def _syscall(sys_call: SysCall, msg: dict[str, Any]) -> dict[str, Any]:
        reply: dict[str, Any] = {"t": "reply", "id": msg.get("id"), "n": msg.get("n")}
        name = msg.get("name")
        try:
            args = _loads(msg.get("args"))
        except ValueError:
            args = None
        if not isinstance(name, str) or not isinstance(args, dict):
            return {**reply, "ok": False, "code": "EINVAL", "message": "a syscall takes a name and an args object"}
        try:
            ok, value, code, message = sys_call(name, args)
        except Exception as e:  # noqa: BLE001 -- the tool sees a failed syscall, never our traceback
            log.exception("sys_call raised for %s", name)
            return {**reply, "ok": False, "code": "EIO", "message": f"syscall failed: {type(e).__name__}"}
        if ok:
            try:
                json.dumps(value, default=_encode)
            except (TypeError, ValueError) as e:
                return {**reply, "ok": False, "code": "EIO", "message": f"syscall value is not JSON-able: {e}"}
            return {**reply, "ok": True, "value": value}
        return {**reply, "ok": False, "code": code or "EIO", "message": message or ""}
