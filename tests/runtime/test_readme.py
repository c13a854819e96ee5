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
