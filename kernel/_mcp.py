"""The MCP client provider (`mcp.list_tools`, `mcp.call`) on the official `mcp` SDK.

A capability `{kind: mcp, scope: {server: NAME, tools: [...]}, rights: [list, call]}` lets a
process list, and call, exactly the listed tools of the server the operator configured under NAME:
`{"url": "http(s)://.../mcp"}` (streamable HTTP) or `{"command": [argv...], "env": {...}}` (stdio,
a child process with the SDK's minimal default environment plus `env`). Deny by default: a scope
without `tools` authorizes nothing, and a tool outside the list is refused before any connection.

Tool descriptions and input schemas are model-visible affordances, not authority. The first
listing of a server pins each tool's (name, description, input_schema) by sha256; later listings
return the pinned description and schema, and a tool whose listing changed is reported once per
new hash (`on_change`, and the sink the kernel attaches) so it can be logged and published. A
changed description never changes which tools a capability allows.

The SDK is async: the provider owns one event loop in a background thread (started on first
use) and one session per server there (connected lazily, dropped after a transport failure or a
timeout and reconnected on the next call). Effect workers call in with
`run_coroutine_threadsafe(...).result()`; one deadline (`timeout_s`) covers connecting and the
request. Tool calls are sent as plain `tools/call` requests, so the SDK never issues a
`tools/list` the kernel did not decide.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import hashlib
import json
import logging
import re
import sys
import threading
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from agentlibos.bus._errors import KernelError
from agentlibos.kernel._provider import check_bus_value, CallInfo, Provider
from agentlibos.kernel._table import SyscallSpec, _row

__all__ = ["MCP_SYSCALLS", "McpToolChange", "make_mcp_provider", "mcp_within", "tool_hash"]

log = logging.getLogger(__name__)

MCP_SYSCALLS: tuple[SyscallSpec, ...] = (
    _row("mcp.list_tools", "server:str", "mcp", "list", "syscalls", "ext",
         "the tools of an operator-configured MCP server that the cap allows, descriptions pinned at "
         "first listing -> {tools: [{name, description, input_schema}]}"),
    _row("mcp.call", "server:str tool:str arguments:map?", "mcp", "call", "syscalls", "ext",
         "call an allowed tool of an operator-configured MCP server -> {content, is_error}"),
)

SERVER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
_CONFIG_KEYS = frozenset({"url", "command", "env", "cwd"})
_MAX_PAGES = 100
_CLOSE_GRACE_S = 5.0  # how long close() lets sessions end cleanly before cancelling them

#: A change report: (server, tool, old_hash, new_hash, new_description).
OnChange = Callable[[str, str, str, str, str], None]


@dataclass(frozen=True, slots=True)
class McpToolChange:
    server: str
    tool: str
    old_hash: str
    new_hash: str
    new_description: str

    def body(self) -> dict[str, Any]:
        return {"server": self.server, "tool": self.tool, "old_hash": self.old_hash, "new_hash": self.new_hash,
                "new_description": self.new_description}


@dataclass(frozen=True, slots=True)
class _Pin:
    hash: str
    description: str
    input_schema: dict[str, Any]


@dataclass(frozen=True, slots=True)
class _Server:
    name: str
    url: str | None
    command: tuple[str, ...]
    env: dict[str, str]
    cwd: str | None

    @property
    def shown(self) -> str:
        """The URL without credentials, or the program: for logs and approvers."""
        if self.url is None:
            return self.command[0]
        p = urlsplit(self.url)
        host = p.hostname or ""
        netloc = (f"[{host}]" if ":" in host else host) + (f":{p.port}" if p.port else "")
        return f"{p.scheme}://{netloc}{p.path or '/'}" + (f"?{p.query}" if p.query else "")


def _parse_server(name: Any, cfg: Any) -> _Server:
    if not isinstance(name, str) or not SERVER_NAME.fullmatch(name):
        raise ValueError(f"mcp server name {name!r} must match {SERVER_NAME.pattern}")
    if not isinstance(cfg, Mapping):
        raise ValueError(f"mcp server {name!r}: the config must be a mapping")
    unknown = set(cfg) - _CONFIG_KEYS
    if unknown:
        raise ValueError(f"mcp server {name!r}: unknown config keys {sorted(unknown)}")
    url, command = cfg.get("url"), cfg.get("command")
    if (url is None) == (command is None):
        raise ValueError(f"mcp server {name!r}: give exactly one of url (streamable HTTP) or command (stdio)")
    env = cfg.get("env") or {}
    if not isinstance(env, Mapping) or not all(isinstance(k, str) and isinstance(v, str) for k, v in env.items()):
        raise ValueError(f"mcp server {name!r}: env must map strings to strings")
    cwd = cfg.get("cwd")
    if cwd is not None and not isinstance(cwd, str):
        raise ValueError(f"mcp server {name!r}: cwd must be a string")
    if url is not None:
        if not isinstance(url, str) or any(ord(ch) < 0x21 or ord(ch) == 0x7F for ch in url):
            raise ValueError(f"mcp server {name!r}: not a URL: {url!r}")
        parts = urlsplit(url)
        if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
            raise ValueError(f"mcp server {name!r}: {url!r} must be an http(s) URL with a host")
        _ = parts.port  # ValueError for a bad port
        if env or cwd is not None:
            raise ValueError(f"mcp server {name!r}: env and cwd are for stdio servers")
        return _Server(name, url, (), {}, None)
    if (not isinstance(command, (list, tuple)) or not command
            or not all(isinstance(a, str) and a and "\x00" not in a for a in command)):
        raise ValueError(f"mcp server {name!r}: command must be a non-empty argv list of strings")
    return _Server(name, None, tuple(command), dict(env), cwd)


def tool_hash(name: str, description: str, input_schema: Any) -> str:
    """sha256 of a tool's affordance: (name, description, input_schema) as canonical JSON."""
    body = json.dumps([name, description, input_schema], sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(body.encode("utf-8", "surrogatepass")).hexdigest()


def mcp_within(child: Mapping[str, Any], parent: Mapping[str, Any]) -> bool:
    """Narrowing for mcp scopes: the same server, tools a subset of the parent's. A parent without
    `tools` authorizes nothing, so no child of it may name any."""
    if not isinstance(child.get("server"), str) or child.get("server") != parent.get("server"):
        return False
    p_tools, c_tools = parent.get("tools"), child.get("tools")
    if not isinstance(p_tools, list):
        return not isinstance(c_tools, list) or not c_tools
    return isinstance(c_tools, list) and set(c_tools) <= set(p_tools)


def _content(block: Any) -> dict[str, Any]:
    """One content block as plain data: text as {type: text, text}; others keep their fields."""
    kind = getattr(block, "type", None)
    if kind == "text":
        return {"type": "text", "text": block.text}
    data = block.model_dump(mode="json", exclude_none=True)
    data.pop("annotations", None)
    data.pop("_meta", None)
    data.pop("meta", None)
    return data


def _is_transport_failure(exc: BaseException) -> bool:
    """True unless the server itself answered with a JSON-RPC error (the session is then fine)."""
    from mcp.shared.exceptions import MCPError

    if isinstance(exc, MCPError):
        return exc.code in (-32000, -32001)  # connection closed, request timeout (the SDK's own)
    return True


def _is_timeout(exc: BaseException) -> bool:
    import httpx2
    from mcp.shared.exceptions import MCPError

    if isinstance(exc, BaseExceptionGroup):
        return any(_is_timeout(e) for e in exc.exceptions)
    return isinstance(exc, (TimeoutError, httpx2.TimeoutException)) or (isinstance(exc, MCPError) and exc.code == -32001)


def _describe_error(exc: BaseException) -> str:
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    text = str(exc) or type(exc).__name__
    return f"{type(exc).__name__}: {text}"[:1000]


class _Conn:
    """One server's session, living in a holder task on the provider's loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.ready: asyncio.Future[Any] = loop.create_future()
        self.stop = asyncio.Event()
        self.session: Any = None
        self.task: asyncio.Task[None] | None = None


class _McpClient:
    def __init__(self, servers: Mapping[str, Mapping[str, Any]], timeout_s: float, on_change: OnChange | None,
                 max_response_bytes: int) -> None:
        if not timeout_s > 0:
            raise ValueError("timeout_s must be positive")
        if max_response_bytes < 1:
            raise ValueError("max_response_bytes must be positive")
        self.servers = {name: _parse_server(name, cfg) for name, cfg in servers.items()}
        self.timeout_s = float(timeout_s)
        self.max_response_bytes = int(max_response_bytes)
        self._on_change = on_change
        self._sinks: list[Callable[[dict[str, Any]], None]] = []
        self._lock = threading.Lock()  # loop start/stop, pins, sinks
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._closed = False
        # Pins: (server, tool) -> the first listing's affordance; changes reported once per new hash.
        self._pins: dict[tuple[str, str], _Pin] = {}
        self._reported: set[tuple[str, str, str]] = set()
        # Loop-side state (touched only on the loop thread).
        self._conns: dict[str, _Conn] = {}
        self._holders: set[asyncio.Task[None]] = set()
        self._connecting: dict[str, asyncio.Lock] = {}

    # --- authorization -------------------------------------------------------------------------
    def covers(self, scope: Mapping[str, Any], sys: str, args: Mapping[str, Any]) -> bool:
        server, tools = scope.get("server"), scope.get("tools")
        if not isinstance(server, str) or server != args.get("server"):
            return False
        if not isinstance(tools, list):
            return False  # deny by default: no `tools`, nothing
        if sys == "mcp.list_tools":
            return True
        if sys == "mcp.call":
            tool = args.get("tool")
            return isinstance(tool, str) and tool in tools
        return False

    # --- describing ----------------------------------------------------------------------------
    def describe(self, sys: str, args: Mapping[str, Any]) -> dict[str, Any]:
        srv = self.servers.get(str(args.get("server")))
        out: dict[str, Any] = {"server": args.get("server"), "transport": None, "target": None}
        if srv is not None:
            out["transport"] = "http" if srv.url is not None else "stdio"
            out["target"] = srv.shown
        if sys == "mcp.call":
            out["tool"] = args.get("tool")
            try:
                out["bytes"] = len(json.dumps(args.get("arguments") or {}, separators=(",", ":"),
                                              ensure_ascii=False, allow_nan=False).encode())
            except (TypeError, ValueError):
                out["bytes"] = None
        return out

    # --- pins ----------------------------------------------------------------------------------
    def pins(self) -> dict[tuple[str, str], str]:
        """{(server, tool): pinned hash}."""
        with self._lock:
            return {k: p.hash for k, p in self._pins.items()}

    def attach(self, sink: Callable[[dict[str, Any]], None]) -> None:
        """Also report each change to `sink(body)` (the kernel: a log entry and an `mcp/` event);
        body: {event: "tool_changed", server, tool, old_hash, new_hash, new_description, pid, handle}.
        Called on the effect worker thread before the listing's result is returned."""
        with self._lock:
            self._sinks.append(sink)

    def _pin(self, server: str, listed: list[Any]) -> tuple[dict[str, _Pin], list[McpToolChange]]:
        out: dict[str, _Pin] = {}
        changes: list[McpToolChange] = []
        with self._lock:
            for tool in listed:
                name = tool.name
                if name in out:
                    continue  # a name listed twice: the first entry counts
                desc = tool.description or ""
                schema = dict(tool.input_schema or {})
                h = tool_hash(name, desc, schema)
                pin = self._pins.get((server, name))
                if pin is None:
                    pin = self._pins[(server, name)] = _Pin(h, desc, schema)
                elif pin.hash != h and (server, name, h) not in self._reported:
                    self._reported.add((server, name, h))
                    changes.append(McpToolChange(server, name, pin.hash, h, desc))
                out[name] = pin
        return out, changes

    def _report(self, changes: list[McpToolChange], info: CallInfo) -> None:
        with self._lock:
            sinks = list(self._sinks)
        for ch in changes:
            log.warning("mcp server %r changed the listing of tool %r (%s -> %s); the pinned one stays",
                        ch.server, ch.tool, ch.old_hash[:12], ch.new_hash[:12])
            if self._on_change is not None:
                try:
                    self._on_change(ch.server, ch.tool, ch.old_hash, ch.new_hash, ch.new_description)
                except Exception:
                    log.exception("mcp: on_change failed")
            body = {"event": "tool_changed", **ch.body(), "pid": info.pid, "handle": info.handle}
            for sink in sinks:
                try:
                    sink(dict(body))
                except Exception:
                    log.exception("mcp: change sink failed")

    # --- the effect ----------------------------------------------------------------------------
    def run(self, args: Mapping[str, Any], info: CallInfo) -> Any:
        name = args["server"]
        srv = self.servers.get(name)
        if srv is None:
            raise KernelError("ENOENT", f"no such mcp server configured: {name!r}")
        if info.sys == "mcp.list_tools":
            allowed = info.scope.get("tools")
            allowed = set(allowed) if isinstance(allowed, list) else set()
            listed = self._submit(srv, lambda s: self._list(s))
            pinned, changes = self._pin(name, listed)
            self._report(changes, info)
            value: Any = {"tools": [{"name": t, "description": p.description, "input_schema": p.input_schema}
                                    for t, p in pinned.items() if t in allowed]}
        elif info.sys == "mcp.call":
            arguments = args.get("arguments")
            if arguments is not None and not isinstance(arguments, dict):
                raise KernelError("EINVAL", "arguments must be an object")
            try:
                json.dumps(arguments, allow_nan=False)
            except (TypeError, ValueError) as exc:
                raise KernelError("EINVAL", f"arguments are not JSON: {exc}") from None
            tool = args["tool"]
            result = self._submit(srv, lambda s: self._call(s, tool, arguments))
            value = {"content": [_content(b) for b in result.content], "is_error": bool(result.is_error)}
            if result.structured_content is not None:
                value["structured_content"] = result.structured_content
        else:
            raise KernelError("ENOSYS", f"{info.sys} is not an mcp syscall")
        check_bus_value(value, "mcp")
        size = len(json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode())
        if size > self.max_response_bytes:
            raise KernelError("EIO", f"mcp response too large ({size} bytes; the limit is {self.max_response_bytes})")
        return value

    @staticmethod
    async def _list(session: Any) -> list[Any]:
        import mcp.types as types

        tools: list[Any] = []
        cursor: str | None = None
        for _ in range(_MAX_PAGES):
            params = types.PaginatedRequestParams(cursor=cursor) if cursor is not None else None
            page = await session.list_tools(params=params)
            tools.extend(page.tools)
            cursor = page.next_cursor
            if cursor is None:
                return tools
        raise KernelError("EIO", f"tools/list did not end within {_MAX_PAGES} pages")

    @staticmethod
    async def _call(session: Any, tool: str, arguments: dict[str, Any] | None) -> Any:
        import mcp.types as types

        # A plain tools/call: ClientSession.call_tool would first list the tools itself when it has
        # not seen this one (to validate structured output), a listing the kernel did not decide.
        request = types.CallToolRequest(params=types.CallToolRequestParams(name=tool, arguments=arguments))
        return await session.send_request(request, types.CallToolResult)

    def _submit(self, srv: _Server, op: Callable[[Any], Awaitable[Any]]) -> Any:
        loop = self._ensure_loop()
        fut = asyncio.run_coroutine_threadsafe(asyncio.wait_for(self._request(srv, op), self.timeout_s), loop)
        try:
            return fut.result(self.timeout_s + _CLOSE_GRACE_S)  # a backstop: wait_for ends it first
        except KernelError:
            raise
        except (TimeoutError, concurrent.futures.TimeoutError):
            fut.cancel()
            raise KernelError("ETIMEDOUT", f"mcp server {srv.name!r} did not answer within {self.timeout_s:g} s") from None
        except concurrent.futures.CancelledError:
            raise KernelError("EIO", "the mcp provider was closed") from None
        except BaseException as exc:
            from mcp.shared.exceptions import MCPError

            if _is_timeout(exc):
                raise KernelError("ETIMEDOUT", f"mcp server {srv.name!r} timed out: {_describe_error(exc)}") from None
            if isinstance(exc, MCPError) and not _is_transport_failure(exc):
                raise KernelError("EIO", f"mcp error {exc.code}: {exc.message[:1000]}") from None
            raise KernelError("EIO", f"mcp server {srv.name!r} ({srv.shown}) failed: {_describe_error(exc)}") from None

    # --- the loop and the sessions (loop thread) -----------------------------------------------
    def _ensure_loop(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._closed:
                raise KernelError("EIO", "the mcp provider is closed")
            if self._loop is None:
                loop = asyncio.new_event_loop()
                thread = threading.Thread(target=self._run_loop, args=(loop,), name="agentlibos-mcp", daemon=True)
                thread.start()
                self._loop, self._thread = loop, thread
            return self._loop

    @staticmethod
    def _run_loop(loop: asyncio.AbstractEventLoop) -> None:
        asyncio.set_event_loop(loop)
        try:
            loop.run_forever()
        finally:
            try:
                loop.run_until_complete(loop.shutdown_asyncgens())
                loop.run_until_complete(loop.shutdown_default_executor())
            finally:
                asyncio.set_event_loop(None)
                loop.close()

    async def _request(self, srv: _Server, op: Callable[[Any], Awaitable[Any]]) -> Any:
        conn = await self._session(srv)
        try:
            return await op(conn.session)
        except BaseException as exc:
            if _is_transport_failure(exc):
                self._drop(srv.name, conn)  # reconnect on the next call
            raise

    async def _session(self, srv: _Server) -> _Conn:
        lock = self._connecting.setdefault(srv.name, asyncio.Lock())
        async with lock:
            conn = self._conns.get(srv.name)
            if conn is not None and conn.session is not None and not conn.stop.is_set():
                return conn
            if conn is not None:
                self._drop(srv.name, conn)
            loop = asyncio.get_running_loop()
            conn = _Conn(loop)
            self._conns[srv.name] = conn
            conn.task = loop.create_task(self._hold(srv, conn), name=f"mcp-session-{srv.name}")
            self._holders.add(conn.task)
            conn.task.add_done_callback(self._holders.discard)
            try:
                await conn.ready  # a cancelled wait (the deadline) cancels `ready` too
            except BaseException:
                self._drop(srv.name, conn)
                raise
            return conn

    def _drop(self, name: str, conn: _Conn) -> None:
        conn.stop.set()
        if conn.session is None and conn.task is not None:
            conn.task.cancel()  # still connecting: a hung server must not keep it alive
        if self._conns.get(name) is conn:
            del self._conns[name]

    async def _hold(self, srv: _Server, conn: _Conn) -> None:
        """Open the transport and the session, publish it, and keep both open until told to stop:
        anyio scopes must be left by the task that entered them."""
        from mcp import ClientSession
        from mcp.types import Implementation

        try:
            async with contextlib.AsyncExitStack() as stack:
                if srv.url is not None:
                    import httpx2
                    from mcp.client.streamable_http import streamable_http_client
                    from mcp.shared._httpx_utils import create_mcp_http_client

                    http = await stack.enter_async_context(create_mcp_http_client(
                        timeout=httpx2.Timeout(self.timeout_s, read=max(300.0, self.timeout_s))))
                    read, write = await stack.enter_async_context(streamable_http_client(srv.url, http_client=http))
                else:
                    from mcp.client.stdio import StdioServerParameters, stdio_client

                    params = StdioServerParameters(command=srv.command[0], args=list(srv.command[1:]),
                                                   env=dict(srv.env) or None, cwd=srv.cwd)
                    read, write = await stack.enter_async_context(stdio_client(params, errlog=sys.__stderr__ or sys.stderr))
                session = await stack.enter_async_context(ClientSession(
                    read, write, client_info=Implementation(name="agent-libos", version="0.1.0")))
                await session.initialize()
                conn.session = session
                if not conn.ready.done():
                    conn.ready.set_result(None)
                await conn.stop.wait()
        except asyncio.CancelledError:
            if not conn.ready.done():
                conn.ready.cancel()
            raise
        except BaseException as exc:  # reported to the caller that waits on `ready`
            if not conn.ready.done():
                conn.ready.set_exception(exc if isinstance(exc, Exception) else RuntimeError(repr(exc)))
            else:
                log.debug("mcp session %r ended: %s", srv.name, _describe_error(exc))
        finally:
            conn.session = None
            conn.stop.set()
            if self._conns.get(srv.name) is conn:
                del self._conns[srv.name]

    async def _aclose(self) -> None:
        for name, conn in list(self._conns.items()):
            self._drop(name, conn)
        holders = list(self._holders)
        if not holders:
            return
        _, pending = await asyncio.wait(holders, timeout=_CLOSE_GRACE_S)
        for t in pending:
            t.cancel()
        if pending:
            await asyncio.wait(pending, timeout=_CLOSE_GRACE_S)

    def close(self) -> None:
        """End every session (stdio servers exit), then the loop and its thread. Idempotent."""
        with self._lock:
            self._closed = True
            loop, thread = self._loop, self._thread
            self._loop = self._thread = None
        if loop is None or thread is None:
            return
        try:
            asyncio.run_coroutine_threadsafe(self._aclose(), loop).result(3 * _CLOSE_GRACE_S)
        except Exception:
            log.exception("mcp: closing the sessions failed")
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join()


def make_mcp_provider(
    servers: Mapping[str, Mapping[str, Any]],
    *,
    timeout_s: float = 30.0,
    on_change: OnChange | None = None,
    max_response_bytes: int = 1 << 20,
) -> Provider:
    """The `mcp` provider over the operator's server table
    `{name: {"url": "http(s)://host:port/mcp"} | {"command": [argv...], "env": {...}, "cwd": str?}}`.

    `on_change(server, tool, old_hash, new_hash, new_description)` is called (on an effect worker
    thread, before the listing returns) once per changed tool listing. Raises ValueError for a
    malformed table."""
    client = _McpClient(servers, timeout_s, on_change, max_response_bytes)
    return Provider(
        attach=client.attach,
        kind="mcp",
        syscalls=MCP_SYSCALLS,
        covers=client.covers,
        run=client.run,
        describe=client.describe,
        scope_keys={"server": "str", "tools": "list[str]"},
        within=mcp_within,
        close=client.close,
    )
