"""The syscall table against ABI.md: every ABI syscall is served or explicitly not yet; nothing
reaches the kernel outside the table."""

from __future__ import annotations

import os
import re

from agentlibos.actors import syscall_for
from agentlibos.harness import BUILTIN_TOOLS
from agentlibos.kernel import ADDITIONS, NOT_YET, SYSCALLS, tool_name
from tests.conftest import REPO

ABI = REPO.parent / "shared" / "spec" / "ABI.md"
SNAPSHOT = REPO / "docs" / "abi-syscalls.txt"


def _snapshot() -> set[str]:
    return {line.strip() for line in SNAPSHOT.read_text().splitlines() if line.strip() and not line.startswith("#")}


def _from_abi(text: str) -> set[str]:
    section = text[text.index("## Syscalls"):text.index("## The log's promise")]
    names = set()
    for line in section.splitlines():
        if line.startswith("| ") and not line.startswith("| syscall"):
            for part in line.split("|")[1].split("/"):
                if re.fullmatch(r"[a-z_]+\.[a-z_]+", part.strip()):
                    names.add(part.strip())
    return names


def test_snapshot_matches_abi_md() -> None:
    # ABI.md sits beside the repository in the developers' and CI's checkouts; a clone of this
    # repository alone checks against the snapshot, which must then at least be well formed.
    if ABI.exists() or os.environ.get("CI"):
        assert ABI.exists(), f"{ABI} is missing in CI: the ABI is the contract this table is checked against"
        assert _from_abi(ABI.read_text()) == _snapshot()
    else:
        assert all(re.fullmatch(r"[a-z_]+\.[a-z_]+", n) for n in _snapshot()) and len(_snapshot()) >= 40


def test_every_abi_syscall_is_served_or_declared_not_yet() -> None:
    abi = _snapshot()
    process_calls = {n for n, s in SYSCALLS.items() if s.role == "process"}
    assert abi <= process_calls | NOT_YET
    assert process_calls - abi == set(ADDITIONS)
    assert not (process_calls & NOT_YET)


def test_operator_requests_are_namespaced() -> None:
    assert all(n.startswith("op.") for n, s in SYSCALLS.items() if s.role == "operator")


def test_tool_names_round_trip() -> None:
    for name in _snapshot():
        assert syscall_for(tool_name(name)) == name
        assert tool_name(name) in BUILTIN_TOOLS
    assert {tool_name(n) for n in _snapshot()} == set(BUILTIN_TOOLS)
