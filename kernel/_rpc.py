"""The JSON-RPC client provider (`rpc.call`): JSON-RPC 2.0 over HTTP to operator-configured endpoints.

A capability `{kind: rpc, scope: {endpoint: NAME, methods: [...]}, rights: [call]}` authorizes
calling exactly the listed methods on the endpoint the operator configured under NAME (a URL as
`endpoint` only when the operator enabled `allow_urls`). Deny by default: a scope without
`methods` authorizes nothing.

The effect:
- the URL comes from the operator's endpoint table only (never from the caller's words);
- the host is resolved once, the first time it is used, and every connection goes to that
  address (pinned for the provider's lifetime): a DNS answer that changes later (rebinding)
  cannot send a request anywhere else;
- redirects are never followed (a 3xx is EIO); http and https only;
- one deadline covers connect, send and receive (ETIMEDOUT); the response body is read up to
  `max_response_bytes` (one byte more is EIO).
"""

from __future__ import annotations

import base64
import http.client
import itertools
import json
import re
import socket
import ssl
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import SplitResult, unquote, urlsplit

from agentlibos.bus._errors import KernelError
from agentlibos.kernel._provider import check_bus_value, CallInfo, Provider
from agentlibos.kernel._table import SyscallSpec, _row

__all__ = ["RPC_SYSCALLS", "make_rpc_provider", "normalize_url", "rpc_within"]

RPC_SYSCALLS: tuple[SyscallSpec, ...] = (
    _row("rpc.call", "endpoint:str method:str params:any?", "rpc", "call", "syscalls", "ext",
         "JSON-RPC 2.0 call to an operator-configured endpoint -> {result}"),
)

ENDPOINT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
_DEFAULT_PORTS = {"http": 80, "https": 443}
_MAX_ERROR_MESSAGE = 1000


@dataclass(frozen=True, slots=True)
class _Target:
    """A parsed, validated endpoint URL."""

    scheme: str
    host: str  # lower-case hostname or IP literal (no brackets)
    port: int
    target: str  # path + query, as sent in the request line
    auth: str | None  # "user:password" from the URL, sent as Basic auth
    shown: str  # the URL without credentials, for logs and approvers

    @property
    def key(self) -> tuple[str, str, int, str, str | None]:
        return (self.scheme, self.host, self.port, self.target, self.auth)


def _parse_url(url: str) -> _Target:
    """Parse an http(s) URL; ValueError for anything else."""
    if not isinstance(url, str) or not url or any(ord(ch) < 0x21 or ord(ch) == 0x7F for ch in url):
        raise ValueError(f"not a URL: {url!r}")
    parts: SplitResult = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS:
        raise ValueError(f"{url!r}: only http and https endpoints are allowed")
    host = parts.hostname
    if not host:
        raise ValueError(f"{url!r}: no host")
    port = parts.port or _DEFAULT_PORTS[scheme]  # .port raises ValueError for a bad port
    path = parts.path or "/"
    target = path + (f"?{parts.query}" if parts.query else "")
    auth = None
    if parts.username is not None:
        auth = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
    netloc_host = f"[{host}]" if ":" in host else host
    default = port == _DEFAULT_PORTS[scheme]
    shown = f"{scheme}://{netloc_host}{'' if default else f':{port}'}{target}"
    return _Target(scheme, host, port, target, auth, shown)


def normalize_url(url: str) -> str | None:
    """A canonical form for comparing URLs (scheme and host lower-case, default port dropped,
    empty path '/', fragment dropped); None when `url` is not an allowed endpoint URL."""
    try:
        t = _parse_url(url)
    except ValueError:
        return None
    return t.shown if t.auth is None else f"{t.shown}#auth={t.auth}"


def _is_url(s: str) -> bool:
    return "://" in s


def rpc_within(child: Mapping[str, Any], parent: Mapping[str, Any]) -> bool:
    """Narrowing for rpc scopes: the same endpoint, and methods a subset of the parent's. A parent
    without `methods` authorizes nothing, so no child of it may name any."""
    if not isinstance(child.get("endpoint"), str) or child.get("endpoint") != parent.get("endpoint"):
        return False
    p_methods, c_methods = parent.get("methods"), child.get("methods")
    if not isinstance(p_methods, list):
        return not isinstance(c_methods, list) or not c_methods
    return isinstance(c_methods, list) and set(c_methods) <= set(p_methods)


class _Deadline:
    """One deadline for a whole call; shuts the socket down when it passes, so no read or
    drip-fed header can outlive it."""

    def __init__(self, timeout_s: float) -> None:
        self.end = time.monotonic() + timeout_s
        self.expired = False
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()
        self._timer = threading.Timer(timeout_s, self._expire)
        self._timer.daemon = True
        self._timer.start()

    def remaining(self) -> float:
        left = self.end - time.monotonic()
        if left <= 0:
            self.expired = True
            raise TimeoutError("deadline passed")
        return left

    def watch(self, sock: socket.socket) -> None:
        with self._lock:
            self._sock = sock
            if self.expired:
                self._shutdown()

    def _expire(self) -> None:
        with self._lock:
            self.expired = True
            self._shutdown()

    def _shutdown(self) -> None:
        if self._sock is not None:
            try:
                self._sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def cancel(self) -> None:
        self._timer.cancel()
        with self._lock:
            self._sock = None


def _connect(addrs: list[tuple[int, Any]], deadline: _Deadline) -> socket.socket:
    """Connect to the first reachable pinned address (never resolving anything)."""
    last: OSError | None = None
    for family, sockaddr in addrs:
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.settimeout(deadline.remaining())
            deadline.watch(sock)
            sock.connect(sockaddr)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return sock
        except OSError as exc:
            sock.close()
            if isinstance(exc, TimeoutError) or deadline.expired:
                raise TimeoutError("connect timed out") from None
            last = exc
    raise last or OSError("no address to connect to")


class _PinnedHTTP(http.client.HTTPConnection):
    def __init__(self, t: _Target, addrs: list[tuple[int, Any]], deadline: _Deadline) -> None:
        super().__init__(t.host, t.port, timeout=deadline.remaining())
        self._addrs = addrs
        self._deadline = deadline

    def connect(self) -> None:
        self.sock = _connect(self._addrs, self._deadline)


class _PinnedHTTPS(http.client.HTTPSConnection):
    def __init__(self, t: _Target, addrs: list[tuple[int, Any]], deadline: _Deadline, context: ssl.SSLContext) -> None:
        super().__init__(t.host, t.port, timeout=deadline.remaining(), context=context)
        self._addrs = addrs
        self._deadline = deadline
        self._ctx = context

    def connect(self) -> None:
        raw = _connect(self._addrs, self._deadline)
        try:
            # Certificate and SNI are checked against the configured host name, not the address.
            self.sock = self._ctx.wrap_socket(raw, server_hostname=self.host)
        except BaseException:
            raw.close()
            raise
        self._deadline.watch(self.sock)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


class _RpcClient:
    def __init__(self, endpoints: Mapping[str, str], timeout_s: float, max_response_bytes: int, allow_urls: bool,
                 ssl_context: ssl.SSLContext | None) -> None:
        if not timeout_s > 0:
            raise ValueError("timeout_s must be positive")
        if max_response_bytes < 1:
            raise ValueError("max_response_bytes must be positive")
        self.endpoints: dict[str, _Target] = {}
        for name, url in endpoints.items():
            if not isinstance(name, str) or not ENDPOINT_NAME.fullmatch(name):
                raise ValueError(f"rpc endpoint name {name!r} must match {ENDPOINT_NAME.pattern}")
            self.endpoints[name] = _parse_url(url)
        self.timeout_s = float(timeout_s)
        self.max_response_bytes = int(max_response_bytes)
        self.allow_urls = allow_urls
        self._ssl = ssl_context
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._pins: dict[tuple[str, int], list[tuple[int, Any]]] = {}

    # --- authorization -------------------------------------------------------------------------
    def covers(self, scope: Mapping[str, Any], sys: str, args: Mapping[str, Any]) -> bool:
        if sys != "rpc.call":
            return False
        want, method = args.get("endpoint"), args.get("method")
        have, methods = scope.get("endpoint"), scope.get("methods")
        if not isinstance(want, str) or not isinstance(method, str) or not isinstance(have, str):
            return False
        if not isinstance(methods, list) or method not in methods:
            return False  # deny by default: no `methods`, no calls
        if want in self.endpoints or not _is_url(want):
            return have == want
        if not self.allow_urls or not _is_url(have):
            return False
        a, b = normalize_url(want), normalize_url(have)
        return a is not None and a == b

    # --- describing ----------------------------------------------------------------------------
    def _target(self, endpoint: str) -> _Target:
        t = self.endpoints.get(endpoint)
        if t is not None:
            return t
        if self.allow_urls and _is_url(endpoint):
            try:
                return _parse_url(endpoint)
            except ValueError as exc:
                raise KernelError("EINVAL", str(exc)) from None
        raise KernelError("ENOENT", f"no such endpoint configured: {endpoint!r}")

    def describe(self, sys: str, args: Mapping[str, Any]) -> dict[str, Any]:
        endpoint = str(args.get("endpoint"))
        try:
            t: _Target | None = self._target(endpoint)
        except KernelError:
            t = None
        size: int | None
        try:
            size = len(self._encode_params(args.get("params")))
        except KernelError:
            size = None
        shown = endpoint if endpoint in self.endpoints or t is None else t.shown
        return {"endpoint": shown, "url": t.shown if t else None, "method": args.get("method"), "bytes": size}

    @staticmethod
    def _encode_params(params: Any) -> bytes:
        if params is None:
            return b""
        if not isinstance(params, (list, dict)):
            raise KernelError("EINVAL", "params must be an object or an array (JSON-RPC 2.0)")
        try:
            return json.dumps(params, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()
        except (TypeError, ValueError) as exc:
            raise KernelError("EINVAL", f"params are not JSON: {exc}") from None

    # --- the effect ----------------------------------------------------------------------------
    def _addresses(self, t: _Target) -> list[tuple[int, Any]]:
        """The addresses of t's host: resolved once, then pinned (no second resolution)."""
        key = (t.host, t.port)
        with self._lock:
            pinned = self._pins.get(key)
        if pinned is not None:
            return pinned
        try:
            infos = socket.getaddrinfo(t.host, t.port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
        except (OSError, UnicodeError) as exc:
            raise KernelError("EIO", f"cannot resolve {t.host!r}: {exc}") from None
        addrs: list[tuple[int, Any]] = [(int(family), sockaddr) for family, _, _, _, sockaddr in infos
                                        if family in (socket.AF_INET, socket.AF_INET6)]
        if not addrs:
            raise KernelError("EIO", f"cannot resolve {t.host!r}: no address")
        with self._lock:
            return self._pins.setdefault(key, addrs)

    def run(self, args: Mapping[str, Any], info: CallInfo) -> Any:
        t = self._target(args["endpoint"])
        method = args["method"]
        params = self._encode_params(args.get("params"))
        with self._lock:
            rid = next(self._ids)
        body = b'{"jsonrpc":"2.0","id":' + str(rid).encode() + b',"method":' + json.dumps(method).encode()
        body += (b',"params":' + params if params else b"") + b"}"
        addrs = self._addresses(t)
        deadline = _Deadline(self.timeout_s)
        conn: http.client.HTTPConnection | None = None
        resp: http.client.HTTPResponse | None = None
        try:
            if t.scheme == "https":
                conn = _PinnedHTTPS(t, addrs, deadline, self._ssl or ssl.create_default_context())
            else:
                conn = _PinnedHTTP(t, addrs, deadline)
            headers = {"Content-Type": "application/json", "Accept": "application/json",
                       "User-Agent": "agent-libos-rpc", "Connection": "close"}
            if t.auth is not None:
                headers["Authorization"] = "Basic " + base64.b64encode(t.auth.encode()).decode()
            conn.request("POST", t.target, body=body, headers=headers)
            if conn.sock is not None:
                conn.sock.settimeout(deadline.remaining())
            resp = conn.getresponse()
            if 300 <= resp.status < 400:
                raise KernelError("EIO", f"redirect refused (HTTP {resp.status} from {t.shown})")
            data = self._read_body(resp, deadline, conn)
        except KernelError:
            raise
        except (TimeoutError, OSError, http.client.HTTPException) as exc:
            if deadline.expired or isinstance(exc, TimeoutError):
                raise KernelError("ETIMEDOUT", f"rpc call to {t.shown} timed out after {self.timeout_s:g} s") from None
            raise KernelError("EIO", f"rpc call to {t.shown} failed: {type(exc).__name__}: {exc}") from None
        finally:
            deadline.cancel()
            if resp is not None:
                resp.close()  # the response holds the socket open until it is closed too
            if conn is not None:
                conn.close()
        return self._parse(data, resp.status, rid)

    def _read_body(self, resp: http.client.HTTPResponse, deadline: _Deadline, conn: http.client.HTTPConnection) -> bytes:
        limit = self.max_response_bytes
        length = resp.getheader("Content-Length")
        if length is not None and length.strip().isdigit() and int(length) > limit:
            raise KernelError("EIO", f"response too large ({int(length)} bytes; the limit is {limit})")
        data = bytearray()
        while True:
            if conn.sock is not None:
                conn.sock.settimeout(deadline.remaining())
            chunk = resp.read(min(1 << 16, limit + 1 - len(data)))
            if not chunk:
                break
            data += chunk
            if len(data) > limit:
                raise KernelError("EIO", f"response too large (over the {limit}-byte limit)")
        if deadline.expired:
            raise TimeoutError("deadline passed")
        return bytes(data)

    @staticmethod
    def _parse(data: bytes, status: int, rid: int) -> Any:
        try:
            msg = json.loads(data, parse_constant=_reject_constant)
        except (ValueError, RecursionError):
            if not 200 <= status < 300:
                raise KernelError("EIO", f"rpc endpoint answered HTTP {status}") from None
            raise KernelError("EIO", "rpc response is not JSON") from None
        if not isinstance(msg, dict) or msg.get("jsonrpc") != "2.0" or (("result" in msg) == ("error" in msg)):
            if not 200 <= status < 300:
                raise KernelError("EIO", f"rpc endpoint answered HTTP {status}")
            raise KernelError("EIO", "rpc response is not a JSON-RPC 2.0 response")
        mid = msg.get("id")
        if "error" in msg:
            err = msg["error"]
            if mid not in (rid, None) or isinstance(mid, bool):
                raise KernelError("EIO", "rpc response id does not match the request")
            if not isinstance(err, dict) or not isinstance(err.get("code"), int) or isinstance(err.get("code"), bool):
                raise KernelError("EIO", "rpc response has a malformed error object")
            message = str(err.get("message", ""))[:_MAX_ERROR_MESSAGE]
            raise KernelError("EIO", f"rpc error {err['code']}: {message}")
        if mid != rid or isinstance(mid, bool):
            raise KernelError("EIO", "rpc response id does not match the request")
        if not 200 <= status < 300:
            raise KernelError("EIO", f"rpc endpoint answered HTTP {status}")
        check_bus_value(msg["result"], "rpc")
        return {"result": msg["result"]}


def make_rpc_provider(
    endpoints: Mapping[str, str],
    *,
    timeout_s: float = 10.0,
    max_response_bytes: int = 1 << 20,
    allow_urls: bool = False,
    ssl_context: ssl.SSLContext | None = None,
) -> Provider:
    """The `rpc` provider over the operator's endpoint table `{name: http(s) URL}`.

    `allow_urls` lets a capability name a URL instead of an endpoint name (compared after
    normalization); `ssl_context` overrides the default certificate verification for https.
    Raises ValueError for a malformed table."""
    client = _RpcClient(endpoints, timeout_s, max_response_bytes, allow_urls, ssl_context)
    return Provider(
        kind="rpc",
        syscalls=RPC_SYSCALLS,
        covers=client.covers,
        run=client.run,
        describe=client.describe,
        scope_keys={"endpoint": "str", "methods": "list[str]"},
        within=rpc_within,
    )
