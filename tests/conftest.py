"""Shared fixtures: an embedded runtime on temporary directories, cleaned up after each test."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import settings

from agentlibos.runtime import Runtime

settings.register_profile("ci", deadline=None, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def runtime(tmp_path: Path) -> Iterator[Runtime]:
    (tmp_path / "world").mkdir()
    rt = Runtime(tmp_path / "state", world_root=tmp_path / "world")
    with rt:
        yield rt


