"""Local HTTP servers that speak just enough of the Anthropic Messages API and the OpenAI chat
completions API for the real SDK clients: scripted answers, every request recorded.

A script entry is a response body (status 200), a `(status, body)` pair, a callable that takes the
request body and returns either, or HANG: hold the request until the server closes (a model that
never answers; the client's timeout must fire, no test sleeps).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Self

HANG = object()

Answer = Any  # dict | tuple[int, dict] | Callable[[dict], dict | tuple[int, dict]] | HANG


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: ScriptedServer

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length)
        try:
            body = json.loads(raw or b"{}")
        except json.JSONDecodeError:
            body = {"_raw": raw.decode(errors="replace")}
        srv = self.server
        status, out = srv.answer(self.path, {k.lower(): v for k, v in self.headers.items()}, body)
        if out is HANG:
            srv.released.wait(60)
            return
        data = json.dumps(out).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("request-id", "req_test")
        self.end_headers()
        self.wfile.write(data)


class ScriptedServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128  # the default 5 resets connections that arrive together
    #: The endpoint this server answers on.
    route = "/"

    def __init__(self, script: list[Answer] | None = None) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.script: list[Answer] = list(script or [])
        self.requests: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self.released = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host!s}:{port}"

    def start(self) -> Self:
        self._thread.start()
        return self

    def close(self) -> None:
        self.released.set()
        self.shutdown()
        self.server_close()
        self._thread.join(10)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a client that gave up (timeout) leaves a broken pipe: not a test failure

    def push(self, *answers: Answer) -> None:
        with self._lock:
            self.script.extend(answers)

    def answer(self, path: str, headers: dict[str, str], body: dict[str, Any]) -> tuple[int, Any]:
        with self._lock:
            self.requests.append(body)
            self.headers.append(headers)
            if path.rstrip("/") != self.route:
                return 404, self.not_found(path)
            if not self.script:
                return 500, self.error_body(500, "api_error", "the test script has no more answers")
            entry = self.script.pop(0)
        if callable(entry):
            entry = entry(body)
        if entry is HANG:
            return 200, HANG
        if isinstance(entry, tuple):
            return entry[0], entry[1]
        return 200, entry

    def not_found(self, path: str) -> dict[str, Any]:
        return self.error_body(404, "not_found_error", f"no route {path}")

    def error_body(self, status: int, kind: str, message: str) -> dict[str, Any]:
        raise NotImplementedError


class MessagesServer(ScriptedServer):
    """POST /v1/messages, Anthropic-style."""

    route = "/v1/messages"

    def error_body(self, status: int, kind: str, message: str) -> dict[str, Any]:
        return {"type": "error", "error": {"type": kind, "message": message}}


class ChatServer(ScriptedServer):
    """POST /v1/chat/completions, OpenAI-style (base_url is `url + "/v1"`)."""

    route = "/v1/chat/completions"

    def error_body(self, status: int, kind: str, message: str) -> dict[str, Any]:
        return {"error": {"message": message, "type": kind, "code": str(status)}}


# --- response builders -----------------------------------------------------------------------------

_ids = iter(range(1, 1_000_000))


def message(*content: dict[str, Any], stop_reason: str = "end_turn", model: str = "claude-test",
            input_tokens: int = 10, output_tokens: int = 5) -> dict[str, Any]:
    return {"id": f"msg_{next(_ids)}", "type": "message", "role": "assistant", "model": model,
            "content": list(content), "stop_reason": stop_reason, "stop_sequence": None,
            "usage": {"input_tokens": input_tokens, "output_tokens": output_tokens}}


def text(t: str) -> dict[str, Any]:
    return {"type": "text", "text": t}


def tool_use(id: str, name: str, input: dict[str, Any]) -> dict[str, Any]:
    return {"type": "tool_use", "id": id, "name": name, "input": input}


def anthropic_error(status: int, kind: str, msg: str) -> tuple[int, dict[str, Any]]:
    return status, {"type": "error", "error": {"type": kind, "message": msg}}


def chat(content: str | None = None, *, tool_calls: list[tuple[str, str, dict[str, Any]]] = (),  # type: ignore[assignment]
         finish_reason: str | None = None, model: str = "local-test", prompt_tokens: int = 12,
         completion_tokens: int = 7) -> dict[str, Any]:
    msg: dict[str, Any] = {"role": "assistant", "content": content}
    if tool_calls:
        msg["tool_calls"] = [{"id": i, "type": "function", "function": {"name": n, "arguments": json.dumps(a)}}
                             for i, n, a in tool_calls]
    return {"id": f"chatcmpl-{next(_ids)}", "object": "chat.completion", "created": 1700000000, "model": model,
            "choices": [{"index": 0, "message": msg, "logprobs": None,
                         "finish_reason": finish_reason or ("tool_calls" if tool_calls else "stop")}],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens}}


Responder = Callable[[dict[str, Any]], Any]
