"""Providers of what a process's agent itself uses: its memory namespaces, its model (llm), and its
JIT tools and Skills (affordances: they change what the model sees, never authority).
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

import yaml  # type: ignore[import-untyped]

from agentlibos.bus import KernelError
from agentlibos.kernel._caps import CapRecord
from agentlibos.kernel._globs import compile_glob
from agentlibos.kernel._kcaps import CapsMixin
from agentlibos.kernel._kstate import Outcome, Proc
from agentlibos.kernel._models import CompletionRequest, ModelBackend
from agentlibos.kernel._table import NOT_YET, SYSCALLS, SyscallSpec, tool_name
from agentlibos.storage import digest

log = logging.getLogger("agentlibos.kernel")

TOOL_NAME = re.compile(r"[a-z][a-z0-9_]{0,63}")
def read_skill_text(folder: Path, name: str) -> tuple[dict[str, Any], str]:
    """SKILL.md's front matter and body; KernelError ENOENT/EINVAL when missing or malformed."""
    try:
        text = (folder / "SKILL.md").read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise KernelError("EINVAL", f"Skill {name!r}: SKILL.md is not UTF-8") from None
    except OSError:
        raise KernelError("ENOENT", f"no Skill {name!r} is installed") from None
    meta: dict[str, Any] = {}
    body = text
    if text.startswith("---"):
        head, sep, rest = text[3:].partition("\n---")
        if sep:
            try:
                loaded = yaml.safe_load(head)
            except yaml.YAMLError as exc:
                raise KernelError("EINVAL", f"Skill {name!r}: bad front matter: {exc}") from None
            meta = loaded if isinstance(loaded, dict) else {}
            body = rest.lstrip("\n")
    return meta, body


def read_skill_folder(folder: Path, name: str) -> tuple[dict[str, Any], str, list[dict[str, Any]]]:
    """A Skill as installed: SKILL.md's front matter and body, and tools/*.ts (each with an
    optional .json sidecar for its description and input schema). Unchecked; KernelError
    ENOENT/EINVAL when it is missing or malformed."""
    meta, body = read_skill_text(folder, name)
    tools = []
    tools_dir = folder / "tools"
    if tools_dir.is_dir():
        for ts in sorted(tools_dir.glob("*.ts")):
            info: dict[str, Any] = {}
            side = ts.with_suffix(".json")
            try:
                if side.exists():
                    info = json.loads(side.read_text(encoding="utf-8"))
                source = ts.read_text(encoding="utf-8")
            except (OSError, ValueError) as exc:  # unreadable, not UTF-8, not JSON
                raise KernelError("EINVAL", f"Skill {name!r}: tools/{ts.stem}: {exc}") from None
            if not isinstance(info, dict):
                raise KernelError("EINVAL", f"Skill {name!r}: {side.name} is not a JSON object")
            tools.append({"name": ts.stem, "description": info.get("description", ""),
                          "input_schema": info.get("input_schema"), "source": source})
    return meta, body, tools


SKILL_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")
BUILTIN_TOOL_NAMES = frozenset(tool_name(n) for n in SYSCALLS) | frozenset(tool_name(n) for n in NOT_YET)


class AgentMixin(CapsMixin):
    """A process's memory, model, JIT tools and Skills."""

    # --- providers: memory ---------------------------------------------------------------------
    def _sys_memory(self, proc: Proc, spec: SyscallSpec, args: dict[str, Any], handle: str | None, now: float) -> Outcome:
        ns = args.get("ns") or "self"
        right = spec.rights[0]
        cap = self._authorize(proc, "memory", handle, now,
                              lambda c: c.scope["namespace"] == ns and right in c.rights,
                              lambda: f"{spec.name} in namespace {ns!r}")
        # A `self` cap names the namespace of the process it was granted to.
        store_key = f"self:{self._self_owner(cap)}" if ns == "self" else f"ns:{ns}"
        store = self.memory.get(store_key)
        op = spec.name[4:]
        if op == "list":
            prefix = args.get("prefix", "")
            keys = sorted(k for k in (store or {}) if k.startswith(prefix))
            return Outcome.allow(cap, value={"keys": keys})
        key = args["key"]
        if not key or len(key) > 256:
            raise KernelError("EINVAL", "a memory key is 1 to 256 characters")
        if op == "get":
            if store is None or key not in store:
                raise KernelError("ENOENT", f"no key {key!r} in namespace {ns!r}")
            return Outcome.allow(cap, value={"value": store[key]})
        if op == "put":
            self._check_value_size(args["value"], "value")
            full = store is not None and key not in store and len(store) >= self.config.mem_keys_max
            if full:
                raise KernelError("EINVAL", f"namespace {ns!r} is full ({self.config.mem_keys_max} keys)")

            def put(_seq: int) -> Any:
                self.memory.setdefault(store_key, {})[key] = args["value"]
                return {}

            return Outcome.allow(cap, apply=put)
        if op == "delete":
            if store is None or key not in store:
                raise KernelError("ENOENT", f"no key {key!r} in namespace {ns!r}")

            def delete(_seq: int) -> Any:
                self.memory.get(store_key, {}).pop(key, None)
                return {}

            return Outcome.allow(cap, apply=delete)
        raise KernelError("ENOSYS", spec.name)

    def _self_owner(self, cap: CapRecord) -> int:
        # A derived `self` cap passed to another process still names the original holder's space.
        if cap.parent is None:
            return cap.holder
        return self.caps.chain(cap.id)[-1].holder

    # --- providers: llm ------------------------------------------------------------------------
    def _sys_llm(self, proc: Proc, spec: SyscallSpec, args: dict[str, Any], handle: str | None, now: float) -> Outcome:
        model = args.get("model") or proc.model
        max_tokens = args.get("max_tokens")
        if max_tokens is not None and max_tokens <= 0:
            raise KernelError("EINVAL", "max_tokens must be positive")
        over: dict[str, Any] = {}

        def covers(cap: CapRecord) -> bool:
            if not any(compile_glob(m).fullmatch(model) for m in cap.scope["models"]):
                return False
            limit = cap.scope.get("max_tokens")
            if limit is not None and max_tokens is not None and max_tokens > limit:
                over["limit"] = limit
                return False
            return True

        cap = self._authorize(proc, "llm", handle, now, covers, f"model {model!r}" +
                              (f" with max_tokens {max_tokens}" if max_tokens else ""))
        backend = self._backend(model)
        if backend is None:
            raise KernelError("EINVAL", f"no model backend serves {model!r}")
        conversation = proc.conversation = {"messages": args["messages"], "system": args.get("system")}
        request = CompletionRequest(pid=proc.pid, image=proc.image, model=model, messages=args["messages"],
                                    tools=args.get("tools") or [], system=args.get("system"), max_tokens=max_tokens)
        node = self.budgets.nodes[proc.pid]

        def charge_tokens(value: Any) -> None:
            usage = value.get("usage", {}) if isinstance(value, dict) else {}
            node.charge({"llm_tokens": float(usage.get("input_tokens", 0) + usage.get("output_tokens", 0))})
            # A turn's last answer (no tool call) completes the conversation: a checkpoint taken
            # between turns then holds it whole.
            content = value.get("content") if isinstance(value, dict) else None
            if (proc.conversation is conversation and isinstance(content, list)
                    and not any(isinstance(b, dict) and b.get("type") == "tool_use" for b in content)):
                proc.conversation = {**conversation,
                                     "messages": [*conversation["messages"], {"role": "assistant", "content": content}]}

        out = Outcome.allow(cap, effect=lambda: _turn_value(backend.complete(request)), detail={"model": model})
        # max_tokens is checked up front and refused whole; what is charged is the reported usage.
        out.check_only = {"llm_tokens": float(max_tokens or 0)}
        out.after = charge_tokens
        secret = getattr(backend, "_api_key", None)
        out.observe = {"model": model, "secrets": [secret] if isinstance(secret, str) else [],
                       "request": {"model": model, "system": args.get("system"), "messages": args["messages"],
                                   "tools": [t.get("name") for t in args.get("tools") or [] if isinstance(t, dict)],
                                   "max_tokens": max_tokens}}
        return out

    def _backend(self, model: str) -> ModelBackend | None:
        if model in self.models:
            return self.models[model]
        prefix = model.split(":", 1)[0]
        return self.models.get(prefix) or self.models.get("*")

    # --- providers: tools and Skills -----------------------------------------------------------
    def _sys_tool(self, proc: Proc, spec: SyscallSpec, args: dict[str, Any], handle: str | None, now: float) -> Outcome:
        if spec.name == "tool.list":
            image = self.images.get(proc.image, {})
            return Outcome.allow(None, value={"builtin": list(image.get("tools", [])), "jit": sorted(proc.jit_tools)})
        name = args["name"]
        if spec.name == "tool.remove":
            if name not in proc.jit_tools:
                raise KernelError("ENOENT", f"no JIT tool {name!r}")
            del proc.jit_tools[name]
            return Outcome.allow(None, value={"removed": name})
        tool = self._check_tool(name, args.get("description", ""), args.get("input_schema"), args["source"])
        proc.jit_tools[name] = tool
        return Outcome.allow(None, value={"tool": name, "digest": digest(tool["source"])})

    def _check_tool(self, name: str, description: Any, schema: Any, source: Any) -> dict[str, Any]:
        if not isinstance(name, str) or not TOOL_NAME.fullmatch(name) or name in BUILTIN_TOOL_NAMES:
            raise KernelError("EINVAL", f"tool name {name!r} must match {TOOL_NAME.pattern} and not be a builtin tool")
        if not isinstance(source, str) or "\x00" in source:
            raise KernelError("EINVAL", "source must be text")
        size = len(source.encode("utf-8", "surrogatepass"))
        if size > self.config.jit_source_max_bytes:
            raise KernelError("EINVAL", f"source of {size} bytes exceeds the {self.config.jit_source_max_bytes}-byte limit")
        if "export default" not in source:
            raise KernelError("EINVAL", "a JIT tool module must `export default async function (input, sys)`")
        if schema is not None and not isinstance(schema, dict):
            raise KernelError("EINVAL", "input_schema must be a JSON Schema object")
        return {"description": str(description or ""), "input_schema": schema or {"type": "object"}, "source": source}

    def _skills_dir(self) -> Path:
        return Path(self.config.skills_dir) if self.config.skills_dir else self.config.state_dir / "skills"

    def _read_skill(self, name: str) -> dict[str, Any]:
        if not isinstance(name, str) or not SKILL_NAME.fullmatch(name):
            raise KernelError("EINVAL", f"skill name {name!r} must match {SKILL_NAME.pattern}")
        folder = self._skills_dir() / name
        meta, body, raw_tools = read_skill_folder(folder, name)
        tools = [{"name": t["name"], **self._check_tool(t["name"], t["description"], t["input_schema"], t["source"])}
                 for t in raw_tools]
        return {"name": str(meta.get("name", name)), "description": str(meta.get("description", "")),
                "instructions": body.strip(), "tools": tools}

    def _skill_instructions(self, names: list[str]) -> list[str]:
        """The instructions (SKILL.md bodies) of the Skills a process starts with; one gone or
        broken since is left out, with a warning."""
        out = []
        for name in names:
            if not isinstance(name, str) or not SKILL_NAME.fullmatch(name):
                continue
            try:
                text = read_skill_text(self._skills_dir() / name, name)[1].strip()
            except KernelError as exc:
                log.warning("kernel: Skill %r gives no instructions: %s", name, exc.message)
                continue
            if text:
                out.append(text)
        return out

    def _sys_skill(self, proc: Proc, spec: SyscallSpec, args: dict[str, Any], handle: str | None, now: float) -> Outcome:
        if spec.name == "skill.list":
            available = []
            root = self._skills_dir()
            if root.is_dir():
                for d in sorted(root.iterdir()):
                    if (d / "SKILL.md").exists() and SKILL_NAME.fullmatch(d.name):
                        try:
                            sk = self._read_skill(d.name)
                        except KernelError:
                            continue
                        available.append({"name": d.name, "description": sk["description"]})
            return Outcome.allow(None, value={"available": available, "loaded": list(proc.skills)})
        skill = self._read_skill(args["name"])
        for t in skill["tools"]:
            proc.jit_tools[t["name"]] = {k: t[k] for k in ("description", "input_schema", "source")}
        if args["name"] not in proc.skills:
            proc.skills.append(args["name"])
        return Outcome.allow(None, value=skill, detail={"skill": args["name"], "tools": [t["name"] for t in skill["tools"]]})


def _turn_value(result: Any) -> dict[str, Any]:
    value = result.to_value() if hasattr(result, "to_value") else result
    if not isinstance(value, dict) or not isinstance(value.get("content"), list):
        raise KernelError("EIO", "the model backend returned no content list")
    return value
