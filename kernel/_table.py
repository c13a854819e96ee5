"""The syscall table: the only way into the kernel. Name -> argument schema, capability kind,
rights, budget dimensions and provider; nothing outside this table reaches an effect.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from agentlibos.bus._errors import KernelError

# Argument types: a name from _TYPES, "?" suffix for optional.
_TYPES: dict[str, tuple[type, ...]] = {
    "str": (str,),
    "int": (int,),
    "num": (int, float),
    "bool": (bool,),
    "list": (list,),
    "map": (dict,),
    "data": (str, bytes),
    "pid": (int, str),
    "any": (object,),
}

MAX_STRING = 1 << 20


@dataclass(frozen=True, slots=True)
class ArgSpec:
    name: str
    type: str
    required: bool


@dataclass(frozen=True, slots=True)
class SyscallSpec:
    """One row of the table. `kind` None means the call needs no capability."""

    name: str
    args: tuple[ArgSpec, ...]
    kind: str | None
    rights: tuple[str, ...]
    budget: tuple[str, ...]
    provider: str
    role: str = "process"  # "process" or "operator"
    doc: str = ""
    known: frozenset[str] = field(init=False, repr=False, compare=False)
    #: What one call charges on each of its budget dimensions before the provider adds more.
    base_charges: tuple[tuple[str, float], ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "known", frozenset(a.name for a in self.args))
        object.__setattr__(self, "base_charges", tuple((d, 1.0 if d in ("syscalls", "llm_calls") else 0.0)
                                                       for d in self.budget))

    def validate(self, args: Mapping[str, Any]) -> dict[str, Any]:
        known = self.known
        for key in args:
            if key not in known:
                raise KernelError("EINVAL", f"{self.name} takes no argument {key!r} (arguments: {', '.join(sorted(known)) or 'none'})")
        out: dict[str, Any] = {}
        for a in self.args:
            v = args.get(a.name)
            if v is None:
                if a.required:
                    raise KernelError("EINVAL", f"{self.name} needs argument {a.name!r}")
                continue
            t = a.type
            if t != "any" and (not isinstance(v, _TYPES[t]) or (v.__class__ is bool and t != "bool")):
                raise KernelError("EINVAL", f"{self.name}: argument {a.name!r} must be {t}, not {type(v).__name__}")
            if isinstance(v, (str, bytes)) and len(v) > MAX_STRING:
                raise KernelError("EINVAL", f"{self.name}: argument {a.name!r} is longer than {MAX_STRING} bytes")
            out[a.name] = v
        return out


def _args(spec: str) -> tuple[ArgSpec, ...]:
    out = []
    for part in spec.split():
        name, _, t = part.partition(":")
        required = not t.endswith("?")
        out.append(ArgSpec(name, t.rstrip("?"), required))
    return tuple(out)


def _row(name: str, args: str, kind: str | None, rights: str, budget: str, provider: str, doc: str, role: str = "process") -> SyscallSpec:
    return SyscallSpec(name, _args(args), kind, tuple(rights.split()), tuple(budget.split()), provider, role, doc)


_S = "syscalls"

SYSCALLS: dict[str, SyscallSpec] = {
    s.name: s
    for s in [
        _row("fs.read", "path:str", "fs", "read", _S, "fs", "read a file -> {text} or {bytes}"),
        _row("fs.write", "path:str data:data mode:str?", "fs", "write create", f"{_S} fs_bytes_written", "fs",
             "write (existing file: write right) or create (new file: create right); mode w or a"),
        _row("fs.list", "path:str", "fs", "list", _S, "fs", "list a directory -> {entries: [{name, type}]}"),
        _row("fs.stat", "path:str", "fs", "read list", _S, "fs", "-> {type, size, mtime}"),
        _row("fs.delete", "path:str", "fs", "delete", _S, "fs", "delete a file or an empty directory"),
        _row("fs.mkdir", "path:str", "fs", "create", _S, "fs", "create a directory"),
        _row("shell.exec", "argv:list cwd:str? stdin:data? timeout_s:num?", "shell", "exec", _S, "shell",
             "run a program (argv only, never a shell string) -> {exit_code, stdout, stderr}"),
        _row("mem.get", "key:str ns:str?", "memory", "read", _S, "memory", "-> {value}"),
        _row("mem.put", "key:str value:any ns:str?", "memory", "write", _S, "memory", "store a msgpack-able value"),
        _row("mem.delete", "key:str ns:str?", "memory", "delete", _S, "memory", "delete a key"),
        _row("mem.list", "prefix:str? ns:str?", "memory", "list", _S, "memory", "-> {keys}"),
        _row("llm.complete", "messages:list tools:list? model:str? max_tokens:int? system:str?", "llm", "complete",
             "llm_calls llm_tokens", "llm", "one model turn -> {content, stop_reason, usage, model}"),
        _row("cap.list", "", None, "", _S, "cap", "the caller's handles with kind, scope, rights"),
        _row("cap.derive", "handle:str narrow:map? as:str?", None, "", _S, "cap", "a narrowed copy for the caller"),
        _row("cap.grant", "handle:str to:pid narrow:map? as:str?", None, "grant", _S, "cap",
             "pass a narrowed copy to another process (needs the grant right)"),
        _row("cap.revoke", "handle:str", None, "", _S, "cap", "revoke a cap and everything derived from it"),
        _row("cap.drop", "handle:str", None, "", _S, "cap", "close the caller's own handle"),
        _row("cap.request", "kind:str scope:map rights:list reason:str?", None, "", _S, "cap",
             "ask a human for a new capability inside the requestable ceiling the operator set -> {handle}"),
        _row("budget.get", "", None, "", _S, "budget", "the caller's budget per dimension"),
        _row("proc.self", "", None, "", _S, "proc", "-> {pid, ppid, image, state}"),
        _row("proc.exit", "status:str? result:any?", None, "", "", "proc",
             "end the calling process (its host calls this when the agent's loop ends)"),
        _row("proc.account", "jit_ms:num tool:str? refusals:list?", None, "", "jit_ms", "proc",
             "charge JIT tool time to the caller (its host reports it after each JIT tool call)"),
        _row("proc.spawn", "image:str input:any? caps:list? budget:map?", "proc", "spawn", f"{_S} children", "proc",
             "start a child from an image with an explicit, attenuated capability list -> {pid}"),
        _row("proc.wait", "pid:int timeout_s:num?", "proc", "wait", _S, "proc",
             "wait for a descendant to end -> {pid, status, result}"),
        _row("proc.kill", "pid:int", "proc", "signal", _S, "proc", "kill a descendant and its subtree"),
        _row("proc.list", "", None, "", _S, "proc", "the caller's children"),
        _row("msg.send", "to:pid payload:any queue:str?", "msg", "send", _S, "msg",
             "send to a process the msg cap names (parent, children, a pid, an image)"),
        _row("msg.recv", "queue:str? timeout_s:num?", None, "", _S, "msg",
             "take the next message from one of the caller's own queues -> {from, queue, payload}"),
        _row("human.ask", "question:str choices:list? channel:str?", "human", "ask", _S, "human",
             "ask a human; the caller waits for the answer -> {answer}"),
        _row("human.notify", "text:str channel:str?", "human", "notify", _S, "human", "tell a human"),
        _row("tool.define", "name:str description:str? input_schema:map? source:str", None, "", _S, "tool",
             "add a TypeScript JIT tool to the caller's tool table (an affordance: grants nothing)"),
        _row("tool.remove", "name:str", None, "", _S, "tool", "remove a JIT tool"),
        _row("tool.list", "", None, "", _S, "tool", "the caller's builtin and JIT tools"),
        _row("skill.load", "name:str", None, "", _S, "skill",
             "load an installed Skill: its instructions and tools join the caller's affordances (grants nothing)"),
        _row("skill.list", "", None, "", _S, "skill", "installed Skills and the ones the caller loaded"),
        _row("ckpt.create", "label:str?", "checkpoint", "create", _S, "ckpt",
             "snapshot the caller (conversation, tools, Skills, memory, queues, handles) -> {checkpoint}"),
        _row("ckpt.list", "", None, "", _S, "ckpt", "checkpoints the caller took or may use"),
        _row("ckpt.restore", "checkpoint:any", "checkpoint", "restore", _S, "ckpt",
             "return the caller to a checkpoint; revoked or expired handles come back dead"),
        _row("ckpt.fork", "checkpoint:any caps:list? budget:map? input:any?", "checkpoint", "fork",
             f"{_S} children", "ckpt", "start a child from a checkpoint with an explicit, attenuated cap list -> {pid}"),
        _row("image.commit", "checkpoint:any name:str", "image", "commit", _S, "image",
             "make an AgentImage from a checkpoint (never its capabilities) -> {image, digest}"),
        _row("image.list", "", "image", "read", _S, "image", "images the caller's image caps may read"),
        _row("image.show", "name:str", "image", "read", _S, "image", "an image's content (never capabilities)"),
        _row("image.boot", "name:str input:any? caps:list? budget:map?", "image", "boot", f"{_S} children", "image",
             "start a child from an image; it holds only the caps passed here -> {pid}"),
        # Operator requests: only connections that said hello with the operator token.
        _row("op.image.register", "name:str prompt:str? tools:list? skills:list? jit_tools:map? model:str? budget:map? "
             "meta:map?", None, "", "",
             "op", "register or replace an AgentImage", "operator"),
        _row("op.spawn", "image:str caps:list? budget:map? input:any? model:str? daemon:bool? external:bool? "
             "requestable:list?", None, "", "", "op",
             "start a root process with operator grants -> {pid} (external: no host runs it; the reply carries the "
             "token an outside client says hello with; requestable: the ceiling of what cap.request may ask for)",
             "operator"),
        _row("op.grant", "pid:int kind:str scope:map rights:list approval:str? expires_in_s:num? uses:int? name:str?",
             None, "", "", "op", "grant a capability to a process -> {handle, cap}", "operator"),
        _row("op.revoke", "pid:int? handle:str? cap:int?", None, "", "", "op",
             "revoke a capability (by pid+handle or cap id) and everything derived from it", "operator"),
        _row("op.kill", "pid:int", None, "", "", "op", "kill a process and its subtree", "operator"),
        _row("op.unknown", "", None, "", "", "op", "effects logged as intended with no result (after a crash)",
             "operator"),
        _row("op.resolve", "decision:int outcome:str note:str?", None, "", "", "op",
             "say what became of an unknown effect: done, failed or retry (never re-run by the kernel)", "operator"),
        _row("op.suspend", "pid:int", None, "", "", "op",
             "suspend a process: its requests wait, undecided, until it is resumed", "operator"),
        _row("op.resume", "pid:int", None, "", "", "op", "resume a suspended process", "operator"),
        _row("op.send", "pid:int input:any", None, "", "", "op",
             "deliver an input message to a process (a follow-up after an interrupt)", "operator"),
        _row("op.interrupt", "pid:int", None, "", "", "op",
             "interrupt a process's current turn: its waiting or next syscall gets EINTR -> {interrupted}", "operator"),
        _row("op.deadline", "pid:int in_s:num?", None, "", "", "op",
             "kill a process and its subtree in_s seconds from now (no in_s: clear) -> {deadline}", "operator"),
        _row("op.wait", "pid:int timeout_s:num?", None, "", "", "op", "wait for a process to exit -> {status, result}",
             "operator"),
        _row("op.ps", "", None, "", "", "op", "every process with state and image", "operator"),
        _row("op.caps", "pid:int?", None, "", "", "op", "capability records, optionally of one process", "operator"),
        _row("op.budget", "pid:int", None, "", "", "op", "a process's budget view", "operator"),
        _row("op.images", "", None, "", "", "op", "every registered image with its digest", "operator"),
        _row("op.approvals", "", None, "", "", "op", "pending approvals and questions, with the kernel's rendering",
             "operator"),
        _row("op.approve", "id:int remember:bool? author:str?", None, "", "", "op",
             "approve a pending request (remember: also grant, without approval, exactly that effect class)",
             "operator"),
        _row("op.deny", "id:int reason:str? author:str?", None, "", "", "op", "deny a pending request", "operator"),
        _row("op.answer", "id:int answer:any author:str?", None, "", "", "op", "answer a human.ask question",
             "operator"),
        _row("op.ckpt.create", "pid:int label:str?", None, "", "", "op",
             "snapshot a live process as the kernel sees it (as ckpt.create does) -> {checkpoint}", "operator"),
        _row("op.ckpt.list", "pid:int?", None, "", "", "op", "every checkpoint, optionally of one process",
             "operator"),
        _row("op.ckpt.show", "checkpoint:any", None, "", "", "op",
             "what a checkpoint holds: affordances, memory keys, handles with their records' status", "operator"),
        _row("op.ckpt.restore", "pid:int checkpoint:any", None, "", "", "op",
             "roll a process back to one of its checkpoints; revoked or expired handles come back dead, budget "
             "spent stays spent -> {checkpoint, restored}", "operator"),
        _row("op.ckpt.fork", "checkpoint:any caps:list? budget:map? input:any? model:str? daemon:bool? external:bool? "
             "requestable:list?", None, "", "", "op",
             "start a root process from a checkpoint with operator grants (never the checkpoint's) -> {pid}",
             "operator"),
        _row("op.mem.put", "ns:str key:str value:any", None, "", "", "op",
             "seed Object Memory (ns: a shared namespace, or self:PID)", "operator"),
        _row("op.mem.get", "ns:str key:str", None, "", "", "op", "read Object Memory -> {value}", "operator"),
        # Host requests: only the connection that said hello with the host token; never logged on their own.
        _row("host.park", "pid:int messages:list jit_tools:map? instructions:list?", None, "", "", "host",
             "at a clean stop, an idle hosted process's affordances, so that it resumes after the restart",
             "host"),
        _row("host.failed", "pid:int reason:str", None, "", "", "host",
             "a hosted process the host could not run (no socket or thread left): it ends with status error",
             "host"),
    ]
}

#: ABI syscalls that later work adds; a request for one gets ENOSYS naming it as not yet available.
NOT_YET: frozenset[str] = frozenset(
    {
        "rpc.call",
        "mcp.list_tools", "mcp.call", "pty.open", "pty.write", "pty.read", "pty.close",
    }
)

#: Syscalls this project adds to ABI.md (documented in docs/protocol.md).
ADDITIONS: frozenset[str] = frozenset({"proc.exit", "proc.account"})


def tool_name(sys: str) -> str:
    """Model-visible builtin tool name: LLM tool names may not contain dots."""
    return sys.replace(".", "_")
