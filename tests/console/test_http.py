"""The console over plain HTTP: the token, the CSRF token, the headers, escaping, actions, SSE."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator

import httpx
import pytest

from agentlibos.console import CSP, ConsoleServer, make_app, visible
from agentlibos.storage import SQLiteLog
from tests.console.conftest import ANSI, SCRIPT, Env, gate, start_evil, ws


@pytest.fixture
def web(env: Env) -> Iterator[httpx.Client]:
    """A client that has traded the URL's token for the cookie."""
    with httpx.Client(base_url=env.server.base_url, timeout=15) as c:
        r = c.get(f"/?token={env.server.token}")
        assert r.status_code == 303
        yield c


def _csrf(env: Env) -> str:
    return str(env.server.app.console.csrf)


def _ops(env: Env, name: str) -> list[dict]:
    with SQLiteLog.open_readonly(env.rt.state_dir / "log.db") as log:
        return [e.body for e in log.entries(1, kinds=["op"]) if e.body.get("sys") == name]


# --- the token -------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/", "/events", "/static/console.js", "/static/console.css", "/fragments/procs",
                                  "/procs/1", "/nope"])
def test_every_request_needs_the_token(env: Env, path: str) -> None:
    r = httpx.get(env.server.base_url + path, timeout=10)
    assert r.status_code == 403
    assert "token" in r.text
    assert r.headers["content-security-policy"] == CSP


def test_actions_need_the_token(env: Env) -> None:
    r = httpx.post(env.server.base_url + "/actions/kill", data={"pid": "1", "csrf": _csrf(env)}, timeout=10)
    assert r.status_code == 403


def test_wrong_token_and_wrong_cookie_are_refused(env: Env) -> None:
    base = env.server.base_url
    assert httpx.get(f"{base}/?token=not-the-token", timeout=10).status_code == 403
    assert httpx.get(f"{base}/?token=", timeout=10).status_code == 403
    name = f"agentlibos_console_{env.server.port}"
    assert httpx.get(base + "/", cookies={name: "not-the-token"}, timeout=10).status_code == 403
    # the right token under another console's cookie name does not count either
    assert httpx.get(base + "/", cookies={"agentlibos_console_1": env.server.token}, timeout=10).status_code == 403


def test_token_is_traded_for_a_strict_httponly_cookie(env: Env) -> None:
    c = httpx.Client(base_url=env.server.base_url, timeout=10)
    r = c.get(f"/procs/1?token={env.server.token}&x=1")
    c.close()
    c = httpx.Client(base_url=env.server.base_url, timeout=10, cookies=c.cookies)
    assert r.status_code == 303
    assert r.headers["location"] == "/procs/1?x=1"  # the token does not stay in the address bar
    cookie = r.headers["set-cookie"]
    assert f"agentlibos_console_{env.server.port}={env.server.token}" in cookie
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie.replace("Strict", "strict")
    r = c.get("/")
    c.close()
    assert r.status_code == 200
    assert "agent-libos console" in r.text


def test_server_listens_on_loopback_with_a_fresh_token(env: Env) -> None:
    assert env.server.host == "127.0.0.1"
    assert env.server.url.startswith("http://127.0.0.1:")
    assert len(env.server.token) >= 40
    other = ConsoleServer(env.rt)
    assert other.token != env.server.token
    with pytest.raises(ValueError):
        make_app(env.rt, "")


# --- headers ---------------------------------------------------------------------------------


def test_strict_csp_and_no_inline_script(env: Env, web: httpx.Client) -> None:
    for path in ("/", "/fragments/procs", "/fragments/approvals", "/static/console.js"):
        r = web.get(path)
        assert r.status_code == 200, path
        csp = r.headers["content-security-policy"]
        assert csp == CSP
        for directive in ("default-src 'self'", "script-src 'self'", "object-src 'none'", "frame-ancestors 'none'"):
            assert directive in csp
        assert "unsafe-inline" not in csp and "unsafe-eval" not in csp
        assert r.headers["x-content-type-options"] == "nosniff"
        assert r.headers["x-frame-options"] == "DENY"
        assert r.headers["referrer-policy"] == "same-origin"
    page = web.get("/").text
    scripts = re.findall(r"<script\b[^>]*>", page)
    assert scripts and all("src=" in s for s in scripts)
    assert not re.search(r"\son[a-z]+\s*=", page), "no inline event handlers"


# --- CSRF and actions ------------------------------------------------------------------------


def _blocked(env: Env, steps_after: list[dict] | None = None) -> tuple[int, int]:
    env.image("gated", [{"tool": "fs_write", "args": {"path": "outbox/out.txt", "data": "hi"}, "cap": "gate"},
                        *(steps_after or [])])
    pid = env.start("gated", [ws(), gate()])
    aid = env.wait_for(lambda: [a["id"] for a in env.pending(pid)], what="a pending approval")[0]
    return pid, aid


def test_post_needs_the_csrf_token(env: Env, web: httpx.Client) -> None:
    pid, aid = _blocked(env)
    assert web.post("/actions/approve", data={"id": str(aid)}).status_code == 403
    assert web.post("/actions/approve", data={"id": str(aid), "csrf": "0" * 64}).status_code == 403
    assert web.post("/actions/approve", json={"id": aid, "csrf": _csrf(env)}).status_code == 403  # form posts only
    r = web.post("/actions/approve", data={"id": str(aid), "csrf": _csrf(env)},
               headers={"origin": "http://evil.example"})
    assert r.status_code == 403
    assert [a["id"] for a in env.pending(pid)] == [aid], "nothing was approved"
    r = web.post("/actions/approve", data={"id": str(aid), "csrf": _csrf(env), "next": "/"})
    assert r.status_code == 303 and r.headers["location"].startswith("/?notice=approved")
    assert env.rt.wait(pid, timeout_s=15).status == "ok"
    assert (env.world / "outbox" / "out.txt").read_text() == "hi"
    approve = _ops(env, "op.approve")
    assert approve and approve[-1]["author"] == "operator"


def test_deny_tells_the_agent(env: Env, web: httpx.Client) -> None:
    pid, aid = _blocked(env)
    r = web.post("/actions/deny", data={"id": str(aid), "reason": "not today", "csrf": _csrf(env)})
    assert r.status_code == 303
    assert env.rt.wait(pid, timeout_s=15).status == "ok"
    assert not (env.world / "outbox" / "out.txt").exists()
    assert _ops(env, "op.deny")


def test_kill_and_revoke_are_operator_requests(env: Env, web: httpx.Client) -> None:
    pid, _ = _blocked(env)
    cap = next(x for x in env.rt.caps(pid) if x["handle"] == "ws")
    r = web.post("/actions/revoke", data={"cap": str(cap["cap"]), "csrf": _csrf(env), "next": f"/procs/{pid}"})
    assert r.status_code == 303 and r.headers["location"].startswith(f"/procs/{pid}?notice=revoked")
    assert next(x for x in env.rt.caps(pid) if x["handle"] == "ws")["revoked"]
    r = web.post("/actions/kill", data={"pid": str(pid), "csrf": _csrf(env)})
    assert r.status_code == 303
    assert env.rt.wait(pid, timeout_s=15).status == "killed"
    assert _ops(env, "op.revoke") and _ops(env, "op.kill")


def test_kernel_errors_are_shown_not_raised(env: Env, web: httpx.Client) -> None:
    r = web.post("/actions/approve", data={"id": "999", "csrf": _csrf(env)})
    assert r.status_code == 303 and "error=" in r.headers["location"]
    page = web.get(r.headers["location"])
    assert page.status_code == 200 and 'class="error"' in page.text


def test_open_redirects_are_not_followed(env: Env, web: httpx.Client) -> None:
    r = web.post("/actions/approve", data={"id": "999", "csrf": _csrf(env), "next": "//evil.example/x"})
    assert r.headers["location"].startswith("/?")


def test_suspend_and_resume_go_through_the_kernel(env: Env, web: httpx.Client) -> None:
    pid, _aid = _blocked(env)
    state = lambda: next(p["state"] for p in env.rt.ps() if p["pid"] == pid)  # noqa: E731
    r = web.post("/actions/suspend", data={"pid": str(pid), "csrf": _csrf(env)})
    assert r.status_code == 303 and "notice=" in r.headers["location"], r.headers["location"]
    assert state() == "suspended"
    assert 'data-action="resume"' in web.get("/").text
    r = web.post("/actions/resume", data={"pid": str(pid), "csrf": _csrf(env)})
    assert r.status_code == 303 and "notice=" in r.headers["location"]
    assert state() != "suspended"
    assert web.post("/actions/format-disk", data={"csrf": _csrf(env)}).status_code == 404


# --- untrusted text --------------------------------------------------------------------------


def test_agent_text_is_escaped(env: Env, web: httpx.Client) -> None:
    pid = start_evil(env)
    for url in (f"/procs/{pid}", "/", "/fragments/approvals"):
        text = web.get(url).text
        assert SCRIPT not in text and "<b id=injected>" not in text and "<img src=x" not in text, url
        assert "\x1b" not in text, url
    proc_page = web.get(f"/procs/{pid}").text
    assert "&lt;script&gt;document.title=&#39;pwned&#39;;alert(&#39;xss&#39;)&lt;/script&gt;" in proc_page
    assert "\\x1b[31mred\\x1b[0m" in proc_page  # ANSI shown, not interpreted
    assert "&lt;img src=x onerror=alert(1)&gt;.txt" in web.get("/fragments/approvals").text


def test_visible_shows_control_and_bidi_characters() -> None:
    assert visible(ANSI) == "\\x1b[31mred\\x1b[0m"
    assert visible("a\u202eb\u200bc") == "a\\u202eb\\u200bc"
    assert visible("line\nnext\ttab") == "line\nnext\ttab"
    assert visible({"k": "<v>"}) == '{"k": "<v>"}'


# --- views -----------------------------------------------------------------------------------


def test_dashboard_shows_processes_budgets_caps_and_verify(env: Env, web: httpx.Client) -> None:
    pid, aid = _blocked(env)
    page = web.get("/").text
    assert f'id="proc-{pid}"' in page and 'data-state="blocked"' in page
    assert "llm_calls" in page and "syscalls" in page  # budget rows
    assert 'data-handle="ws"' in page and 'data-handle="gate"' in page  # caps
    assert f'id="approval-{aid}"' in page and "outbox/out.txt" in page  # the kernel's rendering
    assert "verified:" in page
    assert 'data-action="suspend"' in page
    assert "gated" in page  # images


def test_derived_caps_nest_under_their_parent(env: Env) -> None:
    env.image("deriver", [{"tool": "fs_write", "args": {"path": "outbox/x", "data": "x"}, "cap": "gate"}])
    pid = env.start("deriver", [ws(), gate()])
    env.wait_for(lambda: env.pending(pid), what="a pending approval")
    parent = next(x for x in env.rt.caps(pid) if x["handle"] == "ws")
    from agentlibos.console._app import _cap_forest

    child = {**parent, "cap": 999, "handle": "narrow", "parent": parent["cap"], "via": "cap.derive"}
    other = {**parent, "cap": 1000, "handle": "far", "parent": 12345, "via": "cap.derive"}
    forest = _cap_forest([dict(parent), child, other])
    assert [c["handle"] for c in forest] == ["ws", "far"]
    assert [c["handle"] for c in forest[0]["children"]] == ["narrow"]
    assert forest[1]["parent_elsewhere"] is True


def test_event_stream_sends_audit_events(env: Env, web: httpx.Client) -> None:
    env.image("writer", [{"tool": "fs_write", "args": {"path": "workspace/a.txt", "data": "a"}, "cap": "ws"}])
    pid = env.start("writer", [ws()])
    assert env.rt.wait(pid, timeout_s=15).status == "ok"
    seen: list[dict] = []
    with web.stream("GET", "/events") as s:
        assert s.headers["content-type"].startswith("text/event-stream")
        assert s.headers["content-security-policy"] == CSP
        event = None
        for line in s.iter_lines():
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: "):
                seen.append({"event": event, **json.loads(line[6:])})
                if any(e["event"] == "proc" and e["body"].get("state") == "exited" for e in seen):
                    break
    audit = [e["body"] for e in seen if e["event"] == "audit"]
    assert any(a["pid"] == pid and a["sys"] == "fs.write" and a["decision"] == "allow" and a["cap"] == "ws"
               for a in audit)
    assert any(e["event"] == "llm" and e["body"]["model"] == "scripted" for e in seen)


def test_event_stream_resumes_after_last_event_id(env: Env, web: httpx.Client) -> None:
    env.image("writer", [{"tool": "fs_write", "args": {"path": "workspace/a.txt", "data": "a"}, "cap": "ws"}])
    pid = env.start("writer", [ws()])
    env.rt.wait(pid, timeout_s=15)
    hub = env.server.hub
    env.wait_for(lambda: len(hub.since(0)) >= 3, what="events in the hub")
    last = hub.since(0)[-2]["id"]
    with web.stream("GET", "/events", headers={"last-event-id": str(last)}) as s:
        ids = []
        for line in s.iter_lines():
            if line.startswith("id: "):
                ids.append(int(line[4:]))
                break
    assert ids == [last + 1]


def test_interrupt_send_and_deadline_go_through_the_kernel(env: Env, web: httpx.Client) -> None:
    pid, aid = _blocked(env)
    assert 'data-action="interrupt"' in web.get("/").text
    r = web.post("/actions/interrupt", data={"pid": str(pid), "csrf": _csrf(env)})
    assert r.status_code == 303 and "notice=interrupted" in r.headers["location"], r.headers["location"]
    assert not env.pending(pid)  # the approval it waited on ended with EINTR
    r = web.post("/actions/send", data={"pid": str(pid), "text": " ", "csrf": _csrf(env)})
    assert "error=" in r.headers["location"]
    r = web.post("/actions/deadline", data={"pid": str(pid), "seconds": "-1", "csrf": _csrf(env)})
    assert "error=" in r.headers["location"]
    r = web.post("/actions/deadline", data={"pid": str(pid), "seconds": "0", "csrf": _csrf(env)})
    assert r.status_code == 303 and "notice=" in r.headers["location"]
    assert env.rt.wait(pid, timeout_s=15).status == "deadline"  # interrupted, it waited for input
    assert _ops(env, "op.interrupt") and _ops(env, "op.deadline")


def test_checkpoint_and_restore_go_through_the_kernel(env: Env, web: httpx.Client) -> None:
    pid, _ = _blocked(env)
    assert 'data-action="checkpoint"' in web.get("/").text
    r = web.post("/actions/checkpoint", data={"pid": str(pid), "label": "before", "csrf": _csrf(env)})
    assert r.status_code == 303 and "notice=checkpoint" in r.headers["location"], r.headers["location"]
    (ck,) = env.rt.checkpoints(pid)
    assert (ck["label"], ck["author"]) == ("before", "operator")
    env.rt.revoke(pid, "ws")
    page = web.get("/").text
    assert 'data-action="restore"' in page and f'name="checkpoint" value="{ck["checkpoint"]}"' in page
    r = web.post("/actions/restore", data={"pid": str(pid), "checkpoint": str(ck["checkpoint"]), "csrf": _csrf(env)})
    assert r.status_code == 303 and "notice=pid" in r.headers["location"], r.headers["location"]
    assert _ops(env, "op.ckpt.create") and _ops(env, "op.ckpt.restore")
    # The revoked cap came back with the rollback as a handle, still dead.
    assert [c["revoked"] for c in env.rt.caps(pid) if c["handle"] == "ws"] == [True]
    # Another process's checkpoint is refused, and the console says why.
    other, _ = env.rt.spawn_external("gated")
    r = web.post("/actions/restore", data={"pid": str(other), "checkpoint": str(ck["checkpoint"]), "csrf": _csrf(env)})
    assert "error=" in r.headers["location"] and "EPERM" in r.headers["location"]
