"""The shell provider: argv-only execution with a resolved program, a scrubbed environment,
rlimits, and a timeout that kills the whole process group.
"""

from __future__ import annotations

import fnmatch
import os
import resource
import signal
import subprocess
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from agentlibos.bus._errors import KernelError

MAX_OUTPUT = 1 << 20


def resolve_program(name: str, path_dirs: Sequence[str], base_dir: str) -> str | None:
    """The real path of the executable `name` would run: names search PATH, paths are relative to base."""
    if not name or "\x00" in name:
        return None
    if "/" in name:
        cand = name if name.startswith("/") else os.path.join(base_dir, name)
        cand = os.path.realpath(cand)
        return cand if os.path.isfile(cand) and os.access(cand, os.X_OK) else None
    for d in path_dirs:
        cand = os.path.join(d, name)
        if os.path.isfile(cand) and os.access(cand, os.X_OK):
            return os.path.realpath(cand)
    return None


def _match(args: Sequence[str], pattern: Sequence[str]) -> bool:
    if not pattern:
        return not args
    head, rest = pattern[0], pattern[1:]
    if head == "**":
        return any(_match(args[i:], rest) for i in range(len(args) + 1))
    return bool(args) and fnmatch.fnmatchcase(args[0], head) and _match(args[1:], rest)


def argv_matches(argv: Sequence[str], patterns: Sequence[Sequence[str]],
                 same_program: Callable[[str], bool] | None = None) -> bool:
    """Whole-argv patterns: one glob per argument, `**` for zero or more arguments. A pattern's
    first element that is a plain name matches the program it resolves to (so `git` matches
    `/usr/bin/git`), like the program allow-list does."""
    for p in patterns:
        if not p:
            continue
        head = p[0]
        if same_program is not None and not any(ch in head for ch in "*?[") and head != "**":
            if same_program(head) and _match(argv[1:], p[1:]):
                return True
            continue
        if _match(argv, p):
            return True
    return False


def _limits(cpu_s: int, mem_bytes: int) -> Any:
    def apply() -> None:  # runs in the child between fork and exec: setrlimit only, no Python locks
        resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s + 1))
        if mem_bytes:
            resource.setrlimit(resource.RLIMIT_AS, (mem_bytes, mem_bytes))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

    return apply


def run(
    argv: Sequence[str],
    *,
    executable: str,
    cwd: str,
    env: Mapping[str, str],
    stdin: str | bytes | None,
    timeout_s: float,
    mem_bytes: int = 1 << 30,
    max_output: int = MAX_OUTPUT,
) -> dict[str, Any]:
    data = stdin.encode() if isinstance(stdin, str) else stdin
    try:
        proc = subprocess.Popen(
            list(argv),
            executable=executable,
            cwd=cwd,
            env=dict(env),
            stdin=subprocess.PIPE if data is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
            close_fds=True,
            preexec_fn=_limits(int(timeout_s) + 1, mem_bytes),
        )
    except OSError as exc:
        raise KernelError("EIO", f"could not start {argv[0]!r}: {exc.strerror}") from None
    try:
        out, err = proc.communicate(data, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.communicate()
        raise KernelError("ETIMEDOUT", f"{argv[0]!r} ran past its {timeout_s:g} s limit; its process group was killed") from None
    finally:
        # Children that outlived the program (daemonized helpers) die with its group.
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    return {
        "exit_code": proc.returncode,
        "stdout": out[:max_output].decode("utf-8", "replace"),
        "stderr": err[:max_output].decode("utf-8", "replace"),
        "truncated": len(out) > max_output or len(err) > max_output,
    }
