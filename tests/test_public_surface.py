"""Each subpackage exports exactly its curated surface, and dependencies point the right way."""

from __future__ import annotations

import ast
import importlib

import pytest

from tests.conftest import REPO

PACKAGES = ["storage", "bus", "kernel", "actors", "runtime", "harness", "console", "cli"]
# What each package may import from agentlibos (ARCHITECTURE.md; bus errors are shared, see docs/architecture.md).
ALLOWED = {
    "storage": {"bus._errors"},
    "bus": set(),
    "kernel": {"bus", "storage"},
    "actors": {"bus"},
    "runtime": {"bus", "kernel", "actors", "storage"},
    "harness": {"bus", "kernel", "actors", "storage", "runtime"},
    "console": {"bus", "runtime", "storage"},
    "cli": {"bus", "kernel", "actors", "storage", "runtime", "harness", "console"},
}


@pytest.mark.parametrize("name", PACKAGES)
def test_all_is_exact(name: str) -> None:
    mod = importlib.import_module(f"agentlibos.{name}")
    assert sorted(mod.__all__) == sorted(set(mod.__all__)), "duplicates in __all__"
    public = {n for n in vars(mod) if not n.startswith("_")} - {"annotations"}
    submodules = {n for n in public if type(getattr(mod, n)).__name__ == "module"}
    assert public - submodules == set(mod.__all__), "exports and __all__ differ"


@pytest.mark.parametrize("name", PACKAGES)
def test_dependency_direction(name: str) -> None:
    allowed = ALLOWED[name]
    for path in (REPO / name).glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("agentlibos."):
                target = node.module.split(".", 1)[1]
                top = target.split(".")[0]
                if top == name:
                    continue
                assert top in allowed or target in allowed, f"{path.name} imports {node.module}"


def test_no_agentlibos_folder_at_root() -> None:
    assert not (REPO / "agentlibos").exists()
