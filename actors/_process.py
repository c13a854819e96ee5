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

from agentlibos.actors._messages import Input, ProcessSpec, Stop
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
    ) -> None:
        super().__init__()
        self.spec = spec
        self.pid = spec.pid
        self.state = "embryo"
        self.messages: list[dict[str, Any]] = []
        self.tools = spec.tools
        self._endpoint = endpoint
        self._ctx = context
        self._observer = observer
        self._on_exit = on_exit
        self._client: KernelClient | None = None
        self._last_turn_seq: int | None = None

    def on_start(self) -> None:
        self._client = KernelClient(self._endpoint, context=self._ctx, token=self.spec.token, timeout_s=None)
        self.state = "ready"
        if self.spec.input is not None:
            self.actor_ref.tell(Input(self.spec.input))

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
        if isinstance(message, Input):
            status, result = "ok", None
            try:
                status, result = self._turn(message.content)
            except (BusError, KernelError) as exc:
                status, result = "error", str(exc)
            except Exception as exc:  # an agent bug ends the agent, not the host
                log.exception("process %s failed", self.pid)
                status, result = "error", f"{type(exc).__name__}: {exc}"
            if not self.spec.daemon or status != "ok":
                self._exit(status, result)
        return None

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
                "tools": tool_definitions(self.tools),
                "system": self.spec.prompt,
            }, from_turn=False)
            if not reply.ok:
                assert reply.error is not None
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
            results = [self._run_tool(call) for call in calls]
            self.messages.append({"role": "user", "content": results})
            if turn.get("final") or turn.get("stop_reason") == "end_turn":
                return "ok", text
        return "error", "turn step limit reached"

    def _run_tool(self, call: dict[str, Any]) -> dict[str, Any]:
        name = call.get("name", "")
        raw = call.get("input") or {}
        args = dict(raw) if isinstance(raw, dict) else {}
        cap = args.pop("cap", None)
        if name not in self.tools:
            reply = Reply.failure(0, "ENOSYS", f"tool {name!r} is not in this process's tool table")
        else:
            reply = self._call(syscall_for(name), args, cap=cap if isinstance(cap, str) else None)
        if self._observer is not None:
            self._observer.tool_result(self.pid, self.spec.image, call, reply)
        return {"type": "tool_result", "tool_use_id": call.get("id", ""), "content": _result_text(reply),
                "is_error": not reply.ok}

    def _exit(self, status: str, result: Any) -> None:
        if self.state in ("exited", "killed"):
            return
        self.state = "exited"
        try:
            self._call("proc.exit", {"status": status, "result": result if isinstance(result, (str, int, float, type(None))) else str(result)})
        except (BusError, KernelError):
            pass
        self.actor_ref.stop(block=False)
