"""The `git` Runtime Module: typed git operations on repositories inside the world root.

Loaded only at kernel start (kernel config `modules = ["agentlibos.kernel._git"]`); it registers
one provider of the new capability kind `git`:

    {kind: git, scope: {repos: [DIR, ...], remotes: [NAME, ...]},
     rights: [status, diff, commit, branch, worktree, push]}

- `repos` are directories relative to the world root; a call's `repo` (and a worktree's `path`)
  must be one of them or lie below one, both as written and after symbolic links are followed
  inside the world root (a `..`, an absolute path or a link leaving the root is EPERM).
  Deny by default: a scope without `repos` authorizes nothing.
- `remotes` are names from the operator's table `git_remotes = {name: url}` (kernel config).
  `git.push` goes to the URL the operator configured under that name, never to a URL or a
  remote the repository or the caller names; a remote missing from the scope or from the
  operator's table is EPERM. Every push waits for a human (see `needs_approval`).

Every git run gets a scrubbed environment (no $HOME config, no system config, no terminal
prompt, no pager, no editor), runs none of the repository's hooks (`core.hooksPath=/dev/null`)
and no fsmonitor, signs nothing, and runs in the repository directory pinned by an open
descriptor. (A local remote's own server-side hooks are the operator's and do run: git gives the
local receive-pack none of the -c settings.) A repository whose own `.git/config` sets anything
outside a short list of inert keys (aliases, filters, textconv, sshCommand, insteadOf, fsmonitor,
worktree...) is refused: git would run commands or reach places the kernel never decided.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import stat as _stat
import subprocess
import tempfile
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from agentlibos.bus._errors import KernelError
from agentlibos.kernel._paths import Resolution, Root, resolve, split_path
from agentlibos.kernel._provider import CallInfo, Provider
from agentlibos.kernel._table import SyscallSpec, _row

__all__ = ["GIT_RIGHTS", "GIT_SCOPE_KEYS", "GIT_SYSCALLS", "git_within", "make_git_provider", "needs_approval",
           "register"]

_S = "syscalls"
GIT_SYSCALLS: tuple[SyscallSpec, ...] = (
    _row("git.status", "repo:str", "git", "status", _S, "ext",
         "working tree status -> {branch, head, entries: [{path, index, worktree, orig?}]}"),
    _row("git.diff", "repo:str staged:bool?", "git", "diff", _S, "ext",
         "unstaged (or, with staged, staged) changes as a unified diff -> {diff, truncated}"),
    _row("git.commit", "repo:str message:str paths:list?", "git", "commit", _S, "ext",
         "commit the given paths (default: every change in the work tree) -> {commit, branch}"),
    _row("git.branch", "repo:str name:str create:bool?", "git", "branch", _S, "ext",
         "switch to a branch (create: make it at HEAD first) -> {branch, head}"),
    _row("git.worktree", "repo:str path:str branch:str", "git", "worktree", _S, "ext",
         "add a linked worktree at path (world-relative) on branch (made at HEAD if new) -> {path, branch, head}"),
    _row("git.push", "repo:str remote:str branch:str", "git", "push", _S, "ext",
         "push a branch to an operator-configured remote; always waits for a human -> {remote, branch, commit}"),
)
GIT_SYSCALL_NAMES = frozenset(s.name for s in GIT_SYSCALLS)
GIT_RIGHTS = frozenset(r for s in GIT_SYSCALLS for r in s.rights)
GIT_SCOPE_KEYS: Mapping[str, str] = {"repos": "list[str]", "remotes": "list[str]"}

REMOTE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_MAX_MESSAGE = 64 << 10
_MAX_PATHS = 1000
_ERR_CHARS = 2000

#: Per-invocation settings that beat anything in the repository's own config.
_SAFE_FLAGS: tuple[str, ...] = (
    "-c", "core.hooksPath=/dev/null",
    "-c", "core.fsmonitor=false",
    "-c", "core.pager=cat",
    "-c", "core.editor=true",
    "-c", "commit.gpgSign=false",
    "-c", "tag.gpgSign=false",
    "-c", "push.gpgSign=false",
    "-c", "credential.helper=",
    "-c", "protocol.ext.allow=never",
    "-c", "submodule.recurse=false",
    "-c", "color.ui=false",
    "--no-pager",
)

#: Repository config keys that cannot make git run anything or go anywhere (git init writes these).
_INERT_KEYS = frozenset({
    "core.repositoryformatversion", "core.filemode", "core.bare", "core.logallrefupdates", "core.ignorecase",
    "core.precomposeunicode", "core.symlinks", "core.autocrlf", "core.eol", "core.safecrlf", "core.quotepath",
    "user.name", "user.email", "init.defaultbranch", "extensions.objectformat", "gc.auto",
})
_INERT_PATTERNS = (
    re.compile(r"branch\.[^\n]+\.(remote|merge|rebase)"),
    re.compile(r"remote\.[^\n]+\.(url|fetch)"),  # a push never uses a named remote: only the operator's URL
)


# --- scopes ----------------------------------------------------------------------------------


def _rel(path: Any) -> tuple[str, ...] | None:
    """World-relative components of a path as written; None for anything that is not one."""
    if not isinstance(path, str) or not path or path.startswith("/") or "\x00" in path:
        return None
    parts = tuple(p for p in path.split("/") if p not in ("", "."))
    if ".." in parts:
        return None
    return parts


def _under(child: tuple[str, ...], parent: tuple[str, ...]) -> bool:
    return child[: len(parent)] == parent


def _scope_repos(scope: Mapping[str, Any]) -> list[tuple[str, ...]]:
    repos = scope.get("repos")
    if not isinstance(repos, list):
        return []  # deny by default
    out = []
    for r in repos:
        rel = _rel(r)
        if rel is not None:  # an entry with '..' or an absolute path authorizes nothing
            out.append(rel)
    return out


def _scope_remotes(scope: Mapping[str, Any]) -> list[str]:
    remotes = scope.get("remotes")
    return [r for r in remotes if isinstance(r, str)] if isinstance(remotes, list) else []


def _repo_allowed(rel: tuple[str, ...], scope: Mapping[str, Any]) -> bool:
    return any(_under(rel, r) for r in _scope_repos(scope))


def git_within(child: Mapping[str, Any], parent: Mapping[str, Any]) -> bool:
    """Narrowing for git scopes: every child repo lies at or below a parent repo, and the child's
    remotes are a subset of the parent's (a missing list authorizes nothing, so a child of a
    parent without `remotes` may name none)."""
    c_repos = child.get("repos")
    if c_repos is not None:
        if not isinstance(c_repos, list):
            return False
        p_repos = _scope_repos(parent)
        for r in c_repos:
            rel = _rel(r)
            if rel is not None and not any(_under(rel, p) for p in p_repos):
                return False
    c_remotes = child.get("remotes")
    if c_remotes is not None:
        if not isinstance(c_remotes, list):
            return False
        if not set(c_remotes) <= set(_scope_remotes(parent)):
            return False
    return True


def needs_approval(sys: str, args: Mapping[str, Any]) -> bool:
    """Calls that wait for a human whatever their capability says: every push."""
    return sys == "git.push"


def _shown_url(url: str) -> str:
    """The URL without credentials, for logs and approvers."""
    m = re.match(r"([A-Za-z][A-Za-z0-9+.-]*://)([^/@]*@)?(.*)", url)
    if m and m.group(2):
        return m.group(1) + "***@" + m.group(3)
    return url


# --- the provider ----------------------------------------------------------------------------


class _Repo:
    """A repository directory pinned by an O_PATH descriptor, with its canonical world path."""

    def __init__(self, fd: int, rel: str) -> None:
        self.fd = fd
        self.rel = rel

    @property
    def cwd(self) -> str:
        # The descriptor's magic link: the directory we checked, even if its name is swapped later.
        return f"/proc/{os.getpid()}/fd/{self.fd}"

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class _Git:
    def __init__(self, world_root: Path, remotes: Mapping[str, str], *, git: str, path: Sequence[str],
                 timeout_s: float, max_output_bytes: int, author: tuple[str, str]) -> None:
        if not timeout_s > 0:
            raise ValueError("git timeout_s must be positive")
        if max_output_bytes < 1:
            raise ValueError("git max_output_bytes must be positive")
        self.remotes: dict[str, str] = {}
        for name, url in remotes.items():
            if not isinstance(name, str) or not REMOTE_NAME.fullmatch(name):
                raise ValueError(f"git remote name {name!r} must match {REMOTE_NAME.pattern}")
            if (not isinstance(url, str) or not url or url.startswith("-") or url.lower().startswith(("ext::", "fd::"))
                    or any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in url)):
                raise ValueError(f"git remote {name!r}: {url!r} is not an allowed URL")
            self.remotes[name] = url
        self.world_root = Path(world_root)
        self.git = git
        self.timeout_s = float(timeout_s)
        self.max_output_bytes = int(max_output_bytes)
        self.env = {
            "PATH": os.pathsep.join(path),
            "HOME": "/nonexistent",
            "LC_ALL": "C",
            "GIT_CONFIG_NOSYSTEM": "1",
            "GIT_CONFIG_SYSTEM": "/dev/null",
            "GIT_CONFIG_GLOBAL": "/dev/null",
            "GIT_TERMINAL_PROMPT": "0",
            "GIT_EDITOR": "true",
            "GIT_PAGER": "cat",
            "GIT_LITERAL_PATHSPECS": "1",
            "GIT_OPTIONAL_LOCKS": "0",
            "GIT_NO_REPLACE_OBJECTS": "1",
            "GIT_AUTHOR_NAME": author[0],
            "GIT_AUTHOR_EMAIL": author[1],
            "GIT_COMMITTER_NAME": author[0],
            "GIT_COMMITTER_EMAIL": author[1],
        }
        self._procs: set[subprocess.Popen[bytes]] = set()
        self._lock = threading.Lock()
        self._closed = False

    # --- authorization (kernel thread: lexical, no I/O) ----------------------------------------
    def covers(self, scope: Mapping[str, Any], sys: str, args: Mapping[str, Any]) -> bool:
        if sys not in GIT_SYSCALL_NAMES:
            return False
        repo = _rel(args.get("repo"))
        if repo is None or not _repo_allowed(repo, scope):
            return False
        if sys == "git.worktree":
            path = _rel(args.get("path"))
            if not path or not _repo_allowed(path, scope):
                return False
        if sys == "git.push":
            remote = args.get("remote")
            return isinstance(remote, str) and remote in _scope_remotes(scope) and remote in self.remotes
        return True

    def describe(self, sys: str, args: Mapping[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {"repo": args.get("repo")}
        if sys == "git.diff":
            out["staged"] = bool(args.get("staged"))
        elif sys == "git.commit":
            out["message"] = str(args.get("message", ""))[:2000]
            out["paths"] = list(args.get("paths") or [])[:50] or "all changes"
        elif sys == "git.branch":
            out.update(branch=args.get("name"), create=bool(args.get("create")))
        elif sys == "git.worktree":
            out.update(path=args.get("path"), branch=args.get("branch"))
        elif sys == "git.push":
            remote = args.get("remote")
            url = self.remotes.get(remote) if isinstance(remote, str) else None
            out.update(remote=remote, url=_shown_url(url) if url else None, branch=args.get("branch"),
                       refspec=f"refs/heads/{args.get('branch')}:refs/heads/{args.get('branch')}")
        return out

    # --- the effect (worker thread) ------------------------------------------------------------
    def run(self, args: Mapping[str, Any], info: CallInfo) -> Any:
        repo = self._open_repo(args["repo"], info.scope)
        try:
            self._check_repo(repo, info.scope)
            if info.sys == "git.status":
                return self._status(repo)
            if info.sys == "git.diff":
                return self._diff(repo, bool(args.get("staged")))
            if info.sys == "git.commit":
                return self._commit(repo, args["message"], args.get("paths"))
            if info.sys == "git.branch":
                return self._branch(repo, args["name"], bool(args.get("create")))
            if info.sys == "git.worktree":
                return self._worktree(repo, args["path"], args["branch"], info.scope)
            if info.sys == "git.push":
                return self._push(repo, args["remote"], args["branch"], info.scope)
            raise KernelError("ENOSYS", f"git provider has no {info.sys!r}")
        finally:
            repo.close()

    # paths ------------------------------------------------------------------------------------
    def _resolve(self, path: str) -> Resolution:
        """Resolve a world-relative path (links followed inside the world root only)."""
        with Root.open(self.world_root, "") as root:
            return resolve(root, split_path(path))

    def _open_repo(self, path: str, scope: Mapping[str, Any]) -> _Repo:
        res = self._resolve(path)
        try:
            canon = _rel(res.rel) if res.rel else ()
            if canon is None or not _repo_allowed(canon, scope):
                raise KernelError("EPERM", f"{path!r} resolves to {res.rel or '.'!r}, outside the capability's repos")
            if not res.exists:
                raise KernelError("ENOENT", f"{path!r}: no such directory")
            if res.kind != "dir":
                raise KernelError("EINVAL", f"{path!r} is not a directory")
            try:
                if res.name is None:
                    fd = os.dup(res.parent_fd)
                else:
                    fd = os.open(res.name, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                                 dir_fd=res.parent_fd)
            except OSError as exc:
                raise KernelError("EIO", f"{path!r}: cannot open: {exc.strerror}") from None
            return _Repo(fd, res.rel)
        finally:
            res.close()

    def _world_real(self) -> Path:
        return Path(os.path.realpath(self.world_root))

    def _inside_scope(self, real: str, scope: Mapping[str, Any]) -> bool:
        try:
            rel = Path(real).relative_to(self._world_real())
        except ValueError:
            return False
        return _repo_allowed(tuple(p for p in rel.parts if p not in ("", ".")), scope)

    def _check_repo(self, repo: _Repo, scope: Mapping[str, Any]) -> None:
        """A repository root (`.git` a directory, or a linked worktree's gitdir file) whose git
        directory stays inside the capability's repos and has no links out, no alternates and no
        config that could run anything."""
        try:
            st = os.stat(".git", dir_fd=repo.fd, follow_symlinks=False)
        except FileNotFoundError:
            raise KernelError("ENOENT", f"{repo.rel or '.'!r} is not the top of a git repository") from None
        except OSError as exc:
            raise KernelError("EIO", f"{repo.rel!r}: {exc.strerror}") from None
        if _stat.S_ISDIR(st.st_mode):
            self._check_gitdir(f"{repo.cwd}/.git", scope, repo.rel)
        elif _stat.S_ISREG(st.st_mode):
            fd = os.open(".git", os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=repo.fd)
            with os.fdopen(fd, "rb") as fh:
                text = fh.read(4096).decode("utf-8", "replace").strip()
            if not text.startswith("gitdir: "):
                raise KernelError("EINVAL", f"{repo.rel!r}: .git is a file that names no git directory")
            target = text[len("gitdir: "):]
            base = os.path.realpath(repo.cwd)
            gitdir = os.path.realpath(os.path.join(base, target))
            if not self._inside_scope(gitdir, scope):
                raise KernelError("EPERM", f"{repo.rel!r}: its git directory lies outside the capability's repos")
            common = gitdir
            try:
                with open(os.path.join(gitdir, "commondir"), encoding="utf-8") as fh:
                    common = os.path.realpath(os.path.join(gitdir, fh.read().strip()))
            except FileNotFoundError:
                pass
            except OSError as exc:
                raise KernelError("EIO", f"{repo.rel!r}: {exc.strerror}") from None
            if not self._inside_scope(common, scope):
                raise KernelError("EPERM", f"{repo.rel!r}: its git directory lies outside the capability's repos")
            self._check_gitdir(gitdir, scope, repo.rel)
            if common != gitdir:
                self._check_gitdir(common, scope, repo.rel)
        else:
            raise KernelError("EPERM", f"{repo.rel!r}: .git is a symbolic link or a special file")
        self._check_config(repo)

    @staticmethod
    def _check_gitdir(gitdir: str, scope: Mapping[str, Any], shown: str) -> None:
        try:
            for entry in os.scandir(gitdir):
                if entry.is_symlink():
                    raise KernelError("EPERM", f"{shown!r}: .git/{entry.name} is a symbolic link")
            if os.path.lexists(os.path.join(gitdir, "objects", "info", "alternates")):
                raise KernelError("EPERM", f"{shown!r}: the repository borrows objects from elsewhere (alternates)")
        except OSError as exc:
            raise KernelError("EIO", f"{shown!r}: cannot read the git directory: {exc.strerror}") from None

    def _check_config(self, repo: _Repo) -> None:
        rc, out, err, _ = self._git(repo, ["config", "--local", "--no-includes", "--list", "--null"], check=False)
        if rc != 0:
            if rc == 1 and not out:
                return  # no config at all
            raise KernelError("EIO", f"{repo.rel!r}: cannot read the repository's config: {err}")
        for item in out.split(b"\0"):
            if not item:
                continue
            key = item.split(b"\n", 1)[0].decode("utf-8", "replace").lower()
            if key in _INERT_KEYS or any(p.fullmatch(key) for p in _INERT_PATTERNS):
                continue
            raise KernelError("EPERM", f"{repo.rel!r}: the repository's config sets {key!r}, which the git "
                                       "provider does not run with")

    # running git --------------------------------------------------------------------------------
    def _git(self, repo: _Repo, argv: list[str], *, check: bool = True) -> tuple[int, bytes, str, bool]:
        """Run git in the pinned repository -> (exit code, stdout up to the limit, stderr, truncated)."""
        with self._lock:
            if self._closed:
                raise KernelError("EIO", "the git provider is closed")
        env = dict(self.env)
        env["GIT_CEILING_DIRECTORIES"] = os.path.dirname(os.path.realpath(repo.cwd)) or "/"
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            try:
                proc = subprocess.Popen([self.git, *_SAFE_FLAGS, *argv], cwd=repo.cwd, env=env,
                                        stdin=subprocess.DEVNULL, stdout=out, stderr=err, close_fds=True,
                                        start_new_session=True)
            except OSError as exc:
                raise KernelError("EIO", f"cannot run git: {exc.strerror}") from None
            with self._lock:
                self._procs.add(proc)
            try:
                rc = proc.wait(self.timeout_s)
            except subprocess.TimeoutExpired:
                self._kill(proc)
                raise KernelError("ETIMEDOUT", f"git {argv[0]} took longer than {self.timeout_s:g} s") from None
            finally:
                with self._lock:
                    self._procs.discard(proc)
            out.seek(0)
            data = out.read(self.max_output_bytes + 1)
            err.seek(0)
            text = err.read(_ERR_CHARS).decode("utf-8", "replace").strip()
        truncated = len(data) > self.max_output_bytes
        data = data[: self.max_output_bytes]
        if check and rc != 0:
            raise KernelError("EIO", f"git {argv[0]} failed (exit {rc}): {text or data[:_ERR_CHARS].decode('utf-8', 'replace').strip()}")
        return rc, data, text, truncated

    @staticmethod
    def _kill(proc: subprocess.Popen[bytes]) -> None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        proc.wait()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            procs = list(self._procs)
        for p in procs:
            self._kill(p)

    def _head(self, repo: _Repo) -> str | None:
        rc, out, _, _ = self._git(repo, ["rev-parse", "--verify", "--quiet", "HEAD^{commit}"], check=False)
        return out.decode().strip() if rc == 0 else None

    def _current_branch(self, repo: _Repo) -> str | None:
        rc, out, _, _ = self._git(repo, ["symbolic-ref", "--quiet", "--short", "HEAD"], check=False)
        return out.decode("utf-8", "replace").strip() if rc == 0 else None

    def _branch_name(self, repo: _Repo, name: str) -> str:
        if not name or name.startswith("-") or len(name) > 255:
            raise KernelError("EINVAL", f"{name!r} is not a branch name")
        rc, out, _, _ = self._git(repo, ["check-ref-format", "--branch", name], check=False)
        if rc != 0 or out.decode("utf-8", "replace").strip() != name:
            raise KernelError("EINVAL", f"{name!r} is not a branch name")
        return name

    def _branch_exists(self, repo: _Repo, name: str) -> bool:
        rc, _, _, _ = self._git(repo, ["rev-parse", "--verify", "--quiet", f"refs/heads/{name}"], check=False)
        return rc == 0

    @staticmethod
    def _pathspecs(paths: Any) -> list[str]:
        if not isinstance(paths, list) or not paths or len(paths) > _MAX_PATHS:
            raise KernelError("EINVAL", f"paths must be a non-empty list of at most {_MAX_PATHS} paths")
        out = []
        for p in paths:
            rel = _rel(p)
            if not rel:
                raise KernelError("EPERM" if isinstance(p, str) and p else "EINVAL",
                                  f"path {p!r} must be relative to the repository, without '..'")
            out.append("/".join(rel))
        return out

    # operations -------------------------------------------------------------------------------
    def _status(self, repo: _Repo) -> dict[str, Any]:
        _, out, _, truncated = self._git(repo, ["status", "--porcelain=v1", "-z", "--branch", "--untracked-files=all",
                                                "--ignore-submodules=all"])
        tokens = out.decode("utf-8", "replace").split("\0")
        branch: str | None = None
        entries: list[dict[str, Any]] = []
        i = 0
        while i < len(tokens):
            tok = tokens[i]
            i += 1
            if not tok:
                continue
            if tok.startswith("## "):
                head = tok[3:]
                for prefix in ("No commits yet on ", "Initial commit on "):
                    if head.startswith(prefix):
                        head = head[len(prefix):]
                branch = None if head.startswith("HEAD (no branch)") else head.split("...", 1)[0].split(" ", 1)[0]
                continue
            if len(tok) < 4:
                continue
            entry: dict[str, Any] = {"path": tok[3:], "index": tok[0], "worktree": tok[1]}
            if tok[0] in "RC" and i < len(tokens):
                entry["orig"] = tokens[i]
                i += 1
            entries.append(entry)
        return {"branch": branch, "head": self._head(repo), "entries": entries, "truncated": truncated}

    def _diff(self, repo: _Repo, staged: bool) -> dict[str, Any]:
        argv = ["diff", "--no-color", "--no-ext-diff", "--no-textconv", "--ignore-submodules=all"]
        if staged:
            argv.append("--cached")
        _, out, _, truncated = self._git(repo, argv)
        return {"diff": out.decode("utf-8", "replace"), "truncated": truncated}

    def _commit(self, repo: _Repo, message: str, paths: Any) -> dict[str, Any]:
        if not message.strip() or len(message) > _MAX_MESSAGE:
            raise KernelError("EINVAL", f"a commit message is non-empty and at most {_MAX_MESSAGE} characters")
        specs = None if paths is None else self._pathspecs(paths)
        self._git(repo, ["add", "--all", "--", *(specs or ["."])])
        rc, _, _, _ = self._git(repo, ["diff", "--cached", "--quiet", "--ignore-submodules=all", "--",
                                       *(specs or [])], check=False)
        if rc == 0:
            raise KernelError("EINVAL", "nothing to commit")
        argv = ["commit", "--no-verify", "--no-gpg-sign", "--no-edit", "--quiet", "-m", message]
        if specs is not None:
            argv += ["--only", "--", *specs]
        self._git(repo, argv)
        return {"commit": self._head(repo), "branch": self._current_branch(repo)}

    def _branch(self, repo: _Repo, name: str, create: bool) -> dict[str, Any]:
        name = self._branch_name(repo, name)
        exists = self._branch_exists(repo, name)
        if create and exists:
            raise KernelError("EEXIST", f"branch {name!r} already exists")
        if not create and not exists:
            raise KernelError("ENOENT", f"no branch {name!r}")
        self._git(repo, ["switch", "--no-guess", "--quiet", *(["-c"] if create else []), name])
        return {"branch": name, "head": self._head(repo)}

    def _worktree(self, repo: _Repo, path: str, branch: str, scope: Mapping[str, Any]) -> dict[str, Any]:
        branch = self._branch_name(repo, branch)
        res = self._resolve(path)
        try:
            canon = _rel(res.rel) if res.rel else ()
            if not canon or not _repo_allowed(canon, scope):
                raise KernelError("EPERM", f"{path!r} resolves to {res.rel or '.'!r}, outside the capability's repos")
            if res.exists:
                raise KernelError("EEXIST", f"{path!r} already exists")
            # The parent directory as opened, named through its descriptor's real path.
            target = os.path.join(os.path.realpath(f"/proc/{os.getpid()}/fd/{res.parent_fd}"), res.name or "")
        finally:
            res.close()
        if not self._inside_scope(target, scope):
            raise KernelError("EPERM", f"{path!r} lies outside the capability's repos")
        if self._branch_exists(repo, branch):
            argv = ["worktree", "add", "--quiet", "--", target, branch]
        else:
            argv = ["worktree", "add", "--quiet", "-b", branch, "--", target]
        self._git(repo, argv)
        wt = self._open_repo("/".join(canon), scope)
        try:
            return {"path": wt.rel, "branch": branch, "head": self._head(wt)}
        finally:
            wt.close()

    def _push(self, repo: _Repo, remote: str, branch: str, scope: Mapping[str, Any]) -> dict[str, Any]:
        if remote not in _scope_remotes(scope) or remote not in self.remotes:
            raise KernelError("EPERM", f"remote {remote!r} is not one the operator configured for this capability")
        url = self.remotes[remote]
        branch = self._branch_name(repo, branch)
        if not self._branch_exists(repo, branch):
            raise KernelError("ENOENT", f"no branch {branch!r}")
        rc, out, _, _ = self._git(repo, ["rev-parse", "--verify", f"refs/heads/{branch}^{{commit}}"])
        commit = out.decode().strip()
        # The commit is pinned in the refspec: what is pushed is what was resolved here.
        self._git(repo, ["push", "--no-verify", "--porcelain", "--quiet", url,
                         f"{commit}:refs/heads/{branch}"])
        return {"remote": remote, "url": _shown_url(url), "branch": branch, "commit": commit}


def make_git_provider(
    world_root: str | os.PathLike[str],
    remotes: Mapping[str, str] | None = None,
    *,
    git: str | None = None,
    path: Sequence[str] = ("/usr/local/bin", "/usr/bin", "/bin"),
    timeout_s: float = 60.0,
    max_output_bytes: int = 1 << 20,
    author: tuple[str, str] = ("agent-libos", "agent@agent-libos.invalid"),
) -> Provider:
    """The `git` provider over repositories below `world_root` and the operator's remote table
    `{name: url}`. The git program is found once, here, on `path` (never on a caller's PATH).
    Raises ValueError for a malformed remote table or when git cannot be found."""
    exe = git or shutil.which("git", path=os.pathsep.join(path))
    if not exe or not os.path.isabs(exe):
        raise ValueError(f"git module: no git program on {list(path)}")
    impl = _Git(Path(world_root), dict(remotes or {}), git=exe, path=path, timeout_s=timeout_s,
                max_output_bytes=max_output_bytes, author=author)
    return Provider(
        kind="git",
        syscalls=GIT_SYSCALLS,
        covers=impl.covers,
        run=impl.run,
        describe=impl.describe,
        scope_keys=dict(GIT_SCOPE_KEYS),
        within=git_within,
        close=impl.close,
        needs_approval=needs_approval,
    )


def register(config: Any) -> list[Provider]:
    """Runtime Module entry: the `git` provider for this kernel's world root, with the operator's
    remotes from `config.git_remotes` ({name: url}; none configured: no push anywhere)."""
    remotes = getattr(config, "git_remotes", None) or {}
    if not isinstance(remotes, Mapping):
        raise ValueError("git_remotes must be a table {name: url}")
    return [make_git_provider(
        config.world_root,
        remotes,
        path=tuple(getattr(config, "path", ("/usr/local/bin", "/usr/bin", "/bin"))),
        timeout_s=float(getattr(config, "git_timeout_s", 60.0)),
    )]
