"""The `git` Runtime Module through the real embedded runtime, on real repositories in tmp_path:
the loader, repository-scoped caps (another repo, `..`, links out), hooks and repo config that
never run, typed operations, and push only to an operator-configured remote, only with approval.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import types
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from agentlibos.bus import KernelClient, KernelError
from agentlibos.kernel._config import KernelConfig
from agentlibos.kernel._git import GIT_RIGHTS, make_git_provider, register
from agentlibos.kernel._modules import ModuleError, load_modules
from agentlibos.kernel._provider import CallInfo, Provider
from agentlibos.kernel._rpc import make_rpc_provider
from agentlibos.kernel._table import _row
from agentlibos.runtime import Grant, Runtime

ALL = sorted(GIT_RIGHTS)
GIT_ENV = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": "/nonexistent", "LC_ALL": "C",
           "GIT_CONFIG_NOSYSTEM": "1", "GIT_CONFIG_GLOBAL": "/dev/null", "GIT_AUTHOR_NAME": "t",
           "GIT_AUTHOR_EMAIL": "t@t.invalid", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t.invalid"}


def git(cwd: Path, *argv: str) -> str:
    return subprocess.run(["git", *argv], cwd=cwd, env=GIT_ENV, check=True, capture_output=True,
                          text=True).stdout.strip()


def make_repo(path: Path) -> Path:
    path.mkdir(parents=True)
    git(path, "init", "-q", "-b", "main")
    (path / "README").write_text("hello\n")
    git(path, "add", "README")
    git(path, "commit", "-q", "-m", "init")
    return path


def config(tmp_path: Path, remotes: Mapping[str, str]) -> KernelConfig:
    return KernelConfig.load(tmp_path / "state", tmp_path / "world", git_remotes=dict(remotes))


class Env:
    def __init__(self, tmp_path: Path, rt: Runtime) -> None:
        self.tmp = tmp_path
        self.rt = rt
        self.world = tmp_path / "world"
        self.clients: list[KernelClient] = []

    def proc(self, *caps: Grant) -> tuple[int, str, KernelClient]:
        pid, token = self.rt.spawn_external("x", caps=list(caps))
        c = self.rt.client(token)
        self.clients.append(c)
        return pid, token, c

    def approvals(self) -> list[dict[str, Any]]:
        return list(self.rt.operator.call("op.approvals")["approvals"])

    def wait_approval(self, pid: int, timeout_s: float = 30) -> dict[str, Any]:
        """Poll op.approvals (each poll is a kernel round trip) until pid has one pending."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            mine = [a for a in self.approvals() if a["pid"] == pid]
            if mine:
                return mine[0]
        raise AssertionError(f"no approval pending for pid {pid} within {timeout_s} s")


@contextmanager
def runtime(tmp_path: Path, remotes: Mapping[str, str] | None = None) -> Iterator[Env]:
    world = tmp_path / "world"
    world.mkdir(exist_ok=True)
    providers = load_modules(["agentlibos.kernel._git"], config(tmp_path, remotes or {}))
    rt = Runtime(tmp_path / "state", world_root=world, ipc=False, providers=providers)
    env = Env(tmp_path, rt)
    with rt:
        rt.register_image("x")
        try:
            yield env
        finally:
            for c in env.clients:
                c.close()


def code_of(c: KernelClient, sys: str, args: dict[str, Any]) -> str:
    with pytest.raises(KernelError) as ei:
        c.call(sys, args)
    return ei.value.code


def cap(repos: list[str], rights: list[str] = ALL, remotes: list[str] | None = None, **kw: Any) -> Grant:
    scope: dict[str, Any] = {"repos": repos}
    if remotes is not None:
        scope["remotes"] = remotes
    return Grant("git", scope, rights, **kw)


# --- the loader ------------------------------------------------------------------------------


def test_load_modules_gives_the_git_provider(tmp_path: Path) -> None:
    (prov,) = load_modules(["agentlibos.kernel._git"], config(tmp_path, {}))
    assert prov.kind == "git"
    assert {r.name: (r.rights, [(a.name, a.type, a.required) for a in r.args]) for r in prov.syscalls} == {
        "git.status": (("status",), [("repo", "str", True)]),
        "git.diff": (("diff",), [("repo", "str", True), ("staged", "bool", False)]),
        "git.commit": (("commit",), [("repo", "str", True), ("message", "str", True), ("paths", "list", False)]),
        "git.branch": (("branch",), [("repo", "str", True), ("name", "str", True), ("create", "bool", False)]),
        "git.worktree": (("worktree",), [("repo", "str", True), ("path", "str", True), ("branch", "str", True)]),
        "git.push": (("push",), [("repo", "str", True), ("remote", "str", True), ("branch", "str", True)]),
    }
    assert dict(prov.scope_keys) == {"repos": "list[str]", "remotes": "list[str]"}


def _fake_module(monkeypatch: pytest.MonkeyPatch, name: str, register_fn: Any) -> None:
    mod = types.ModuleType(name)
    if register_fn is not None:
        mod.register = register_fn  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, name, mod)


def _prov(kind: str, rows: tuple[Any, ...], **kw: Any) -> Provider:
    return Provider(kind=kind, syscalls=rows, covers=lambda s, n, a: True, run=lambda a, i: {},
                    scope_keys=kw.pop("scope_keys", {"names": "list[str]"}), **kw)


def test_loader_refuses_bad_modules(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = config(tmp_path, {})
    with pytest.raises(ModuleError, match="cannot import"):
        load_modules(["agentlibos_no_such_module_xyz"], cfg)
    with pytest.raises(ModuleError, match="not a module name"):
        load_modules(["../evil"], cfg)
    with pytest.raises(ModuleError, match="list of names"):
        load_modules("agentlibos.kernel._git", cfg)
    _fake_module(monkeypatch, "alos_mod_noreg", None)
    with pytest.raises(ModuleError, match="no register"):
        load_modules(["alos_mod_noreg"], cfg)
    # A module may not take over a built-in kind (fs caps mean what the kernel says they mean).
    fs_row = _row("fs.chmod", "path:str", "fs", "write", "syscalls", "ext", "")
    _fake_module(monkeypatch, "alos_mod_fs", lambda c: [_prov("fs", (fs_row,))])
    with pytest.raises(ModuleError, match="built-in capability kind"):
        load_modules(["alos_mod_fs"], cfg)
    # Rows are <kind>.<verb>, served by the provider, each naming a right.
    bad_name = _row("other.x", "", "thing", "use", "syscalls", "ext", "")
    _fake_module(monkeypatch, "alos_mod_name", lambda c: [_prov("thing", (bad_name,))])
    with pytest.raises(ModuleError, match="thing.<verb>"):
        load_modules(["alos_mod_name"], cfg)
    no_right = _row("thing.x", "", "thing", "", "syscalls", "ext", "")
    _fake_module(monkeypatch, "alos_mod_right", lambda c: [_prov("thing", (no_right,))])
    with pytest.raises(ModuleError, match="names no right"):
        load_modules(["alos_mod_right"], cfg)
    op_row = _row("thing.x", "", "thing", "use", "", "ext", "", role="operator")
    _fake_module(monkeypatch, "alos_mod_op", lambda c: [_prov("thing", (op_row,))])
    with pytest.raises(ModuleError, match="process syscall"):
        load_modules(["alos_mod_op"], cfg)
    # Two modules cannot claim the same kind; a failing register() is a ModuleError.
    with pytest.raises(ModuleError, match="already provided"):
        _fake_module(monkeypatch, "alos_mod_git2", register)
        load_modules(["agentlibos.kernel._git", "alos_mod_git2"], cfg)

    def boom(c: Any) -> Any:
        raise RuntimeError("no")

    _fake_module(monkeypatch, "alos_mod_boom", boom)
    with pytest.raises(ModuleError, match="register\\(\\) failed"):
        load_modules(["alos_mod_boom"], cfg)


def test_loader_accepts_endpoint_providers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A module may bring RPC endpoints: a provider of the built-in rpc kind."""
    _fake_module(monkeypatch, "alos_mod_rpc", lambda c: [make_rpc_provider({"crm": "http://127.0.0.1:9/"})])
    (prov,) = load_modules(["alos_mod_rpc"], config(tmp_path, {}))
    assert prov.kind == "rpc"


def test_loader_refuses_a_running_kernel(tmp_path: Path) -> None:
    """Nothing loads a module later: not a provider on an effect thread, not the kernel thread."""
    errors: list[BaseException] = []

    def attempt() -> None:
        try:
            load_modules(["agentlibos.kernel._git"], config(tmp_path, {}))
        except BaseException as exc:
            errors.append(exc)

    for name in ("agentlibos-effect_0", "Kernel-7"):
        t = threading.Thread(target=attempt, name=name)
        t.start()
        t.join(30)
    assert len(errors) == 2 and all(isinstance(e, ModuleError) and "only at kernel start" in str(e) for e in errors)


def test_the_syscall_table_is_fixed_at_start(tmp_path: Path) -> None:
    with runtime(tmp_path) as env:
        _, _, c = env.proc(cap(["proj"]))
        assert "git.status" in env.rt.inspect(lambda k: set(k.syscalls))
        # No operator request or syscall adds a module: op.* has nothing of the sort.
        assert not [n for n in env.rt.inspect(lambda k: list(k.syscalls)) if "module" in n]
        with pytest.raises(KernelError) as ei:
            env.rt.operator.call("op.module.load", {"name": "agentlibos.kernel._git"})
        assert ei.value.code == "ENOSYS"


# --- typed operations in an allowed repo -------------------------------------------------------


def test_status_diff_commit_branch_worktree(tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "world" / "proj")
    with runtime(tmp_path) as env:
        _, _, c = env.proc(cap(["proj"]))
        st = c.call("git.status", {"repo": "proj"})
        assert st["branch"] == "main" and st["entries"] == [] and len(st["head"]) == 40
        (repo / "README").write_text("hello\nworld\n")
        (repo / "new.txt").write_text("new\n")
        st = c.call("git.status", {"repo": "proj"})
        assert {(e["path"], e["index"], e["worktree"]) for e in st["entries"]} == {
            ("README", " ", "M"), ("new.txt", "?", "?")}
        d = c.call("git.diff", {"repo": "proj"})
        assert "+world" in d["diff"] and d["truncated"] is False
        assert c.call("git.diff", {"repo": "proj", "staged": True})["diff"] == ""

        # Commit only the listed path; the other change stays in the work tree.
        out = c.call("git.commit", {"repo": "proj", "message": "add new", "paths": ["new.txt"]})
        assert out["branch"] == "main" and out["commit"] == git(repo, "rev-parse", "HEAD")
        assert git(repo, "show", "--name-only", "--format=%s", "HEAD").split("\n") == ["add new", "", "new.txt"]
        assert git(repo, "log", "-1", "--format=%an <%ae>") == "agent-libos <agent@agent-libos.invalid>"
        assert [e["path"] for e in c.call("git.status", {"repo": "proj"})["entries"]] == ["README"]
        # Without paths: every change.
        c.call("git.commit", {"repo": "proj", "message": "the rest"})
        assert c.call("git.status", {"repo": "proj"})["entries"] == []
        assert code_of(c, "git.commit", {"repo": "proj", "message": "empty"}) == "EINVAL"
        assert code_of(c, "git.commit", {"repo": "proj", "message": "x", "paths": ["../escape"]}) == "EPERM"

        # Branches: create-and-switch, switch back, typed failures.
        b = c.call("git.branch", {"repo": "proj", "name": "feature", "create": True})
        assert b["branch"] == "feature" and git(repo, "symbolic-ref", "--short", "HEAD") == "feature"
        assert code_of(c, "git.branch", {"repo": "proj", "name": "feature", "create": True}) == "EEXIST"
        assert code_of(c, "git.branch", {"repo": "proj", "name": "nope"}) == "ENOENT"
        assert code_of(c, "git.branch", {"repo": "proj", "name": "-d"}) == "EINVAL"
        assert code_of(c, "git.branch", {"repo": "proj", "name": "a..b"}) == "EINVAL"
        assert c.call("git.branch", {"repo": "proj", "name": "main"})["branch"] == "main"

        # A worktree inside the repo's scope (its parent directory exists), on a new branch; then work in it.
        (repo / ".worktrees").mkdir()
        assert code_of(c, "git.worktree", {"repo": "proj", "path": "proj/no/such/wt", "branch": "x"}) == "ENOENT"
        w = c.call("git.worktree", {"repo": "proj", "path": "proj/.worktrees/wt1", "branch": "wt-branch"})
        assert w == {"path": "proj/.worktrees/wt1", "branch": "wt-branch", "head": git(repo, "rev-parse", "HEAD")}
        wt = repo / ".worktrees" / "wt1"
        assert (wt / "README").read_text() == "hello\nworld\n"
        (wt / "f.txt").write_text("in the worktree\n")
        c.call("git.commit", {"repo": "proj/.worktrees/wt1", "message": "wt work"})
        assert git(repo, "log", "-1", "--format=%s", "wt-branch") == "wt work"
        assert code_of(c, "git.worktree", {"repo": "proj", "path": "proj/.worktrees/wt1", "branch": "x"}) == "EEXIST"


def test_rights_are_per_operation(tmp_path: Path) -> None:
    make_repo(tmp_path / "world" / "proj")
    with runtime(tmp_path) as env:
        _, _, c = env.proc(cap(["proj"], ["status", "diff"]))
        c.call("git.status", {"repo": "proj"})
        assert code_of(c, "git.commit", {"repo": "proj", "message": "x"}) == "EPERM"
        assert code_of(c, "git.branch", {"repo": "proj", "name": "b", "create": True}) == "EPERM"


# --- repository scope -----------------------------------------------------------------------------


def test_other_repos_and_escapes_are_eperm(tmp_path: Path) -> None:
    world = tmp_path / "world"
    make_repo(world / "proj")
    make_repo(world / "other")
    outside = make_repo(tmp_path / "outside")
    (world / "proj" / "to-other").symlink_to("../other")
    (world / "proj" / "abs-out").symlink_to(outside)
    (world / "proj" / "up-out").symlink_to("../../outside")
    with runtime(tmp_path) as env:
        _, _, c = env.proc(cap(["proj"]))
        assert code_of(c, "git.status", {"repo": "other"}) == "EPERM"
        assert code_of(c, "git.status", {"repo": "proj/../other"}) == "EPERM"
        assert code_of(c, "git.status", {"repo": "../outside"}) == "EPERM"
        assert code_of(c, "git.status", {"repo": str(outside)}) == "EPERM"
        assert code_of(c, "git.status", {"repo": "proj/to-other"}) == "EPERM"  # a link to another repo
        assert code_of(c, "git.status", {"repo": "proj/abs-out"}) == "EPERM"  # an absolute link
        assert code_of(c, "git.status", {"repo": "proj/up-out"}) == "EPERM"  # a link out of the root
        assert code_of(c, "git.worktree", {"repo": "proj", "path": "other/wt", "branch": "b"}) == "EPERM"
        assert code_of(c, "git.worktree", {"repo": "proj", "path": "../wt", "branch": "b"}) == "EPERM"
        assert code_of(c, "git.worktree", {"repo": "proj", "path": "proj/to-other/wt", "branch": "b"}) == "EPERM"
        assert not (world / "other" / "wt").exists() and not (tmp_path / "wt").exists()
        # A subdirectory without its own .git is not a repository top (git never climbs out).
        (world / "proj" / "sub").mkdir()
        assert code_of(c, "git.status", {"repo": "proj/sub"}) == "ENOENT"
        # A scope without repos authorizes nothing.
        _, _, c2 = env.proc(Grant("git", {}, ALL))
        assert code_of(c2, "git.status", {"repo": "proj"}) == "EPERM"


def test_git_dir_links_out_are_refused(tmp_path: Path) -> None:
    world = tmp_path / "world"
    make_repo(world / "other")
    proj = world / "proj"
    proj.mkdir()
    (proj / ".git").write_text(f"gitdir: {world / 'other' / '.git'}\n")  # a gitfile into another repo
    linked = world / "linked"
    linked.mkdir()
    (linked / ".git").symlink_to(world / "other" / ".git")
    with runtime(tmp_path) as env:
        _, _, c = env.proc(cap(["proj", "linked"]))
        assert code_of(c, "git.status", {"repo": "proj"}) == "EPERM"
        assert code_of(c, "git.status", {"repo": "linked"}) == "EPERM"


def test_derived_caps_only_narrow(tmp_path: Path) -> None:
    make_repo(tmp_path / "world" / "proj")
    with runtime(tmp_path, {"origin": str(tmp_path / "remote.git")}) as env:
        _, _, c = env.proc(cap(["proj"], name="g"))
        h = c.call("cap.derive", {"handle": "g", "narrow": {"scope": {"repos": ["proj/.worktrees"]}}})["handle"]
        assert h
        assert code_of(c, "cap.derive", {"handle": "g", "narrow": {"scope": {"repos": ["other"]}}}) == "EPERM"
        # The parent names no remotes: a child may not add one (that would widen: no push -> push).
        assert code_of(c, "cap.derive", {"handle": "g", "narrow": {"scope": {"remotes": ["origin"]}}}) == "EPERM"
        assert code_of(c, "cap.derive", {"handle": "g", "narrow": {"rights": ["status", "foo"]}}) in ("EPERM", "EINVAL")


# --- hooks and repository config never run -------------------------------------------------------


def test_hooks_never_run(tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "world" / "proj")
    canary = tmp_path / "canary"
    for hook in ("pre-commit", "commit-msg", "post-commit", "post-checkout", "reference-transaction"):
        h = repo / ".git" / "hooks" / hook
        h.write_text(f"#!/bin/sh\necho {hook} >> {canary}\n")
        h.chmod(0o755)
    with runtime(tmp_path) as env:
        _, _, c = env.proc(cap(["proj"]))
        (repo / "a.txt").write_text("a\n")
        c.call("git.commit", {"repo": "proj", "message": "a"})
        c.call("git.branch", {"repo": "proj", "name": "b", "create": True})
        c.call("git.worktree", {"repo": "proj", "path": "proj/wt", "branch": "c"})
        assert git(repo, "log", "-1", "--format=%s", "b") == "a"
    assert not canary.exists()


@pytest.mark.parametrize("key, value", [
    ("core.fsmonitor", "{canary}"),
    ("core.hooksPath", "{hooks}"),
    ("alias.status", "!{canary}"),
    ("filter.x.clean", "{canary}"),
    ("diff.external", "{canary}"),
    ("core.worktree", "/"),
    ("include.path", "/dev/null"),
    ("url./tmp/.insteadOf", "origin"),
])
def test_repo_config_that_could_run_anything_is_refused(tmp_path: Path, key: str, value: str) -> None:
    repo = make_repo(tmp_path / "world" / "proj")
    canary = tmp_path / "canary"
    script = tmp_path / "run.sh"
    script.write_text(f"#!/bin/sh\necho ran >> {canary}\n")
    script.chmod(0o755)
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "pre-commit").symlink_to(script)
    (repo / ".gitattributes").write_text("* filter=x diff=x\n")
    git(repo, "config", key, value.format(canary=script, hooks=hooks))
    with runtime(tmp_path) as env:
        _, _, c = env.proc(cap(["proj"]))
        (repo / "a.txt").write_text("a\n")
        for sys_, args in (("git.status", {}), ("git.diff", {}), ("git.commit", {"message": "m"})):
            with pytest.raises(KernelError) as ei:
                c.call(sys_, {"repo": "proj", **args})
            assert ei.value.code == "EPERM" and key.lower() in ei.value.message
    assert not canary.exists()


# --- push: configured remotes only, always with approval -----------------------------------------


def _push_in_thread(env: Env, token: str, args: dict[str, Any]) -> tuple[threading.Thread, dict[str, Any]]:
    box: dict[str, Any] = {}

    def go() -> None:
        c = env.rt.client(token)  # a client is confined to the thread that made it
        try:
            box["value"] = c.call("git.push", args)
        except KernelError as exc:
            box["error"] = exc
        finally:
            c.close()

    t = threading.Thread(target=go)
    t.start()
    return t, box


def test_push_to_a_configured_remote_waits_for_approval(tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "world" / "proj")
    remote = tmp_path / "remote.git"
    git(tmp_path, "init", "-q", "--bare", str(remote))
    canary = tmp_path / "canary"
    # The remote is the operator's: its own server-side hooks are the operator's policy and do run
    # (git clears -c settings for the local receive-pack); here it records which pushes arrived.
    hook = remote / "hooks" / "pre-receive"
    hook.write_text(f"#!/bin/sh\necho ran >> {canary}\n")
    hook.chmod(0o755)
    with runtime(tmp_path, {"origin": str(remote)}) as env:
        pid, token, _ = env.proc(cap(["proj"], remotes=["origin"], approval="always"))
        head = git(repo, "rev-parse", "HEAD")

        # Denied: EDENIED, nothing reaches the remote.
        t, box = _push_in_thread(env, token, {"repo": "proj", "remote": "origin", "branch": "main"})
        ap = env.wait_approval(pid)
        assert ap["sys"] == "git.push"
        assert {k: ap["rendering"][k] for k in ("repo", "remote", "url", "branch")} == {
            "repo": "proj", "remote": "origin", "url": str(remote), "branch": "main"}
        env.rt.operator.call("op.deny", {"id": ap["id"], "reason": "not yet"})
        t.join(30)
        assert box["error"].code == "EDENIED"
        assert subprocess.run(["git", "rev-parse", "--verify", "-q", "refs/heads/main"], cwd=remote, env=GIT_ENV,
                              capture_output=True).returncode != 0

        # Approved: the branch arrives with the commit the kernel resolved.
        t, box = _push_in_thread(env, token, {"repo": "proj", "remote": "origin", "branch": "main"})
        ap = env.wait_approval(pid)
        env.rt.operator.call("op.approve", {"id": ap["id"]})
        t.join(30)
        assert "error" not in box, box
        assert box["value"] == {"remote": "origin", "url": str(remote), "branch": "main", "commit": head}
        assert git(remote, "rev-parse", "refs/heads/main") == head
        assert env.approvals() == []
    assert canary.read_text() == "ran\n"  # once: the denied push never reached the remote


def test_push_to_an_unconfigured_remote_is_eperm(tmp_path: Path) -> None:
    make_repo(tmp_path / "world" / "proj")
    configured = tmp_path / "remote.git"
    git(tmp_path, "init", "-q", "--bare", str(configured))
    rogue = tmp_path / "rogue.git"
    git(tmp_path, "init", "-q", "--bare", str(rogue))
    with runtime(tmp_path, {"origin": str(configured)}) as env:
        # "rogue" is in the cap's scope but the operator never configured it; "origin" is configured
        # but not in this cap's scope; a URL is never a remote name.
        pid, _, c = env.proc(cap(["proj"], remotes=["rogue", str(rogue)], approval="always"))
        for remote in ("rogue", "origin", str(rogue)):
            assert code_of(c, "git.push", {"repo": "proj", "remote": remote, "branch": "main"}) == "EPERM"
        assert [a for a in env.approvals() if a["pid"] == pid] == []  # refused before anyone is asked
        # A remote the repository itself configures is not a remote the operator configured.
        git(tmp_path / "world" / "proj", "remote", "add", "mine", str(rogue))
        assert code_of(c, "git.push", {"repo": "proj", "remote": "mine", "branch": "main"}) == "EPERM"
    assert subprocess.run(["git", "rev-parse", "--verify", "-q", "refs/heads/main"], cwd=rogue, env=GIT_ENV,
                          capture_output=True).returncode != 0


def test_push_waits_for_approval_even_on_a_cap_without_it(tmp_path: Path) -> None:
    make_repo(tmp_path / "world" / "proj")
    remote = tmp_path / "remote.git"
    git(tmp_path, "init", "-q", "--bare", str(remote))
    with runtime(tmp_path, {"origin": str(remote)}) as env:
        pid, token, _ = env.proc(cap(["proj"], remotes=["origin"]))  # approval "never"
        t, box = _push_in_thread(env, token, {"repo": "proj", "remote": "origin", "branch": "main"})
        try:
            ap = env.wait_approval(pid, timeout_s=5)
        except AssertionError:
            t.join(30)
            raise
        env.rt.operator.call("op.deny", {"id": ap["id"]})
        t.join(30)
        assert box["error"].code == "EDENIED"


def test_modules_named_in_the_kernel_config(tmp_path: Path) -> None:
    make_repo(tmp_path / "world" / "proj")
    remote = tmp_path / "remote.git"
    git(tmp_path, "init", "-q", "--bare", str(remote))
    rt = Runtime(tmp_path / "state", world_root=tmp_path / "world", ipc=False,
                 modules=("agentlibos.kernel._git",), git_remotes={"origin": str(remote)})
    with rt:
        rt.register_image("x")
        pid, token = rt.spawn_external("x", caps=[cap(["proj"], remotes=["origin"])])
        with rt.client(token) as c:
            assert c.call("git.status", {"repo": "proj"})["branch"] == "main"
            assert code_of(c, "git.push", {"repo": "proj", "remote": "elsewhere", "branch": "main"}) == "EPERM"
    with pytest.raises(ModuleError):
        Runtime(tmp_path / "state2", world_root=tmp_path / "world", ipc=False,
                modules=("agentlibos_no_such_module_xyz",)).start()
    # The short entry-point name works too.
    rt = Runtime(tmp_path / "state3", world_root=tmp_path / "world", ipc=False, modules=("git",))
    with rt:
        rt.register_image("x")
        pid, token = rt.spawn_external("x", caps=[cap(["proj"])])
        with rt.client(token) as c:
            assert c.call("git.status", {"repo": "proj"})["branch"] == "main"
    # A kernel without the module grants no git capability (the kind is not its).
    with Runtime(tmp_path / "state4", world_root=tmp_path / "world", ipc=False) as rt:
        rt.register_image("x")
        with pytest.raises(KernelError) as ei:
            rt.spawn_external("x", caps=[cap(["proj"])])
        assert ei.value.code == "EINVAL"


# --- the provider on its own: no descriptor leaks -----------------------------------------------


def test_provider_run_leaks_no_descriptors(tmp_path: Path, fd_guard: None) -> None:
    world = tmp_path / "world"
    make_repo(world / "proj")
    make_repo(world / "other")
    prov = make_git_provider(world, {})
    scope = {"repos": ["proj"]}
    try:
        for _ in range(3):
            info = CallInfo(pid=1, sys="git.status", handle="c1", scope=scope)
            assert prov.run({"repo": "proj"}, info)["branch"] == "main"
            with pytest.raises(KernelError) as ei:
                prov.run({"repo": "other"}, info)
            assert ei.value.code == "EPERM"
        assert prov.covers(scope, "git.status", {"repo": "proj"})
        assert not prov.covers(scope, "git.status", {"repo": "proj/../other"})
        assert not prov.covers(scope, "git.push", {"repo": "proj", "remote": "origin", "branch": "main"})
    finally:
        assert prov.close is not None
        prov.close()


def test_a_run_with_a_module_replays_with_it(tmp_path: Path) -> None:
    """The replay loads the modules the run's kernel recorded at start, so module syscalls (and a
    push that waited for a human) replay to the same decisions."""
    from agentlibos.kernel._replay import replay_log

    make_repo(tmp_path / "world" / "proj")
    remote = tmp_path / "remote.git"
    git(tmp_path, "init", "-q", "--bare", str(remote))
    with Runtime(tmp_path / "state", world_root=tmp_path / "world", ipc=False, modules=("git",),
                 git_remotes={"origin": str(remote)}) as rt:
        rt.register_image("x")
        pid, token = rt.spawn_external("x", caps=[cap(["proj"], remotes=["origin"])])
        with rt.client(token) as c:
            c.call("git.status", {"repo": "proj"})
            assert code_of(c, "git.status", {"repo": "elsewhere"}) == "EPERM"
    report = replay_log(tmp_path / "state" / "log.db", state_dir=tmp_path / "replay")
    assert report.entries > 0 and report.state_hash == report.recorded_hash
