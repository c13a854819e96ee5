"""Providers whose effects reach the world outside the kernel: fs (confined to the world root),
shell, and the providers registered at start (rpc, mcp, pty, Runtime Modules).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

from agentlibos.bus import KernelError
from agentlibos.kernel import _fsops, _shell
from agentlibos.kernel._caps import CapRecord
from agentlibos.kernel._globs import PathSet
from agentlibos.kernel._kcaps import CapsMixin
from agentlibos.kernel._kstate import Outcome, Proc
from agentlibos.kernel._paths import Root, resolve, split_path, strip_root
from agentlibos.kernel._provider import CallInfo
from agentlibos.kernel._table import SyscallSpec

log = logging.getLogger("agentlibos.kernel")

#: A regular file up to this size is read on the kernel thread, with its decision (one entry,
#: one commit); a bigger one is read off it, as an effect with its own result entry.
INLINE_READ_BYTES = 64 << 10


class WorldMixin(CapsMixin):
    """The fs, shell and start-registered providers: their effects run off the kernel thread (a
    small file is read with its decision, see INLINE_READ_BYTES)."""

    # --- providers: fs -------------------------------------------------------------------------
    def _sys_fs(self, proc: Proc, spec: SyscallSpec, args: dict[str, Any], handle: str | None, now: float) -> Outcome:
        if "confinement" in self.config.ablate:
            return self._fs_unconfined(proc, spec, args, handle, now)
        comps = split_path(args["path"])
        op = spec.name[3:]
        state: dict[str, Any] = {}

        def covers(cap: CapRecord) -> bool:
            rest = strip_root(tuple(cap.scope["root"].split("/")) if cap.scope["root"] else (), comps)
            if rest is None:
                return False
            try:
                root = Root.open(self.config.world_root, cap.scope["root"])
            except KernelError:
                return False
            try:
                res = resolve(root, rest)
            except KernelError as exc:
                root.close()
                state.setdefault("error", exc)
                return False
            root.close()
            pathset = PathSet(tuple(cap.scope["paths"]) if "paths" in cap.scope else None,
                              tuple(cap.scope.get("exclude", ())))
            if not pathset.covers(res.rel):
                res.close()
                return False
            if op == "write":
                need = {"write"} if res.exists else {"create"}
            elif op == "stat":
                need = {"read", "list"}
            else:
                need = set(spec.rights)
            if not (need & cap.rights):
                res.close()
                return False
            old = state.pop("res", None)
            if old is not None:
                old[0].close()
            state["res"] = (res, pathset)
            return True

        try:
            cap = self._authorize(proc, "fs", handle, now, covers, f"{spec.name} of {args['path']!r}")
        except KernelError as exc:
            held = state.pop("res", None)
            if held is not None:
                held[0].close()
            err = state.get("error")
            if exc.code == "EPERM" and err is not None and err.code != "EPERM":
                # The path was inside a held root but does not exist: report that, not a denial.
                if self._lexically_covered(proc, comps, handle, spec):
                    raise err from None
            raise
        res, pathset = state.pop("res")
        detail: dict[str, Any] = {"path": "/".join(x for x in (cap.scope["root"], res.rel) if x)}
        cfg = self.config
        if op == "read":
            if _fsops.small_regular(res, INLINE_READ_BYTES):
                # As bounded as the path walk that just ran here, and a read changes nothing: one
                # entry holds the decision and the content, one commit instead of two.
                try:
                    return Outcome.allow(cap, value=_fsops.read(res, max_bytes=cfg.fs_max_read_bytes), detail=detail)
                finally:
                    res.close()
            return Outcome.allow(cap, effect=_closing(res, lambda: _fsops.read(res, max_bytes=cfg.fs_max_read_bytes)), detail=detail)
        if op == "write":
            data = args["data"]
            mode = args.get("mode", "w")
            if mode not in ("w", "a"):
                res.close()
                raise KernelError("EINVAL", "mode must be 'w' or 'a'")
            size = len(data.encode() if isinstance(data, str) else data)
            create = not res.exists
            detail.update(bytes=size, create=create)
            return Outcome.allow(cap, effect=_closing(res, lambda: _fsops.write(res, data, mode, create=create)),
                                 extra={"fs_bytes_written": float(size)}, detail=detail)
        if op == "list":
            not_excluded = PathSet(None, tuple(cap.scope.get("exclude", ())))

            def listing() -> Any:
                # Hide what the capability does not cover; directories stay visible unless excluded.
                value = _fsops.listdir(res)
                prefix = res.rel + "/" if res.rel else ""
                value["entries"] = [e for e in value["entries"] if pathset.covers(prefix + e["name"])
                                    or (e["type"] == "dir" and not_excluded.covers(prefix + e["name"]))]
                return value
            return Outcome.allow(cap, effect=_closing(res, listing), detail=detail)
        if op == "stat":
            return Outcome.allow(cap, effect=_closing(res, lambda: _fsops.stat(res)), detail=detail)
        if op == "delete":
            return Outcome.allow(cap, effect=_closing(res, lambda: _fsops.delete(res)), detail=detail)
        if op == "mkdir":
            return Outcome.allow(cap, effect=_closing(res, lambda: _fsops.mkdir(res)), detail=detail)
        res.close()
        raise KernelError("ENOSYS", spec.name)

    def _fs_unconfined(self, proc: Proc, spec: SyscallSpec, args: dict[str, Any], handle: str | None,
                       now: float) -> Outcome:
        """Ablation only: the check a naive wrapper makes (the path's text starts with the root)
        and a plain open that follows `..`, absolute paths and symlinks."""
        path = args["path"]
        op = spec.name[3:]
        target = os.path.join(str(self.config.world_root), path)

        def covers(c: CapRecord) -> bool:
            root = c.scope["root"]
            lexical_ok = not root or path == root or path.startswith(root + "/")
            need = ({"write"} if os.path.exists(target) else {"create"}) if op == "write" else set(spec.rights)
            return lexical_ok and bool(need & c.rights)

        cap = self._authorize(proc, "fs", handle, now, covers, f"{spec.name} of {path!r}")

        def effect() -> Any:
            try:
                if op == "read":
                    with open(target, "rb") as fh:
                        data = fh.read()
                    try:
                        return {"text": data.decode()}
                    except UnicodeDecodeError:
                        return {"bytes": data}
                if op == "write":
                    data = args["data"]
                    with open(target, "ab" if args.get("mode") == "a" else "wb") as fh:
                        fh.write(data.encode() if isinstance(data, str) else data)
                    return {"bytes": len(data)}
                if op == "list":
                    return {"entries": [{"name": n, "type": "dir" if os.path.isdir(os.path.join(target, n)) else "file"}
                                        for n in sorted(os.listdir(target))]}
                if op == "stat":
                    st = os.stat(target)
                    return {"type": "dir" if os.path.isdir(target) else "file", "size": st.st_size, "mtime": st.st_mtime}
                if op == "delete":
                    (os.rmdir if os.path.isdir(target) else os.unlink)(target)
                    return {}
                os.mkdir(target)
                return {}
            except FileNotFoundError:
                raise KernelError("ENOENT", path) from None
            except OSError as exc:
                raise KernelError("EIO", f"{path}: {exc.strerror}") from None

        return Outcome.allow(cap, effect=effect, detail={"path": path, "unconfined": True})

    def _lexically_covered(self, proc: Proc, comps: list[str], handle: str | None, spec: SyscallSpec) -> bool:
        for cap in self.caps.held(proc.pid):
            if cap.kind != "fs" or (handle is not None and cap.handle != handle) or cap.status(self.clock()):
                continue
            rest = strip_root(tuple(cap.scope["root"].split("/")) if cap.scope["root"] else (), comps)
            if rest is None or ".." in rest:
                continue
            pathset = PathSet(tuple(cap.scope["paths"]) if "paths" in cap.scope else None, tuple(cap.scope.get("exclude", ())))
            if pathset.covers("/".join(rest)) and set(spec.rights) & cap.rights:
                return True
        return False

    # --- providers: shell ----------------------------------------------------------------------
    def _sys_shell(self, proc: Proc, spec: SyscallSpec, args: dict[str, Any], handle: str | None, now: float) -> Outcome:
        argv = args["argv"]
        if not argv or not all(isinstance(a, str) and "\x00" not in a for a in argv):
            raise KernelError("EINVAL", "argv must be a non-empty list of strings without NUL bytes")
        world = str(self.config.world_root)
        want_cwd = args.get("cwd")
        want_timeout = args.get("timeout_s")
        if want_timeout is not None and want_timeout <= 0:
            raise KernelError("EINVAL", "timeout_s must be positive")
        found: dict[str, Any] = {}

        def covers(cap: CapRecord) -> bool:
            scope = cap.scope
            cwd_rel = want_cwd if want_cwd is not None else scope.get("cwd", "")
            try:
                cwd_comps = split_path(cwd_rel) if cwd_rel not in ("", ".") else []
            except KernelError:
                return False
            rest = strip_root(tuple(scope.get("cwd", "").split("/")) if scope.get("cwd") else (), cwd_comps)
            if rest is None:
                return False
            try:
                root = Root.open(world, scope.get("cwd", ""))
            except KernelError:
                return False
            try:
                res = resolve(root, rest)
            except KernelError:
                root.close()
                return False
            root.close()
            if res.kind != "dir" and res.name is not None:
                res.close()
                return False
            cwd_path = os.path.join(world, *([scope["cwd"]] if scope.get("cwd") else []), res.rel)
            res.close()
            exe = _shell.resolve_program(argv[0], self.config.path, cwd_path)
            if exe is None:
                return False
            allowed = {_shell.resolve_program(p, self.config.path, world) for p in scope["programs"]}
            if exe not in allowed:
                return False
            if "argv" in scope and not _shell.argv_matches(
                    argv, scope["argv"], same_program=lambda name: _shell.resolve_program(
                        name, self.config.path, world) == exe):
                return False
            limit = scope.get("timeout_s")
            if want_timeout is not None and limit is not None and want_timeout > limit:
                found.setdefault("timeout", limit)
                return False
            found.update(exe=exe, cwd=cwd_path, timeout=want_timeout or limit or self.config.shell_default_timeout_s,
                         env=scope.get("env", []))
            return True

        try:
            cap = self._authorize(proc, "shell", handle, now, covers, f"running {argv[0]!r} with these arguments in this cwd")
        except KernelError as exc:
            if exc.code == "EPERM" and "timeout" in found:
                raise KernelError("EPERM", f"timeout_s {want_timeout:g} exceeds the capability's {found['timeout']:g}") from None
            raise
        env = {k: os.environ[k] for k in found["env"] if k in os.environ}
        env.update(self.config.shell_env)
        env["PATH"] = os.pathsep.join(self.config.path)
        cfg = self.config
        exe, cwd, timeout = found["exe"], found["cwd"], float(found["timeout"])
        detail = {"argv": list(argv), "program": exe, "cwd": os.path.relpath(cwd, world), "timeout_s": timeout}
        return Outcome.allow(cap, effect=lambda: _shell.run(argv, executable=exe, cwd=cwd, env=env, stdin=args.get("stdin"),
                                                           timeout_s=timeout, mem_bytes=cfg.shell_mem_bytes), detail=detail)

    # --- providers registered at start (rpc, mcp, Runtime Modules) -----------------------------
    def _sys_ext(self, proc: Proc, spec: SyscallSpec, args: dict[str, Any], handle: str | None, now: float) -> Outcome:
        prov = self._ext[spec.name]
        rights = set(spec.rights)

        def covers(c: CapRecord) -> bool:
            if rights and not rights & c.rights:
                return False
            try:
                return bool(prov.covers(c.scope, spec.name, args))
            except Exception:  # a provider that cannot decide denies (fail closed)
                log.exception("provider %s: covers() failed", prov.kind)
                return False

        cap = self._authorize(proc, prov.kind, handle, now, covers, spec.name)
        detail = None
        if prov.describe is not None:
            try:
                detail = prov.describe(spec.name, args)
            except Exception:
                log.exception("provider %s: describe() failed", prov.kind)
        info = CallInfo(pid=proc.pid, sys=spec.name, handle=cap.handle, scope=dict(cap.scope))
        out = Outcome.allow(cap, effect=lambda: prov.run(args, info), detail=detail)
        if prov.needs_approval is not None:
            try:
                out.must_approve = bool(prov.needs_approval(spec.name, args))
            except Exception:  # cannot tell: a human decides (fail closed)
                log.exception("provider %s: needs_approval() failed", prov.kind)
                out.must_approve = True
        return out


class _closing:
    """An effect that owns an opened path: it closes the path whether or not it ever runs."""

    def __init__(self, res: Any, fn: Callable[[], Any]) -> None:
        self._res = res
        self._fn = fn

    def __call__(self) -> Any:
        try:
            return self._fn()
        finally:
            self._res.close()

    def close(self) -> None:
        self._res.close()
