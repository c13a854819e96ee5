"""The console in a real browser: Playwright for Python driving Debian's Chromium.

Browser downloads are impossible here, so Playwright never installs one: `.ci/run` installs the
`chromium` package and these tests launch it by `executable_path` (`$CHROMIUM` overrides).
Screenshots go to test-artifacts/console/.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.console.conftest import ANSI, EVIL_NAME, HTML, SCRIPT, Env, gate, start_evil, ws

playwright_sync = pytest.importorskip("playwright.sync_api")


def _chromium() -> str | None:
    for candidate in (os.environ.get("CHROMIUM"), "/usr/bin/chromium", shutil.which("chromium"),
                      shutil.which("chromium-browser")):
        if candidate and Path(candidate).exists():
            return candidate
    return None


CHROMIUM = _chromium()
if CHROMIUM is None and os.environ.get("CI"):
    raise RuntimeError("CI must install Debian's chromium (apt-get install chromium) for the console's browser tests")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium executable (apt-get install chromium)")

TIMEOUT_MS = 15_000


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with playwright_sync.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        yield b
        b.close()


@pytest.fixture
def page(browser: Any, env: Env) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    context.set_default_timeout(TIMEOUT_MS)
    pg = context.new_page()
    pg.dialogs = []  # type: ignore[attr-defined]
    pg.console_errors = []  # type: ignore[attr-defined]
    pg.on("dialog", lambda d: (pg.dialogs.append(d.message), d.dismiss()))  # type: ignore[attr-defined]
    pg.on("console", lambda m: pg.console_errors.append(m.text) if m.type == "error" else None)  # type: ignore[attr-defined]
    yield pg
    context.close()


def _open(page: Any, env: Env) -> None:
    page.goto(env.server.url)
    assert "token=" not in page.url  # traded for the cookie, dropped from the address bar
    page.wait_for_selector("#live.on")  # the event stream is connected


def _shot(page: Any, artifacts: Path, name: str) -> None:
    page.screenshot(path=str(artifacts / f"{name}.png"), full_page=True)


def test_open_with_token_and_see_a_running_process_appear(page: Any, env: Env, artifacts: Path) -> None:
    _open(page, env)
    assert page.locator("li.proc").count() == 0
    env.image("worker", [{"tool": "fs_write", "args": {"path": "workspace/a.txt", "data": "a"}, "cap": "ws"},
                         {"tool": "fs_write", "args": {"path": "outbox/b.txt", "data": "b"}, "cap": "gate"}])
    pid = env.start("worker", [ws(), gate()], budget={"llm_calls": 10, "syscalls": 100})
    # No reload: the page learns of the process from the event stream.
    page.wait_for_selector(f"#proc-{pid}")
    page.wait_for_selector(f'#proc-{pid}[data-state="blocked"]')
    row = page.locator(f"#proc-{pid}")
    assert "worker" in row.inner_text()
    assert row.locator("table.budget").inner_text().count("llm_calls") == 1
    assert row.locator('li.cap[data-handle="ws"]').count() == 1
    page.wait_for_selector('#audit tbody tr[data-kind="audit"]')
    _shot(page, artifacts, "process-appears")
    assert page.dialogs == []


def test_approve_and_watch_the_blocked_process_continue(page: Any, env: Env, artifacts: Path) -> None:
    env.image("gated", [{"tool": "fs_write", "args": {"path": "outbox/report.txt", "data": "done"}, "cap": "gate"},
                        {"tool": "fs_write", "args": {"path": "workspace/after.txt", "data": "after"}, "cap": "ws"}])
    pid = env.start("gated", [ws(), gate()])
    aid = env.wait_for(lambda: [a["id"] for a in env.pending(pid)], what="a pending approval")[0]
    _open(page, env)
    card = page.locator(f"#approval-{aid}")
    card.wait_for()
    assert "outbox/report.txt" in card.inner_text()  # the kernel's rendering of the effect
    _shot(page, artifacts, "approval-pending")
    card.locator('button[data-action="approve"]').click()
    page.wait_for_url("**/?notice=*")
    page.wait_for_selector(f'#proc-{pid}[data-state="exited"]')
    assert env.rt.wait(pid, timeout_s=15).status == "ok"
    assert (env.world / "outbox" / "report.txt").read_text() == "done"
    assert (env.world / "workspace" / "after.txt").read_text() == "after"
    assert page.locator(f"#approval-{aid}").count() == 0
    page.wait_for_selector('#audit tbody tr[data-kind="approval"]')
    _shot(page, artifacts, "approval-approved")


def test_revoke_a_cap_and_see_the_next_use_denied(page: Any, env: Env, artifacts: Path) -> None:
    env.image("reviser", [
        {"tool": "fs_write", "args": {"path": "workspace/draft.txt", "data": "v1"}, "cap": "ws"},
        {"tool": "fs_write", "args": {"path": "outbox/ask.txt", "data": "may I?"}, "cap": "gate"},
        {"tool": "fs_write", "args": {"path": "workspace/draft.txt", "data": "v2"}, "cap": "ws"},
    ])
    pid = env.start("reviser", [ws(), gate()], budget={"llm_calls": 10, "syscalls": 100})
    aid = env.wait_for(lambda: [a["id"] for a in env.pending(pid)], what="a pending approval")[0]
    _open(page, env)
    cap = page.locator(f'#proc-{pid} li.cap[data-handle="ws"]')
    cap.locator('button[data-action="revoke"]').click()
    page.wait_for_url("**/?notice=revoked*")
    assert "revoked" in page.locator(f'#proc-{pid} li.cap[data-handle="ws"] .capstate').inner_text()
    page.locator(f'#approval-{aid} button[data-action="approve"]').click()
    page.wait_for_url("**/?notice=approved*")
    denied = page.locator('#audit tbody tr.deny[data-kind="audit"]', has_text="EREVOKED")
    denied.first.wait_for()
    text = denied.first.inner_text()
    assert "fs.write" in text and "deny" in text
    # the filters: only denials of this pid
    page.fill("#f-pid", str(pid))
    page.select_option("#f-decision", "deny")
    visible_rows = page.locator("#audit tbody tr:not([hidden])")
    assert visible_rows.count() >= 1
    assert all(r.get_attribute("data-decision") == "deny" for r in visible_rows.all())
    assert (env.world / "workspace" / "draft.txt").read_text() == "v1"
    page.wait_for_selector(f'#proc-{pid}[data-state="exited"]')
    page.wait_for_selector("#llm tbody tr")
    page.select_option("#f-decision", "")
    page.fill("#f-pid", "")
    _shot(page, artifacts, "console")  # the README's picture


def test_agent_text_never_executes_and_shows_as_written(page: Any, env: Env, artifacts: Path) -> None:
    pid = start_evil(env)
    _open(page, env)
    title = page.title()
    approvals = page.locator("#approvals").inner_text()
    assert f"outbox/{EVIL_NAME}" in approvals  # the file name, as written
    page.goto(f"{env.server.base_url}/procs/{pid}")
    page.wait_for_selector("#entries")
    body = page.locator("main").inner_text()
    assert SCRIPT in body and HTML in body  # shown as text, exactly
    assert "\\x1b[31mred\\x1b[0m" in body and "\x1b" not in body  # ANSI made visible, not interpreted
    assert ANSI not in body
    assert page.locator("#injected").count() == 0  # no element was made from the payload
    assert page.locator("main img, main script, main b").count() == 0
    assert page.title() == f"pid {pid} · agent-libos console"  # not 'pwned'
    assert title == "agent-libos console"
    assert page.evaluate("document.scripts.length") == 1  # only /static/console.js
    _shot(page, artifacts, "untrusted-text")
    page.goto(env.server.base_url + "/")
    page.wait_for_selector("#live.on")
    page.wait_for_selector('#audit tbody tr[data-kind="approval"]')
    assert page.locator("#injected").count() == 0 and page.title() == title
    assert page.dialogs == []


def test_a_request_without_the_token_is_refused(browser: Any, env: Env, artifacts: Path) -> None:
    context = browser.new_context()
    pg = context.new_page()
    try:
        response = pg.goto(env.server.base_url + "/")
        assert response is not None and response.status == 403
        assert "access token" in pg.locator("body").inner_text()
        assert response.headers["content-security-policy"].startswith("default-src 'self'")
        wrong = pg.goto(env.server.base_url + "/?token=wrong")
        assert wrong is not None and wrong.status == 403
        events = pg.goto(env.server.base_url + "/events")
        assert events is not None and events.status == 403
        _shot(pg, artifacts, "refused")
    finally:
        context.close()
