"""Kernel configuration: one frozen, typed object, read in one place from a TOML file and
AGENTLIBOS_* environment variables (environment wins).
"""

from __future__ import annotations

import os
import secrets
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any


@dataclass(frozen=True, slots=True)
class KernelConfig:
    state_dir: Path
    world_root: Path
    #: PATH the shell provider searches and gives programs (world `bin/` first in scenario runs).
    path: tuple[str, ...] = ("/usr/local/bin", "/usr/bin", "/bin")
    #: Variables every program gets besides the ones its capability allows.
    shell_env: Mapping[str, str] = field(default_factory=dict)
    shell_default_timeout_s: float = 30.0
    shell_mem_bytes: int = 1 << 30
    fs_max_read_bytes: int = 4 << 20
    mem_value_max_bytes: int = 64 << 10
    mem_keys_max: int = 10_000
    effect_workers: int = 16
    #: Installed Skills: one folder per Skill with SKILL.md and optional tools/*.ts (default STATE/skills).
    skills_dir: str = ""
    jit_source_max_bytes: int = 64 << 10
    approval_timeout_s: float = 300.0
    #: Operator-configured RPC endpoints (name -> URL) and MCP servers (name -> {url} or {command, env}).
    rpc_endpoints: Mapping[str, str] = field(default_factory=dict)
    mcp_servers: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    #: Runtime Modules loaded at kernel start (dotted module paths or `agentlibos.modules` entry
    #: point names), e.g. ("agentlibos.kernel._git",). Nothing loads one later.
    modules: tuple[str, ...] = ()
    #: Remotes the git module may push to (name -> URL); none: no push anywhere.
    git_remotes: Mapping[str, str] = field(default_factory=dict)
    #: Mechanisms switched off, for the benchmark's ablations only (never in a deployment):
    #: "attenuation", "approvals", "confinement", "cascade", "jit-sandbox" (JIT tools run unsandboxed).
    ablate: tuple[str, ...] = ()
    approvals_per_minute: int = 20
    #: Seconds a hosted process may sit idle between turns before its host hibernates it (stops
    #: its actor, keeps its affordances, starts it again on its next message); 0 or less: never.
    hibernate_after_s: float = 300.0
    #: What the kernel records of each model call: "off", "metadata" (model, tokens, latency, stop
    #: reason, cost estimate) or "full" (plus the request and the response, secrets redacted).
    llm_observe: str = "metadata"
    operator_token: str = ""
    host_token: str = ""

    @classmethod
    def load(cls, state_dir: str | os.PathLike[str], world_root: str | os.PathLike[str] | None = None,
             **overrides: Any) -> KernelConfig:
        state = Path(state_dir).absolute()
        values: dict[str, Any] = {}
        toml_path = state / "kernel.toml"
        if toml_path.exists():
            with toml_path.open("rb") as fh:
                values.update(tomllib.load(fh).get("kernel", {}))
        names = {f.name: f for f in fields(cls)}
        for key, raw in os.environ.items():
            if key.startswith("AGENTLIBOS_") and key[11:].lower() in names:
                values[key[11:].lower()] = raw
        values.update({k: v for k, v in overrides.items() if v is not None})
        world = Path(world_root or values.pop("world_root", None) or state / "world").absolute()
        values.pop("world_root", None)
        values.pop("state_dir", None)
        cfg = cls(state_dir=state, world_root=world)
        coerced: dict[str, Any] = {}
        for key, val in values.items():
            if key not in names:
                raise ValueError(f"unknown kernel setting {key!r}")
            default = getattr(cfg, key)
            if isinstance(default, tuple) and isinstance(val, str):
                val = tuple(p for p in val.split(os.pathsep) if p)
            elif isinstance(default, bool):
                val = str(val).lower() in ("1", "true", "yes")
            elif isinstance(default, (int, float)) and isinstance(val, str):
                val = type(default)(val)
            elif isinstance(default, tuple):
                val = tuple(val)
            coerced[key] = val
        cfg = replace(cfg, **coerced)
        if not cfg.operator_token or not cfg.host_token:
            cfg = replace(
                cfg,
                operator_token=cfg.operator_token or secrets.token_hex(16),
                host_token=cfg.host_token or secrets.token_hex(16),
            )
        return cfg
