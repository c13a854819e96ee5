"""Scenario files (../shared/spec/SCENARIOS.md): load, validate against a JSON Schema, and hand
back typed value objects. A file that cannot be loaded raises ScenarioError naming what is wrong.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from agentlibos.bus import ScenarioError

FORMAT_VERSIONS = (1,)
EXPECTS = ("allowed", "denied", "approval", "failed")
ROOT_IMAGE = "root"

#: Every builtin tool (ABI syscall names with '.' -> '_').
BUILTIN_TOOLS = frozenset(
    """fs_read fs_write fs_list fs_stat fs_delete fs_mkdir shell_exec human_ask human_notify mem_get mem_put
    mem_delete mem_list proc_spawn proc_wait proc_kill proc_list proc_self msg_send msg_recv ckpt_create
    ckpt_restore ckpt_fork ckpt_list image_commit image_list image_show image_boot tool_define tool_remove
    tool_list skill_load skill_list rpc_call mcp_list_tools mcp_call pty_open pty_write pty_read pty_close
    llm_complete cap_list cap_request cap_derive cap_grant cap_revoke cap_drop budget_get""".split()
)

_step = {
    "type": "object",
    "oneOf": [
        {
            "required": ["tool"],
            "properties": {
                "tool": {"type": "string"},
                "args": {"type": "object"},
                "expect": {"enum": list(EXPECTS)},
                "code": {"type": "string"},
                "cap": {"type": "string"},
                "save_as": {"type": "string", "pattern": "^[A-Za-z_][A-Za-z0-9_]*$"},
                "script": {"type": "string"},
                "note": {"type": "string"},
            },
            "additionalProperties": False,
        },
        {
            "required": ["operator"],
            "properties": {
                "operator": {"type": "object"},
                "to": {},
                "note": {"type": "string"},
            },
            "additionalProperties": False,
        },
    ],
}

_image = {
    "type": "object",
    "properties": {
        "prompt": {"type": "string"},
        "tools": {"type": "array", "items": {"type": "string"}},
        "model": {"type": "string"},
        "script": {"type": "array", "items": _step},
        "budget": {"type": "object"},
    },
    "additionalProperties": False,
}

_check_kinds = {
    "file_equals": {"type": "object", "required": ["path", "text"]},
    "file_contains": {"type": "object", "required": ["path", "text"]},
    "file_exists": {"type": "string"},
    "file_absent": {"type": "string"},
    "rpc_calls": {"type": "object", "required": ["endpoint", "count"]},
    "mcp_calls": {"type": "object", "required": ["server", "count"]},
    "program_ran": {"type": "object", "required": ["name", "count"]},
    "memory_equals": {"type": "object", "required": ["namespace", "key", "value"]},
    "human_asked": {"type": "object", "required": ["count"]},
    "processes": {"type": "object", "required": ["count"]},
}

SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["id", "version", "image", "script"],
    "properties": {
        "id": {"type": "string", "pattern": "^[a-z0-9-]+$"},
        "version": {"enum": list(FORMAT_VERSIONS)},
        "title": {"type": "string"},
        "tags": {"type": "array", "items": {"type": "string"}},
        "world": {
            "type": "object",
            "properties": {
                "files": {"type": "object", "additionalProperties": {"type": "string"}},
                "secrets": {"type": "array", "items": {"type": "string", "minLength": 4}},
                "rpc": {"type": "object"},
                "mcp": {"type": "object"},
                "skills": {"type": "object"},
                "programs": {"type": "object", "additionalProperties": {"type": "string"}},
                "memory": {"type": "object", "additionalProperties": {"type": "object"}},
                "dirs": {"type": "array", "items": {"type": "string"}},
                "symlinks": {"type": "object", "additionalProperties": {"type": "string"}},
            },
            "additionalProperties": False,
        },
        "image": _image,
        "caps": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["kind", "scope", "rights"],
                "properties": {
                    "kind": {"type": "string"},
                    "scope": {"type": "object"},
                    "rights": {"type": "array", "items": {"type": "string"}},
                    "name": {"type": "string"},
                    "approval": {"enum": ["never", "always"]},
                    "expires_in_s": {"type": "number"},
                    "uses": {"type": "integer"},
                },
                "additionalProperties": False,
            },
        },
        "budget": {"type": "object", "additionalProperties": {"type": "number"}},
        "human": {"type": "array", "items": {"type": ["string", "object"]}},
        "script": {"type": "array", "items": _step},
        "images": {"type": "object", "additionalProperties": _image},
        "checks": {
            "type": "array",
            "items": {
                "type": "object",
                "minProperties": 1,
                "maxProperties": 1,
                "properties": _check_kinds,
                "additionalProperties": False,
            },
        },
    },
    "additionalProperties": False,
}

_VALIDATOR = jsonschema.Draft202012Validator(SCHEMA)


@dataclass(frozen=True, slots=True)
class Step:
    index: int
    tool: str | None
    args: Mapping[str, Any]
    expect: str | None
    code: str | None = None
    cap: str | None = None
    save_as: str | None = None
    operator: Mapping[str, Any] | None = None
    raw: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Scenario:
    id: str
    version: int
    title: str
    tags: tuple[str, ...]
    world: Mapping[str, Any]
    image: Mapping[str, Any]
    caps: tuple[Mapping[str, Any], ...]
    budget: Mapping[str, float]
    human: tuple[Any, ...]
    script: tuple[Step, ...]
    images: Mapping[str, Mapping[str, Any]]
    checks: tuple[Mapping[str, Any], ...]
    path: str = ""

    @property
    def secrets(self) -> tuple[str, ...]:
        return tuple(self.world.get("secrets", ()))

    def scripts(self) -> dict[str, list[dict[str, Any]]]:
        """Raw step lists by script name: the root's under ROOT_IMAGE, every image's under its name."""
        out = {ROOT_IMAGE: [dict(s.raw) for s in self.script]}
        for name, img in self.images.items():
            if "script" in img:
                out[name] = [dict(s) for s in img["script"]]
        return out


def _jit_tool_names(data: dict[str, Any]) -> set[str]:
    """Tools a scenario can grow: its Skills' tools and every tool_define in any script."""
    names: set[str] = set()
    for skill in ((data.get("world") or {}).get("skills") or {}).values():
        if isinstance(skill, dict):
            names.update((skill.get("tools") or {}).keys())
    scripts = [data.get("script") or []] + [img.get("script") or [] for img in (data.get("images") or {}).values()]
    for script in scripts:
        for step in script:
            if isinstance(step, dict) and step.get("tool") == "tool_define":
                name = (step.get("args") or {}).get("name")
                if isinstance(name, str):
                    names.add(name)
    return names


#: What an operator step may do (SCENARIOS.md's revoke, grant and kill; checkpoint and restore are
#: this project's, documented in the README's "How to write a scenario").
OPERATOR_ACTIONS = ("revoke", "grant", "kill", "checkpoint", "restore")


def _steps(raw: list[dict[str, Any]], where: str, extra_tools: set[str] = frozenset()) -> tuple[Step, ...]:  # type: ignore[assignment]
    out = []
    for i, s in enumerate(raw):
        if "tool" in s:
            if s["tool"] not in BUILTIN_TOOLS and s["tool"] not in extra_tools:
                raise ScenarioError(f"{where} step {i}: unknown tool {s['tool']!r}")
            out.append(Step(i, s["tool"], s.get("args") or {}, s.get("expect"), s.get("code"), s.get("cap"),
                            s.get("save_as"), None, s))
        else:
            op = s["operator"]
            if not any(k in op for k in OPERATOR_ACTIONS):
                raise ScenarioError(f"{where} step {i}: operator step needs one of {', '.join(OPERATOR_ACTIONS)}")
            if "restore" in op and not isinstance(op.get("label"), str):
                raise ScenarioError(f"{where} step {i}: operator restore needs the label of a checkpoint "
                                    f"the operator took (`checkpoint: root, label: L`)")
            out.append(Step(i, None, {}, None, operator=op, raw=s))
    return tuple(out)


def parse_scenario(data: Any, path: str = "<string>") -> Scenario:
    if not isinstance(data, dict):
        raise ScenarioError(f"{path}: a scenario is a YAML mapping")
    errors = sorted(_VALIDATOR.iter_errors(data), key=lambda e: list(e.absolute_path))
    if errors:
        e = errors[0]
        where = "/".join(str(p) for p in e.absolute_path) or "(top level)"
        raise ScenarioError(f"{path}: {where}: {e.message}")
    for name, img in (data.get("images") or {}).items():
        if not re.fullmatch(r"[a-z0-9][a-z0-9_-]*", name) or name == ROOT_IMAGE:
            raise ScenarioError(f"{path}: image name {name!r} must be [a-z0-9_-]+ and not {ROOT_IMAGE!r}")
        for t in img.get("tools", []):
            if t not in BUILTIN_TOOLS:
                raise ScenarioError(f"{path}: images/{name}: unknown tool {t!r}")
        _steps(img.get("script", []), f"{path}: images/{name}", _jit_tool_names(data))
    for t in data["image"].get("tools", []):
        if t not in BUILTIN_TOOLS:
            raise ScenarioError(f"{path}: image: unknown tool {t!r}")
    return Scenario(
        id=data["id"],
        version=data["version"],
        title=data.get("title", ""),
        tags=tuple(data.get("tags", ())),
        world=data.get("world") or {},
        image=data["image"],
        caps=tuple(data.get("caps") or ()),
        budget=data.get("budget") or {},
        human=tuple(data.get("human") or ()),
        script=_steps(data["script"], path, _jit_tool_names(data)),
        images=data.get("images") or {},
        checks=tuple(data.get("checks") or ()),
        path=path,
    )


def load_scenario(path: str | Path) -> Scenario:
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as exc:
        raise ScenarioError(f"{p}: cannot read: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ScenarioError(f"{p}: bad YAML: {exc}") from None
    return parse_scenario(data, str(p))


def find_scenarios(root: str | Path) -> list[Path]:
    r = Path(root)
    if r.is_file():
        return [r]
    return sorted(r.rglob("*.yaml"))
