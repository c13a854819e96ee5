"""The Kernel's side of capabilities: finding the held capability that authorizes a call, logging
new grants, and the cap.* and budget.* syscalls.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from agentlibos.bus import KernelError
from agentlibos.kernel._caps import CapRecord, Narrow
from agentlibos.kernel._kbase import KernelBase
from agentlibos.kernel._kstate import LIVE, Outcome, Proc
from agentlibos.kernel._table import SyscallSpec


class CapsMixin(KernelBase):
    """Capability lookup for every provider, and the cap.* and budget.* syscalls."""

    # --- capability lookup ---------------------------------------------------------------------
    def _authorize(self, proc: Proc, kind: str, handle: str | None, now: float,
                   covers: Callable[[CapRecord], bool], what: str | Callable[[], str] = "this") -> CapRecord:
        """The held capability that authorizes this; deny with the most telling code otherwise.
        `what` names the request in a denial (a callable: built only when one is needed)."""
        if handle is not None:
            cap = self.caps.by_handle(proc.pid, handle)
            if cap is None:
                raise KernelError("EPERM", f"no capability handle {handle!r} is held by this process")
            if cap.kind != kind:
                raise KernelError("EPERM", f"{handle} is a {cap.kind} capability; this needs {kind}")
            code = cap.status(now)
            if code is not None:
                raise KernelError(code, f"{handle} is {'revoked' if code == 'EREVOKED' else 'expired or used up'}")
            if not covers(cap):
                raise KernelError("EPERM", f"{handle} does not authorize {_named(what)}")
            return cap
        dead: str | None = None
        gated: CapRecord | None = None
        for cap in self.caps.held(proc.pid):
            if cap.kind != kind:
                continue
            if not covers(cap):
                continue
            code = cap.status(now)
            if code is not None:
                dead = dead or code
                continue
            if cap.approval == "always":
                # Same authority either way: prefer a cap that needs no human (an approved-and-
                # remembered grant) over one that asks.
                gated = gated or cap
                continue
            return cap
        if gated is not None:
            return gated
        if dead is not None:
            raise KernelError(dead, f"the {kind} capability that covered {_named(what)} is "
                                    f"{'revoked' if dead == 'EREVOKED' else 'expired or used up'}")
        raise KernelError("EPERM", f"no held {kind} capability authorizes {_named(what)}")

    # --- providers: caps, budget ---------------------------------------------------------------
    def _sys_cap(self, proc: Proc, spec: SyscallSpec, args: dict[str, Any], handle: str | None, now: float) -> Outcome:
        op = spec.name[4:]
        if op == "list":
            return Outcome.allow(None, value={"caps": [c.view() for c in self.caps.held(proc.pid)]})
        if op == "request":
            return self._cap_request(proc, args)
        h = args["handle"]
        cap = self.caps.by_handle(proc.pid, h)
        if cap is None:
            raise KernelError("EPERM", f"no capability handle {h!r} is held by this process")
        if op == "drop":
            self.caps.drop(proc.pid, h)
            self._stage("cap.drop", {"cap": cap.id}, pid=proc.pid)
            return Outcome.allow(cap, value={})
        if op == "revoke":
            revoked = self.caps.revoke(cap.id)
            self._stage("cap.revoke", {"caps": revoked}, pid=proc.pid)
            return Outcome.allow(cap, value={"revoked": len(revoked)})
        narrow = Narrow.parse(args.get("narrow"))
        if op == "derive":
            new = self.caps.derive(cap, narrow, holder=proc.pid, now=now, handle=args.get("as"), via="cap.derive")
            assert new is not None
            self._log_cap(new, proc.pid)
            return Outcome.allow(cap, value={"handle": new.handle})
        if op == "grant":
            if "grant" not in cap.rights:
                raise KernelError("EPERM", f"{h} does not carry the grant right")
            target = proc.ppid if args["to"] == "parent" else args["to"]
            if not isinstance(target, int) or target not in self.procs or self.procs[target].state not in LIVE:
                raise KernelError("ENOENT", f"no live process {args['to']!r}")
            new = self.caps.derive(cap, narrow, holder=target, now=now, handle=args.get("as"), via="cap.grant")
            assert new is not None
            self._log_cap(new, proc.pid)
            return Outcome.allow(cap, value={"handle": new.handle, "pid": target})
        raise KernelError("ENOSYS", spec.name)

    def _cap_request(self, proc: Proc, args: dict[str, Any]) -> Outcome:
        """A process asks for authority it lacks. Outside the ceiling the operator set at launch
        (none by default) it is EPERM without asking anyone; inside, a human decides, and a yes is
        a new capability (via cap.request), logged like any other grant."""
        from agentlibos.kernel._caps import scope_within, validate_rights, validate_scope

        kind = args["kind"]
        if kind not in self.kinds:
            raise KernelError("EINVAL", f"unknown capability kind {kind!r}")
        scope = validate_scope(kind, args["scope"])
        rights = validate_rights(kind, args["rights"])
        if not rights:
            raise KernelError("EINVAL", "a request names at least one right")
        fits = [c for c in proc.requestable if c["kind"] == kind and rights <= set(c["rights"])
                and scope_within(kind, scope, c["scope"])]
        if not fits:
            raise KernelError("EPERM", f"the request for {kind} {sorted(rights)} lies outside this process's "
                                       "requestable ceiling" if proc.requestable else
                                       "no requestable ceiling was set for this process (nothing to ask for)")

        def grant(seq: int) -> Any:
            rec = self.caps.create(holder=proc.pid, kind=kind, scope=scope, rights=sorted(rights),
                                   approval="never", via="cap.request")
            self._log_cap(rec, None, seq)
            return {"handle": rec.handle}

        reason = args.get("reason")
        out = Outcome.allow(None, apply=grant, detail={
            "request": {"kind": kind, "scope": scope, "rights": sorted(rights)},
            **({"reason_from_process": str(reason)[:500]} if reason else {})})
        out.must_approve = True
        return out

    def _log_cap(self, rec: CapRecord, author: int | None, cause: int | None = None) -> None:
        rec.created_seq = self._stage("cap.create", rec.log_body(), pid=author or None, cause=cause)

    def _sys_budget(self, proc: Proc, spec: SyscallSpec, args: dict[str, Any], handle: str | None, now: float) -> Outcome:
        return Outcome.allow(None, value=self.budgets.nodes[proc.pid].view(now))


def _named(what: str | Callable[[], str]) -> str:
    return what if isinstance(what, str) else what()
