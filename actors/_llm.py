"""Model backends for real models: the Anthropic Messages API, OpenAI-compatible chat completions
(self-hosted models), and replay of the answers a recorded run got.

Each fits the backend interface behind `llm.complete` (`complete(request) -> turn` with
`to_value()`); the kernel checks the `llm` capability and budgets before, and charges the reported
usage after, so nothing here decides anything. Errors become ABI errors: a timeout is ETIMEDOUT,
anything the provider refused or failed is EIO (a malformed request is EINVAL), with the HTTP
status in the message and no secret in it.
"""

from __future__ import annotations

import json
import threading
from collections import defaultdict, deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import PurePath
from typing import Any, Self

from agentlibos.bus import KernelError, NondeterminismError
from agentlibos.bus._observe import redact
from agentlibos.bus._turn import Completion


#: One model turn in the shape `llm.complete` returns (the kernel's `Completion`).
LLMTurn = Completion


# --- secrets, prices and call records: the kernel's (it records every call) --------------------

# --- errors ------------------------------------------------------------------------------------

def _map_error(sdk: Any, exc: BaseException, *, provider: str, url: str, timeout_s: float,
               secrets: Iterable[str | None]) -> KernelError | None:
    """The ABI error for an SDK exception (None: not an SDK error)."""
    def clean(s: str) -> str:
        return redact(s, secrets)

    if isinstance(exc, sdk.APITimeoutError):
        return KernelError("ETIMEDOUT", f"{provider} did not answer within {timeout_s:g}s ({url})")
    if isinstance(exc, sdk.APIStatusError):
        status = exc.status_code
        detail = clean(_status_detail(exc))
        if isinstance(exc, sdk.AuthenticationError):
            return KernelError("EIO", f"{provider} rejected the API key (HTTP {status}): {detail}")
        if isinstance(exc, sdk.PermissionDeniedError):
            return KernelError("EIO", f"{provider} denied the request (HTTP {status}): {detail}")
        if isinstance(exc, sdk.RateLimitError):
            return KernelError("EIO", f"{provider} rate limit (HTTP {status}): {detail}")
        if status in (400, 404, 413, 422):
            return KernelError("EINVAL", f"{provider} refused the request (HTTP {status}): {detail}")
        return KernelError("EIO", f"{provider} failed (HTTP {status}): {detail}")
    if isinstance(exc, sdk.APIConnectionError):
        return KernelError("EIO", f"could not reach {provider} at {url}: {clean(str(exc))}")
    if isinstance(exc, getattr(sdk, "APIError", ())):
        return KernelError("EIO", f"{provider} error: {clean(str(exc))}")
    return None


def _status_detail(exc: Any) -> str:
    body = getattr(exc, "body", None)
    if isinstance(body, dict):
        err = body.get("error", body)
        if isinstance(err, dict) and err.get("message"):
            kind = err.get("type") or err.get("code")
            return f"{kind}: {err['message']}" if kind else str(err["message"])
    return str(getattr(exc, "message", "") or exc)


def _secret(v: Any) -> str | None:
    return v if isinstance(v, str) and v else None


def _strip_prefix(model: str, prefix: str | None) -> str:
    if prefix and model.startswith(prefix + ":"):
        return model[len(prefix) + 1:]
    return model


def _dump(obj: Any) -> dict[str, Any]:
    if isinstance(obj, dict):
        return obj
    if hasattr(obj, "model_dump"):
        return dict(obj.model_dump())
    return dict(vars(obj))


# --- Anthropic ---------------------------------------------------------------------------------

class _SdkModel:
    """What the SDK adapters share: the client they own, the secret to keep out of errors, and
    SDK exceptions mapped to ABI errors."""

    provider = "model provider"
    _sdk: Any
    client: Any
    _owns_client: bool
    _api_key: str | None
    base_url: str
    timeout_s: float

    def _setup(self, sdk: Any, *, default_max_tokens: int | None, timeout_s: float, prefix: str | None,
               client: Any) -> None:
        self._sdk = sdk
        self.default_max_tokens = default_max_tokens
        self.timeout_s = float(timeout_s)
        self.prefix = prefix
        self._owns_client = client is None

    def _adopt(self, client: Any, api_key: str | None, base_url: str | None) -> None:
        self.client = client
        self._api_key = _secret(getattr(client, "api_key", None)) or api_key
        self.base_url = str(getattr(client, "base_url", base_url or ""))

    def _create(self, create: Any, kw: dict[str, Any]) -> Any:
        try:
            return create(**kw)
        except Exception as exc:
            err = _map_error(self._sdk, exc, provider=self.provider, url=self.base_url, timeout_s=self.timeout_s,
                             secrets=[self._api_key])
            if err is None:
                raise
            raise err from None

    def close(self) -> None:
        if self._owns_client:
            self.client.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AnthropicModel(_SdkModel):
    """`llm.complete` on the Anthropic Messages API (the `anthropic` SDK).

    Register it under the prefix `anthropic` and spawn with `model="anthropic:claude-..."`; the
    prefix is stripped before the request. `max_retries` defaults to 0: a retry is a second model
    call the kernel did not see, and the agent can retry through the kernel itself.
    """

    provider = "Anthropic"

    def __init__(self, *, api_key: str | None = None, base_url: str | None = None, default_max_tokens: int = 1024,
                 client: Any = None, timeout_s: float = 60, max_retries: int = 0, prefix: str | None = "anthropic") -> None:
        import anthropic

        self._setup(anthropic, default_max_tokens=default_max_tokens, timeout_s=timeout_s, prefix=prefix,
                    client=client)
        if client is None:
            # api_key None: the SDK reads ANTHROPIC_API_KEY (and ANTHROPIC_BASE_URL for base_url None).
            client = anthropic.Anthropic(api_key=api_key, base_url=base_url, timeout=self.timeout_s,
                                         max_retries=max_retries)
            if not (client.api_key or getattr(client, "auth_token", None)):
                client.close()
                raise KernelError("EINVAL", "AnthropicModel needs an API key: pass api_key or set ANTHROPIC_API_KEY")
        self._adopt(client, api_key, base_url)

    def params(self, request: Any) -> dict[str, Any]:
        """The keyword arguments of `messages.create` for a CompletionRequest."""
        kw: dict[str, Any] = {
            "model": _strip_prefix(request.model, self.prefix),
            "max_tokens": int(request.max_tokens or self.default_max_tokens),
            "messages": [_anthropic_message(m) for m in request.messages],
        }
        if request.system:
            kw["system"] = request.system
        if request.tools:
            kw["tools"] = [{"name": t["name"], "description": t.get("description") or "",
                            "input_schema": t.get("input_schema") or {"type": "object"}} for t in request.tools]
        return kw

    def complete(self, request: Any) -> LLMTurn:
        kw = self.params(request)
        msg = self._create(self.client.messages.create, kw)
        content: list[dict[str, Any]] = []
        for block in msg.content:
            b = _dump(block)
            if b.get("type") == "text":
                content.append({"type": "text", "text": b.get("text", "")})
            elif b.get("type") == "tool_use":
                content.append({"type": "tool_use", "id": b["id"], "name": b["name"], "input": b.get("input") or {}})
        u = _dump(msg.usage) if msg.usage is not None else {}
        usage = {"input_tokens": int(u.get("input_tokens") or 0), "output_tokens": int(u.get("output_tokens") or 0)}
        for extra in ("cache_creation_input_tokens", "cache_read_input_tokens"):
            if u.get(extra):
                usage[extra] = int(u[extra])
        return LLMTurn(content=content, stop_reason=str(msg.stop_reason or "end_turn"), usage=usage,
                       model=f"{self.prefix}:{msg.model}" if self.prefix else str(msg.model))


def _anthropic_message(m: Mapping[str, Any]) -> dict[str, Any]:
    content = m.get("content")
    if isinstance(content, str):
        return {"role": m["role"], "content": content}
    blocks: list[dict[str, Any]] = []
    for b in content or []:
        kind = b.get("type")
        if kind == "text":
            if b.get("text"):  # the API refuses empty text blocks (scripted turns have them)
                blocks.append({"type": "text", "text": b["text"]})
        elif kind == "tool_use":
            blocks.append({"type": "tool_use", "id": b["id"], "name": b["name"], "input": b.get("input") or {}})
        elif kind == "tool_result":
            r = {"type": "tool_result", "tool_use_id": b["tool_use_id"], "content": b.get("content", "")}
            if b.get("is_error"):
                r["is_error"] = True
            blocks.append(r)
        else:
            blocks.append(dict(b))
    if not blocks:
        blocks = [{"type": "text", "text": "(empty)"}]
    return {"role": m["role"], "content": blocks}


# --- OpenAI-compatible chat --------------------------------------------------------------------

_FINISH = {"tool_calls": "tool_use", "function_call": "tool_use", "stop": "end_turn", "length": "max_tokens",
           "content_filter": "refusal"}


class OpenAIChatModel(_SdkModel):
    """`llm.complete` on any OpenAI-compatible `/chat/completions` endpoint (vLLM, llama.cpp,
    Ollama, OpenAI itself) through the `openai` SDK (the `openai` extra).

    The conversation stays Anthropic-shaped in the process; it is translated here both ways.
    """

    provider = "OpenAI-compatible endpoint"

    def __init__(self, *, api_key: str | None = None, base_url: str | None = "https://api.openai.com/v1",
                 client: Any = None, default_max_tokens: int | None = 1024, timeout_s: float = 60,
                 max_retries: int = 0, prefix: str | None = "openai") -> None:
        try:
            import openai
        except ImportError as exc:  # pragma: no cover - depends on the extra
            raise ImportError("OpenAIChatModel needs the openai SDK: pip install 'agent-libos[openai]'") from exc
        self._setup(openai, default_max_tokens=default_max_tokens, timeout_s=timeout_s, prefix=prefix, client=client)
        if client is None:
            try:  # api_key None: the SDK reads OPENAI_API_KEY
                client = openai.OpenAI(api_key=api_key, base_url=base_url, timeout=self.timeout_s,
                                       max_retries=max_retries)
            except openai.OpenAIError as exc:
                raise KernelError("EINVAL", "OpenAIChatModel needs an API key: pass api_key (any string for a "
                                  f"server without auth) or set OPENAI_API_KEY ({exc})") from None
        self._adopt(client, api_key, base_url)

    def params(self, request: Any) -> dict[str, Any]:
        """The keyword arguments of `chat.completions.create` for a CompletionRequest."""
        messages: list[dict[str, Any]] = []
        if request.system:
            messages.append({"role": "system", "content": request.system})
        for m in request.messages:
            messages.extend(_openai_messages(m))
        kw: dict[str, Any] = {"model": _strip_prefix(request.model, self.prefix), "messages": messages}
        max_tokens = request.max_tokens or self.default_max_tokens
        if max_tokens:
            kw["max_tokens"] = int(max_tokens)
        if request.tools:
            kw["tools"] = [{"type": "function", "function": {
                "name": t["name"], "description": t.get("description") or "",
                "parameters": t.get("input_schema") or {"type": "object"}}} for t in request.tools]
        return kw

    def complete(self, request: Any) -> LLMTurn:
        kw = self.params(request)
        resp = self._create(self.client.chat.completions.create, kw)
        if not resp.choices:
            raise KernelError("EIO", f"{self.provider} returned no choices")
        choice = resp.choices[0]
        msg = choice.message
        content: list[dict[str, Any]] = []
        if msg.content:
            content.append({"type": "text", "text": msg.content})
        for i, call in enumerate(msg.tool_calls or []):
            fn = call.function
            try:
                args = json.loads(fn.arguments or "{}")
            except json.JSONDecodeError:
                args = {"_unparsed_arguments": fn.arguments}
            if not isinstance(args, dict):
                args = {"value": args}
            content.append({"type": "tool_use", "id": call.id or f"call_{i}", "name": fn.name, "input": args})
        finish = choice.finish_reason or "stop"
        stop = _FINISH.get(finish, finish)
        if any(b["type"] == "tool_use" for b in content):
            stop = "tool_use"  # some servers say "stop" with tool calls
        u = resp.usage
        usage = {"input_tokens": int(getattr(u, "prompt_tokens", 0) or 0),
                 "output_tokens": int(getattr(u, "completion_tokens", 0) or 0)}
        return LLMTurn(content=content or [{"type": "text", "text": ""}], stop_reason=stop, usage=usage,
                       model=f"{self.prefix}:{resp.model}" if self.prefix else str(resp.model))


def _openai_messages(m: Mapping[str, Any]) -> list[dict[str, Any]]:
    role, content = m["role"], m.get("content")
    if isinstance(content, str):
        return [{"role": role, "content": content}]
    blocks = list(content or [])
    if role == "assistant":
        text = "".join(b.get("text", "") for b in blocks if b.get("type") == "text")
        calls = [{"id": b["id"], "type": "function",
                  "function": {"name": b["name"], "arguments": json.dumps(b.get("input") or {})}}
                 for b in blocks if b.get("type") == "tool_use"]
        out: dict[str, Any] = {"role": "assistant", "content": text or None}
        if calls:
            out["tool_calls"] = calls
        elif not text:
            out["content"] = ""
        return [out]
    # A user message: tool results become `tool` messages, any text a user message after them.
    msgs: list[dict[str, Any]] = []
    texts: list[str] = []
    for b in blocks:
        if b.get("type") == "tool_result":
            c = b.get("content", "")
            if isinstance(c, list):
                c = "".join(x.get("text", "") for x in c if isinstance(x, dict))
            msgs.append({"role": "tool", "tool_call_id": b["tool_use_id"], "content": str(c)})
        elif b.get("type") == "text":
            texts.append(b.get("text", ""))
    if texts:
        msgs.append({"role": role, "content": "\n".join(texts)})
    return msgs


# --- replay ------------------------------------------------------------------------------------

@dataclass(slots=True)
class _Recorded:
    value: dict[str, Any]
    request: dict[str, Any] | None  # what the process asked (None: the payload was not kept)


class ReplayModel:
    """Answers `llm.complete` with the turns a recorded run got, in order per pid.

    Takes a kernel log opened for reading (anything with `entries()` and `payload(seq)`, e.g.
    `SQLiteLog.open_readonly(path)`; it is read whole here and may be closed after) or a sequence
    of `(pid, turn_value)` pairs. (actors may not import storage, so opening the path is the
    caller's part.) When the recorded request is in the log, the replayed request must match it;
    a request that differs, or one the recorded run never made, raises NondeterminismError (the
    kernel reports it to the process as EIO).
    """

    def __init__(self, source: Any | Sequence[tuple[int, Mapping[str, Any]]]) -> None:
        self._turns: dict[int, deque[_Recorded]] = defaultdict(deque)
        self._lock = threading.Lock()
        self.served: list[tuple[int, int]] = []  # (pid, index) in the order answered
        self._count: dict[int, int] = defaultdict(int)
        if isinstance(source, (str, PurePath)):
            raise TypeError("ReplayModel takes an open log (SQLiteLog.open_readonly(path)), not a path")
        if hasattr(source, "entries") and hasattr(source, "payload"):
            self._load_log(source)
        else:
            for pid, value in source:
                self._turns[int(pid)].append(_Recorded(dict(value), None))

    def _load_log(self, log: Any) -> None:
        for e in log.entries(kinds=["result"]):
            body = e.body or {}
            if body.get("sys") != "llm.complete" or not body.get("ok") or e.pid is None:
                continue
            present, value = log.payload(e.seq)
            if not present or not isinstance(value, dict):
                raise NondeterminismError(f"log entry {e.seq}: the model turn's payload was not kept; cannot replay")
            request = None
            if e.cause is not None:
                has_req, req = log.payload(e.cause)
                if has_req and isinstance(req, dict):
                    request = req
            self._turns[int(e.pid)].append(_Recorded(value, request))

    def remaining(self, pid: int) -> int:
        with self._lock:
            return len(self._turns.get(pid, ()))

    def complete(self, request: Any) -> LLMTurn:
        with self._lock:
            queue = self._turns.get(request.pid)
            index = self._count[request.pid]
            if not queue:
                raise NondeterminismError(
                    f"process {request.pid} asked for model turn {index + 1}; the recorded run has {index}")
            rec = queue[0]
            if rec.request is not None:
                got = {"messages": request.messages, "tools": request.tools or [], "system": request.system}
                want = {"messages": rec.request.get("messages"), "tools": rec.request.get("tools") or [],
                        "system": rec.request.get("system")}
                for key in ("messages", "tools", "system"):
                    if _canon(got[key]) != _canon(want[key]):
                        raise NondeterminismError(
                            f"process {request.pid}, model turn {index + 1}: the {key} differ from the recorded run")
            queue.popleft()
            self._count[request.pid] = index + 1
            self.served.append((request.pid, index))
        v = rec.value
        return LLMTurn(content=list(v.get("content") or []), stop_reason=str(v.get("stop_reason", "end_turn")),
                       usage=dict(v.get("usage") or {"input_tokens": 0, "output_tokens": 0}),
                       model=str(v.get("model", "")), final=bool(v.get("final", False)))


def _canon(x: Any) -> str:
    return json.dumps(x, sort_keys=True, default=repr, ensure_ascii=False)
