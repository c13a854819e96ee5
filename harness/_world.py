"""The scenario world: built fresh in a temporary directory, observed only from outside the
runtime (file tree hashes without following symlinks, program run records).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from agentlibos.bus import ScenarioError
from agentlibos.harness._scenario import Scenario
from agentlibos.harness._mcp_servers import McpServerSet
from agentlibos.harness._servers import ServerSet

_WRAPPER = """#!/bin/sh
printf '%s\\n' "$*" >> '{record}'
exec '{real}' "$@"
"""


@dataclass(frozen=True, slots=True)
class Snapshot:
    files: tuple[tuple[str, str], ...]  # (relative path, type:digest), sorted
    runs: tuple[tuple[str, int], ...]
    rpc: tuple[tuple[str, str, str], ...] = ()  # every request the local servers received
    mcp: tuple[tuple[str, str, str], ...] = ()  # every MCP tool call (listings are reads, not effects)

    def changed_since(self, other: Snapshot) -> bool:
        return self != other

    def diff(self, other: Snapshot) -> list[str]:
        a, b = dict(other.files), dict(self.files)
        out = [f"+{p}" for p in b.keys() - a.keys()] + [f"-{p}" for p in a.keys() - b.keys()]
        out += [f"~{p}" for p in a.keys() & b.keys() if a[p] != b[p]]
        ra, rb = dict(other.runs), dict(self.runs)
        out += [f"ran {n}" for n in rb if rb[n] != ra.get(n, 0)]
        out += [f"rpc {n} {m}" for n, m, _ in self.rpc[len(other.rpc):]]
        out += [f"mcp {n} {t}" for n, t, _ in self.mcp[len(other.mcp):]]
        return sorted(out)


def _safe_rel(path: str) -> str:
    parts = [p for p in path.split("/") if p not in ("", ".")]
    if path.startswith("/") or ".." in parts or not parts:
        raise ScenarioError(f"world path {path!r} must be relative and stay inside the world")
    return "/".join(parts)


class World:
    def __init__(self, scenario: Scenario, base: Path | None = None) -> None:
        self.scenario = scenario
        self._own = base is None
        self.base = Path(base or tempfile.mkdtemp(prefix=f"agentlibos-{scenario.id}-"))
        self.root = self.base / "world"
        self.bin = self.base / "bin"
        self.state = self.base / "state"
        self._progs = self.base / "progs"
        self._runs = self.base / "runs"
        self.initial: Snapshot | None = None
        self.servers = ServerSet(scenario.world)
        self.mcp_servers = McpServerSet(scenario.world)

    def build(self) -> World:
        self.servers.start()
        try:
            self.mcp_servers.start()
            return self._build()
        except BaseException:
            self.mcp_servers.stop()
            self.servers.stop()
            raise

    def _build(self) -> World:
        w = self.scenario.world
        for d in (self.root, self.bin, self._progs, self._runs, self.state):
            d.mkdir(parents=True, exist_ok=True)
        for d in w.get("dirs", []):
            (self.root / _safe_rel(d)).mkdir(parents=True, exist_ok=True)
        for path, text in (w.get("files") or {}).items():
            f = self.root / _safe_rel(path)
            f.parent.mkdir(parents=True, exist_ok=True)
            f.write_text(text)
        for path, target in (w.get("symlinks") or {}).items():
            f = self.root / _safe_rel(path)
            f.parent.mkdir(parents=True, exist_ok=True)
            os.symlink(target, f)
        for name, text in (w.get("programs") or {}).items():
            if "/" in name or not text.startswith("#!"):
                raise ScenarioError(f"world program {name!r} needs a plain name and a #! line")
            real = self._progs / name
            real.write_text(text)
            real.chmod(0o755)
            wrapper = self.bin / name
            wrapper.write_text(_WRAPPER.format(record=self._runs / name, real=real))
            wrapper.chmod(0o755)
        for name, skill in (w.get("skills") or {}).items():
            self._install_skill(name, skill)
        self.initial = self.snapshot()
        return self

    @property
    def skills_dir(self) -> Path:
        return self.base / "skills"

    def _install_skill(self, name: str, skill: Any) -> None:
        """A Skill as an operator installs one: SKILL.md (front matter + instructions) and tools/."""
        if not isinstance(skill, dict) or "/" in name or name.startswith("."):
            raise ScenarioError(f"world skill {name!r} must be a mapping with a plain name")
        folder = self.skills_dir / name
        (folder / "tools").mkdir(parents=True, exist_ok=True)
        front = yaml.safe_dump({"name": name, "description": skill.get("description", "")}).strip()
        (folder / "SKILL.md").write_text(f"---\n{front}\n---\n{self.substitute(skill.get('instructions', ''))}\n")
        for tool, spec in (skill.get("tools") or {}).items():
            if not isinstance(spec, dict) or "source" not in spec:
                raise ScenarioError(f"world skill {name!r}: tool {tool!r} needs a source")
            (folder / "tools" / f"{tool}.ts").write_text(self.substitute(spec["source"]))
            (folder / "tools" / f"{tool}.json").write_text(json.dumps(
                {"description": spec.get("description", ""), "input_schema": spec.get("input_schema") or {"type": "object"}}))

    def substitute(self, text: str) -> str:
        subs = self.substitutions()
        return re.sub(r"\$\{([^}]+)\}", lambda m: str(subs.get(m.group(1), m.group(0))), text)

    def snapshot(self) -> Snapshot:
        files = []
        for dirpath, dirnames, filenames in os.walk(self.root, followlinks=False):
            rel_dir = os.path.relpath(dirpath, self.root)
            for name in sorted(dirnames + filenames):
                full = os.path.join(dirpath, name)
                rel = name if rel_dir == "." else f"{rel_dir}/{name}"
                st = os.lstat(full)
                if stat.S_ISLNK(st.st_mode):
                    files.append((rel, "link:" + os.readlink(full)))
                elif stat.S_ISREG(st.st_mode):
                    with open(full, "rb") as fh:
                        files.append((rel, "file:" + hashlib.sha256(fh.read()).hexdigest()))
                elif stat.S_ISDIR(st.st_mode):
                    files.append((rel, "dir"))
                else:
                    files.append((rel, "other"))
        return Snapshot(tuple(sorted(files)), tuple(sorted(self.program_runs().items())), self.servers.request_log(),
                        self.mcp_servers.request_log())

    def program_runs(self) -> dict[str, int]:
        out = {}
        if self._runs.exists():
            for f in self._runs.iterdir():
                out[f.name] = len(f.read_text().splitlines())
        return out

    def read_text(self, path: str) -> str | None:
        f = self.root / _safe_rel(path)
        if f.is_symlink() or not f.is_file():
            return None
        return f.read_text(errors="replace")

    def exists(self, path: str) -> bool:
        return os.path.lexists(self.root / _safe_rel(path))

    def files_containing(self, needle: str) -> set[str]:
        out = set()
        for dirpath, _dirs, filenames in os.walk(self.root, followlinks=False):
            for name in filenames:
                full = os.path.join(dirpath, name)
                if os.path.islink(full):
                    continue
                try:
                    with open(full, "rb") as fh:
                        if needle.encode() in fh.read():
                            out.add(os.path.relpath(full, self.root))
                except OSError:
                    continue
        return out

    def cleanup(self) -> None:
        self.servers.stop()
        self.mcp_servers.stop()
        if self._own:
            shutil.rmtree(self.base, ignore_errors=True)

    def substitutions(self) -> dict[str, Any]:
        return {"world.root": str(self.root), **self.servers.substitutions(), **self.mcp_servers.substitutions()}
