"""Human approvals and questions: a request parked for a person, its decision (approve, approve and
remember, deny, time out), and the human.* syscalls.
"""

from __future__ import annotations

import re
import threading
from typing import Any


from agentlibos.bus import KernelError, Topic
from agentlibos.kernel._caps import CapRecord
from agentlibos.kernel._kprocs import ProcsMixin
from agentlibos.kernel._kstate import LIVE, Approval, ApprovalTimeout, Outcome, Proc
from agentlibos.kernel._table import SyscallSpec
from agentlibos.storage import digest


class ApprovalsMixin(ProcsMixin):
    """Requests that wait for a human, and what becomes of them once one decides."""

    # --- human approvals and questions ---------------------------------------------------------
    def _ask_approval(self, conn: bytes, rid: int, proc: Proc, spec: SyscallSpec, args: dict[str, Any],
                      cap: CapRecord | None, outcome: Outcome | None, seq: int, *, question: dict[str, Any] | None = None) -> None:
        """Park a request for a human. The approver sees the kernel's rendering of the effect."""
        now = self.clock()
        rendering = _sanitize({"sys": spec.name, "pid": proc.pid, "image": proc.image,
                               "cap": cap.handle if cap else None, **(outcome.detail or {} if outcome else {}),
                               **({"question": question} if question else {})})
        if self._carried_over(conn, rid, proc, spec, cap, outcome, seq, rendering, question is not None):
            return
        recent = [t for t in self._approval_times.get(proc.pid, []) if t > now - 60]
        if len(recent) >= self.config.approvals_per_minute:
            self._finish(conn, rid, proc.pid, spec.name, seq, None, KernelError(
                "EDENIED", f"approval flood: more than {self.config.approvals_per_minute} requests a minute"))
            return
        recent.append(now)
        self._approval_times[proc.pid] = recent
        self._approval_ids += 1
        aid = self._approval_ids
        ap = Approval(aid, proc.pid, spec.name, "question" if question else "effect", rendering, now, conn, rid, seq,
                      outcome, cap)
        self.approvals[aid] = ap
        timer = threading.Timer(self.config.approval_timeout_s, self._fire_approval, (aid,))
        timer.daemon = True
        ap.timer = timer
        timer.start()
        self._stage("approval.ask", {"id": aid, "pid": proc.pid, "sys": spec.name, "kind": ap.kind}, pid=proc.pid,
                    cause=seq, payload=rendering, has_payload=True)
        self._set_state(proc, "blocked")
        self._event(Topic.approval(), {"id": aid, "event": "asked", "pid": proc.pid, "sys": spec.name,
                                       "kind": ap.kind, "rendering": rendering})

    def _carried_over(self, conn: bytes, rid: int, proc: Proc, spec: SyscallSpec, cap: CapRecord | None,
                      outcome: Outcome | None, seq: int, rendering: dict[str, Any], question: bool) -> bool:
        """A retry, after a restart, of a request whose approval outlived it: wait on that same
        approval, or run now if a human already said yes to it (once). True if handled."""
        if not self._approved_carried and not any(a.carried for a in self.approvals.values()):
            return False
        key = digest(rendering)
        aid = self._approved_carried.pop((proc.pid, key), None)
        if aid is not None and not question and outcome is not None:
            self._stage("approval.reuse", {"id": aid, "pid": proc.pid, "sys": spec.name}, pid=proc.pid, cause=seq)
            self._carry_out(conn, rid, proc, spec, outcome, seq)
            return True
        ap = next((a for a in self.approvals.values() if a.carried == key and a.pid == proc.pid and not a.conn), None)
        if ap is None:
            return False
        ap.conn, ap.rid, ap.decision_seq, ap.outcome, ap.cap = conn, rid, seq, outcome, cap
        self._stage("approval.attach", {"id": ap.id, "pid": proc.pid, "sys": spec.name}, pid=proc.pid, cause=seq)
        self._set_state(proc, "blocked")
        return True

    def _fire_approval(self, aid: int) -> None:
        self._post(ApprovalTimeout(aid))

    def _decide_approval(self, aid: int, approve: bool, *, author: str, reason: str = "", answer: Any = None,
                         remember: bool = False, cause: int | None = None) -> dict[str, Any]:
        ap = self.approvals.pop(aid, None)
        if ap is None:
            raise KernelError("ENOENT", f"no pending approval {aid}")
        if ap.timer is not None:
            ap.timer.cancel()
        proc = self.procs.get(ap.pid)
        body: dict[str, Any] = {"id": aid, "decision": "approve" if approve else "deny", "author": author}
        if reason:
            body["reason"] = reason[:500]
        seq = self._stage("approval.decide", body, pid=ap.pid, cause=cause or ap.decision_seq)
        self._event(Topic.approval(), {"id": aid, "event": body["decision"], "pid": ap.pid, "author": author})
        if proc is not None and proc.state == "blocked":
            self._set_state(proc, "running")
        if not ap.conn:
            # Its request ended with a restart; a yes waits for the process to send it again.
            if approve and ap.carried and ap.kind == "effect":
                self._approved_carried[(ap.pid, ap.carried)] = aid
                return {"id": aid, "decision": "approve",
                        "note": "asked before a restart: runs when the process retries the same request (once)"}
            return {"id": aid, "decision": body["decision"], "note": "asked before a restart: nothing runs now"}
        if proc is None or proc.state not in LIVE:
            return {"id": aid, "decision": body["decision"], "note": "the process has ended"}
        spec = self.syscalls[ap.sys]
        if not approve:
            self._finish(ap.conn, ap.rid, ap.pid, ap.sys, ap.decision_seq, None,
                         KernelError("EDENIED", f"a human said no{': ' + reason if reason else ''}"))
            return {"id": aid, "decision": "deny"}
        if ap.kind == "question":
            self._finish(ap.conn, ap.rid, ap.pid, ap.sys, ap.decision_seq, {"answer": answer}, None)
            return {"id": aid, "decision": "approve"}
        out: dict[str, Any] = {"id": aid, "decision": "approve"}
        assert ap.outcome is not None
        # Revoked or expired while it waited, or dropped (a rollback): the approval cannot
        # resurrect it, and nothing is remembered from it.
        gone = None if ap.cap is None else ap.cap.status(self.clock()) or ("EPERM" if ap.cap.dropped else None)
        if ap.cap is not None and gone is not None:
            self._finish(ap.conn, ap.rid, ap.pid, ap.sys, ap.decision_seq, None,
                         KernelError(gone, f"{ap.cap.handle} was revoked, expired or dropped while awaiting approval"))
            return out
        if remember and ap.cap is not None:
            out["remembered"] = self._remember(proc, ap, seq)
        self._carry_out(ap.conn, ap.rid, proc, spec, ap.outcome, ap.decision_seq)
        return out

    def _remember(self, proc: Proc, ap: Approval, cause: int) -> str | None:
        """"Approve and remember": an explicit grant, without approval, for exactly this effect class."""
        cap = ap.cap
        assert cap is not None
        scope = dict(cap.scope)
        detail = ap.outcome.detail if ap.outcome else None
        if cap.kind == "fs" and detail and detail.get("path") is not None:
            root = cap.scope.get("root", "")
            rel = detail["path"][len(root):].lstrip("/") if root and detail["path"].startswith(root) else detail["path"]
            scope["paths"] = [rel.replace("*", "?")] if rel else scope.get("paths", ["**"])
        elif cap.kind == "shell" and detail and detail.get("argv"):
            scope["argv"] = [list(detail["argv"])]
        elif cap.kind == "rpc" and detail and detail.get("method"):
            scope["methods"] = [detail["method"]]
        try:
            rec = self.caps.create(holder=proc.pid, kind=cap.kind, scope=scope, rights=sorted(cap.rights),
                                   approval="never", expires=cap.expires, parent=cap.id, via="approval.remember")
        except KernelError:
            return None
        if not self._scope_ok(cap, rec):
            self.caps.revoke(rec.id)
            return None
        cap.children.append(rec.id) if rec.id not in cap.children else None
        self._log_cap(rec, None, cause)
        return rec.handle

    @staticmethod
    def _scope_ok(parent: CapRecord, child: CapRecord) -> bool:
        from agentlibos.kernel._caps import scope_within

        return scope_within(parent.kind, child.scope, parent.scope)

    def _sys_human(self, proc: Proc, spec: SyscallSpec, args: dict[str, Any], handle: str | None, now: float) -> Outcome:
        right = "ask" if spec.name == "human.ask" else "notify"
        channel = args.get("channel")
        cap = self._authorize(proc, "human", handle, now, lambda c: right in c.rights and (
            channel is None or c.scope.get("channel") == channel), f"{spec.name}")
        if spec.name == "human.notify":
            text = _sanitize(args["text"])
            def notify(seq: int) -> Any:
                self._event(Topic.approval(), {"event": "notify", "pid": proc.pid, "text": text, "seq": seq})
                return {}

            return Outcome.allow(cap, apply=notify, detail={"text": text})
        question = {"question": _sanitize(args["question"]), "choices": _sanitize(args.get("choices") or [])}
        out = Outcome.allow(cap, detail=question)
        out.human_question = question
        return out


_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def _sanitize(value: Any) -> Any:
    """Text an approver will read: control characters and ANSI escapes shown, never interpreted."""
    if isinstance(value, str):
        return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", value)
    if isinstance(value, dict):
        return {str(_sanitize(k)): _sanitize(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_sanitize(v) for v in value]
    return value
