"""The three baseline systems of `bench safety` (../shared/spec/SCENARIOS.md, "Systems compared").

Each is a small, honest implementation of what such an agent wrapper really does, with no kernel
and no capabilities. They run the same scenario files and scripts (the same ScriptedModel), and
are observed by the same outside Judge as `libos`: world snapshots around every step, secrets in
tool results, program runs, the same judge_step / StepResult / RunResult and the same checks.

- `direct`: the tool table is the authority. A call to a tool the process does not have is
  ENOSYS; everything else runs its effect at once: fs paths are joined to the world root exactly
  as given (so `..`, absolute paths and symlinks are followed), programs run with the world's
  PATH, memory is a dict per namespace, processes are threads, JIT tools run under `deno run -A`.
- `confirm`: the same effects, but every tool call that has an effect is first shown to the
  scripted human as the model wrote it (tool name and arguments); the human answers from the
  scenario's `human:` list in order (approve once it runs out); a deny refuses with EDENIED.
- `sandbox`: the same effects, but fs paths must resolve (realpath) inside `workspace/` or
  `scratch/` and a shell cwd must lie there (else EPERM); nothing else is restricted.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import queue
import shutil
import signal
import stat
import subprocess  # noqa: TID251 -- the baselines run programs and deno directly; that is the point
import threading
import time
import urllib.error
import urllib.request
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any


from agentlibos.actors import ScriptedModel
from agentlibos.bus import KernelError, Reply
from agentlibos.harness._libos import (
    RUN_TIMEOUT_S,
    Judge,
    _not_reached,
    _run_checks,
    score,
)
from agentlibos.harness._results import RunResult, StepResult
from agentlibos.harness._scenario import BUILTIN_TOOLS, ROOT_IMAGE, Scenario
from agentlibos.harness._world import World
from agentlibos.kernel import read_skill_folder

#: World kinds the baselines have no client for (the runtime itself supports them).
UNSUPPORTED_WORLD = ("mcp",)

#: Where a naive wrapper's agent works: the default shell cwd, and the sandbox's confinement.
WORKSPACE = "workspace"
SCRATCH = "scratch"
#: A resource bound of this harness, not a policy: processes ever started in one run (a fork bomb
#: under a wrapper with no budget would otherwise run until the machine gives out). Past it a
#: spawn fails with EIO, the way fork() fails with EAGAIN.
MAX_PROCESSES = 32
SHELL_TIMEOUT_S = 30.0
JIT_TIMEOUT_S = 20.0
MAX_OUTPUT = 1 << 20

#: Tool calls that only look at the wrapper's own state or change what the model sees; every other
#: call has an effect (on files, programs, memory, other processes, or runs code) and `confirm`
#: asks the human about it.
NO_EFFECT_TOOLS = frozenset(
    """cap_list cap_request cap_derive cap_grant cap_revoke cap_drop budget_get proc_self proc_list proc_wait
    msg_recv tool_define tool_remove tool_list skill_list skill_load image_list image_show ckpt_list llm_complete
    human_ask human_notify""".split()
)
_DENY_WORDS = frozenset({"deny", "denied", "no", "reject", "rejected", "refuse", "n"})
_JIT_MARK = "\x1eAGENTLIBOS-JIT "

# A naive JIT runner: the tool module is imported from a file and run with every Deno permission;
# `sys.call` forwards to the wrapper's own effects over stdin/stdout (marked lines).
_JIT_RUNNER = r"""
const MARK = "\u001eAGENTLIBOS-JIT ";
const CODES = new Set(["EPERM", "EREVOKED", "EEXPIRED", "EBUDGET", "EDENIED", "EINVAL", "ENOENT",
  "EEXIST", "ETIMEDOUT", "EIO", "ENOSYS", "ECONFLICT"]);
const enc = new TextEncoder();
function emit(obj) {
  const bytes = enc.encode(MARK + JSON.stringify(obj) + "\n");
  let off = 0;
  while (off < bytes.length) off += Deno.stdout.writeSync(bytes.subarray(off));
}
const reader = Deno.stdin.readable.pipeThrough(new TextDecoderStream()).getReader();
let buf = "";
async function readLine() {
  for (;;) {
    const i = buf.indexOf("\n");
    if (i >= 0) { const line = buf.slice(0, i); buf = buf.slice(i + 1); return line; }
    const { value, done } = await reader.read();
    if (done) return null;
    buf += value;
  }
}
class SyscallError extends Error {
  constructor(code, message) { super(message || code); this.name = "SyscallError"; this.code = code; }
}
globalThis.SyscallError = SyscallError;
let chain = Promise.resolve();
const sys = {
  SyscallError,
  call(name, args) {
    const p = chain.then(async () => {
      emit({ t: "sys", name, args: args === undefined ? {} : args });
      const line = await readLine();
      if (line === null) throw new SyscallError("EIO", "the wrapper went away");
      const r = JSON.parse(line);
      if (r.ok) return r.value;
      throw new SyscallError(r.code, r.message);
    });
    chain = p.catch(() => {});
    return p;
  },
};
const input = JSON.parse((await readLine()) ?? "null");
try {
  const mod = await import(Deno.args[0]);
  const value = await mod.default(input, sys);
  emit({ t: "result", ok: true, value: value === undefined ? null : value });
} catch (e) {
  const code = e && typeof e.code === "string" && CODES.has(e.code) ? e.code : "EIO";
  let message;
  try { message = e instanceof Error ? `${e.name}: ${e.message}` : String(e); } catch (_) { message = "thrown"; }
  emit({ t: "result", ok: false, code, message });
}
Deno.exit(0);
"""


def _err(code: str, message: str = "") -> KernelError:
    return KernelError(code, message)


def _os_error(exc: OSError, what: str) -> KernelError:
    if isinstance(exc, FileNotFoundError):
        return _err("ENOENT", f"{what}: no such file or directory")
    if isinstance(exc, FileExistsError):
        return _err("EEXIST", f"{what}: already exists")
    if isinstance(exc, PermissionError):
        return _err("EPERM", f"{what}: permission denied by the OS")
    if isinstance(exc, IsADirectoryError):
        return _err("EINVAL", f"{what}: is a directory")
    if isinstance(exc, NotADirectoryError):
        return _err("EINVAL", f"{what}: not a directory")
    return _err("EIO", f"{what}: {exc.strerror or exc}")


def _syscall_to_tool(name: str) -> str:
    return name.replace(".", "_", 1)


@dataclass(eq=False)
class _Proc:
    pid: int
    ppid: int | None
    image: str
    tools: frozenset[str]
    jit_tools: dict[str, dict[str, Any]] = field(default_factory=dict)
    skills: list[str] = field(default_factory=list)
    queues: dict[str, deque[dict[str, Any]]] = field(default_factory=dict)
    state: str = "running"  # running | exited | killed
    status: str | None = None
    thread: threading.Thread | None = None

    @property
    def live(self) -> bool:
        return self.state == "running"

    def view(self) -> dict[str, Any]:
        return {"pid": self.pid, "image": self.image, "state": self.state, "status": self.status}


@dataclass(slots=True)
class _Human:
    """What the Judge reads of the scripted human: approvals asked per process and the last answer."""

    asked: dict[int, int] = field(default_factory=dict)
    last_answer: dict[int, str] = field(default_factory=dict)
    questions: int = 0


@dataclass(frozen=True, slots=True)
class _Request:
    """What ScriptedModel.complete reads from a completion request."""

    pid: int
    image: str


class _MemoryView:
    """Duck-types `rt.operator.call("op.mem.get", ...)` for the shared `_run_checks`."""

    def __init__(self, memory: dict[str, dict[str, Any]]) -> None:
        self.operator = self
        self._memory = memory

    def call(self, name: str, args: Mapping[str, Any]) -> dict[str, Any]:
        store = self._memory.get(args["ns"], {})
        if args["key"] not in store:
            raise _err("ENOENT", f"no key {args['key']!r}")
        return {"value": store[args["key"]]}


class _Wrapper:
    """One run of a scenario under one baseline policy."""

    def __init__(self, scenario: Scenario, world: World, policy: str) -> None:
        self.scenario = scenario
        self.world = world
        self.policy = policy
        self.root = str(world.root)
        self.judge = Judge(scenario, world)
        self.model = ScriptedModel(scenario.scripts(), on_step=self.judge.on_step, on_operator=self._operator,
                                   substitute=self.judge.substitute)
        self.judge.scripted = self.model
        self.procs: dict[int, _Proc] = {}
        self.memory: dict[str, dict[str, Any]] = {}
        self.cv = threading.Condition()
        self.pids = itertools.count(1)
        self.msg_seq = itertools.count(1)
        self.human = list(scenario.human)
        self.approvals = 0
        self.transcript: list[dict[str, Any]] = []
        self.errors: list[str] = []
        self.jit_dir = world.base / "baseline-jit"
        self.jit_ids = itertools.count(1)
        self.env = {"PATH": os.pathsep.join((str(world.bin), "/usr/local/bin", "/usr/bin", "/bin")),
                    "WORLD_ROOT": self.root, "HOME": self.root, **world.servers.env()}
        self.rpc_urls = world.servers.urls()
        self.human_state = _Human()
        self.judge.human = self.human_state  # type: ignore[assignment]
        self.images: dict[str, Mapping[str, Any]] = {ROOT_IMAGE: scenario.image}
        for name, spec in scenario.images.items():
            if "prompt" in spec or "tools" in spec:
                self.images[name] = spec
        for ns, values in (scenario.world.get("memory") or {}).items():
            self.memory.setdefault(ns, {}).update(values)

    # processes ---------------------------------------------------------------------------------
    def start(self, image: str, ppid: int | None) -> _Proc:
        with self.cv:
            if len(self.procs) >= MAX_PROCESSES:
                raise _err("EIO", f"the wrapper's process table is full ({MAX_PROCESSES} processes)")
            pid = next(self.pids)
            spec = self.images[image]
            proc = _Proc(pid, ppid, image, frozenset(spec.get("tools", ())))
            self.procs[pid] = proc
        proc.thread = threading.Thread(target=self._play, args=(proc,), name=f"baseline-{pid}", daemon=True)
        proc.thread.start()
        return proc

    def _play(self, proc: _Proc) -> None:
        try:
            request = _Request(proc.pid, proc.image)
            while proc.live:
                turn = self.model.complete(request)
                if turn.stop_reason != "tool_use":
                    break
                call = turn.content[0]
                reply = self._tool_call(proc, call["name"], dict(call.get("input") or {}))
                self.judge.tool_result(proc.pid, proc.image, call, reply)
                if turn.final:
                    break
        except Exception as exc:  # a bug here must end the process, not the interpreter's thread hook
            self.errors.append(f"process {proc.pid}: {type(exc).__name__}: {exc}")
        finally:
            with self.cv:
                if proc.state == "running":
                    proc.state, proc.status = "exited", "ok"
                self.cv.notify_all()

    def kill(self, pid: int) -> list[int]:
        with self.cv:
            doomed = [pid]
            for p in doomed:
                doomed.extend(c.pid for c in self.procs.values() if c.ppid == p and c.pid not in doomed)
            killed = [p for p in doomed if self.procs[p].live]
            for p in killed:
                self.procs[p].state, self.procs[p].status = "killed", "killed"
            self.judge.killed.update(killed)
            self.cv.notify_all()
        return killed

    def _operator(self, pid: int, script: str, idx: int, step: Mapping[str, Any]) -> None:
        op = step["operator"]
        if "revoke" in op:
            names = {c.get("name") for c in self.scenario.caps}
            if op["revoke"] not in names:
                self.errors.append(f"operator step {idx} of {script or 'root'}: no operator grant named {op['revoke']!r}")
            return  # a wrapper without capabilities has nothing to revoke
        if "grant" in op:
            return  # nor anything to grant: everything is already allowed
        if "checkpoint" in op or "restore" in op:
            return  # nor any kernel state to snapshot or roll back
        target = self.judge.substitute(op["kill"])
        if target in ("root", ROOT_IMAGE):
            pids = [self.judge.root_pid or 1]
        elif isinstance(target, int) or (isinstance(target, str) and target.isdigit()):
            pids = [int(target)]
        else:
            pids = [p.pid for p in list(self.procs.values()) if p.image == target and p.live]
        for p in pids:
            if p in self.procs:
                self.kill(p)

    def wait_all(self) -> bool:
        deadline = time.monotonic() + RUN_TIMEOUT_S
        with self.cv:
            while any(p.live for p in self.procs.values()):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self.cv.wait(timeout=min(remaining, 1.0))
            timed_out = any(p.live for p in self.procs.values())
        if timed_out:
            for p in list(self.procs.values()):
                if p.live:
                    self.kill(p.pid)
        for p in list(self.procs.values()):
            if p.thread is not None:
                p.thread.join(timeout=max(0.0, deadline + 5 - time.monotonic()))
        return not timed_out

    # tool calls --------------------------------------------------------------------------------
    def _tool_call(self, proc: _Proc, tool: str, args: dict[str, Any]) -> Reply:
        args.pop("cap", None)  # there are no capability handles to name
        try:
            if tool not in proc.tools and tool not in proc.jit_tools:
                raise _err("ENOSYS", f"{tool!r} is not in this process's tool table")
            if self.policy == "confirm" and tool not in NO_EFFECT_TOOLS:
                self._confirm(proc, tool, args)
            if tool in proc.jit_tools and tool not in BUILTIN_TOOLS:
                value = self._run_jit(proc, tool, args)
            else:
                value = self.effect(proc, tool, args)
            return Reply(id=0, ok=True, value=value)
        except KernelError as exc:
            return Reply(id=0, ok=False, error=exc)
        except (KeyError, TypeError, ValueError) as exc:
            return Reply(id=0, ok=False, error=_err("EINVAL", f"bad arguments for {tool}: {exc}"))
        except OSError as exc:
            return Reply(id=0, ok=False, error=_os_error(exc, tool))

    def _confirm(self, proc: _Proc, tool: str, args: Mapping[str, Any]) -> None:
        """Show the human the call as the model described it; the human answers from the script."""
        with self.cv:
            self.approvals += 1
            answer = self.human.pop(0) if self.human else "approve"
            verdict = "deny" if _is_deny(answer) else "approve"
            self.transcript.append({"pid": proc.pid, "tool": tool, "args": dict(args), "answer": verdict})
            h = self.human_state
            h.asked[proc.pid] = h.asked.get(proc.pid, 0) + 1
            h.last_answer[proc.pid] = verdict
        if verdict == "deny":
            raise _err("EDENIED", f"the human denied {tool}")

    def effect(self, proc: _Proc, tool: str, args: dict[str, Any]) -> Any:
        handler: Callable[[_Proc, dict[str, Any]], Any] | None = getattr(self, f"_t_{tool}", None)
        if handler is None:
            raise _err("EIO", f"{tool} is not supported by this baseline")
        return handler(proc, args)

    # fs ----------------------------------------------------------------------------------------
    def _path(self, path: Any) -> str:
        if not isinstance(path, str) or not path:
            raise _err("EINVAL", "path must be a non-empty string")
        full = os.path.join(self.root, path)  # as given: `..`, absolute paths and symlinks all work
        if self.policy == "sandbox":
            real = os.path.realpath(full)
            allowed = [os.path.realpath(os.path.join(self.root, d)) for d in (WORKSPACE, SCRATCH)]
            if not any(real == a or real.startswith(a + os.sep) for a in allowed):
                raise _err("EPERM", f"{path!r} resolves outside the sandbox ({WORKSPACE}/, {SCRATCH}/)")
        return full

    def _t_fs_read(self, proc: _Proc, args: dict[str, Any]) -> Any:
        p = self._path(args["path"])
        try:
            with open(p, "rb") as fh:
                data = fh.read(MAX_OUTPUT)
        except OSError as exc:
            raise _os_error(exc, args["path"]) from None
        try:
            return {"text": data.decode("utf-8")}
        except UnicodeDecodeError:
            return {"bytes": data}

    def _t_fs_write(self, proc: _Proc, args: dict[str, Any]) -> Any:
        p = self._path(args["path"])
        mode = args.get("mode", "w")
        if mode not in ("w", "a"):
            raise _err("EINVAL", "mode must be 'w' or 'a'")
        data = args["data"]
        payload = data.encode() if isinstance(data, str) else bytes(data) if isinstance(data, bytes) else str(data).encode()
        try:
            with open(p, mode + "b") as fh:
                fh.write(payload)
        except OSError as exc:
            raise _os_error(exc, args["path"]) from None
        return {"bytes": len(payload)}

    def _t_fs_list(self, proc: _Proc, args: dict[str, Any]) -> Any:
        p = self._path(args["path"])
        try:
            entries = []
            with os.scandir(p) as it:
                for e in it:
                    kind = "symlink" if e.is_symlink() else "dir" if e.is_dir() else "file" if e.is_file() else "other"
                    entries.append({"name": e.name, "type": kind})
        except OSError as exc:
            raise _os_error(exc, args["path"]) from None
        return {"entries": sorted(entries, key=lambda e: e["name"])}

    def _t_fs_stat(self, proc: _Proc, args: dict[str, Any]) -> Any:
        try:
            st = os.stat(self._path(args["path"]))
        except OSError as exc:
            raise _os_error(exc, args["path"]) from None
        kind = "dir" if stat.S_ISDIR(st.st_mode) else "file" if stat.S_ISREG(st.st_mode) else "other"
        return {"type": kind, "size": st.st_size, "mtime": st.st_mtime}

    def _t_fs_delete(self, proc: _Proc, args: dict[str, Any]) -> Any:
        p = self._path(args["path"])
        try:
            if os.path.isdir(p) and not os.path.islink(p):
                os.rmdir(p)
            else:
                os.unlink(p)
        except OSError as exc:
            raise _os_error(exc, args["path"]) from None
        return {}

    def _t_fs_mkdir(self, proc: _Proc, args: dict[str, Any]) -> Any:
        try:
            os.mkdir(self._path(args["path"]))
        except OSError as exc:
            raise _os_error(exc, args["path"]) from None
        return {}

    # shell -------------------------------------------------------------------------------------
    def _t_shell_exec(self, proc: _Proc, args: dict[str, Any]) -> Any:
        argv = args["argv"]
        if not isinstance(argv, list) or not argv or not all(isinstance(a, str) and "\x00" not in a for a in argv):
            raise _err("EINVAL", "argv must be a non-empty list of strings")
        cwd_arg = args.get("cwd")
        if cwd_arg is None:
            ws = os.path.join(self.root, WORKSPACE)
            cwd = ws if os.path.isdir(ws) else self.root
        else:
            cwd = self._path(cwd_arg)  # the sandbox confines the cwd like any other path
        timeout = float(args.get("timeout_s") or SHELL_TIMEOUT_S)
        stdin = args.get("stdin")
        data = stdin.encode() if isinstance(stdin, str) else stdin
        try:
            child = subprocess.Popen(argv, cwd=cwd, env=dict(self.env), stdin=subprocess.PIPE if data is not None
                                     else subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     start_new_session=True, close_fds=True)
        except OSError as exc:
            raise _os_error(exc, f"running {argv[0]!r}") from None
        with child:
            try:
                out, err = child.communicate(data, timeout=timeout)
            except subprocess.TimeoutExpired:
                _killpg(child.pid)
                child.communicate()
                raise _err("ETIMEDOUT", f"{argv[0]!r} ran past {timeout:g} s") from None
            finally:
                _killpg(child.pid)
        return {"exit_code": child.returncode, "stdout": out[:MAX_OUTPUT].decode("utf-8", "replace"),
                "stderr": err[:MAX_OUTPUT].decode("utf-8", "replace")}

    # memory ------------------------------------------------------------------------------------
    def _store(self, proc: _Proc, args: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
        ns = args.get("ns") or "self"
        key = f"self:{proc.pid}" if ns == "self" else str(ns)
        return str(ns), self.memory.setdefault(key, {})

    def _t_mem_get(self, proc: _Proc, args: dict[str, Any]) -> Any:
        ns, store = self._store(proc, args)
        if args["key"] not in store:
            raise _err("ENOENT", f"no key {args['key']!r} in namespace {ns!r}")
        return {"value": store[args["key"]]}

    def _t_mem_put(self, proc: _Proc, args: dict[str, Any]) -> Any:
        _ns, store = self._store(proc, args)
        store[str(args["key"])] = args["value"]
        return {}

    def _t_mem_delete(self, proc: _Proc, args: dict[str, Any]) -> Any:
        ns, store = self._store(proc, args)
        if args["key"] not in store:
            raise _err("ENOENT", f"no key {args['key']!r} in namespace {ns!r}")
        del store[args["key"]]
        return {}

    def _t_mem_list(self, proc: _Proc, args: dict[str, Any]) -> Any:
        _ns, store = self._store(proc, args)
        prefix = args.get("prefix", "")
        return {"keys": sorted(k for k in store if k.startswith(prefix))}

    # capabilities and budgets: a wrapper without them "succeeds" at every such call ------------
    def _t_cap_list(self, proc: _Proc, args: dict[str, Any]) -> Any:
        return {"caps": []}

    def _t_cap_derive(self, proc: _Proc, args: dict[str, Any]) -> Any:
        return {"handle": args.get("as") or args.get("handle")}

    def _t_cap_grant(self, proc: _Proc, args: dict[str, Any]) -> Any:
        return {"handle": args.get("as") or args.get("handle"), "pid": args.get("to")}

    def _t_cap_revoke(self, proc: _Proc, args: dict[str, Any]) -> Any:
        return {"revoked": 0}

    def _t_cap_drop(self, proc: _Proc, args: dict[str, Any]) -> Any:
        return {}

    def _t_cap_request(self, proc: _Proc, args: dict[str, Any]) -> Any:
        return {"handle": None}

    def _t_budget_get(self, proc: _Proc, args: dict[str, Any]) -> Any:
        return {}

    def _t_llm_complete(self, proc: _Proc, args: dict[str, Any]) -> Any:
        # The scripted model answers an explicit completion with end_turn text, consuming no step.
        return self.model.complete(_Request(proc.pid, proc.image)).to_value()

    # processes, messages, images ---------------------------------------------------------------
    def _t_proc_spawn(self, proc: _Proc, args: dict[str, Any]) -> Any:
        image = args["image"]
        if image not in self.images:
            raise _err("ENOENT", f"no image {image!r}")
        return {"pid": self.start(image, proc.pid).pid}

    def _t_image_boot(self, proc: _Proc, args: dict[str, Any]) -> Any:
        return self._t_proc_spawn(proc, {"image": args["name"]})

    def _target(self, pid: Any) -> _Proc:
        target = self.procs.get(pid) if isinstance(pid, int) else None
        if target is None:
            raise _err("ENOENT", f"no process {pid!r}")
        return target

    def _t_proc_wait(self, proc: _Proc, args: dict[str, Any]) -> Any:
        target = self._target(args["pid"])
        timeout = args.get("timeout_s")
        with self.cv:
            done = self.cv.wait_for(lambda: not target.live or not proc.live,
                                    timeout=float(timeout) if timeout is not None else RUN_TIMEOUT_S)
        if not done:
            raise _err("ETIMEDOUT", f"process {target.pid} is still running")
        return {"pid": target.pid, "status": target.status, "result": None}

    def _t_proc_kill(self, proc: _Proc, args: dict[str, Any]) -> Any:
        return {"killed": self.kill(self._target(args["pid"]).pid)}

    def _t_proc_list(self, proc: _Proc, args: dict[str, Any]) -> Any:
        return {"processes": [p.view() for p in list(self.procs.values()) if p.ppid == proc.pid]}

    def _t_proc_self(self, proc: _Proc, args: dict[str, Any]) -> Any:
        return {"pid": proc.pid, "ppid": proc.ppid, "image": proc.image, "state": proc.state}

    def _t_msg_send(self, proc: _Proc, args: dict[str, Any]) -> Any:
        to = args["to"]
        target = self._target(proc.ppid if to == "parent" else to)
        queue_name = args.get("queue") or "inbox"
        with self.cv:
            if not target.live:
                raise _err("ENOENT", f"no live process {to!r}")
            target.queues.setdefault(queue_name, deque()).append(
                {"from": proc.pid, "queue": queue_name, "payload": args["payload"], "seq": next(self.msg_seq)})
            self.cv.notify_all()
        return {"delivered": target.pid}

    def _t_msg_recv(self, proc: _Proc, args: dict[str, Any]) -> Any:
        q = proc.queues.setdefault(args.get("queue") or "inbox", deque())
        timeout = args.get("timeout_s")
        with self.cv:
            got = self.cv.wait_for(lambda: bool(q) or not proc.live,
                                   timeout=float(timeout) if timeout is not None else RUN_TIMEOUT_S)
            if not got or not q:
                raise _err("ETIMEDOUT", "no message")
            return q.popleft()

    def _image_view(self, name: str) -> dict[str, Any]:
        spec = self.images[name]
        return {"name": name, "digest": hashlib.sha256(json.dumps(dict(spec), sort_keys=True, default=str).encode()).hexdigest(),
                "prompt": spec.get("prompt", ""), "tools": list(spec.get("tools", [])), "skills": [], "jit_tools": [],
                "budget": spec.get("budget"), "model": spec.get("model")}

    def _t_image_list(self, proc: _Proc, args: dict[str, Any]) -> Any:
        return {"images": [{"name": n, "digest": self._image_view(n)["digest"]} for n in sorted(self.images)]}

    def _t_image_show(self, proc: _Proc, args: dict[str, Any]) -> Any:
        if args["name"] not in self.images:
            raise _err("ENOENT", f"no image {args['name']!r}")
        return self._image_view(args["name"])

    def _t_human_notify(self, proc: _Proc, args: dict[str, Any]) -> Any:
        return {}

    def _t_human_ask(self, proc: _Proc, args: dict[str, Any]) -> Any:
        with self.cv:
            entry = self.human.pop(0) if self.human else "approve"
            self.human_state.questions += 1
        if _is_deny(entry):
            raise _err("EDENIED", "the human declined to answer")
        return {"answer": entry.get("answer") if isinstance(entry, Mapping) else entry}

    def _t_rpc_call(self, proc: _Proc, args: dict[str, Any]) -> Any:
        """A JSON-RPC 2.0 POST to the endpoint as named (a configured name, or any URL given)."""
        endpoint = args["endpoint"]
        url = self.rpc_urls.get(endpoint) or (endpoint if str(endpoint).startswith(("http://", "https://")) else None)
        if url is None:
            raise _err("ENOENT", f"no endpoint {endpoint!r}")
        body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": args["method"], "params": args.get("params", {})},
                          default=_jsonable).encode()
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"}, method="POST")
        try:
            with opener.open(req, timeout=10) as resp:
                msg = json.loads(resp.read())
        except (urllib.error.URLError, OSError, ValueError) as exc:
            raise _err("EIO", f"rpc to {endpoint!r} failed: {exc}") from None
        if not isinstance(msg, dict) or "result" not in msg:
            raise _err("EIO", f"rpc error from {endpoint!r}: {msg.get('error') if isinstance(msg, dict) else msg!r}")
        return {"result": msg["result"]}

    # JIT tools and Skills ----------------------------------------------------------------------
    def _t_tool_define(self, proc: _Proc, args: dict[str, Any]) -> Any:
        name, source = args["name"], args["source"]
        if not isinstance(name, str) or not name or name in BUILTIN_TOOLS or not isinstance(source, str):
            raise _err("EINVAL", f"bad tool definition {name!r}")
        proc.jit_tools[name] = {"description": str(args.get("description", "")),
                                "input_schema": args.get("input_schema") or {"type": "object"}, "source": source}
        return {"tool": name, "digest": hashlib.sha256(source.encode()).hexdigest()}

    def _t_tool_remove(self, proc: _Proc, args: dict[str, Any]) -> Any:
        if proc.jit_tools.pop(args["name"], None) is None:
            raise _err("ENOENT", f"no JIT tool {args['name']!r}")
        return {"removed": args["name"]}

    def _t_tool_list(self, proc: _Proc, args: dict[str, Any]) -> Any:
        return {"builtin": sorted(proc.tools), "jit": sorted(proc.jit_tools)}

    def _read_skill(self, name: Any) -> dict[str, Any]:
        if not isinstance(name, str) or not name or "/" in name or name.startswith("."):
            raise _err("EINVAL", f"bad Skill name {name!r}")
        meta, body, tools = read_skill_folder(self.world.skills_dir / name, name)
        for t in tools:
            t["input_schema"] = t["input_schema"] or {"type": "object"}
        return {"name": name, "description": str(meta.get("description", "")), "instructions": body.strip(),
                "tools": tools}

    def _t_skill_list(self, proc: _Proc, args: dict[str, Any]) -> Any:
        root = self.world.skills_dir
        available = []
        if root.is_dir():
            for d in sorted(root.iterdir()):
                if (d / "SKILL.md").exists():
                    available.append({"name": d.name, "description": self._read_skill(d.name)["description"]})
        return {"available": available, "loaded": list(proc.skills)}

    def _t_skill_load(self, proc: _Proc, args: dict[str, Any]) -> Any:
        skill = self._read_skill(args["name"])
        for t in skill["tools"]:
            proc.jit_tools[t["name"]] = {k: t[k] for k in ("description", "input_schema", "source")}
        if args["name"] not in proc.skills:
            proc.skills.append(args["name"])
        return skill

    def _run_jit(self, proc: _Proc, tool: str, args: dict[str, Any]) -> Any:
        """Run the tool's TypeScript with every permission; its sys.call runs the same effects."""
        try:
            import deno  # type: ignore[import-untyped]

            deno_bin = deno.find_deno_bin()
        except Exception:  # noqa: BLE001 -- optional package: fall back to PATH
            deno_bin = shutil.which("deno")
        if not deno_bin:
            raise _err("EIO", "deno is not installed")
        self.jit_dir.mkdir(exist_ok=True)
        runner = self.jit_dir / "runner.js"
        if not runner.exists():
            runner.write_text(_JIT_RUNNER)
        n = next(self.jit_ids)
        module = self.jit_dir / f"tool_{n}_{tool}.ts"
        module.write_text(proc.jit_tools[tool]["source"])
        env = {**self.env, "DENO_DIR": str(self.jit_dir / "deno_dir"), "NO_COLOR": "1", "DENO_NO_UPDATE_CHECK": "1"}
        argv = [deno_bin, "run", "-A", "--quiet", "--no-prompt", "--no-config", "--no-lock", str(runner),
                module.as_uri()]
        with open(self.jit_dir / f"tool_{n}.stderr", "wb") as errf, subprocess.Popen(
                argv, cwd=self.root, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=errf,
                start_new_session=True, close_fds=True) as child:
            assert child.stdin is not None and child.stdout is not None
            lines: queue.Queue[bytes | None] = queue.Queue()
            reader = threading.Thread(target=_pump, args=(child.stdout, lines), daemon=True)
            reader.start()
            deadline = time.monotonic() + JIT_TIMEOUT_S
            try:
                _send(child, args)
                while True:
                    try:
                        raw = lines.get(timeout=max(0.0, deadline - time.monotonic()))
                    except queue.Empty:
                        raise _err("ETIMEDOUT", f"JIT tool {tool} ran past {JIT_TIMEOUT_S:g} s") from None
                    if raw is None:
                        raise _err("EIO", f"JIT tool {tool}: deno exited without a result")
                    text = raw.decode("utf-8", "replace")
                    if not text.startswith(_JIT_MARK):
                        continue  # the tool's own console output
                    msg = json.loads(text[len(_JIT_MARK):])
                    if msg.get("t") == "result":
                        if msg.get("ok"):
                            return msg.get("value")
                        raise _err(msg.get("code") or "EIO", str(msg.get("message") or ""))
                    if msg.get("t") == "sys":
                        _send(child, self._bridge(proc, str(msg.get("name")), msg.get("args")))
            finally:
                _killpg(child.pid)
                child.kill()
                for s in (child.stdin, child.stdout):
                    try:
                        s.close()
                    except OSError:
                        pass
                child.wait()
                reader.join(timeout=5)

    def _bridge(self, proc: _Proc, name: str, args: Any) -> dict[str, Any]:
        """A JIT tool's sys.call: the same effects as the model's tools (no tool-table check)."""
        if not isinstance(args, dict):
            return {"ok": False, "code": "EINVAL", "message": "args must be an object"}
        tool = _syscall_to_tool(name)
        if tool not in BUILTIN_TOOLS:
            return {"ok": False, "code": "ENOSYS", "message": f"unknown syscall {name!r}"}
        try:
            value = self.effect(proc, tool, dict(args))
            json.dumps(value, default=_jsonable)
            return {"ok": True, "value": json.loads(json.dumps(value, default=_jsonable))}
        except KernelError as exc:
            return {"ok": False, "code": exc.code, "message": exc.message}
        except (KeyError, TypeError, ValueError) as exc:
            return {"ok": False, "code": "EINVAL", "message": f"bad arguments for {name}: {exc}"}
        except OSError as exc:
            e = _os_error(exc, name)
            return {"ok": False, "code": e.code, "message": e.message}


def _jsonable(value: Any) -> Any:
    if isinstance(value, bytes | bytearray):
        return bytes(value).decode("latin-1")
    raise TypeError(f"{type(value).__name__} is not JSON-able")


def _pump(stream: Any, lines: queue.Queue[bytes | None]) -> None:
    try:
        for raw in stream:
            lines.put(raw.rstrip(b"\n"))
    except (OSError, ValueError):
        pass
    finally:
        lines.put(None)


def _send(child: subprocess.Popen[bytes], obj: Any) -> None:
    assert child.stdin is not None
    try:
        child.stdin.write(json.dumps(obj, default=_jsonable).encode() + b"\n")
        child.stdin.flush()
    except (BrokenPipeError, OSError):
        pass  # the tool ended; its result (or absence) says what happened


def _killpg(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _is_deny(answer: Any) -> bool:
    if isinstance(answer, Mapping):
        for key in ("answer", "decision", "approve", "approved"):
            if key in answer:
                v = answer[key]
                return (v is False) if isinstance(v, bool) else _is_deny(v)
        return any(str(k).lower() in _DENY_WORDS for k in answer)
    if isinstance(answer, bool):
        return not answer
    return str(answer).strip().lower() in _DENY_WORDS


def _run(scenario: Scenario, policy: str, on_step: Callable[[StepResult], None] | None = None) -> RunResult:
    result = RunResult(scenario=scenario.id, system=policy, tags=scenario.tags)
    started = time.monotonic()
    for kind in UNSUPPORTED_WORLD:
        if scenario.world.get(kind):
            result.error = f"world.{kind} is not supported by this baseline yet"
            return result
    world = World(scenario).build()
    try:
        w = _Wrapper(scenario, world, policy)
        judge = w.judge
        judge.root_pid = 1
        w.start(ROOT_IMAGE, None)
        finished = w.wait_all()
        procs = [p.view() for p in list(w.procs.values())]
        checks = _run_checks(scenario, world, _MemoryView(w.memory), 1, procs,  # type: ignore[arg-type]
                             w.human_state.questions)
        result.wall_s = time.monotonic() - started
        result.approvals = w.approvals
        result.steps = sorted(judge.results, key=lambda s: (s.pid or 0, s.index))
        killed = {p["pid"] for p in procs if p["state"] == "killed"}
        result.steps.extend(_not_reached(scenario, judge, procs, killed))
        return score(result, scenario, world, judge, checks, list(judge.errors) + w.errors, finished=finished,
                     on_step=on_step)
    finally:
        world.cleanup()


def run_direct(scenario: Scenario, *, on_step: Callable[[StepResult], None] | None = None) -> RunResult:
    """Direct wrapper: the tool table is the authority; every call runs its effect."""
    return _run(scenario, "direct", on_step)


def run_confirm(scenario: Scenario, *, on_step: Callable[[StepResult], None] | None = None) -> RunResult:
    """Confirmation wrapper: each effect is shown to the scripted human first (default approve)."""
    return _run(scenario, "confirm", on_step)


def run_sandbox(scenario: Scenario, *, on_step: Callable[[StepResult], None] | None = None) -> RunResult:
    """Sandbox-only: fs confined to workspace/ and scratch/, shell cwd there, the rest unrestricted."""
    return _run(scenario, "sandbox", on_step)

