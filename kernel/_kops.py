"""Operator requests (`op.*`): each is logged as an `op` entry, then carried out by its `_op_*` method:
images, spawn, grants and revocation, suspend, resume, interrupt, deadlines, approvals, inspection.
"""

from __future__ import annotations

import threading
from typing import Any

from agentlibos.bus import Command, KernelError, Request, Topic
from agentlibos.kernel._budget import parse_budget
from agentlibos.kernel._caps import GRANT_FIELDS, CapRecord, check_limits, validate_rights, validate_scope
from agentlibos.kernel._kapprovals import ApprovalsMixin, _sanitize
from agentlibos.kernel._kckpt import CheckpointsMixin, image_digest
from agentlibos.kernel._kstate import LIVE, Parked, Proc
from agentlibos.kernel._table import SyscallSpec

#: What an `_op_*` method returns when it parked the request: the reply comes when the wait ends.
_PARKED = object()


class OperatorMixin(ApprovalsMixin, CheckpointsMixin):
    """One `_op_*` method per operator request; `_operator` logs each and dispatches it."""

    def _live_proc(self, pid: int) -> Proc:
        """The live process an operator request names; ENOENT otherwise."""
        proc = self.procs.get(pid)
        if proc is None or proc.state not in LIVE:
            raise KernelError("ENOENT", f"no live process {pid}")
        return proc

    # --- operator requests ---------------------------------------------------------------------
    def _operator(self, conn: bytes, req: Request, spec: SyscallSpec, args: dict[str, Any]) -> None:
        seq = self._stage("op", {"sys": spec.name, "author": "operator"}, cause=req.cause, payload=args, has_payload=True)
        try:
            value = getattr(self, "_op_" + spec.name[3:].replace(".", "_"))(conn, req, args, seq)
        except KernelError as exc:
            self._finish(conn, req.id, 0, spec.name, seq, None, exc)
            return
        if value is _PARKED:
            return
        self._finish(conn, req.id, 0, spec.name, seq, value, None)

    def _op_image_register(self, conn: bytes, req: Request, args: dict[str, Any], seq: int) -> Any:
        tools = args.get("tools") or []
        if not all(isinstance(t, str) for t in tools):
            raise KernelError("EINVAL", "image tools must be tool names")
        image = {"name": args["name"], "prompt": args.get("prompt", ""), "tools": tools,
                 "skills": list(args.get("skills") or []), "jit_tools": dict(args.get("jit_tools") or {}),
                 "model": args.get("model"), "budget": args.get("budget") or {}, "meta": args.get("meta") or {}}
        image["digest"] = image_digest(image)
        self.images[args["name"]] = image
        self._stage("image.register", {"name": args["name"]}, cause=seq, payload=image, has_payload=True)
        return {"image": args["name"], "digest": image["digest"]}

    def _check_grant(self, g: Any, what: str = "grant") -> None:
        """Every field of a grant is known and well-formed (a typo such as `expires: 60` would
        otherwise give a capability that never expires): checked before anything is created."""
        if not isinstance(g, dict):
            raise KernelError("EINVAL", f"a {what} is a map with kind, scope and rights")
        unknown = sorted(str(k) for k in g if k not in GRANT_FIELDS)
        if unknown:
            raise KernelError("EINVAL", f"{what}: unknown field {unknown[0][:64]!r} "
                                        f"(fields: {', '.join(sorted(GRANT_FIELDS))})")
        kind = g.get("kind")
        if kind not in self.kinds:
            raise KernelError("EINVAL", f"{what}: unknown capability kind {str(kind)[:64]!r}")
        validate_scope(kind, g.get("scope", {}))
        validate_rights(kind, g.get("rights", []))
        check_limits(g, f"{what}: ")
        name = g.get("name")
        if name is not None and (not isinstance(name, str) or not name or len(name) > 64):
            raise KernelError("EINVAL", f"{what}: a handle name is a non-empty string of at most 64 characters")

    def _grant(self, pid: int, spec: dict[str, Any], now: float, cause: int) -> CapRecord:
        self._check_grant(spec)
        kind = spec["kind"]
        exp = spec.get("expires_in_s")
        rec = self.caps.create(
            holder=pid, kind=kind, scope=spec.get("scope", {}), rights=spec.get("rights", []),
            approval=spec.get("approval", "never"), expires=None if exp is None else now + float(exp),
            uses=spec.get("uses"), handle=spec.get("name"), via="operator",
        )
        self._log_cap(rec, None, cause)
        return rec

    def _op_spawn(self, conn: bytes, req: Request, args: dict[str, Any], seq: int,
                  checkpoint: dict[str, Any] | None = None) -> Any:
        """A root process from an image, or from a checkpoint's snapshot (op.ckpt.fork), holding
        exactly the operator's grants."""
        now = self.clock()
        image = args["image"]
        if image not in self.images:
            raise KernelError("ENOENT", f"no image {image!r} is registered")
        img = self.images[image]
        budget = parse_budget(args.get("budget") if args.get("budget") is not None else img.get("budget"))
        model = args.get("model") or img.get("model") or "scripted"
        grants = args.get("caps") or []
        # Validate every grant before creating anything, so a bad grant leaves no half-made process.
        for g in grants:
            self._check_grant(g)
        ceiling = []
        for g in args.get("requestable") or []:
            self._check_grant(g, "requestable entry")
            ceiling.append({"kind": g["kind"], "scope": validate_scope(g["kind"], g.get("scope", {})),
                            "rights": sorted(validate_rights(g["kind"], g.get("rights", [])))})
        proc = self._create_process(image, None, model, budget, bool(args.get("daemon")), args.get("input"), now)
        proc.requestable = ceiling
        start_extra = None
        if checkpoint is not None:
            self._seed_from_checkpoint(proc, checkpoint)
            start_extra = {"restored": self._affordances(checkpoint), "origin": "fork"}
        for g in grants:
            self._grant(proc.pid, g, now, seq)
        if args.get("external"):
            proc.external = True
            return {"pid": proc.pid, "token": proc.token}
        self._start_process(proc, start_extra)
        return {"pid": proc.pid}

    def _op_grant(self, conn: bytes, req: Request, args: dict[str, Any], seq: int) -> Any:
        proc = self._live_proc(args["pid"])
        g: dict[str, Any] = {k: args[k] for k in ("kind", "scope", "rights", "approval", "expires_in_s", "uses")
                             if k in args}
        if "name" in args:
            g["name"] = args["name"]
        rec = self._grant(proc.pid, g, self.clock(), seq)
        return {"cap": rec.id, "handle": rec.handle, "pid": proc.pid}

    def _op_revoke(self, conn: bytes, req: Request, args: dict[str, Any], seq: int) -> Any:
        if "cap" in args:
            rec = self.caps.records.get(args["cap"])
        elif "pid" in args and "handle" in args:
            rec = self.caps.by_handle(args["pid"], args["handle"])
        else:
            raise KernelError("EINVAL", "op.revoke needs cap, or pid and handle")
        if rec is None:
            raise KernelError("ENOENT", "no such capability")
        revoked = self.caps.revoke(rec.id)
        self._stage("cap.revoke", {"caps": revoked, "author": "operator"}, cause=seq)
        return {"revoked": revoked}

    def _op_kill(self, conn: bytes, req: Request, args: dict[str, Any], seq: int) -> Any:
        proc = self.procs.get(args["pid"])
        if proc is None:
            raise KernelError("ENOENT", f"no process {args['pid']}")
        return {"killed": self._kill(proc)}

    # --- checkpoints ---------------------------------------------------------------------------
    def _op_ckpt_create(self, conn: bytes, req: Request, args: dict[str, Any], seq: int) -> Any:
        proc = self._live_proc(args["pid"])
        return {"checkpoint": self._take_checkpoint(proc, args.get("label"), seq, author="operator")}

    def _op_ckpt_list(self, conn: bytes, req: Request, args: dict[str, Any], seq: int) -> Any:
        pid = args.get("pid")
        return {"checkpoints": [
            {"checkpoint": cid, "pid": ck["pid"], "image": ck.get("image"), "label": ck.get("label"),
             "log_seq": ck.get("log_seq"), "author": ck.get("author", "process")}
            for cid, ck in sorted(self.checkpoints.items()) if pid is None or ck["pid"] == pid]}

    def _op_ckpt_show(self, conn: bytes, req: Request, args: dict[str, Any], seq: int) -> Any:
        ck = self._find_checkpoint(args["checkpoint"])
        now = self.clock()
        handles = []
        for h, cid in sorted(ck["handles"].items()):
            rec = self.caps.records.get(cid)
            status = "gone" if rec is None else ("dropped" if rec.dropped else rec.status(now) or "live")
            handles.append({"handle": h, "cap": cid, "kind": rec.kind if rec else None, "status": status})
        messages = (ck.get("conversation") or {}).get("messages") or []
        return {"checkpoint": ck["id"], "pid": ck["pid"], "image": ck.get("image"), "label": ck.get("label"),
                "log_seq": ck.get("log_seq"), "author": ck.get("author", "process"), "messages": len(messages),
                "jit_tools": sorted(ck.get("jit_tools") or {}), "skills": list(ck.get("skills") or []),
                "memory": sorted(str(k) for k in ck.get("memory") or {}), "handles": handles,
                "children": list(ck.get("children") or []),
                # What the process holds now that a restore would drop (it got them after the checkpoint).
                "drops": sorted(h for h in self.caps.handles.get(ck["pid"], {}) if h not in ck["handles"])}

    def _op_ckpt_restore(self, conn: bytes, req: Request, args: dict[str, Any], seq: int) -> Any:
        proc = self._live_proc(args["pid"])
        ck = self._find_checkpoint(args["checkpoint"], proc.pid)
        if ck["pid"] != proc.pid:
            raise KernelError("EPERM", f"checkpoint {ck['id']} is of pid {ck['pid']}: a process is restored only "
                                       f"to its own checkpoints (op.ckpt.fork starts a new one from it)")
        if proc.state == "needs_attention":
            raise KernelError("ECONFLICT", f"process {proc.pid} has an effect of unknown outcome: resolve it first "
                                           f"(agentlibos resolve)")
        restored = self._restore_checkpoint(proc, ck)
        self._stage("ckpt.restore", {"checkpoint": ck["id"], "pid": proc.pid, "author": "operator"}, pid=proc.pid,
                    cause=seq)
        if not proc.external:
            # The host gives the process its restored affordances between turns (a turn in progress ends first).
            self._command(Command("restore", proc.pid, {"restored": restored}))
        body = {"pid": proc.pid, "event": "restored", "checkpoint": ck["id"]}
        self._event(Topic.proc(proc.pid), body)
        self._event(Topic("proc/"), body)
        return {"checkpoint": ck["id"], "pid": proc.pid, "handles": sorted(self.caps.handles.get(proc.pid, {}))}

    def _op_ckpt_fork(self, conn: bytes, req: Request, args: dict[str, Any], seq: int) -> Any:
        ck = self._find_checkpoint(args["checkpoint"])
        return self._op_spawn(conn, req, {**args, "image": ck["image"]}, seq, checkpoint=ck)

    def _op_unknown(self, conn: bytes, req: Request, args: dict[str, Any], seq: int) -> Any:
        return {"effects": [dict(v) for _, v in sorted(self.unresolved.items())]}

    def _op_resolve(self, conn: bytes, req: Request, args: dict[str, Any], seq: int) -> Any:
        """An operator says what became of an unknown effect (done, failed, or to be retried by a
        new run); the kernel never re-runs it itself."""
        outcome = args["outcome"]
        if outcome not in ("done", "failed", "retry"):
            raise KernelError("EINVAL", "outcome is done, failed or retry")
        item = self.unresolved.pop(args["decision"], None)
        if item is None:
            raise KernelError("ENOENT", f"no unknown effect at decision {args['decision']}")
        self._stage("effect.resolved", {"decision": item["decision"], "outcome": outcome, "author": "operator",
                                        "note": str(args.get("note") or "")[:500]}, pid=item["pid"], cause=seq)
        proc = self.procs.get(item["pid"])
        if proc is not None and proc.state == "needs_attention" and not any(
                v["pid"] == proc.pid for v in self.unresolved.values()):
            self._set_state(proc, "exited", status=f"resolved ({outcome})")
            proc.status = f"resolved ({outcome})"
        return {"decision": item["decision"], "outcome": outcome}

    def _op_suspend(self, conn: bytes, req: Request, args: dict[str, Any], seq: int) -> Any:
        proc = self._live_proc(args["pid"])
        if proc.state != "suspended":
            proc.resume_state = proc.state
            self._set_state(proc, "suspended")
        return {"pid": proc.pid, "state": "suspended"}

    def _op_resume(self, conn: bytes, req: Request, args: dict[str, Any], seq: int) -> Any:
        proc = self.procs.get(args["pid"])
        if proc is None or proc.state != "suspended":
            raise KernelError("ENOENT", f"no suspended process {args['pid']}")
        self._set_state(proc, proc.resume_state if proc.resume_state in LIVE else "ready")
        held, proc.held = proc.held, []
        for held_conn, held_req in held:
            caller = self._conns.get(held_conn)
            if caller is not None:
                self._request(held_conn, caller, held_req)
        return {"pid": proc.pid, "state": proc.state, "released": len(held)}

    def _op_interrupt(self, conn: bytes, req: Request, args: dict[str, Any], seq: int) -> Any:
        """Interrupt a process's current turn: what it waits on now (an approval, a message, a
        child) ends with EINTR, or else its next syscall does; the process then waits for input."""
        proc = self._live_proc(args["pid"])
        err = KernelError("EINTR", "the operator interrupted this turn")
        ended = 0
        for aid in [a.id for a in self.approvals.values() if a.pid == proc.pid]:
            ap = self.approvals.pop(aid)
            if ap.timer is not None:
                ap.timer.cancel()
            self._stage("approval.decide", {"id": aid, "decision": "deny", "author": "operator",
                                            "reason": "interrupted"}, pid=proc.pid, cause=seq)
            self._event(Topic.approval(), {"id": aid, "event": "deny", "pid": proc.pid, "author": "operator"})
            self._finish(ap.conn, ap.rid, ap.pid, ap.sys, ap.decision_seq, None, err)
            ended += 1
        for key in [k for k, p in self._parked.items() if p.pid == proc.pid]:
            ended += self._resume(key, error=err)
        if proc.state == "blocked":
            self._set_state(proc, "running")
        proc.interrupt = ended == 0
        return {"pid": proc.pid, "interrupted": ended}

    def _op_deadline(self, conn: bytes, req: Request, args: dict[str, Any], seq: int) -> Any:
        """Set (in_s seconds from now) or clear (no in_s) a process's deadline; at the deadline the
        kernel kills it and its subtree with status `deadline`."""
        proc = self._live_proc(args["pid"])
        in_s = args.get("in_s")
        if in_s is not None and (isinstance(in_s, bool) or not isinstance(in_s, (int, float)) or in_s < 0):
            raise KernelError("EINVAL", "in_s must be a number of seconds >= 0")
        if proc.deadline_timer is not None:
            proc.deadline_timer.cancel()
            proc.deadline_timer = None
        proc.deadline = None if in_s is None else self.clock() + float(in_s)
        if in_s is not None:
            timer = threading.Timer(float(in_s), self._fire_deadline, (proc.pid,))
            timer.daemon = True
            proc.deadline_timer = timer
            timer.start()
        return {"pid": proc.pid, "deadline": proc.deadline}

    def _op_send(self, conn: bytes, req: Request, args: dict[str, Any], seq: int) -> Any:
        proc = self._live_proc(args["pid"])
        self._stage("msg.deliver", {"pid": proc.pid, "from": "operator"}, pid=proc.pid, cause=seq,
                    payload=args["input"], has_payload=True)
        self._command(Command("deliver", proc.pid, {"input": args["input"]}))
        return {}

    def _op_wait(self, conn: bytes, req: Request, args: dict[str, Any], seq: int) -> Any:
        proc = self.procs.get(args["pid"])
        if proc is None:
            raise KernelError("ENOENT", f"no process {args['pid']}")
        if proc.state not in LIVE:
            return {"pid": proc.pid, "status": proc.status, "result": proc.result}
        self._tickets += 1
        key = self._tickets
        self._parked[key] = Parked(conn, req.id, 0, req.sys, seq)
        self._exit_waiters.setdefault(proc.pid, []).append(key)
        self._park_timeout(key, args.get("timeout_s"))
        return _PARKED

    def _op_ps(self, conn: bytes, req: Request, args: dict[str, Any], seq: int) -> Any:
        return {"processes": [
            {"pid": p.pid, "ppid": p.ppid, "image": p.image, "state": p.state, "status": p.status, "model": p.model}
            for p in self.procs.values()
        ]}

    def _op_caps(self, conn: bytes, req: Request, args: dict[str, Any], seq: int) -> Any:
        pid = args.get("pid")
        return {"caps": [
            {**r.log_body(), "revoked": r.revoked, "dropped": r.dropped, "created_seq": r.created_seq}
            for r in self.caps.records.values() if pid is None or r.holder == pid
        ]}

    def _op_approvals(self, conn: bytes, req: Request, args: dict[str, Any], seq: int) -> Any:
        return {"approvals": [a.view() for a in sorted(self.approvals.values(), key=lambda a: a.id)]}

    def _op_approve(self, conn: bytes, req: Request, args: dict[str, Any], seq: int) -> Any:
        return self._decide_approval(args["id"], True, author=args.get("author") or "operator",
                                     remember=bool(args.get("remember")), cause=seq)

    def _op_deny(self, conn: bytes, req: Request, args: dict[str, Any], seq: int) -> Any:
        return self._decide_approval(args["id"], False, author=args.get("author") or "operator",
                                     reason=args.get("reason") or "", cause=seq)

    def _op_answer(self, conn: bytes, req: Request, args: dict[str, Any], seq: int) -> Any:
        ap = self.approvals.get(args["id"])
        if ap is None or ap.kind != "question":
            raise KernelError("ENOENT", f"no pending question {args['id']}")
        return self._decide_approval(args["id"], True, author=args.get("author") or "operator",
                                     answer=_sanitize(args["answer"]), cause=seq)

    def _op_images(self, conn: bytes, req: Request, args: dict[str, Any], seq: int) -> Any:
        return {"images": [self._image_view(n) for n in sorted(self.images)]}

    def _op_mem_put(self, conn: bytes, req: Request, args: dict[str, Any], seq: int) -> Any:
        self.memory.setdefault(self._ns_key(args["ns"]), {})[args["key"]] = args["value"]
        return {}

    def _op_mem_get(self, conn: bytes, req: Request, args: dict[str, Any], seq: int) -> Any:
        store = self.memory.get(self._ns_key(args["ns"]), {})
        if args["key"] not in store:
            raise KernelError("ENOENT", f"no key {args['key']!r} in {args['ns']!r}")
        return {"value": store[args["key"]]}

    @staticmethod
    def _ns_key(ns: str) -> str:
        return ns if ns.startswith("self:") else f"ns:{ns}"

    def _op_budget(self, conn: bytes, req: Request, args: dict[str, Any], seq: int) -> Any:
        node = self.budgets.nodes.get(args["pid"])
        if node is None:
            raise KernelError("ENOENT", f"no process {args['pid']}")
        return node.view(self.clock())
