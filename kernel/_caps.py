"""Capabilities: kernel records, per-process handles, attenuation-only derivation, cascading revocation.

A process names a capability only by a handle resolved in its own table, so nothing a model or a
JIT tool says can reach a capability the process does not hold.
"""

from __future__ import annotations

import math
import numbers
import posixpath
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from agentlibos.bus._errors import KernelError
from agentlibos.kernel._globs import PathSet, glob_within

KIND_RIGHTS: dict[str, frozenset[str]] = {
    "fs": frozenset({"read", "write", "create", "delete", "list"}),
    "shell": frozenset({"exec"}),
    "human": frozenset({"ask", "notify"}),
    "memory": frozenset({"read", "write", "delete", "list"}),
    "proc": frozenset({"spawn", "signal", "wait"}),
    "msg": frozenset({"send"}),
    "checkpoint": frozenset({"create", "restore", "fork"}),
    "image": frozenset({"commit", "boot", "read"}),
    "rpc": frozenset({"call"}),
    "mcp": frozenset({"list", "call"}),
    "pty": frozenset({"open", "read", "write", "close"}),
    "llm": frozenset({"complete"}),
}
#: The kinds the kernel defines itself; providers registered at kernel start add theirs.
BUILTIN_KINDS = frozenset(KIND_RIGHTS)
KINDS = BUILTIN_KINDS
APPROVALS = ("never", "always")
NARROW_FIELDS = frozenset({"scope", "rights", "approval", "expires_in_s", "uses"})
#: The fields of a grant on the wire (op.spawn's caps and requestable ceiling, op.grant).
GRANT_FIELDS = frozenset({"kind", "scope", "rights", "approval", "expires_in_s", "uses", "name"})


def check_limits(raw: Mapping[str, Any], what: str) -> None:
    """`approval`, `expires_in_s` and `uses` of a grant or a narrow, when given, are well-formed."""
    approval = raw.get("approval")
    if approval is not None and approval not in APPROVALS:
        raise KernelError("EINVAL", f"{what}approval must be 'never' or 'always'")
    exp = raw.get("expires_in_s")
    if exp is not None and (
        not isinstance(exp, numbers.Real) or isinstance(exp, bool) or not math.isfinite(exp) or exp < 0
    ):
        raise KernelError("EINVAL", f"{what}expires_in_s must be a non-negative number of seconds")
    uses = raw.get("uses")
    if uses is not None and (not isinstance(uses, int) or isinstance(uses, bool) or uses < 0):
        raise KernelError("EINVAL", f"{what}uses must be a non-negative integer")

# Scope keys per kind and their types; anything else in a scope is EINVAL (deny by default).
_LIST = "list[str]"
SCOPE_KEYS: dict[str, dict[str, str]] = {
    "fs": {"root": "str", "paths": _LIST, "exclude": _LIST},
    "shell": {"programs": _LIST, "argv": "list[list[str]]", "cwd": "str", "timeout_s": "num", "env": _LIST},
    "human": {"channel": "str"},
    "memory": {"namespace": "str"},
    "proc": {"images": _LIST, "max_children": "num"},
    "msg": {"to": "list[str|int]", "queues": _LIST},
    "checkpoint": {"target": "str|int"},
    "image": {"names": _LIST},
    "rpc": {"endpoint": "str", "methods": _LIST},
    "mcp": {"server": "str", "tools": _LIST},
    "pty": {"programs": _LIST, "session": "str"},
    "llm": {"models": _LIST, "max_tokens": "num"},
}
REQUIRED_SCOPE: dict[str, tuple[str, ...]] = {
    "fs": ("root",),
    "shell": ("programs",),
    "memory": ("namespace",),
    "llm": ("models",),
    "rpc": ("endpoint", "methods"),
}


#: Narrowing checks of registered kinds (a kind without one gets the generic check).
_WITHIN: dict[str, Callable[[Mapping[str, Any], Mapping[str, Any]], bool]] = {}
SCOPE_TYPES = frozenset({"str", "num", "str|int", _LIST, "list[str|int]", "list[list[str]]"})


def register_kind(kind: str, rights: frozenset[str], scope_keys: Mapping[str, str],
                  within: Callable[[Mapping[str, Any], Mapping[str, Any]], bool] | None = None) -> None:
    """Make a provider's capability kind known (kernel start only). Registering the same kind
    again with the same definition is a no-op; a different definition, or a built-in kind, is an
    error: one name never means two kinds of authority in one process."""
    if kind in BUILTIN_KINDS:
        raise ValueError(f"{kind!r} is a built-in capability kind")
    if not rights or not scope_keys or any(t not in SCOPE_TYPES for t in scope_keys.values()):
        raise ValueError(f"capability kind {kind!r} needs rights and typed scope fields")
    known = KIND_RIGHTS.get(kind)
    if known is not None:
        if known != rights or SCOPE_KEYS[kind] != dict(scope_keys) or _WITHIN.get(kind) is not within:
            raise ValueError(f"capability kind {kind!r} is already registered with another definition")
        return
    KIND_RIGHTS[kind] = frozenset(rights)
    SCOPE_KEYS[kind] = dict(scope_keys)
    if within is not None:
        _WITHIN[kind] = within


def _type_ok(value: Any, t: str) -> bool:
    if t == "str":
        return isinstance(value, str)
    if t == "num":
        return isinstance(value, numbers.Real) and not isinstance(value, bool) and float(value) >= 0
    if t == "str|int":
        return isinstance(value, (str, int)) and not isinstance(value, bool)
    if t == _LIST:
        return isinstance(value, list) and all(isinstance(v, str) for v in value)
    if t == "list[str|int]":
        return isinstance(value, list) and all(isinstance(v, (str, int)) and not isinstance(v, bool) for v in value)
    if t == "list[list[str]]":
        return isinstance(value, list) and all(
            isinstance(p, list) and p and all(isinstance(a, str) for a in p) for p in value
        )
    return False


def _rel_components(path: str) -> tuple[str, ...]:
    """A scope directory relative to the world root; '..' and absolute paths are refused."""
    if path.startswith("/") or "\x00" in path:
        raise KernelError("EINVAL", f"scope directory {path!r} must be relative to the world root")
    parts = tuple(p for p in path.split("/") if p not in ("", "."))
    if ".." in parts:
        raise KernelError("EINVAL", f"scope directory {path!r} may not contain '..'")
    return parts


def validate_scope(kind: str, scope: Any) -> dict[str, Any]:
    """Check a scope's shape for its kind; return it normalized (a fresh dict)."""
    if kind not in KIND_RIGHTS:
        raise KernelError("EINVAL", f"unknown capability kind {kind!r}")
    if not isinstance(scope, Mapping):
        raise KernelError("EINVAL", "scope must be a map")
    keys = SCOPE_KEYS[kind]
    out: dict[str, Any] = {}
    for k, v in scope.items():
        if k not in keys:
            raise KernelError("EINVAL", f"{kind} scope has no field {k!r} (fields: {', '.join(sorted(keys))})")
        if not _type_ok(v, keys[k]):
            raise KernelError("EINVAL", f"{kind} scope field {k!r} must be {keys[k]}")
        out[k] = list(v) if isinstance(v, list) else v
    for k in REQUIRED_SCOPE.get(kind, ()):
        if k not in out:
            raise KernelError("EINVAL", f"{kind} scope needs {k!r}")
    if kind == "fs":
        out["root"] = "/".join(_rel_components(out["root"]))
        PathSet(tuple(out["paths"]) if "paths" in out else None, tuple(out.get("exclude", ())))
    if kind == "shell":
        out["cwd"] = "/".join(_rel_components(out.get("cwd", ".")))
    return out


def validate_rights(kind: str, rights: Any) -> frozenset[str]:
    if not isinstance(rights, (list, tuple, set, frozenset)) or not all(isinstance(r, str) for r in rights):
        raise KernelError("EINVAL", "rights must be a list of strings")
    allowed = KIND_RIGHTS[kind] | {"grant"}
    bad = set(rights) - allowed
    if bad:
        raise KernelError("EINVAL", f"{kind} has no right {sorted(bad)[0]!r} (rights: {', '.join(sorted(allowed))})")
    return frozenset(rights)


# --- narrowing -------------------------------------------------------------------------------


def _num_within(child: Any, parent: Any) -> bool:
    if parent is None:
        return True
    return child is not None and child <= parent


def _list_within(child: Any, parent: Any) -> bool:
    if parent is None:
        return True
    return child is not None and set(child) <= set(parent)


def _fs_within(child: Mapping[str, Any], parent: Mapping[str, Any]) -> bool:
    c_root = _rel_components(child["root"])
    p_root = _rel_components(parent["root"])
    if c_root[: len(p_root)] != p_root:
        return False
    rebase = "/".join(c_root[len(p_root) :])
    c_set = PathSet(tuple(child["paths"]) if "paths" in child else None, tuple(child.get("exclude", ())))
    p_set = PathSet(tuple(parent["paths"]) if "paths" in parent else None, tuple(parent.get("exclude", ())))
    from agentlibos.kernel._globs import pathset_within

    return pathset_within(c_set, p_set, rebase)


def _dir_within(child: str, parent: str) -> bool:
    c, p = _rel_components(child), _rel_components(parent)
    return c[: len(p)] == p


def _shell_within(child: Mapping[str, Any], parent: Mapping[str, Any]) -> bool:
    if not _list_within(child.get("programs"), parent.get("programs")):
        return False
    if "argv" in parent:
        # Conservative: each child pattern must be one of the parent's (deny when unsure).
        if "argv" not in child or not all(p in parent["argv"] for p in child["argv"]):
            return False
    if not _dir_within(child.get("cwd", "."), parent.get("cwd", ".")):
        return False
    if not _num_within(child.get("timeout_s"), parent.get("timeout_s")):
        return False
    return _list_within(child.get("env", []), parent.get("env", []))


def _llm_within(child: Mapping[str, Any], parent: Mapping[str, Any]) -> bool:
    for m in child["models"]:
        if not any(glob_within(m, p) for p in parent["models"]):
            return False
    return _num_within(child.get("max_tokens"), parent.get("max_tokens"))


def _image_within(child: Mapping[str, Any], parent: Mapping[str, Any]) -> bool:
    if "names" not in parent:
        return True
    return "names" in child and all(any(glob_within(c, p) for p in parent["names"]) for c in child["names"])


def _generic_within(kind: str, child: Mapping[str, Any], parent: Mapping[str, Any]) -> bool:
    types = SCOPE_KEYS[kind]
    for key in set(child) | set(parent):
        t = types.get(key)
        c, p = child.get(key), parent.get(key)
        if t is None:
            return False
        if key not in parent:
            # Adding a limit the parent lacks narrows for lists and numbers only.
            if t == "num" or t.startswith("list"):
                continue
            return False
        if t == "num":
            if not _num_within(c, p):
                return False
        elif t.startswith("list"):
            if not _list_within(c, p):
                return False
        elif c != p:
            return False
    return True


def scope_within(kind: str, child: Mapping[str, Any], parent: Mapping[str, Any]) -> bool:
    """True only if everything `child` authorizes, `parent` authorizes too."""
    try:
        if kind == "fs":
            return _fs_within(child, parent)
        if kind == "shell":
            return _shell_within(child, parent)
        if kind == "llm":
            return _llm_within(child, parent)
        if kind == "image":
            return _image_within(child, parent)
        if kind == "proc":
            images_ok = "images" not in parent or ("images" in child and all(
                any(glob_within(c, p) for p in parent["images"]) for c in child["images"]))
            return images_ok and _num_within(child.get("max_children"), parent.get("max_children"))
        if kind in _WITHIN:
            try:
                return bool(_WITHIN[kind](child, parent))
            except Exception:  # a narrowing check that cannot decide denies
                return False
        return _generic_within(kind, child, parent)
    except KernelError:
        return False


# --- records ---------------------------------------------------------------------------------


@dataclass(slots=True)
class CapRecord:
    """A capability as the kernel holds it; processes see only its handle."""

    id: int
    holder: int
    handle: str
    kind: str
    scope: dict[str, Any]
    rights: frozenset[str]
    approval: str = "never"
    expires: float | None = None
    uses: int | None = None
    parent: int | None = None
    via: str = "operator"
    created_seq: int = 0
    revoked: bool = False
    dropped: bool = False
    children: list[int] = field(default_factory=list)

    def status(self, now: float) -> str | None:
        """None when usable, else the ABI code that a use gets."""
        if self.revoked:
            return "EREVOKED"
        if self.expires is not None and now >= self.expires:
            return "EEXPIRED"
        if self.uses is not None and self.uses <= 0:
            return "EEXPIRED"
        return None

    def view(self) -> dict[str, Any]:
        return {
            "handle": self.handle,
            "kind": self.kind,
            "scope": self.scope,
            "rights": sorted(self.rights),
            "approval": self.approval,
            "expires": self.expires,
            "uses": self.uses,
            "revoked": self.revoked,
        }

    def log_body(self) -> dict[str, Any]:
        return {
            "cap": self.id,
            "holder": self.holder,
            "handle": self.handle,
            "kind": self.kind,
            "scope": self.scope,
            "rights": sorted(self.rights),
            "approval": self.approval,
            "expires": self.expires,
            "uses": self.uses,
            "parent": self.parent,
            "via": self.via,
        }


@dataclass(frozen=True, slots=True)
class Narrow:
    """The fields of a `narrow`; each left as None is inherited from the parent capability."""

    scope: dict[str, Any] | None = None
    rights: frozenset[str] | None = None
    approval: str | None = None
    expires_in_s: float | None = None
    uses: int | None = None

    @classmethod
    def parse(cls, raw: Any) -> Narrow:
        if raw is None:
            return cls()
        if not isinstance(raw, Mapping):
            raise KernelError("EINVAL", "narrow must be a map")
        unknown = set(raw) - NARROW_FIELDS
        if unknown:
            raise KernelError("EINVAL", f"narrow has no field {sorted(unknown)[0]!r}")
        scope = raw.get("scope")
        if scope is not None and not isinstance(scope, Mapping):
            raise KernelError("EINVAL", "narrow.scope must be a map")
        rights = raw.get("rights")
        if rights is not None and (not isinstance(rights, list) or not all(isinstance(r, str) for r in rights)):
            raise KernelError("EINVAL", "narrow.rights must be a list of strings")
        check_limits(raw, "narrow.")
        approval, exp, uses = raw.get("approval"), raw.get("expires_in_s"), raw.get("uses")
        return cls(
            scope=dict(scope) if scope is not None else None,
            rights=frozenset(rights) if rights is not None else None,
            approval=approval,
            expires_in_s=float(exp) if exp is not None else None,
            uses=uses,
        )


class CapTable:
    """Every capability record, every process's handle table, and the derivation forest."""

    def __init__(self, *, attenuate: bool = True, cascade: bool = True) -> None:
        # Both are always on outside the benchmark's ablations.
        self.attenuate = attenuate
        self.cascade = cascade
        self.records: dict[int, CapRecord] = {}
        self.handles: dict[int, dict[str, int]] = {}
        self._next_handle: dict[int, int] = {}
        self._used_names: dict[int, set[str]] = {}
        self._next_id = 1

    # handles ---------------------------------------------------------------------------------
    def new_handle(self, pid: int) -> str:
        """The next `cN` this process has never held (handles are never reused in a process)."""
        n = self._next_handle.get(pid, 1)
        used = self._used_names.setdefault(pid, set())
        while f"c{n}" in used:
            n += 1
        self._next_handle[pid] = n + 1
        return f"c{n}"

    def held(self, pid: int) -> Iterator[CapRecord]:
        for cid in self.handles.get(pid, {}).values():
            yield self.records[cid]

    def by_handle(self, pid: int, handle: str) -> CapRecord | None:
        cid = self.handles.get(pid, {}).get(handle)
        return None if cid is None else self.records[cid]

    # creation --------------------------------------------------------------------------------
    def create(
        self,
        *,
        holder: int,
        kind: str,
        scope: Any,
        rights: Any,
        approval: str = "never",
        expires: float | None = None,
        uses: int | None = None,
        parent: int | None = None,
        via: str = "operator",
        handle: str | None = None,
        created_seq: int = 0,
    ) -> CapRecord:
        scope_n = validate_scope(kind, scope)
        rights_n = validate_rights(kind, rights)
        if approval not in APPROVALS:
            raise KernelError("EINVAL", "approval must be 'never' or 'always'")
        table = self.handles.setdefault(holder, {})
        if handle is None:
            handle = self.new_handle(holder)
        elif not isinstance(handle, str) or not handle or len(handle) > 64:
            raise KernelError("EINVAL", "a handle name is a non-empty string of at most 64 characters")
        elif handle in table or handle in self._used_names.get(holder, ()):
            raise KernelError("EEXIST", f"handle {handle!r} is or was held by this process (handles are never reused)")
        rec = CapRecord(
            id=self._next_id,
            holder=holder,
            handle=handle,
            kind=kind,
            scope=scope_n,
            rights=rights_n,
            approval=approval,
            expires=expires,
            uses=uses,
            parent=parent,
            via=via,
            created_seq=created_seq,
        )
        self._next_id += 1
        self.records[rec.id] = rec
        table[handle] = rec.id
        self._used_names.setdefault(holder, set()).add(handle)
        if parent is not None:
            self.records[parent].children.append(rec.id)
        return rec

    def derive(
        self, parent: CapRecord, narrow: Narrow, *, holder: int, now: float, handle: str | None, via: str,
        dry_run: bool = False,
    ) -> CapRecord | None:
        """A new record for `holder` that is `parent` narrowed; anything that would widen is EPERM.

        With `dry_run`, every check runs and nothing is created (spawn validates its whole list
        before it makes anything)."""
        code = parent.status(now)
        if code is not None:
            raise KernelError(code, f"capability {parent.handle} is {'revoked' if code == 'EREVOKED' else 'expired'}")
        scope = dict(parent.scope)
        if narrow.scope is not None:
            scope.update(narrow.scope)
        scope = validate_scope(parent.kind, scope)
        if self.attenuate and not scope_within(parent.kind, scope, parent.scope):
            raise KernelError("EPERM", f"narrow would widen the scope of {parent.handle}")
        rights = parent.rights if narrow.rights is None else narrow.rights
        if self.attenuate and not rights <= parent.rights:
            raise KernelError("EPERM", f"narrow would add rights {sorted(rights - parent.rights)} to {parent.handle}")
        approval = narrow.approval or parent.approval
        if self.attenuate and parent.approval == "always" and approval != "always":
            raise KernelError("EPERM", f"narrow would drop the approval requirement of {parent.handle}")
        expires = parent.expires
        if narrow.expires_in_s is not None:
            cand = now + narrow.expires_in_s
            expires = cand if expires is None else min(expires, cand)
        uses = parent.uses
        if narrow.uses is not None:
            if self.attenuate and parent.uses is not None and narrow.uses > parent.uses:
                raise KernelError("EPERM", f"narrow would give more uses than {parent.handle} has left")
            uses = narrow.uses
        if dry_run:
            validate_rights(parent.kind, rights)
            return None
        return self.create(
            holder=holder,
            kind=parent.kind,
            scope=scope,
            rights=rights,
            approval=approval,
            expires=expires,
            uses=uses,
            parent=parent.id,
            via=via,
            handle=handle,
        )

    # revocation ------------------------------------------------------------------------------
    def subtree(self, cap_id: int) -> list[int]:
        out, stack = [], [cap_id]
        while stack:
            cid = stack.pop()
            out.append(cid)
            stack.extend(self.records[cid].children)
        return out

    def revoke(self, cap_id: int) -> list[int]:
        """Revoke a capability and everything derived from it; return the ids newly revoked."""
        newly = []
        for cid in (self.subtree(cap_id) if self.cascade else [cap_id]):
            rec = self.records[cid]
            if not rec.revoked:
                rec.revoked = True
                newly.append(cid)
        return newly

    def drop(self, pid: int, handle: str) -> CapRecord | None:
        cid = self.handles.get(pid, {}).pop(handle, None)
        if cid is None:
            return None
        rec = self.records[cid]
        rec.dropped = True
        return rec

    def release_process(self, pid: int) -> None:
        """An exited process holds nothing any more (records stay, for derivation and explain)."""
        for cid in self.handles.pop(pid, {}).values():
            self.records[cid].dropped = True

    def chain(self, cap_id: int) -> list[CapRecord]:
        """The derivation chain from a capability back to its operator grant."""
        out = []
        cur: int | None = cap_id
        while cur is not None and cur in self.records:
            out.append(self.records[cur])
            cur = self.records[cur].parent
        return out


def normalize_rel(path: str) -> str:
    return posixpath.normpath(path) if path else "."
