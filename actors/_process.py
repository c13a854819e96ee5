"""The AgentProcess actor: takes the next message, asks the model through `llm.complete`, runs the
tool calls as syscalls, feeds results back; reaches the kernel only over the bus.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any, Protocol

import pykka
import zmq

from agentlibos.actors._jit import JitRunner
from agentlibos.actors._messages import Input, Park, ProcessSpec, Restore, Stop
from agentlibos.actors._tools import syscall_for, tool_definitions
from agentlibos.bus import BusError, KernelClient, KernelError, Reply

log = logging.getLogger("agentlibos.actors")

MAX_TURN_STEPS = 10_000


class ToolObserver(Protocol):
    """Sees every tool call and its reply (the harness judges scenario steps with it)."""

    def tool_result(self, pid: int, image: str, call: dict[str, Any], reply: Reply) -> None: ...


def _result_text(reply: Reply) -> str:
    if reply.ok:
        try:
            return json.dumps(reply.value, default=lambda o: repr(o), ensure_ascii=False)
        except (TypeError, ValueError):
            return repr(reply.value)
    assert reply.error is not None
    return json.dumps({"error": reply.error.to_wire()})


class AgentProcess(pykka.ThreadingActor):
    """One agent. Its authority lives in the kernel; here are only its affordances and conversation."""

    use_daemon_thread = True

    def __init__(
        self,
        spec: ProcessSpec,
        endpoint: str,
        context: zmq.Context[Any],
        *,
        observer: ToolObserver | None = None,
        on_exit: Callable[[int], None] | None = None,
        on_idle: Callable[[int, bool], None] | None = None,
        on_failed: Callable[[int, str], None] | None = None,
        jit: Callable[[], JitRunner] | None = None,
    ) -> None:
        super().__init__()
        self.spec = spec
        self.pid = spec.pid
        self.state = "embryo"
        self.messages: list[dict[str, Any]] = []
        self.tools = spec.tools
        # Affordances the process grew at run time: JIT tools and Skill instructions.
        self.jit_tools: dict[str, dict[str, Any]] = {k: dict(v) for k, v in spec.jit_tools.items()}
        self.instructions: list[str] = list(spec.instructions)
        # The Skill each instruction came from (None: not known, as after a restart), so that a
        # restore can take back the instructions of Skills loaded after the checkpoint.
        self._instruction_skills: list[str | None] = [None] * len(self.instructions)
        self._jit = jit
        if spec.restored:
            self._restore(spec.restored)
        self._endpoint = endpoint
        self._ctx = context
        self._observer = observer
        self._on_exit = on_exit
        # Told when the process goes idle between turns (True) and when a turn starts (False), so
        # that its host can hibernate one idle too long.
        self._on_idle = on_idle
        self._on_failed = on_failed
        self._client: KernelClient | None = None
        self._last_turn_seq: int | None = None
        self._interrupted = False

    def on_start(self) -> None:
        try:
            self._client = KernelClient(self._endpoint, context=self._ctx, token=self.spec.token, timeout_s=None)
        except (BusError, KernelError, zmq.ZMQError) as exc:
            # It cannot reach the kernel (no socket left, say): the host reports it, so that the
            # kernel ends the process rather than leave it waiting for a hello that never comes.
            log.error("process %s cannot reach the kernel: %s", self.pid, exc)
            self.state = "exited"
            if self._on_failed is not None:
                self._on_failed(self.pid, f"{type(exc).__name__}: {exc}")
            self.actor_ref.stop(block=False)
            return
        self.state = "ready"
        if self.spec.input is not None:
            self.actor_ref.tell(Input(self.spec.input))
        else:
            self._idle(True)

    def on_stop(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None
        if self._on_exit is not None:
            self._on_exit(self.pid)

    def on_receive(self, message: Any) -> Any:
        if isinstance(message, Stop):
            self.state = "killed"
            self.actor_ref.stop(block=False)
            return None
        if isinstance(message, Park):
            # An input already waiting in the inbox means a turn is due: not idle.
            if self.state != "ready" or not self.actor_inbox.empty():
                return None
            return {"messages": list(self.messages), "jit_tools": {k: dict(v) for k, v in self.jit_tools.items()},
                    "instructions": list(self.instructions)}
        if isinstance(message, Restore):
            # In the inbox's order: a turn that was under way when the operator restored has ended.
            self._restore(message.affordances)
            return None
        if isinstance(message, Input):
            self._idle(False)
            status, result = "ok", None
            try:
                status, result = self._turn(message.content)
            except (BusError, KernelError, zmq.ZMQError) as exc:
                status, result = "error", str(exc)
            except Exception as exc:  # an agent bug ends the agent, not the host
                log.exception("process %s failed", self.pid)
                status, result = "error", f"{type(exc).__name__}: {exc}"
            if status == "interrupted" or (self.spec.daemon and status == "ok"):
                # Between turns: the operator stopped this one, or a daemon waits for its next message.
                self.state = "ready"
                self._idle(True)
            else:
                self._exit(status, result)
        return None

    def _idle(self, idle: bool) -> None:
        if self._on_idle is not None:
            self._on_idle(self.pid, idle)

    # --- the loop ------------------------------------------------------------------------------
    def _call(self, sys: str, args: dict[str, Any], cap: str | None = None, *, from_turn: bool = True) -> Reply:
        """A syscall whose log entry cites the model turn that asked for it."""
        assert self._client is not None
        return self._client.request(sys, args, cap=cap, cause=self._last_turn_seq if from_turn else None)

    def _turn(self, content: Any) -> tuple[str, Any]:
        self.state = "running"
        self.messages.append({"role": "user", "content": content if isinstance(content, (str, list)) else json.dumps(content)})
        text = ""
        for _ in range(MAX_TURN_STEPS):
            reply = self._call("llm.complete", {
                "messages": self.messages,
                "tools": self._tool_definitions(),
                "system": "\n\n".join([self.spec.prompt, *self.instructions]).strip(),
            }, from_turn=False)
            if not reply.ok:
                assert reply.error is not None
                if reply.error.code == "EINTR":
                    return "interrupted", reply.error.message
                if reply.error.code == "EBUDGET":
                    return "budget", reply.error.message
                return "error", str(reply.error)
            self._last_turn_seq = reply.seq
            turn = reply.value
            blocks = turn.get("content", [])
            self.messages.append({"role": "assistant", "content": blocks})
            text = "".join(b.get("text", "") for b in blocks if b.get("type") == "text") or text
            calls = [b for b in blocks if b.get("type") == "tool_use"]
            if not calls:
                return "ok", text
            results: list[dict[str, Any]] = []
            for call in calls:
                if self._interrupted:  # the rest of this turn's calls are not made
                    results.append({"type": "tool_result", "tool_use_id": call.get("id", ""), "is_error": True,
                                    "content": json.dumps({"error": {"code": "EINTR",
                                                                     "message": "the operator interrupted this turn"}})})
                else:
                    results.append(self._run_tool(call))
            self.messages.append({"role": "user", "content": results})
            if self._interrupted:
                self._interrupted = False
                return "interrupted", "the operator interrupted this turn"
            if turn.get("final") or turn.get("stop_reason") == "end_turn":
                return "ok", text
        return "error", "turn step limit reached"

    def _run_tool(self, call: dict[str, Any]) -> dict[str, Any]:
        name = call.get("name", "")
        raw = call.get("input") or {}
        args = dict(raw) if isinstance(raw, dict) else {}
        cap = args.pop("cap", None)
        if name in self.jit_tools:
            reply = self._run_jit(name, self.jit_tools[name], raw)
        elif name not in self.tools:
            reply = Reply.failure(0, "ENOSYS", f"tool {name!r} is not in this process's tool table")
        else:
            reply = self._call(syscall_for(name), args, cap=cap if isinstance(cap, str) else None)
            if reply.ok:
                self._grow(name, args, reply.value)
        if not reply.ok and reply.error is not None and reply.error.code == "EINTR":
            self._interrupted = True
        if self._observer is not None:
            self._observer.tool_result(self.pid, self.spec.image, call, reply)
        return {"type": "tool_result", "tool_use_id": call.get("id", ""), "content": _result_text(reply),
                "is_error": not reply.ok}

    def _tool_definitions(self) -> list[dict[str, Any]]:
        return tool_definitions(self.tools) + [
            {"name": n, "description": t.get("description", ""), "input_schema": t.get("input_schema") or {"type": "object"}}
            for n, t in sorted(self.jit_tools.items())
        ]

    def _grow(self, tool: str, args: dict[str, Any], value: Any) -> None:
        """Affordance changes the kernel accepted: they change what the model sees, nothing else."""
        if tool == "tool_define":
            self.jit_tools[args["name"]] = {"description": args.get("description", ""),
                                            "input_schema": args.get("input_schema") or {"type": "object"},
                                            "source": args["source"]}
        elif tool == "tool_remove":
            self.jit_tools.pop(args.get("name", ""), None)
        elif tool == "ckpt_restore" and isinstance(value, dict) and isinstance(value.get("restored"), dict):
            self._restore(value["restored"])
        elif tool == "skill_load" and isinstance(value, dict):
            for t in value.get("tools", []):
                self.jit_tools[t["name"]] = {k: t[k] for k in ("description", "input_schema", "source")}
            if value.get("instructions"):
                self.instructions.append(str(value["instructions"]))
                self._instruction_skills.append(str(args.get("name")))

    def _restore(self, restored: Any) -> None:
        """Affordances from a checkpoint (the kernel restored the authority side itself)."""
        self.jit_tools = {k: dict(v) for k, v in (restored.get("jit_tools") or {}).items()}
        messages = restored.get("messages")
        if isinstance(messages, list):
            self.messages = list(messages)
        skills = restored.get("skills")
        if isinstance(skills, list) and self.instructions:
            kept = [(text, name) for text, name in zip(self.instructions, self._instruction_skills, strict=True)
                    if name is None or name in skills]
            self.instructions = [text for text, _ in kept]
            self._instruction_skills = [name for _, name in kept]

    def _run_jit(self, name: str, tool: dict[str, Any], input: Any) -> Reply:
        """Run a JIT tool in the Deno sandbox; its only way out is sys.call, made as this process."""
        if self._jit is None:
            return Reply.failure(0, "ENOSYS", "this process host runs no JIT tools")
        pre = self._call("proc.account", {"jit_ms": 0, "tool": name})
        if not pre.ok:
            return pre

        def sys_call(sys: str, args: dict[str, Any]) -> tuple[bool, Any, str | None, str]:
            r = self._call(sys, args if isinstance(args, dict) else {})
            return (r.ok, r.value, r.error.code if r.error else None, r.error.message if r.error else "")

        try:
            res = self._jit().call(tool["source"], input, sys_call)
        except Exception as exc:  # the runner could not run it at all
            return Reply.failure(0, "EIO", f"JIT runner failed: {exc}")
        self._call("proc.account", {"jit_ms": res.elapsed_ms, "tool": name, "refusals": list(res.refusals)})
        if res.ok:
            return Reply(0, True, res.value)
        return Reply.failure(0, res.code or "EIO", res.message)

    def _exit(self, status: str, result: Any) -> None:
        if self.state in ("exited", "killed"):
            return
        self.state = "exited"
        try:
            self._call("proc.exit", {"status": status, "result": result if isinstance(result, (str, int, float, type(None))) else str(result)})
        except (BusError, KernelError, zmq.ZMQError):
            pass  # the kernel is gone (or going): there is nobody left to tell
        self.actor_ref.stop(block=False)
