"""The local web supervision console: a Starlette app served by uvicorn beside an embedded Runtime.

Reads go through the operator API (`op.ps`, `op.caps`, `op.budget`, `op.approvals`, `op.images`)
and the read-only log; every action (approve, deny, kill, revoke) is an operator request through
the kernel, so it is decided and logged like any other. Events come from the kernel's PUB socket
and reach the page by Server-Sent Events.

Security model: one random access token per server (printed in the URL, as Jupyter does), traded
once for an HttpOnly SameSite=Strict cookie; a CSRF token in every form; a strict
Content-Security-Policy (no inline script, no framing). Everything an agent may have written
(model output, tool arguments and results, file names, approval renderings) is untrusted: Jinja2
autoescapes it, control and bidi characters are shown as `\\xNN` escapes, and the page's script
only ever assigns `textContent`.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import hmac
import json
import re
import secrets
import signal
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, MutableMapping
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode

import uvicorn
from jinja2 import Environment, PackageLoader, select_autoescape
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, PlainTextResponse, RedirectResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from agentlibos.bus import KernelError
from agentlibos.runtime import Runtime
from agentlibos.storage import SQLiteLog

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

#: Sent with every response, the 403 refusals included.
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
       "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")
SECURITY_HEADERS = {
    "content-security-policy": CSP,
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    "referrer-policy": "same-origin",
    "cache-control": "no-store",
    "cross-origin-opener-policy": "same-origin",
    "cross-origin-resource-policy": "same-origin",
}
TOPICS = ("audit", "proc", "approval", "llm")
LIVE_STATES = ("embryo", "ready", "running", "blocked", "suspended")
SUSPEND_NOTE = "a suspended process's requests wait, undecided, until it is resumed"

# Control characters (ANSI escapes start with ESC), and bidi/zero-width characters that could make
# text read differently from what it is: shown as \xNN / \uNNNN, never interpreted.
_INVISIBLE = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u200b-\u200f\u202a-\u202e\u2066-\u2069\ufeff]")


def visible(value: Any) -> str:
    """Text as written, with control, ANSI and bidi characters made visible (`\\x1b`, `\\u202e`)."""
    text = value if isinstance(value, str) else _jsonish(value)

    def sub(m: re.Match[str]) -> str:
        o = ord(m.group())
        return f"\\x{o:02x}" if o < 0x100 else f"\\u{o:04x}"

    return _INVISIBLE.sub(sub, text)


def _jsonish(value: Any) -> str:
    if value is None:
        return ""
    return json.dumps(value, ensure_ascii=False, default=_json_default, sort_keys=True)


def _json_default(value: Any) -> Any:
    if isinstance(value, bytes):
        return f"<{len(value)} bytes>"
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    return str(value)


def new_token() -> str:
    """A fresh random access token (256 bits, URL-safe)."""
    return secrets.token_urlsafe(32)


# --- the event hub ---------------------------------------------------------------------------


class EventHub:
    """Subscribes to the kernel's event stream on one thread and keeps the newest events in a ring.

    Each event gets an increasing id (the SSE `id:`), so a page that reconnects asks for what it
    missed with `Last-Event-ID`. PUB drops messages for slow subscribers; the log is the record.
    """

    def __init__(self, rt: Runtime, maxlen: int = 5000) -> None:
        self._rt = rt
        self._ring: collections.deque[dict[str, Any]] = collections.deque(maxlen=maxlen)
        self._lock = threading.Lock()
        self._next = 1
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="console-events", daemon=True)

    def start(self) -> EventHub:
        self._thread.start()
        self._ready.wait(10)
        time.sleep(0.1)  # let the SUB socket's subscription reach the PUB socket (slow joiner)
        return self

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5)

    @property
    def closed(self) -> bool:
        return self._stop.is_set()

    def _run(self) -> None:
        stream = self._rt.events(*(t + "/" for t in TOPICS))
        self._ready.set()
        try:
            while not self._stop.is_set():
                ev = stream.next_event(timeout_s=0.2)
                if ev is None:
                    continue
                topic, body = ev
                name = getattr(topic, "value", str(topic))
                if name.count("/") != 1:  # proc/<pid>/ repeats what proc/ carries
                    continue
                self.publish(name.rstrip("/"), body)
        finally:
            stream.close()

    def publish(self, topic: str, body: dict[str, Any]) -> None:
        with self._lock:
            self._ring.append({"id": self._next, "topic": topic, "ts": time.time(), "body": body})
            self._next += 1

    def since(self, last_id: int, topics: tuple[str, ...] = TOPICS) -> list[dict[str, Any]]:
        with self._lock:
            return [e for e in self._ring if e["id"] > last_id and e["topic"] in topics]


# --- the guard: token, cookie, security headers ----------------------------------------------


def _cookie_name(scope: Scope) -> str:
    # Cookies are not isolated by port: name the cookie after it so two consoles do not collide.
    server = scope.get("server") or ("", 0)
    return f"agentlibos_console_{server[1] or 0}"


def _csrf_for(token: str) -> str:
    return hmac.new(token.encode(), b"agentlibos-console-csrf", hashlib.sha256).hexdigest()


class _Guard:
    """Every request needs the token (`?token=` once, then the cookie); every response gets the
    security headers. A request with a good `?token=` is redirected to the same URL without it,
    so the token does not stay in the address bar or the history."""

    def __init__(self, app: ASGIApp, token: str) -> None:
        self.app = app
        self.token = token

    def _ok(self, given: str | None) -> bool:
        return bool(given) and hmac.compare_digest(str(given).encode(), self.token.encode())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", [])
                           if k.decode("latin-1").lower() not in SECURITY_HEADERS]
                headers += [(k.encode(), v.encode()) for k, v in SECURITY_HEADERS.items()]
                message["headers"] = headers
            await send(message)

        request = Request(scope)
        name = _cookie_name(scope)
        if "token" in request.query_params:
            if not self._ok(request.query_params.get("token")):
                await _refuse(scope, receive, send_with_headers)
                return
            rest = [(k, v) for k, v in request.query_params.multi_items() if k != "token"]
            target = request.url.path + (("?" + urlencode(rest)) if rest else "")
            resp = RedirectResponse(target, status_code=303)
            resp.set_cookie(name, self.token, httponly=True, samesite="strict", path="/")
            await resp(scope, receive, send_with_headers)
            return
        if not self._ok(request.cookies.get(name)):
            await _refuse(scope, receive, send_with_headers)
            return
        await self.app(scope, receive, send_with_headers)


async def _refuse(scope: Scope, receive: Receive, send: Send) -> None:
    resp = PlainTextResponse("403 Forbidden: this console needs its access token; open the URL that "
                             "`agentlibos console` printed.\n", status_code=403)
    await resp(scope, receive, send)


# --- reading the runtime ---------------------------------------------------------------------


class _Reader:
    """What the pages show, read through operator requests and the read-only log."""

    def __init__(self, rt: Runtime, log_path: Path) -> None:
        self.rt = rt
        self.log_path = log_path
        self._log: SQLiteLog | None = None
        self._log_lock = threading.Lock()
        self._verify: tuple[float, dict[str, Any]] | None = None

    def log(self) -> SQLiteLog | None:
        with self._log_lock:
            if self._log is None and self.log_path.exists():
                self._log = SQLiteLog.open_readonly(self.log_path)
            return self._log

    def close(self) -> None:
        with self._log_lock:
            if self._log is not None:
                self._log.close()
                self._log = None

    def processes(self) -> dict[str, Any]:
        procs = self.rt.ps()
        caps = self.rt.caps()
        by_pid = {p["pid"]: p for p in procs}
        for p in procs:
            p["live"] = p.get("state") in LIVE_STATES
            p["children"] = []
            p["budget"] = None
            if p["live"]:
                try:
                    view = self.rt.operator.call("op.budget", {"pid": p["pid"]})
                except KernelError:
                    view = None
                p["budget"] = _budget_rows(view) if view else None
            p["caps"] = _cap_forest([c for c in caps if c.get("holder") == p["pid"]])
        roots: list[dict[str, Any]] = []
        for p in sorted(procs, key=lambda p: p["pid"]):
            parent = by_pid.get(p.get("ppid")) if p.get("ppid") is not None else None
            (parent["children"] if parent is not None else roots).append(p)
        return {"roots": roots, "count": len(procs), "live": sum(1 for p in procs if p["live"])}

    def approvals(self) -> list[dict[str, Any]]:
        return list(self.rt.operator.call("op.approvals").get("approvals", []))

    def images(self) -> list[dict[str, Any]]:
        return self.rt.images()

    def checkpoints(self, live: set[int]) -> list[dict[str, Any]]:
        """The newest checkpoints in the log; `live` (pids) says which can be restored now."""
        log = self.log()
        if log is None:
            return []
        out: collections.deque[dict[str, Any]] = collections.deque(maxlen=200)
        for e in log.entries(1, kinds=["ckpt.create"]):
            out.append({"seq": e.seq, "ts": e.ts, "author": "process", **e.body})
        return [{**c, "live": c.get("pid") in live} for c in out]

    def verify(self, max_age_s: float = 5.0) -> dict[str, Any]:
        now = time.monotonic()
        if self._verify is not None and now - self._verify[0] < max_age_s:
            return self._verify[1]
        log = self.log()
        if log is None:
            result: dict[str, Any] = {"ok": None, "text": "no log yet"}
        else:
            r = log.verify()
            result = {"ok": r.ok, "checked": r.checked, "head": r.head_seq, "first_bad_seq": r.first_bad_seq,
                      "reason": r.reason,
                      "text": (f"verified: {r.checked} entries, head seq {r.head_seq}" if r.ok else
                               f"DOES NOT VERIFY: first bad seq {r.first_bad_seq}: {r.reason}")}
        self._verify = (now, result)
        return result

    def process_entries(self, pid: int, limit: int = 300) -> list[dict[str, Any]]:
        log = self.log()
        if log is None:
            return []
        out: collections.deque[dict[str, Any]] = collections.deque(maxlen=limit)
        for e in log.entries(1, pid=pid):
            out.append({"seq": e.seq, "ts": e.ts, "kind": e.kind, "cause": e.cause, "body": e.body,
                        "has_payload": e.payload_digest is not None})
        for row in out:
            if row["has_payload"]:
                try:
                    stored, value = log.payload(row["seq"])
                except Exception as exc:  # a corrupt payload is shown, not fatal
                    stored, value = True, f"(unreadable payload: {exc})"
                row["payload"] = value if stored else "(payload purged by retention)"
                row["payload_size"] = len(_jsonish(row["payload"]))
        return list(out)


def _budget_rows(view: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for dim, v in view.items():
        if not isinstance(v, dict) or v.get("limit") is None:
            continue
        rows.append({"dim": dim, "used": _num(v.get("used")), "left": _num(v.get("remaining")),
                     "limit": _num(v.get("limit")), "own": v.get("own", True)})
    return rows


def _num(x: Any) -> str:
    if x is None:
        return ""
    if isinstance(x, float) and not x.is_integer():
        return f"{x:.2f}"
    return str(int(x)) if isinstance(x, float) else str(x)


def _cap_forest(caps: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A process's capabilities as a derivation forest; a parent held elsewhere is noted, not nested."""
    ids = {c["cap"] for c in caps}
    for c in caps:
        c["children"] = []
    by_id = {c["cap"]: c for c in caps}
    roots: list[dict[str, Any]] = []
    for c in sorted(caps, key=lambda c: c["cap"]):
        parent = c.get("parent")
        c["parent_elsewhere"] = parent is not None and parent not in ids
        if parent is not None and parent in ids:
            by_id[parent]["children"].append(c)
        else:
            roots.append(c)
    return roots


# --- the app ---------------------------------------------------------------------------------


def _templates() -> Environment:
    env = Environment(loader=PackageLoader("agentlibos.console", "templates"),
                      autoescape=select_autoescape(["html"], default_for_string=True, default=True))
    env.filters["visible"] = visible
    env.filters["num"] = _num
    env.filters["clock"] = lambda ts: time.strftime("%H:%M:%S", time.localtime(ts)) if ts else ""
    env.globals["SUSPEND_NOTE"] = SUSPEND_NOTE
    return env


class _Console:
    def __init__(self, rt: Runtime, token: str, hub: EventHub | None, log_path: Path) -> None:
        self.rt = rt
        self.token = token
        self.csrf = _csrf_for(token)
        self.hub = hub
        self.reader = _Reader(rt, log_path)
        self.env = _templates()
        self.stopping = threading.Event()

    # -- rendering
    def render(self, name: str, status_code: int = 200, **ctx: Any) -> HTMLResponse:
        ctx.setdefault("csrf", self.csrf)
        ctx.setdefault("here", "/")
        ctx.setdefault("state_dir", str(self.rt.state_dir))
        return HTMLResponse(self.env.get_template(name).render(**ctx), status_code=status_code)

    def index(self, request: Request) -> Response:
        procs = self.reader.processes()
        live = {p["pid"] for p in _walk(procs["roots"]) if p["live"]}
        return self.render("index.html", procs=procs, approvals=self.reader.approvals(),
                           images=self.reader.images(), checkpoints=self.reader.checkpoints(live),
                           verify=self.reader.verify(), notice=request.query_params.get("notice", ""),
                           error=request.query_params.get("error", ""))

    def fragment(self, request: Request) -> Response:
        which = request.path_params["name"]
        if which == "procs":
            return self.render("_procs.html", procs=self.reader.processes())
        if which == "approvals":
            return self.render("_approvals.html", approvals=self.reader.approvals())
        if which == "verify":
            return self.render("_verify.html", verify=self.reader.verify())
        return PlainTextResponse("no such fragment", status_code=404)

    def process(self, request: Request) -> Response:
        pid = request.path_params["pid"]
        procs = {p["pid"]: p for p in _walk(self.reader.processes()["roots"])}
        if pid not in procs:
            return self.render("error.html", status_code=404, message=f"no process {pid}")
        return self.render("process.html", p=procs[pid], here=f"/procs/{pid}", entries=self.reader.process_entries(pid),
                           notice=request.query_params.get("notice", ""), error=request.query_params.get("error", ""))

    # -- actions
    async def action(self, request: Request) -> Response:
        form = await _form(request)
        refusal = self._check_post(request, form)
        if refusal is not None:
            return refusal
        what = request.path_params["action"]
        back = form.get("next", "/")
        if not back.startswith("/") or back.startswith("//"):
            back = "/"
        handler = getattr(self, "_do_" + what, None)
        if handler is None:
            return PlainTextResponse(f"no action {what!r}", status_code=404)
        try:
            notice = await asyncio.to_thread(handler, form)
        except _Unsupported as exc:
            return PlainTextResponse(f"ENOSYS: {exc}\n", status_code=501)
        except (KernelError, ValueError, KeyError) as exc:
            return RedirectResponse(_with(back, error=str(exc)), status_code=303)
        return RedirectResponse(_with(back, notice=notice), status_code=303)

    def _check_post(self, request: Request, form: dict[str, str]) -> Response | None:
        origin = request.headers.get("origin")
        if origin is not None and origin != f"{request.url.scheme}://{request.headers.get('host', '')}":
            return PlainTextResponse("403 Forbidden: cross-origin request\n", status_code=403)
        if not hmac.compare_digest(form.get("csrf", "").encode(), self.csrf.encode()):
            return PlainTextResponse("403 Forbidden: missing or wrong CSRF token\n", status_code=403)
        return None

    def _do_approve(self, form: dict[str, str]) -> str:
        aid = int(form["id"])
        self.rt.operator.call("op.approve", {"id": aid, "author": "console"})
        return f"approved #{aid}"

    def _do_deny(self, form: dict[str, str]) -> str:
        aid = int(form["id"])
        self.rt.operator.call("op.deny", {"id": aid, "reason": form.get("reason", ""), "author": "console"})
        return f"denied #{aid}"

    def _do_kill(self, form: dict[str, str]) -> str:
        killed = self.rt.kill(int(form["pid"]))
        return "killed " + (", ".join(f"pid {k}" for k in killed) or "nothing (already ended)")

    def _do_revoke(self, form: dict[str, str]) -> str:
        if form.get("cap"):
            revoked = list(self.rt.operator.call("op.revoke", {"cap": int(form["cap"])})["revoked"])
        else:
            revoked = self.rt.revoke(int(form["pid"]), form["handle"])
        return "revoked " + ", ".join(f"cap {c}" for c in revoked)

    def _do_suspend(self, form: dict[str, str]) -> str:
        pid = int(form["pid"])
        self.rt.operator.call("op.suspend", {"pid": pid})
        return f"suspended pid {pid}"

    def _do_resume(self, form: dict[str, str]) -> str:
        pid = int(form["pid"])
        self.rt.operator.call("op.resume", {"pid": pid})
        return f"resumed pid {pid}"

    def _do_interrupt(self, form: dict[str, str]) -> str:
        pid = int(form["pid"])
        ended = self.rt.interrupt(pid)
        return f"interrupted pid {pid}: " + (f"{ended} waiting request(s) ended" if ended else "its next syscall gets EINTR")

    def _do_send(self, form: dict[str, str]) -> str:
        pid, text = int(form["pid"]), form.get("text", "")
        if not text.strip():
            raise ValueError("nothing to send: write the follow-up message first")
        self.rt.send(pid, text)
        return f"sent a message to pid {pid}"

    def _do_deadline(self, form: dict[str, str]) -> str:
        pid, raw = int(form["pid"]), form.get("seconds", "").strip()
        seconds = float(raw) if raw else None
        if seconds is not None and not seconds >= 0:
            raise ValueError("the deadline is a number of seconds >= 0")
        self.rt.deadline(pid, seconds)
        return f"pid {pid}: " + (f"killed in {seconds:g} s unless it ends first" if seconds is not None else "no deadline")

    def _do_checkpoint(self, form: dict[str, str]) -> str:
        pid, label = int(form["pid"]), form.get("label", "").strip() or None
        cid = self.rt.checkpoint(pid, label)
        return f"checkpoint {cid} of pid {pid}" + (f" ({label})" if label else "")

    def _do_restore(self, form: dict[str, str]) -> str:
        pid, cid = int(form["pid"]), int(form["checkpoint"])
        self.rt.restore(pid, cid)
        return (f"pid {pid} rolled back to checkpoint {cid}: capabilities revoked since stay dead, those granted "
                f"since are dropped, budget spent stays spent")

    # -- the event stream
    async def events(self, request: Request) -> Response:
        try:
            last = int(request.headers.get("last-event-id") or request.query_params.get("after") or 0)
        except ValueError:
            last = 0
        hub = self.hub

        async def stream() -> Any:
            nonlocal last
            yield "retry: 1000\n\n"
            quiet = 0.0
            while hub is not None and not hub.closed and not self.stopping.is_set():
                batch = hub.since(last)
                for e in batch:
                    last = e["id"]
                    data = json.dumps({"topic": e["topic"], "ts": e["ts"], "body": e["body"]}, default=_json_default)
                    yield f"id: {e['id']}\nevent: {e['topic']}\ndata: {data}\n\n"
                if batch:
                    quiet = 0.0
                else:
                    quiet += 0.2
                    if quiet >= 15:
                        quiet = 0.0
                        yield ": keep-alive\n\n"
                    await asyncio.sleep(0.2)
                if await request.is_disconnected():
                    break

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"x-accel-buffering": "no"})


class _Unsupported(Exception):
    pass


def _walk(roots: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for p in roots:
        yield p
        yield from _walk(p["children"])


def _with(url: str, **params: str) -> str:
    base = url.split("?", 1)[0]
    return base + "?" + urlencode({k: v[:300] for k, v in params.items()})


async def _form(request: Request) -> dict[str, str]:
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    body = await request.body()
    if ctype != "application/x-www-form-urlencoded" or len(body) > 64 * 1024:
        return {}
    return {k: v[0] for k, v in parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True).items()}


def make_app(rt: Runtime, token: str, *, hub: EventHub | None = None, log_path: Path | None = None) -> Any:
    """The console as an ASGI app for a started Runtime. Every request needs `token`.

    Pass a started `EventHub` for the live event stream (`ConsoleServer` does); without one the
    stream sends nothing.
    """
    if not token:
        raise ValueError("the console needs a non-empty access token")
    console = _Console(rt, token, hub, log_path or Path(rt.state_dir) / "log.db")
    static = Path(__file__).resolve().parent / "static"
    app = Starlette(routes=[
        Route("/", console.index),
        Route("/procs/{pid:int}", console.process),
        Route("/fragments/{name}", console.fragment),
        Route("/events", console.events),
        Route("/actions/{action}", console.action, methods=["POST"]),
        Mount("/static", StaticFiles(directory=static), name="static"),
    ])
    app.state.console = console
    guarded = _Guard(app, token)
    guarded.console = console  # type: ignore[attr-defined]
    return guarded


# --- serving ---------------------------------------------------------------------------------


class _Server(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, on_exit: Callable[[], None]) -> None:
        super().__init__(config)
        self._on_exit = on_exit
        self.on_started: Callable[[], None] | None = None

    async def startup(self, sockets: Any = None) -> None:
        await super().startup(sockets=sockets)
        if self.started and self.on_started is not None:
            self.on_started()

    def handle_exit(self, sig: int, frame: Any) -> None:
        self._on_exit()
        super().handle_exit(sig, frame)


class ConsoleServer:
    """Serve the console for a started Runtime on `host:port` (port 0 picks a free one).

    `start()` runs uvicorn on a thread (tests); `serve_forever()` runs it on the calling thread
    until SIGINT/SIGTERM (the `agentlibos console` command).
    """

    def __init__(self, rt: Runtime, *, host: str = "127.0.0.1", port: int = 0, token: str | None = None) -> None:
        self.rt = rt
        self.host = host
        self.token = token or new_token()
        self.hub = EventHub(rt)
        self.app = make_app(rt, self.token, hub=self.hub)
        self._console: _Console = self.app.console
        config = uvicorn.Config(self.app, host=host, port=port, log_level="warning", lifespan="off",
                                access_log=False, timeout_graceful_shutdown=2, server_header=False)
        self._server = _Server(config, self._console.stopping.set)
        self._thread: threading.Thread | None = None
        self.port = port

    @property
    def base_url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def url(self) -> str:
        """The URL to open, with the access token."""
        return f"{self.base_url}/?token={self.token}"

    def _bound_port(self) -> int:
        for s in self._server.servers:
            for sock in s.sockets:
                return int(sock.getsockname()[1])
        return self.port

    def start(self, timeout_s: float = 15) -> ConsoleServer:
        self.hub.start()
        self._thread = threading.Thread(target=self._server.run, name="console-http", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.hub.close()
                raise RuntimeError(f"the console could not listen on {self.host}:{self.port}")
            time.sleep(0.02)
        self.port = self._bound_port()
        return self

    def serve_forever(self, on_ready: Callable[[ConsoleServer], None] | None = None) -> None:
        self.hub.start()

        def ready() -> None:
            self.port = self._bound_port()
            if on_ready is not None:
                on_ready(self)

        self._server.on_started = ready
        # uvicorn re-raises the signal that stopped it once it has shut down; with the default
        # handlers that would end the interpreter before the Runtime could stop cleanly.
        previous = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                previous[sig] = signal.signal(sig, lambda *_: None)
        try:
            self._server.run()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self._console.stopping.set()
            self.hub.close()
            self._console.reader.close()

    def stop(self) -> None:
        self._console.stopping.set()
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(10)
        self.hub.close()
        self._console.reader.close()

    def __enter__(self) -> ConsoleServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def serve(state: str | Path, *, host: str = "127.0.0.1", port: int = 8765, world_root: str | None = None,
          token: str | None = None, announce: Callable[[str], None] | None = None) -> None:
    """Start a Runtime on `state` and serve its console until SIGINT/SIGTERM (`agentlibos console`)."""
    say = announce or (lambda text: print(text, flush=True))
    with Runtime(state, world_root=world_root) as rt:
        server = ConsoleServer(rt, host=host, port=port, token=token)
        server.serve_forever(on_ready=lambda s: say(
            f"agentlibos console for {rt.state_dir}\n    {s.url}\n(the token is needed for every request; "
            "Ctrl-C stops the console and its kernel)"))

