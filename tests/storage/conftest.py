"""Fixtures for the storage tests: a fresh log file per test, always closed."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from agentlibos.storage import SQLiteLog


@pytest.fixture
def log_path(tmp_path: Path) -> Path:
    return tmp_path / "log.db"


@pytest.fixture
def log(log_path: Path) -> Iterator[SQLiteLog]:
    with SQLiteLog(log_path) as lg:
        yield lg
