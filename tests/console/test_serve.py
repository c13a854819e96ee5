"""`serve()` (what `agentlibos console` runs): a Runtime and the console in one process, until SIGTERM."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from agentlibos.storage import SQLiteLog
from tests.conftest import REPO

URL = re.compile(r"http://127\.0\.0\.1:(\d+)/\?token=([A-Za-z0-9_-]+)")


def _start(cmd: list[str]) -> tuple[subprocess.Popen[str], str, str]:
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert proc.stdout is not None
    deadline = time.monotonic() + 30
    seen = []
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        seen.append(line)
        m = URL.search(line)
        if m:
            return proc, f"http://127.0.0.1:{m.group(1)}", m.group(2)
    proc.kill()
    proc.wait(10)
    proc.stdout.close()
    raise AssertionError("no console URL printed: " + "".join(seen))


def _check_and_stop(proc: subprocess.Popen[str], base: str, token: str, state: Path) -> None:
    try:
        assert httpx.get(base + "/", timeout=10).status_code == 403
        with httpx.Client(base_url=base, timeout=10, follow_redirects=True) as c:
            r = c.get(f"/?token={token}")
            assert r.status_code == 200 and "verified:" in r.text
            assert str(state.resolve()) in r.text
        assert (state / "connection.json").exists()  # other CLI commands can operate this kernel too
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(20)
        assert proc.stdout is not None
        rest = proc.stdout.read()
        proc.stdout.close()
        assert code == 0, rest
    assert not (state / "connection.json").exists()
    with SQLiteLog.open_readonly(state / "log.db") as log:
        assert log.verify().ok


def test_serve_prints_a_tokened_url_and_stops_on_sigterm(tmp_path: Path) -> None:
    state = tmp_path / "state"
    code = ("import sys; from agentlibos.console import serve; "
            "serve(sys.argv[1], port=0, world_root=sys.argv[2])")
    proc, base, token = _start([sys.executable, "-c", code, str(state), str(tmp_path / "world")])
    _check_and_stop(proc, base, token, state)


def test_cli_console_command(tmp_path: Path) -> None:
    from agentlibos.cli import main

    assert "console" in main.commands  # type: ignore[attr-defined]
    state = tmp_path / "state"
    cmd = [sys.executable, "-c", "from agentlibos.cli import main; main()", "console", "--state", str(state),
           "--port", "0", "--world", str(tmp_path / "world")]
    proc, base, token = _start(cmd)
    _check_and_stop(proc, base, token, state)
