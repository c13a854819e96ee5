"""Fixtures for kernel tests: a guard that fails a test which leaks file descriptors."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest


def open_fds() -> set[str]:
    """The process's open descriptors, without the one the listing itself used."""
    listed = os.listdir("/proc/self/fd")
    # The listing's own descriptor is closed by now; leaving it in would let a descriptor
    # leaked under the same number go unnoticed.
    return {fd for fd in listed if os.path.lexists(f"/proc/self/fd/{fd}")}


@pytest.fixture
def fd_guard() -> Iterator[None]:
    """Fail the test if it ends with descriptors open that were not open when it started."""
    before = open_fds()
    yield
    leaked = open_fds() - before
    assert not leaked, f"leaked file descriptors: {sorted(leaked, key=int)}"
