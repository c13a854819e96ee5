"""The README's Python API example runs verbatim and does what it says."""

from __future__ import annotations

import re
import runpy
from pathlib import Path

import pytest

from tests.conftest import REPO


def _example() -> str:
    text = (REPO / "README.md").read_text()
    m = re.search(r"## The Python API\n\n```python\n(.*?)```", text, re.S)
    assert m, "README has no Python API example"
    return m.group(1)


def test_readme_example_runs_verbatim(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    script = tmp_path / "example.py"
    script.write_text(_example())
    runpy.run_path(str(script), run_name="__main__")
    out = capsys.readouterr().out
    assert "Exit(pid=1, status='ok'" in out
    assert out.rstrip().endswith("ship it")
    assert (tmp_path / "world/workspace/todo.txt").read_text() == "ship it\n"
    assert (tmp_path / "world/secrets/key.txt").read_text() == "hunter2"
    assert "hunter2" not in out
    assert (tmp_path / "state/log.db").exists()


def test_readme_configuration_example_loads(tmp_path: Path) -> None:
    """The README's kernel.toml is a valid configuration: every setting is known and typed, and a
    kernel starts on it (the world root moved under tmp_path)."""
    from agentlibos.kernel import KernelConfig
    from agentlibos.runtime import Runtime

    m = re.search(r"## Configuration\n.*?```toml\n(.*?)```", (REPO / "README.md").read_text(), re.S)
    assert m, "README has no configuration example"
    state = tmp_path / "state"
    state.mkdir()
    (state / "kernel.toml").write_text(m.group(1))
    cfg = KernelConfig.load(state, tmp_path / "world")
    assert cfg.modules == ("git",) and cfg.llm_observe == "metadata" and cfg.approval_timeout_s == 600
    assert dict(cfg.git_remotes) == {"origin": "/srv/git/project.git"}
    assert "tickets" in cfg.rpc_endpoints and "files" in cfg.mcp_servers
    with Runtime(state, world_root=tmp_path / "world", ipc=False) as rt:
        assert "git.status" in rt.inspect(lambda k: set(k.syscalls))
    (state / "kernel.toml").write_text("[kernel]\nno_such_setting = 1\n")
    with pytest.raises(ValueError, match="no_such_setting"):
        KernelConfig.load(state)
