"""Local test servers for scenario worlds: real JSON-RPC 2.0 over HTTP on 127.0.0.1.

Every request a server receives is recorded (method, params, raw body), so the harness observes
RPC sinks from outside the runtime, as it observes files.
"""

from __future__ import annotations

import hashlib
import json
import re
import socketserver
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Self

__all__ = ["RpcRequest", "RpcServer", "ServerSet", "env_name"]

#: A raw override: (request body) -> (HTTP status, headers, response body), or None to answer normally.
Responder = Callable[[bytes], "tuple[int, Mapping[str, str], bytes] | None"]

MAX_REQUEST_BYTES = 16 << 20


@dataclass(frozen=True, slots=True)
class RpcRequest:
    method: str | None  # None when the body was not a JSON-RPC request
    params: Any
    body: bytes
    path: str
    host: str | None  # the Host header as sent

    @property
    def digest(self) -> str:
        return hashlib.sha256(self.body).hexdigest()


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = False  # stop() waits for handlers to finish
    block_on_close = True
    # socketserver's default backlog of 5 resets connections that arrive together while the
    # accept loop is busy (a scenario's children calling at once).
    request_queue_size = 128
    rpc: RpcServer

    def server_bind(self) -> None:
        # No reverse lookup of the bind address (HTTPServer.server_bind calls getfqdn).
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name = str(host)
        self.server_port = int(port)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that gave up (a timeout test) is not an error of the server.
        pass


class _Handler(BaseHTTPRequestHandler):
    server: _HTTPServer
    protocol_version = "HTTP/1.0"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_POST(self) -> None:
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        if not 0 <= length <= MAX_REQUEST_BYTES:
            self._send(400, {}, b"bad Content-Length")
            return
        body = self.rfile.read(length)
        status, headers, out = self.server.rpc._answer(body, self.path, self.headers.get("Host"))
        self._send(status, headers, out)

    def do_GET(self) -> None:
        self._send(405, {"Allow": "POST"}, b"JSON-RPC needs POST")

    def _send(self, status: int, headers: Mapping[str, str], body: bytes) -> None:
        self.send_response(status)
        for k, v in headers.items():
            if v:  # an empty value leaves the header out (e.g. no Content-Length)
                self.send_header(k, v)
        if not any(k.lower() == "content-length" for k in headers):
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def _error(rid: Any, code: int, message: str) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": rid, "error": {"code": code, "message": message}}


class RpcServer:
    """A JSON-RPC 2.0 server on 127.0.0.1 answering each configured method with its value.

    A method's value may be a callable `(params) -> value` (e.g. one that blocks on an Event).
    `respond` overrides the HTTP answer for a request (redirects, broken bodies); requests are
    recorded either way. Unknown methods get error -32601."""

    def __init__(self, name: str, methods: Mapping[str, Any] | None = None, *, respond: Responder | None = None) -> None:
        self.name = name
        self.methods: dict[str, Any] = dict(methods or {})
        self.respond = respond
        self._requests: list[RpcRequest] = []
        self._lock = threading.Lock()
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None

    # --- lifecycle -----------------------------------------------------------------------------
    def start(self) -> RpcServer:
        if self._httpd is not None:
            return self
        httpd = _HTTPServer(("127.0.0.1", 0), _Handler)
        httpd.rpc = self
        self._httpd = httpd
        self._thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        name=f"rpc-server-{self.name}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        httpd, thread = self._httpd, self._thread
        if httpd is None:
            return
        self._httpd = self._thread = None
        httpd.shutdown()
        httpd.server_close()
        if thread is not None:
            thread.join()

    def __enter__(self) -> RpcServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        if self._httpd is None:
            raise RuntimeError(f"rpc server {self.name!r} is not running")
        return int(self._httpd.server_address[1])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    # --- observation ---------------------------------------------------------------------------
    @property
    def requests(self) -> list[RpcRequest]:
        """Every request received so far, in arrival order (a copy)."""
        with self._lock:
            return list(self._requests)

    def count(self, method: str | None = None) -> int:
        with self._lock:
            return sum(1 for r in self._requests if method is None or r.method == method)

    # --- serving -------------------------------------------------------------------------------
    def _record(self, body: bytes, path: str, host: str | None, msg: Any) -> None:
        calls = msg if isinstance(msg, list) and msg else [msg]
        with self._lock:
            for m in calls:
                if isinstance(m, dict) and isinstance(m.get("method"), str):
                    self._requests.append(RpcRequest(m["method"], m.get("params"), body, path, host))
                else:
                    self._requests.append(RpcRequest(None, None, body, path, host))

    def _answer(self, body: bytes, path: str, host: str | None) -> tuple[int, Mapping[str, str], bytes]:
        try:
            msg: Any = json.loads(body)
        except (ValueError, RecursionError):
            msg = None
        self._record(body, path, host, msg)
        if self.respond is not None:
            override = self.respond(body)
            if override is not None:
                return override
        json_headers = {"Content-Type": "application/json"}
        if msg is None:
            return 200, json_headers, json.dumps(_error(None, -32700, "Parse error")).encode()
        if isinstance(msg, list):
            if not msg:
                return 200, json_headers, json.dumps(_error(None, -32600, "Invalid Request")).encode()
            out = [r for r in (self._one(m) for m in msg) if r is not None]
            return (200, json_headers, json.dumps(out).encode()) if out else (204, {}, b"")
        reply = self._one(msg)
        return (200, json_headers, json.dumps(reply).encode()) if reply is not None else (204, {}, b"")

    def _one(self, m: Any) -> dict[str, Any] | None:
        if not isinstance(m, dict) or m.get("jsonrpc") != "2.0" or not isinstance(m.get("method"), str):
            return _error(m.get("id") if isinstance(m, dict) else None, -32600, "Invalid Request")
        rid = m.get("id")
        notification = "id" not in m
        if m["method"] not in self.methods:
            return None if notification else _error(rid, -32601, "Method not found")
        value = self.methods[m["method"]]
        if callable(value):
            value = value(m.get("params"))
        return None if notification else {"jsonrpc": "2.0", "id": rid, "result": value}


def env_name(name: str) -> str:
    """`RPC_<NAME>_URL` spelling of an endpoint name: upper case, other characters `_`."""
    return re.sub(r"[^A-Z0-9]", "_", name.upper())


class ServerGroup:
    """Start and stop a world's local servers together (a failed start stops the rest)."""

    def _members(self) -> dict[str, Any]:
        raise NotImplementedError

    def start(self) -> Self:
        try:
            for server in self._members().values():
                server.start()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        for server in self._members().values():
            server.stop()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class ServerSet(ServerGroup):
    """The local servers of one scenario world: one RpcServer per `world.rpc` entry."""

    def __init__(self, world: Mapping[str, Any] | None = None) -> None:
        self.rpc: dict[str, RpcServer] = {}
        for name, spec in ((world or {}).get("rpc") or {}).items():
            methods = (spec or {}).get("methods") or {} if isinstance(spec, Mapping) else {}
            self.rpc[str(name)] = RpcServer(str(name), methods)

    def _members(self) -> dict[str, Any]:
        return self.rpc

    def __iter__(self) -> Iterator[RpcServer]:
        return iter(self.rpc.values())

    def urls(self) -> dict[str, str]:
        """{endpoint name: URL}: the operator's endpoint table for the rpc provider."""
        return {name: s.url for name, s in self.rpc.items()}

    def substitutions(self) -> dict[str, str]:
        """`${rpc.<name>.url}` values for scenario args and tool sources."""
        return {f"rpc.{name}.url": s.url for name, s in self.rpc.items()}

    def env(self) -> dict[str, str]:
        """`RPC_<NAME>_URL` for world programs."""
        return {f"RPC_{env_name(name)}_URL": s.url for name, s in self.rpc.items()}

    def calls(self, endpoint: str, method: str | None = None) -> int:
        """For the `rpc_calls` check; an endpoint the world does not define has had no calls."""
        s = self.rpc.get(endpoint)
        return 0 if s is None else s.count(method)

    def request_log(self) -> tuple[tuple[str, str, str], ...]:
        """Every server's requests as world state: (endpoint, method or '', body digest), servers
        by name, requests in arrival order. Comparable and hashable (for snapshots)."""
        return tuple((name, r.method or "", r.digest) for name in sorted(self.rpc) for r in self.rpc[name].requests)
