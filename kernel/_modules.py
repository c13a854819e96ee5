"""Runtime Modules: trusted Python modules the operator names in the kernel config, loaded once,
when the kernel starts, and never afterwards.

A module is a dotted Python module path (`agentlibos.kernel._git`) or the name of an entry point
in the group `agentlibos.modules` (installing a package never enables it: the operator still lists
its name). Either way it provides `register(config) -> list[Provider]`; each Provider brings a
capability kind and its syscall rows (with argument schemas), and the kernel adds them to its one
syscall table at construction. The table is fixed from then on: there is no syscall, operator
request or API that loads a module into a running kernel, and `load_modules` itself refuses to run
on a kernel or effect thread (a provider cannot load another module).

A module may bring:
- a new capability kind (its name not one of the built-in kinds) with rows `<kind>.<verb>`;
- RPC/MCP endpoints: providers of the built-in `rpc`/`mcp` kinds from `make_rpc_provider` /
  `make_mcp_provider` (at most one of each per kernel: their syscall names are fixed).
"""

from __future__ import annotations

import importlib
import re
import threading
from collections.abc import Callable, Sequence
from importlib.metadata import entry_points
from types import ModuleType
from typing import Any

from agentlibos.kernel import _caps
from agentlibos.kernel._provider import Provider

__all__ = ["ENTRY_POINT_GROUP", "ModuleError", "load_modules"]

ENTRY_POINT_GROUP = "agentlibos.modules"

_KIND = re.compile(r"[a-z][a-z0-9_]{0,31}")
_VERB = re.compile(r"[a-z][a-z0-9_]{0,63}(\.[a-z][a-z0-9_]{0,63})*")
_MODULE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")
_SCOPE_TYPES = _caps.SCOPE_TYPES
#: Built-in kinds a module may provide endpoints of (their rows are the built-in rpc/mcp rows).
_ENDPOINT_KINDS = frozenset({"rpc", "mcp"})
#: The kinds the kernel defines itself, as they were before any module registered one.
_BUILTIN_KINDS = _caps.BUILTIN_KINDS
_KERNEL_THREAD = re.compile(r"Kernel-\d+|agentlibos-effect.*")


class ModuleError(ValueError):
    """A module that cannot be loaded, or loading at the wrong time; the kernel does not start."""


def _refuse_after_start() -> None:
    name = threading.current_thread().name
    if _KERNEL_THREAD.fullmatch(name):
        raise ModuleError(f"Runtime Modules load only at kernel start, not from a running kernel ({name})")


def _entry_point(name: str) -> Any | None:
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name == name:
            return ep.load()
    return None


def _register_fn(name: str) -> Callable[[Any], Any]:
    if not isinstance(name, str) or not _MODULE_NAME.fullmatch(name):
        raise ModuleError(f"{name!r} is not a module name (a dotted path or an entry point name)")
    target: Any = _entry_point(name)
    if target is None:
        try:
            target = importlib.import_module(name)
        except ImportError as exc:
            raise ModuleError(f"module {name!r}: cannot import it ({exc}); not an entry point in "
                              f"{ENTRY_POINT_GROUP!r} either") from exc
    fn = getattr(target, "register", None) if isinstance(target, ModuleType) else target
    if not callable(fn):
        raise ModuleError(f"module {name!r} has no register(config) function")
    return fn


def _check(name: str, prov: Any, rows: dict[str, str], kinds: dict[str, str]) -> None:
    if not isinstance(prov, Provider):
        raise ModuleError(f"module {name!r}: register() returned {type(prov).__name__}, not a Provider")
    kind = prov.kind
    if not isinstance(kind, str) or not _KIND.fullmatch(kind):
        raise ModuleError(f"module {name!r}: capability kind {kind!r} must match {_KIND.pattern}")
    if kind in _BUILTIN_KINDS and kind not in _ENDPOINT_KINDS:
        raise ModuleError(f"module {name!r}: {kind!r} is a built-in capability kind; a module brings its own")
    if kind in kinds:
        raise ModuleError(f"module {name!r}: capability kind {kind!r} is already provided by {kinds[kind]!r}")
    if not prov.syscalls:
        raise ModuleError(f"module {name!r}: provider {kind!r} has no syscalls")
    for key, t in prov.scope_keys.items():
        if not isinstance(key, str) or t not in _SCOPE_TYPES:
            raise ModuleError(f"module {name!r}: scope field {key!r} of {kind!r} has no known type ({t!r})")
    if kind not in _ENDPOINT_KINDS and not prov.scope_keys:
        raise ModuleError(f"module {name!r}: provider {kind!r} declares no scope fields")
    for row in prov.syscalls:
        verb = row.name[len(kind) + 1:] if row.name.startswith(kind + ".") else ""
        if not _VERB.fullmatch(verb):
            raise ModuleError(f"module {name!r}: syscall {row.name!r} must be named {kind}.<verb>")
        if row.kind != kind or row.provider != "ext" or row.role != "process":
            raise ModuleError(f"module {name!r}: syscall {row.name!r} must be a process syscall of kind {kind!r} "
                              "served by the provider (provider 'ext')")
        if not row.rights:
            raise ModuleError(f"module {name!r}: syscall {row.name!r} names no right (every call needs one)")
        if row.name in rows:
            raise ModuleError(f"module {name!r}: syscall {row.name!r} is already provided by {rows[row.name]!r}")
        rows[row.name] = name
    kinds[kind] = name


def load_modules(names: Sequence[str], config: Any) -> list[Provider]:
    """Import each named module and collect the providers its `register(config)` returns, checked
    (kinds, row names, rights, scope types, no duplicates). Call it once, before the kernel is
    constructed; the kernel takes the list at start and never another. Raises ModuleError."""
    _refuse_after_start()
    if isinstance(names, str):
        raise ModuleError("modules is a list of names, not one string")
    providers: list[Provider] = []
    rows: dict[str, str] = {}
    kinds: dict[str, str] = {}
    seen: set[str] = set()
    for name in names:
        if name in seen:
            continue
        seen.add(name)
        register = _register_fn(name)
        try:
            out = register(config)
        except ModuleError:
            raise
        except Exception as exc:
            raise ModuleError(f"module {name!r}: register() failed: {type(exc).__name__}: {exc}") from exc
        if isinstance(out, Provider):
            out = [out]
        if not isinstance(out, (list, tuple)):
            raise ModuleError(f"module {name!r}: register() must return a list of Providers")
        for prov in out:
            _check(name, prov, rows, kinds)
            providers.append(prov)
    return providers
