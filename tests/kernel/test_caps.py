"""CapTable on its own: derivation only narrows, revocation cascades exactly, handles are per process.

The oracles here are independent of `scope_within`: fs and llm scopes are compared by matching
sample paths and model names, the other kinds by plain set logic over their fields.
"""

from __future__ import annotations

import itertools
import math
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agentlibos.bus import KernelError
from agentlibos.kernel import KIND_RIGHTS, CapRecord, CapTable, Narrow, scope_within, validate_scope
from agentlibos.kernel._globs import PathSet, compile_glob

# --- pools of scopes per kind ------------------------------------------------------------------

FS_ROOTS = ["", "ws", "ws/docs", "ws/docs/a", "ws/src", "other"]
FS_PATHS: list[list[str] | None] = [
    None, ["**"], ["docs/**"], ["*.md"], ["docs/*.md"], ["**/*.md"], ["src/**", "docs/**"], ["a/**"],
    ["x.md"], [], ["*"], ["docs"],
]
FS_EXCLUDES: list[list[str] | None] = [None, [], [".git"], ["secret/**"], ["*.key"], ["**/*.key"], [".git", "*.key"]]

SHELL_PROGRAMS = [["git"], ["ls"], ["git", "ls"], ["git", "ls", "cat"]]
SHELL_CWDS = ["", "ws", "ws/docs", "other"]
SHELL_TIMEOUTS = [5, 10, 30]
SHELL_ENVS = [[], ["HOME"], ["HOME", "LANG"]]
# Literal argv patterns only: for literals, "pattern list is a subset" is exactly "narrower".
SHELL_ARGVS = [[["git", "status"]], [["git", "status"], ["ls"]], [["ls"]]]

MEM_NAMESPACES = ["self", "shared", "team"]

LLM_MODELS = [["scripted"], ["claude-*"], ["claude-3-*"], ["*"], ["claude-3-opus", "scripted"], ["gpt-4o"]]
LLM_MAX_TOKENS = [100, 1000, 4096]
MODEL_NAMES = ["scripted", "claude-3-opus", "claude-3-haiku", "claude-4", "claude-", "gpt-4o", "x", "claude-3-"]

RPC_ENDPOINTS = ["search", "billing", "https://x.example/api"]
RPC_METHODS = [["get"], ["get", "list"], ["put"], []]

MSG_TO: list[list[Any]] = [["parent"], ["parent", "children"], [3], ["parent", 3, "worker"], []]
MSG_QUEUES = [["inbox"], ["inbox", "jobs"], []]

KINDS = ["fs", "shell", "memory", "llm", "rpc", "msg"]

# World paths used to look for a path a child covers and its parent does not.
_COMPONENTS = ["docs", "src", "a", "x.md", "y.key", ".git", "secret"]
_RESTS = [""] + ["/".join(p) for n in (1, 2, 3) for p in itertools.product(_COMPONENTS, repeat=n)]
WORLD_PATHS = sorted({"/".join(x for x in (root, rest) if x) for root in FS_ROOTS for rest in _RESTS})


def _fs_covers(scope: dict[str, Any], world_path: str) -> bool:
    root = [c for c in scope["root"].split("/") if c]
    comps = [c for c in world_path.split("/") if c]
    if comps[: len(root)] != root:
        return False
    rest = "/".join(comps[len(root) :])
    return PathSet(scope.get("paths"), scope.get("exclude", ())).covers(rest)


def fs_witness(child: dict[str, Any], parent: dict[str, Any]) -> str | None:
    """A world path the child scope covers and the parent scope does not."""
    p_root = [c for c in parent["root"].split("/") if c]
    c_root = [c for c in child["root"].split("/") if c]
    if c_root[: len(p_root)] != p_root:
        return child["root"] if _fs_covers(child, child["root"]) else "<root outside parent>"
    for w in WORLD_PATHS:
        if _fs_covers(child, w) and not _fs_covers(parent, w):
            return w
    return None


def _models_cover(models: list[str], name: str) -> bool:
    return any(compile_glob(m).fullmatch(name) for m in models)


def _sub(child: list[Any] | None, parent: list[Any] | None) -> bool:
    """A list-valued limit: absent in the parent means unlimited."""
    if parent is None:
        return True
    return child is not None and all(c in parent for c in child)


def scope_verdict(kind: str, child: dict[str, Any], parent: dict[str, Any]) -> bool | None:
    """True: child is within parent. False: it widens (with a witness). None: undecided here."""
    if kind == "fs":
        if fs_witness(child, parent) is not None:
            return False
        return True if child == parent else None
    if kind == "llm":
        if any(_models_cover(child["models"], n) and not _models_cover(parent["models"], n) for n in MODEL_NAMES):
            return False
        pm, cm = parent.get("max_tokens"), child.get("max_tokens")
        if pm is not None and (cm is None or cm > pm):
            return False
        if set(child["models"]) <= set(parent["models"]) or "*" in parent["models"]:
            return True
        return None
    if kind == "memory":
        return child["namespace"] == parent["namespace"]
    if kind == "rpc":
        return child["endpoint"] == parent["endpoint"] and _sub(child.get("methods"), parent.get("methods"))
    if kind == "msg":
        return _sub(child["to"], parent["to"]) and _sub(child.get("queues"), parent.get("queues"))
    if kind == "shell":
        c_cwd = [c for c in child["cwd"].split("/") if c]
        p_cwd = [c for c in parent["cwd"].split("/") if c]
        pt, ct = parent.get("timeout_s"), child.get("timeout_s")
        return (
            set(child["programs"]) <= set(parent["programs"])
            and c_cwd[: len(p_cwd)] == p_cwd
            and (pt is None or (ct is not None and ct <= pt))
            and set(child.get("env", [])) <= set(parent.get("env", []))
            and _sub(child.get("argv"), parent.get("argv"))
        )
    raise AssertionError(kind)


# --- strategies --------------------------------------------------------------------------------


def _opt(draw: st.DrawFn, key: str, pool: list[Any], out: dict[str, Any]) -> None:
    v = draw(st.sampled_from(pool))
    if v is not None:
        out[key] = v


@st.composite
def scopes(draw: st.DrawFn, kind: str, partial: bool = False) -> dict[str, Any]:
    """A well-formed scope for `kind` (partial: any subset of its fields, for a narrow)."""
    out: dict[str, Any] = {}
    if kind == "fs":
        out["root"] = draw(st.sampled_from(FS_ROOTS))
        _opt(draw, "paths", FS_PATHS, out)
        _opt(draw, "exclude", FS_EXCLUDES, out)
    elif kind == "shell":
        out["programs"] = draw(st.sampled_from(SHELL_PROGRAMS))
        out["cwd"] = draw(st.sampled_from(SHELL_CWDS))
        _opt(draw, "timeout_s", [None, *SHELL_TIMEOUTS], out)
        out["env"] = draw(st.sampled_from(SHELL_ENVS))
        _opt(draw, "argv", [None, *SHELL_ARGVS], out)
    elif kind == "memory":
        out["namespace"] = draw(st.sampled_from(MEM_NAMESPACES))
    elif kind == "llm":
        out["models"] = draw(st.sampled_from(LLM_MODELS))
        _opt(draw, "max_tokens", [None, *LLM_MAX_TOKENS], out)
    elif kind == "rpc":
        out["endpoint"] = draw(st.sampled_from(RPC_ENDPOINTS))
        # An rpc scope always names its methods: without an allow-list it would authorize nothing,
        # and a narrow could add one.
        out["methods"] = draw(st.sampled_from(RPC_METHODS))
    elif kind == "msg":
        out["to"] = draw(st.sampled_from(MSG_TO))
        _opt(draw, "queues", [None, *MSG_QUEUES], out)
    if partial:
        keys = draw(st.sets(st.sampled_from(sorted(out))))
        out = {k: v for k, v in out.items() if k in keys}
    return out


# Malformed pieces of a narrow: (where, value). "parse": Narrow.parse refuses it; "scope": the
# merged scope fails validation (after the parent's status is checked).
MALFORMED_NARROW: list[dict[str, Any]] = [
    {"ttl": 5},
    {"scope": "ws"},
    {"rights": "read"},
    {"rights": [1]},
    {"approval": "sometimes"},
    {"expires_in_s": -1},
    {"expires_in_s": math.nan},
    {"expires_in_s": math.inf},
    {"expires_in_s": True},
    {"uses": -1},
    {"uses": 1.5},
    {"uses": True},
]
MALFORMED_SCOPE: dict[str, list[dict[str, Any]]] = {
    "fs": [{"root": "../x"}, {"root": "/etc"}, {"root": 5}, {"paths": "docs/**"}, {"paths": ["../*"]},
           {"exclude": ["/abs"]}, {"bogus": 1}, {"paths": None}],
    "shell": [{"cwd": ".."}, {"programs": "git"}, {"timeout_s": -1}, {"argv": [[]]}, {"bogus": 1}],
    "memory": [{"namespace": 3}, {"bogus": 1}, {"namespace": None}],
    "llm": [{"models": "x"}, {"max_tokens": "many"}, {"max_tokens": True}, {"bogus": 1}],
    "rpc": [{"methods": "get"}, {"endpoint": ["a"]}, {"bogus": 1}],
    "msg": [{"to": [True]}, {"to": "parent"}, {"queues": [1]}, {"bogus": 1}],
}

NOW0 = 1000.0


@st.composite
def narrows(draw: st.DrawFn, kind: str) -> tuple[dict[str, Any], str | None]:
    """A raw narrow and where it is malformed (None: well-formed)."""
    raw: dict[str, Any] = {}
    malformed: str | None = None
    roll = draw(st.integers(0, 19))
    if roll == 0:
        raw.update(draw(st.sampled_from(MALFORMED_NARROW)))
        malformed = "parse"
    elif roll == 1:
        raw["scope"] = draw(st.sampled_from(MALFORMED_SCOPE[kind]))
        malformed = "scope"
    if "scope" not in raw and draw(st.booleans()):
        raw["scope"] = draw(scopes(kind, partial=True))
    if "rights" not in raw and draw(st.booleans()):
        pool = sorted(KIND_RIGHTS[kind] | {"grant"})
        raw["rights"] = sorted(draw(st.sets(st.sampled_from(pool + ["bogus"]))))
    if "approval" not in raw and draw(st.booleans()):
        raw["approval"] = draw(st.sampled_from(["never", "always"]))
    if "expires_in_s" not in raw and draw(st.booleans()):
        raw["expires_in_s"] = draw(st.sampled_from([0, 0.5, 5, 100, 1e6]))
    if "uses" not in raw and draw(st.booleans()):
        raw["uses"] = draw(st.sampled_from([0, 1, 2, 5, 100]))
    return raw, malformed


def _root_cap(draw: st.DrawFn, table: CapTable, kind: str) -> CapRecord:
    rights = draw(st.sets(st.sampled_from(sorted(KIND_RIGHTS[kind] | {"grant"})), min_size=1))
    exp = draw(st.sampled_from([None, None, 3, 50, 1e5]))
    return table.create(
        holder=1,
        kind=kind,
        scope=draw(scopes(kind)),
        rights=sorted(rights),
        approval=draw(st.sampled_from(["never", "always"])),
        expires=None if exp is None else NOW0 + exp,
        uses=draw(st.sampled_from([None, None, 0, 1, 3, 10])),
    )


def expected_outcome(parent: CapRecord, raw: dict[str, Any], malformed: str | None, now: float) -> set[str] | None:
    """The codes a derive may fail with (None: it must succeed; an empty set means undecided)."""
    if malformed == "parse":
        return {"EINVAL"}
    if parent.revoked:
        return {"EREVOKED"}
    if (parent.expires is not None and now >= parent.expires) or (parent.uses is not None and parent.uses <= 0):
        return {"EEXPIRED"}
    if malformed == "scope":
        return {"EINVAL"}
    merged = {**parent.scope, **raw.get("scope", {})}
    verdict = scope_verdict(parent.kind, merged, parent.scope)
    widens = verdict is False
    rights = raw.get("rights")
    bogus_right = rights is not None and "bogus" in rights
    if rights is not None and not set(rights) <= parent.rights:
        widens = True
    if parent.approval == "always" and raw.get("approval") == "never":
        widens = True
    if raw.get("uses") is not None and parent.uses is not None and raw["uses"] > parent.uses:
        widens = True
    if widens:
        # An unknown right is both malformed and not held: either code is an honest refusal.
        return {"EPERM", "EINVAL"} if bogus_right else {"EPERM"}
    if verdict is None:
        return set()  # the scope check may conservatively refuse; anything else must succeed
    return None


def assert_not_wider(child: CapRecord, parent: CapRecord) -> None:
    assert child.kind == parent.kind
    assert child.rights <= parent.rights
    assert scope_within(child.kind, child.scope, parent.scope)
    assert scope_verdict(child.kind, child.scope, parent.scope) is not False, (child.scope, parent.scope)
    if parent.approval == "always":
        assert child.approval == "always"
    if parent.expires is not None:
        assert child.expires is not None and child.expires <= parent.expires
    if parent.uses is not None:
        assert child.uses is not None and child.uses <= parent.uses


# --- derivation chains -------------------------------------------------------------------------


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), kind=st.sampled_from(KINDS))
def test_derivation_never_widens(data: st.DataObject, kind: str) -> None:
    table = CapTable()
    caps = [_root_cap(data.draw, table, kind)]
    steps = data.draw(st.integers(1, 6))
    for step in range(steps):
        now = NOW0 + step
        parent = caps[data.draw(st.integers(0, len(caps) - 1))]
        raw, malformed = data.draw(narrows(kind))
        expect = expected_outcome(parent, raw, malformed, now)
        before = dict(table.records)
        try:
            child = table.derive(parent, Narrow.parse(raw), holder=1, now=now, handle=None, via="cap.derive")
        except KernelError as exc:
            assert expect is not None, f"derive from {parent.view()} with {raw} refused: {exc}"
            if expect:
                assert exc.code in expect, (exc.code, expect, raw, parent.view())
            else:
                assert exc.code == "EPERM", (exc, raw, parent.view())
            # A refused derive leaves the table as it was.
            assert table.records == before
            continue
        assert expect is None or expect == set(), f"derive from {parent.view()} with {raw} should fail with {expect}"
        assert child.parent == parent.id and child.id in parent.children
        assert child.holder == 1 and child.via == "cap.derive" and not child.revoked
        # Fields left out are inherited; the ones given are taken as given (or capped).
        assert child.rights == (frozenset(raw["rights"]) if "rights" in raw else parent.rights)
        assert child.approval == raw.get("approval", parent.approval)
        assert child.uses == (raw["uses"] if "uses" in raw else parent.uses)
        if "expires_in_s" in raw:
            cand = now + raw["expires_in_s"]
            assert child.expires == (cand if parent.expires is None else min(parent.expires, cand))
        else:
            assert child.expires == parent.expires
        # Not wider than its parent, nor than any ancestor.
        anc: CapRecord | None = parent
        while anc is not None:
            assert_not_wider(child, anc)
            anc = table.records[anc.parent] if anc.parent is not None else None
        caps.append(child)


FS_EXAMPLES = [
    # (parent, child, within)
    ({"root": "ws", "paths": ["docs/**"]}, {"root": "ws/docs", "paths": ["*.md"]}, True),
    ({"root": "ws", "paths": ["docs/**"]}, {"root": "ws/docs"}, True),
    ({"root": "ws", "paths": ["docs/**"]}, {"root": "ws/src"}, False),
    ({"root": "ws", "paths": ["docs/**"]}, {"root": "ws", "paths": ["**"]}, False),
    ({"root": "ws", "paths": ["docs/**"]}, {"root": ""}, False),
    ({"root": "ws"}, {"root": "wsx"}, False),
    ({"root": "ws", "exclude": [".git"]}, {"root": "ws", "exclude": []}, False),
    ({"root": "ws", "exclude": [".git"]}, {"root": "ws"}, False),
    ({"root": "ws", "exclude": [".git"]}, {"root": "ws", "exclude": [".git", "*.key"]}, True),
    ({"root": "ws", "exclude": [".git"]}, {"root": "ws", "paths": [".git/a"]}, False),
    ({"root": "ws", "exclude": ["secret/**"]}, {"root": "ws/secret"}, False),
    ({"root": "ws", "paths": ["**/*.md"]}, {"root": "ws/docs/a", "paths": ["*.md"]}, True),
    ({"root": "ws", "paths": ["*.md"]}, {"root": "ws/docs", "paths": ["*.md"]}, False),
]


@pytest.mark.parametrize(("parent", "child", "within"), FS_EXAMPLES)
def test_fs_examples(parent: dict[str, Any], child: dict[str, Any], within: bool) -> None:
    assert scope_within("fs", validate_scope("fs", child), validate_scope("fs", parent)) is within
    assert (fs_witness(child, parent) is None) is within
    table = CapTable()
    p = table.create(holder=1, kind="fs", scope=parent, rights=["read"])
    # A narrow merges into the parent's scope, so a field the child lacks is spelled by its
    # equivalent: no exclude is `exclude: []`, no paths is `paths: ["**"]`.
    spelled = dict(child)
    if "exclude" in parent and "exclude" not in child:
        spelled["exclude"] = []
    if "paths" in parent and "paths" not in child:
        spelled["paths"] = ["**"]
    narrow = Narrow.parse({"scope": spelled})
    if within:
        c = table.derive(p, narrow, holder=1, now=NOW0, handle=None, via="cap.derive")
        assert_not_wider(c, p)
    else:
        with pytest.raises(KernelError) as ei:
            table.derive(p, narrow, holder=1, now=NOW0, handle=None, via="cap.derive")
        assert ei.value.code == "EPERM"


def test_narrow_fields_each_refuse_widening() -> None:
    t = CapTable()
    p = t.create(holder=1, kind="memory", scope={"namespace": "shared"}, rights=["read", "list"], approval="always",
                 expires=NOW0 + 10, uses=3)
    for raw in ({"rights": ["read", "write"]}, {"approval": "never"}, {"uses": 4}, {"scope": {"namespace": "other"}}):
        with pytest.raises(KernelError) as ei:
            t.derive(p, Narrow.parse(raw), holder=1, now=NOW0, handle=None, via="cap.derive")
        assert ei.value.code == "EPERM", raw
    c = t.derive(p, Narrow.parse({"expires_in_s": 1e9, "uses": 3}), holder=1, now=NOW0, handle=None, via="cap.derive")
    assert c.expires == NOW0 + 10  # a later expiry is capped, not refused
    assert c.uses == 3 and p.uses == 3  # deriving is not a use


# --- revocation --------------------------------------------------------------------------------


@st.composite
def trees(draw: st.DrawFn) -> list[tuple[int, int]]:
    """(parent index, holder) per node after the first: a random derivation forest over 1-3 roots."""
    n = draw(st.integers(2, 16))
    return [(draw(st.integers(-1, i - 1)) if i else -1, draw(st.integers(1, 3))) for i in range(n)]


def _snapshot(rec: CapRecord) -> tuple[Any, ...]:
    return (rec.holder, rec.handle, rec.kind, dict(rec.scope), rec.rights, rec.approval, rec.expires, rec.uses,
            rec.parent, rec.revoked, rec.dropped, tuple(rec.children))


@settings(max_examples=300, deadline=None)
@given(shape=trees(), data=st.data())
def test_revocation_cascades_exactly(shape: list[tuple[int, int]], data: st.DataObject) -> None:
    table = CapTable()
    recs: list[CapRecord] = []
    kids: dict[int, list[int]] = {}
    for i, (pi, holder) in enumerate(shape):
        if pi < 0:
            rec = table.create(holder=holder, kind="memory", scope={"namespace": "shared"},
                               rights=["read", "write", "grant"])
        else:
            rights = data.draw(st.sampled_from([None, ["read"], ["read", "grant"]]))
            narrow = Narrow.parse({} if rights is None or not set(rights) <= recs[pi].rights else {"rights": rights})
            rec = table.derive(recs[pi], narrow, holder=holder, now=NOW0, handle=None, via="cap.grant")
            kids.setdefault(pi, []).append(i)
        recs.append(rec)

    def subtree(i: int) -> set[int]:
        out, stack = set(), [i]
        while stack:
            j = stack.pop()
            out.add(j)
            stack.extend(kids.get(j, []))
        return out

    revoked: set[int] = set()
    for _ in range(data.draw(st.integers(1, 3))):
        x = data.draw(st.integers(0, len(recs) - 1))
        before = {i: _snapshot(r) for i, r in enumerate(recs)}
        newly = table.revoke(recs[x].id)
        sub = subtree(x)
        assert sorted(newly) == sorted(recs[i].id for i in sub - revoked)
        revoked |= sub
        for i, r in enumerate(recs):
            if i in revoked:
                assert r.status(NOW0) == "EREVOKED"
                with pytest.raises(KernelError) as ei:
                    table.derive(r, Narrow(), holder=r.holder, now=NOW0, handle=None, via="cap.derive")
                assert ei.value.code == "EREVOKED"
            else:
                assert r.status(NOW0) is None
            if i not in sub:
                assert _snapshot(r) == before[i], "a cap outside the revoked subtree changed"
            else:
                b = before[i]
                assert _snapshot(r)[:9] == b[:9]  # only the revoked flag moves
        # Revocation holds in every process's table: each holder still sees its handle, dead.
        for r in recs:
            assert table.by_handle(r.holder, r.handle) is r
    # A cap derived later from a live cap is alive; one derived from it dies with its ancestor.
    live = [i for i in range(len(recs)) if i not in revoked]
    if live:
        i = live[0]
        late = table.derive(recs[i], Narrow(), holder=2, now=NOW0, handle=None, via="cap.derive")
        assert late.status(NOW0) is None
        table.revoke(recs[i].id)
        assert late.status(NOW0) == "EREVOKED"


# --- handles -----------------------------------------------------------------------------------


def _mem(table: CapTable, pid: int, handle: str | None = None) -> CapRecord:
    return table.create(holder=pid, kind="memory", scope={"namespace": "shared"}, rights=["read"], handle=handle)


def test_handles_are_per_process() -> None:
    t = CapTable()
    a1, a2 = _mem(t, 1), _mem(t, 1)
    b1 = _mem(t, 2)
    assert (a1.handle, a2.handle, b1.handle) == ("c1", "c2", "c1")
    assert t.by_handle(1, "c1") is a1 and t.by_handle(2, "c1") is b1
    # Another process's handle names nothing in mine, however it is spelled.
    for forged in ("c2", "c3", "c0", "C1", "c1 ", " c1", "", "self", "../c1", "c01", str(a2.id)):
        assert t.by_handle(2, forged) is None, forged
    assert t.by_handle(3, "c1") is None
    assert list(t.held(3)) == []


def test_dropped_handles_are_stale_and_not_reused() -> None:
    t = CapTable()
    c1, c2 = _mem(t, 1), _mem(t, 1)
    child = t.derive(c1, Narrow(), holder=2, now=NOW0, handle=None, via="cap.grant")
    assert t.drop(1, "c2") is c2 and c2.dropped
    assert t.drop(1, "c2") is None  # already closed
    assert t.drop(1, "c9") is None
    assert t.by_handle(1, "c2") is None
    assert t.new_handle(1) == "c3"
    assert _mem(t, 1).handle == "c4"
    # Dropping is closing a descriptor, not revoking: what was derived stays valid.
    t.drop(1, "c1")
    assert not c1.revoked and child.status(NOW0) is None
    assert _mem(t, 1).handle == "c5"


def test_named_handle_is_not_handed_out_again_after_drop() -> None:
    # `as: NAME` (cap.derive/grant, spawn) lets a handle take a cN name the counter has not reached.
    t = CapTable()
    first = _mem(t, 1)
    named = t.derive(first, Narrow(), holder=1, now=NOW0, handle="c2", via="cap.derive")
    assert named.handle == "c2"
    t.drop(1, "c2")
    fresh = _mem(t, 1)
    assert fresh.handle != "c2", "handle c2 was reused within process 1 for a different capability"


@settings(max_examples=500, deadline=None)
@given(ops=st.lists(st.tuples(st.sampled_from(["new", "named", "drop", "release"]), st.integers(1, 2),
                              st.integers(1, 6)), max_size=40))
def test_handles_never_reused(ops: list[tuple[str, int, int]]) -> None:
    t = CapTable()
    ever: dict[int, dict[str, int]] = {}  # pid -> handle -> cap id it named
    released: set[int] = set()
    for op, pid, n in ops:
        if pid in released:
            continue
        if op == "new":
            rec = _mem(t, pid)
            assert rec.handle not in ever.get(pid, {}), f"{rec.handle} reused in process {pid}"
            ever.setdefault(pid, {})[rec.handle] = rec.id
        elif op == "named":
            # Names in the counter's own cN form too: the counter must step around them.
            name = f"c{n}" if n % 2 else f"n{n}"
            if t.by_handle(pid, name) is not None:
                with pytest.raises(KernelError) as ei:
                    _mem(t, pid, handle=name)
                assert ei.value.code == "EEXIST"
            elif name not in ever.get(pid, {}):
                ever.setdefault(pid, {})[name] = _mem(t, pid, handle=name).id
        elif op == "drop":
            held = sorted(t.handles.get(pid, {}))
            if held:
                h = held[n % len(held)]
                t.drop(pid, h)
                assert t.by_handle(pid, h) is None
        else:
            held = [r.id for r in t.held(pid)]
            t.release_process(pid)
            released.add(pid)
            assert list(t.held(pid)) == []
            for cid in held:
                assert t.records[cid].dropped and not t.records[cid].revoked
            for h in ever.get(pid, {}):
                assert t.by_handle(pid, h) is None
        for p, names in ever.items():
            for h, cid in names.items():
                got = t.by_handle(p, h)
                assert got is None or got.id == cid, f"{h} in process {p} now names another capability"


def test_release_process_drops_all_and_keeps_others() -> None:
    t = CapTable()
    mine = [_mem(t, 1) for _ in range(3)]
    granted = t.derive(mine[0], Narrow(), holder=2, now=NOW0, handle=None, via="cap.grant")
    t.release_process(1)
    assert list(t.held(1)) == [] and all(t.by_handle(1, r.handle) is None for r in mine)
    assert all(r.dropped and r.id in t.records for r in mine)
    # The records stay (for derivation chains and explain), and the other process keeps its cap.
    assert t.by_handle(2, granted.handle) is granted and granted.status(NOW0) is None
    assert [r.id for r in t.chain(granted.id)] == [granted.id, mine[0].id]
    t.release_process(1)  # idempotent
    t.release_process(99)


# --- validate_scope ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "scope"),
    [
        ("nope", {}),
        ("FS", {"root": "ws"}),
        ("fs", []),
        ("fs", "ws"),
        ("fs", {}),
        ("fs", {"root": "ws", "bogus": 1}),
        ("fs", {"root": 1}),
        ("fs", {"root": "ws", "paths": "docs/**"}),
        ("fs", {"root": "ws", "paths": [1]}),
        ("fs", {"root": "ws", "paths": ["/abs"]}),
        ("fs", {"root": "ws", "paths": ["a/../b"]}),
        ("fs", {"root": "ws", "exclude": [""]}),
        ("fs", {"root": ".."}),
        ("fs", {"root": "ws/../.."}),
        ("fs", {"root": "a/.."}),
        ("fs", {"root": "/etc"}),
        ("fs", {"root": "/"}),
        ("fs", {"root": "ws\x00x"}),
        ("shell", {}),
        ("shell", {"programs": ["git"], "cwd": "../x"}),
        ("shell", {"programs": ["git"], "cwd": "/tmp"}),
        ("shell", {"programs": ["git"], "timeout_s": -1}),
        ("shell", {"programs": ["git"], "timeout_s": True}),
        ("shell", {"programs": ["git"], "argv": [[]]}),
        ("shell", {"programs": ["git"], "argv": ["git"]}),
        ("memory", {}),
        ("memory", {"namespace": 1}),
        ("memory", {"namespace": "self", "ns": "x"}),
        ("llm", {"models": "x"}),
        ("llm", {"models": ["x"], "max_tokens": "10"}),
        ("llm", {"models": ["x"], "max_tokens": -5}),
        ("rpc", {"endpoint": 5}),
        ("rpc", {"endpoint": "x", "methods": [None]}),
        ("msg", {"to": [True]}),
        ("msg", {"to": [1.5]}),
        ("msg", {"to": ["parent"], "queues": "inbox"}),
        ("human", {"channel": ["ops"]}),
        ("proc", {"images": ["x"], "max_children": "3"}),
    ],
)
def test_validate_scope_refuses(kind: str, scope: Any) -> None:
    with pytest.raises(KernelError) as ei:
        validate_scope(kind, scope)
    assert ei.value.code == "EINVAL"


@pytest.mark.parametrize(
    ("kind", "scope", "normalized"),
    [
        ("fs", {"root": "ws/./docs/"}, {"root": "ws/docs"}),
        ("fs", {"root": "."}, {"root": ""}),
        ("fs", {"root": "ws", "paths": ["docs/**"], "exclude": [".git"]},
         {"root": "ws", "paths": ["docs/**"], "exclude": [".git"]}),
        ("shell", {"programs": ["git"]}, {"programs": ["git"], "cwd": ""}),
        ("msg", {"to": ["parent", 3]}, {"to": ["parent", 3]}),
        ("llm", {"models": ["claude-*"], "max_tokens": 100}, {"models": ["claude-*"], "max_tokens": 100}),
    ],
)
def test_validate_scope_normalizes(kind: str, scope: dict[str, Any], normalized: dict[str, Any]) -> None:
    out = validate_scope(kind, scope)
    assert out == normalized
    assert out is not scope  # a fresh dict: later changes to the request cannot reach the record


def test_validate_scope_copies_lists() -> None:
    paths = ["docs/**"]
    out = validate_scope("fs", {"root": "ws", "paths": paths})
    paths.append("**")
    assert out["paths"] == ["docs/**"]


@pytest.mark.parametrize("raw", MALFORMED_NARROW + [[], "rights", 3])
def test_narrow_parse_refuses(raw: Any) -> None:
    with pytest.raises(KernelError) as ei:
        Narrow.parse(raw)
    assert ei.value.code == "EINVAL"


def test_create_refuses_bad_rights_and_handles() -> None:
    t = CapTable()
    for kw in ({"rights": ["fly"]}, {"rights": "read"}, {"approval": "maybe"}, {"handle": ""}, {"handle": "x" * 65}):
        args: dict[str, Any] = {"holder": 1, "kind": "fs", "scope": {"root": "ws"}, "rights": ["read"], **kw}
        with pytest.raises(KernelError) as ei:
            t.create(**args)
        assert ei.value.code == "EINVAL", kw
    t.create(holder=1, kind="fs", scope={"root": "ws"}, rights=["read"], handle="mine")
    with pytest.raises(KernelError) as ei:
        t.create(holder=1, kind="fs", scope={"root": "ws"}, rights=["read"], handle="mine")
    assert ei.value.code == "EEXIST"
    assert t.records == {k: v for k, v in t.records.items() if v.handle == "mine"}
