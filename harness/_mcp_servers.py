"""Local MCP test servers for scenario worlds: the real MCP protocol (the official `mcp` SDK's
low-level Server), over streamable HTTP on 127.0.0.1 or over stdio in a child process.

Every tool call a server receives is recorded (tool, arguments), and every listing is counted, so
the harness observes MCP sinks from outside the runtime, as it observes files and RPC servers.
A tool with `description_after_first_list` shows that description from the second listing on
(a rug-pull: the server changes a tool's affordance after the client first saw it).

Run as a program (`python -m agentlibos.harness._mcp_servers TOOLS_JSON [--name N] [--record F]`)
it serves the same tools over stdio, appending each call to F as a JSON line.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import socket
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import anyio
import mcp.types as types
import uvicorn
from mcp.server.lowlevel import Server
from mcp.server.stdio import stdio_server

from agentlibos.harness._servers import ServerGroup, env_name

__all__ = ["McpCall", "McpServer", "McpServerSet", "make_server", "serve_stdio"]

#: Seconds uvicorn waits for open responses (an idle SSE stream of a connected client) at stop.
_GRACEFUL_S = 2


@dataclass(frozen=True, slots=True)
class McpCall:
    tool: str
    arguments: Any

    @property
    def digest(self) -> str:
        body = json.dumps(self.arguments, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=repr)
        return hashlib.sha256(body.encode()).hexdigest()


def _text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


class _Tools:
    """The tool table and what happened to it; shared by the HTTP and stdio servers."""

    def __init__(self, tools: Mapping[str, Mapping[str, Any]], on_call: Callable[[McpCall], None] | None = None) -> None:
        self.tools = {str(k): dict(v or {}) for k, v in tools.items()}
        self.on_call = on_call
        self._lock = threading.Lock()
        self.calls: list[McpCall] = []
        self.listings = 0

    def listing(self) -> list[types.Tool]:
        with self._lock:
            self.listings += 1
            later = self.listings > 1
        out = []
        for name, spec in self.tools.items():
            desc = spec.get("description", "")
            if later and spec.get("description_after_first_list") is not None:
                desc = spec["description_after_first_list"]
            out.append(types.Tool(name=name, description=str(desc),
                                  input_schema=dict(spec.get("input_schema") or {"type": "object"})))
        return out

    async def call(self, name: str, arguments: Any) -> types.CallToolResult:
        call = McpCall(name, arguments)
        with self._lock:
            self.calls.append(call)
        if self.on_call is not None:
            self.on_call(call)
        spec = self.tools.get(name)
        if spec is None:
            return types.CallToolResult(content=[types.TextContent(type="text", text=f"unknown tool {name!r}")],
                                        is_error=True)
        value = spec.get("returns", "")
        if callable(value):  # e.g. one that blocks on an Event: off the server's event loop
            value = await anyio.to_thread.run_sync(value, arguments)
        return types.CallToolResult(content=[types.TextContent(type="text", text=_text(value))],
                                    is_error=bool(spec.get("is_error", False)))


def make_server(name: str, table: _Tools) -> Server[Any]:
    """A low-level MCP Server answering tools/list and tools/call from `table`."""

    async def on_list_tools(ctx: Any, params: types.PaginatedRequestParams | None) -> types.ListToolsResult:
        return types.ListToolsResult(tools=table.listing())

    async def on_call_tool(ctx: Any, params: types.CallToolRequestParams) -> types.CallToolResult:
        return await table.call(params.name, params.arguments)

    return Server(name, on_list_tools=on_list_tools, on_call_tool=on_call_tool)


class McpServer:
    """An MCP server over streamable HTTP on 127.0.0.1 (`url` ends in /mcp), in a background thread.

    `tools`: {name: {description, input_schema, returns, description_after_first_list?, is_error?}};
    `returns` is sent as text (JSON for non-strings) or may be a callable `(arguments) -> value`
    (run in a worker thread, e.g. one that blocks on an Event)."""

    def __init__(self, name: str, tools: Mapping[str, Mapping[str, Any]] | None = None) -> None:
        self.name = name
        self._table = _Tools(tools or {})
        self._sock: socket.socket | None = None
        self._uv: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    # --- lifecycle -----------------------------------------------------------------------------
    def start(self) -> McpServer:
        if self._uv is not None:
            return self
        app = make_server(self.name, self._table).streamable_http_app()
        # The socket is bound and listening before the thread starts: the URL is valid at once,
        # and early connections wait in the backlog until the app is up.
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("127.0.0.1", 0))
            sock.listen(128)
        except BaseException:
            sock.close()
            raise
        config = uvicorn.Config(app, log_level="critical", lifespan="on", access_log=False,
                                timeout_graceful_shutdown=_GRACEFUL_S)
        self._sock, self._uv = sock, uvicorn.Server(config)
        self._thread = threading.Thread(target=self._serve, name=f"mcp-server-{self.name}", daemon=True)
        self._thread.start()
        return self

    def _serve(self) -> None:
        assert self._uv is not None and self._sock is not None
        try:
            self._uv.run(sockets=[self._sock])
        except BaseException as exc:  # pragma: no cover - reported by stop()
            self._error = exc

    def stop(self) -> None:
        uv, thread, sock = self._uv, self._thread, self._sock
        if uv is None:
            return
        self._uv = self._thread = self._sock = None
        uv.should_exit = True
        uv.force_exit = True  # do not wait for open SSE streams of connected clients
        if thread is not None:
            thread.join()
        if sock is not None:
            sock.close()
        if self._error is not None:  # pragma: no cover
            raise RuntimeError(f"mcp server {self.name!r} failed: {self._error!r}")

    def __enter__(self) -> McpServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        if self._sock is None:
            raise RuntimeError(f"mcp server {self.name!r} is not running")
        return int(self._sock.getsockname()[1])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/mcp"

    # --- observation ---------------------------------------------------------------------------
    @property
    def calls(self) -> list[McpCall]:
        """Every tool call received so far, in arrival order (a copy)."""
        with self._table._lock:
            return list(self._table.calls)

    @property
    def listings(self) -> int:
        """How many tools/list requests were answered."""
        with self._table._lock:
            return self._table.listings

    def count(self, tool: str | None = None) -> int:
        with self._table._lock:
            return sum(1 for c in self._table.calls if tool is None or c.tool == tool)


class McpServerSet(ServerGroup):
    """The local MCP servers of one scenario world: one McpServer per `world.mcp` entry."""

    def __init__(self, world: Mapping[str, Any] | None = None) -> None:
        self.mcp: dict[str, McpServer] = {}
        for name, spec in ((world or {}).get("mcp") or {}).items():
            tools = (spec or {}).get("tools") or {} if isinstance(spec, Mapping) else {}
            self.mcp[str(name)] = McpServer(str(name), tools)

    def _members(self) -> dict[str, Any]:
        return self.mcp

    def __iter__(self) -> Iterator[McpServer]:
        return iter(self.mcp.values())

    def urls(self) -> dict[str, str]:
        """{server name: URL}."""
        return {name: s.url for name, s in self.mcp.items()}

    def configs(self) -> dict[str, dict[str, Any]]:
        """The operator's server table for the mcp provider: {name: {"url": URL}}."""
        return {name: {"url": s.url} for name, s in self.mcp.items()}

    def substitutions(self) -> dict[str, str]:
        """`${mcp.<name>.url}` values for scenario args and tool sources."""
        return {f"mcp.{name}.url": s.url for name, s in self.mcp.items()}

    def env(self) -> dict[str, str]:
        """`MCP_<NAME>_URL` for world programs."""
        return {f"MCP_{env_name(name)}_URL": s.url for name, s in self.mcp.items()}

    def calls(self, server: str, tool: str | None = None) -> int:
        """For the `mcp_calls` check (tool calls, not listings); an unknown server has had none."""
        s = self.mcp.get(server)
        return 0 if s is None else s.count(tool)

    def request_log(self) -> tuple[tuple[str, str, str], ...]:
        """Every server's tool calls as world state: (server, tool, arguments digest), servers by
        name, calls in arrival order. Listings are left out: they are reads, not effects (and the
        client's own connection setup would otherwise show up as world change)."""
        return tuple((name, c.tool, c.digest) for name in sorted(self.mcp) for c in self.mcp[name].calls)


# --- stdio ---------------------------------------------------------------------------------------


def serve_stdio(name: str, tools: Mapping[str, Mapping[str, Any]], record: str | None = None) -> None:
    """Serve `tools` over stdin/stdout until the client closes the connection. Each call is
    appended to `record` as a JSON line {tool, arguments} (flushed before the answer)."""

    def on_call(call: McpCall) -> None:
        if record is not None:
            with open(record, "a", encoding="utf-8") as fh:
                fh.write(json.dumps({"tool": call.tool, "arguments": call.arguments}) + "\n")

    server = make_server(name, _Tools(tools, on_call))

    async def main() -> None:
        async with stdio_server() as (read, write):
            await server.run(read, write, server.create_initialization_options())

    anyio.run(main)


def _main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="an MCP test server over stdio")
    ap.add_argument("tools", help="JSON: {tool: {description, input_schema, returns, ...}}")
    ap.add_argument("--name", default="stdio")
    ap.add_argument("--record", default=None, help="append each call to this file as a JSON line")
    ns = ap.parse_args(argv)
    serve_stdio(ns.name, json.loads(ns.tools), ns.record)


if __name__ == "__main__":
    _main()
