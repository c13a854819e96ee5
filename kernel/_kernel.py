"""The Kernel actor: decides every syscall against capabilities and budgets, logs the decision
durably before the effect runs, runs effects off its own thread, and replies after commit.
"""

from __future__ import annotations

import concurrent.futures
import functools
import hashlib
import json
import logging
import os
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import zmq

from agentlibos.bus import DENIAL_CODES, Hello, KernelError, LogWriteError, Publisher, Reply, Request, RouterSet, Topic
from agentlibos.bus._observe import OBSERVE_LEVELS, call_record
from agentlibos.kernel._budget import BudgetTree
from agentlibos.kernel._caps import BUILTIN_KINDS, CapRecord, CapTable, register_kind
from agentlibos.kernel._commit import Outputs
from agentlibos.kernel._config import KernelConfig
from agentlibos.kernel._inbox import Inbound, KernelInbox
from agentlibos.kernel._kagent import BUILTIN_TOOL_NAMES, SKILL_NAME, TOOL_NAME, AgentMixin
from agentlibos.kernel._kckpt import image_digest
from agentlibos.kernel._kops import OperatorMixin
from agentlibos.kernel._kprocs import MAX_QUEUE
from agentlibos.kernel._kstate import (
    LIVE,
    OPERATOR,
    Approval,
    ApprovalTimeout,
    Caller,
    DeadlineFired,
    EffectDone,
    Inspect,
    Outcome,
    Parked,
    Pending,
    Proc,
    ProviderNotice,
    TimerFired,
)
from agentlibos.kernel._kworld import WorldMixin
from agentlibos.kernel._models import ModelBackend
from agentlibos.kernel._provider import Provider
from agentlibos.kernel._table import NOT_YET, SYSCALLS, SyscallSpec
from agentlibos.storage import LogBackend, digest

#: Defined in the kernel's parts; other modules and tests import them from here.
__all__ = [
    "ACTIVE_WINDOW_S", "BUILTIN_TOOL_NAMES", "EFFECTFUL", "GROUP_WAIT_S", "LIVE", "MAX_QUEUE", "OPERATOR",
    "SKILL_NAME", "TOOL_NAME", "Approval", "ApprovalTimeout", "Caller", "DeadlineFired", "EffectDone", "Inspect",
    "Kernel", "Outcome", "Parked", "Pending", "Proc", "ProviderNotice", "TimerFired", "image_digest",
]

log = logging.getLogger("agentlibos.kernel")

#: Longest a commit round waits for requests from clients that were just answered (a fraction
#: of one fsync: it turns a trickle of arrivals into one commit instead of two).
GROUP_WAIT_S = 150e-6
ACTIVE_WINDOW_S = 2e-3
#: Syscalls whose effect happens outside the kernel (a crash between intent and result leaves it unknown).
EFFECTFUL = ("fs.", "shell.exec", "llm.complete", "rpc.", "mcp.", "pty.", "git.")


# The loop, group commit, the request path and recovery are here; the rest of the Kernel comes from
# its mixins: caps, processes, approvals, checkpoints and images, world and agent providers, operator.
class Kernel(OperatorMixin, WorldMixin, AgentMixin):
    """One per host. Everything it does happens on its own thread, one message at a time."""

    use_daemon_thread = True

    def __init__(
        self,
        config: KernelConfig,
        log_backend: LogBackend,
        context: zmq.Context[Any],
        endpoints: list[str],
        event_endpoints: list[str],
        models: dict[str, ModelBackend] | None = None,
        providers: list[Provider] | None = None,
    ) -> None:
        super().__init__()
        if config.llm_observe not in OBSERVE_LEVELS:
            raise ValueError(f"llm_observe must be one of {', '.join(OBSERVE_LEVELS)}, not {config.llm_observe!r}")
        self.config = config
        # Time comes from here only: read once per message, so every decision and entry of one
        # message sees the same instant, and a replay can run the kernel on the recorded clock.
        self._tick = time.time()
        # The one syscall table: the built-in rows plus those of providers registered at start.
        self.syscalls = dict(SYSCALLS)
        self._ext = {}
        #: The capability kinds this kernel grants: the built-in ones and its providers' kinds.
        self.kinds = BUILTIN_KINDS
        for prov in providers or []:
            if prov.kind not in BUILTIN_KINDS:
                rights = frozenset(r for row in prov.syscalls for r in row.rights)
                register_kind(prov.kind, rights, prov.scope_keys, prov.within)
                self.kinds |= {prov.kind}
            for row in prov.syscalls:
                if row.name in self.syscalls and row.name not in NOT_YET:
                    raise ValueError(f"provider {prov.kind!r}: syscall {row.name!r} is already in the table")
                self.syscalls[row.name] = row
                self._ext[row.name] = prov
        self.log = log_backend
        self._ctx = context
        self._endpoints = endpoints
        self._event_endpoints = event_endpoints
        self.models = dict(models or {})
        self.caps = CapTable(attenuate="attenuation" not in config.ablate, cascade="cascade" not in config.ablate)
        self.budgets = BudgetTree()
        self.procs = {}
        self.images = {}
        self.checkpoints = {}
        self.unresolved = {}
        self._next_ckpt = 0
        self.memory = {}
        self.approvals = {}
        self._approval_ids = 0
        self._approval_times = {}
        self._approved_carried = {}
        self._conns = {}
        self._ended_conns = {}
        self._tokens = {}
        self._token_digests = {}
        self._host_conn = None
        self._host_backlog = []
        #: Idle hosted processes' affordances, handed over by the host at a clean stop (host.park).
        self._host_parked: dict[int, dict[str, Any]] = {}
        self._next_pid = 1
        self._tickets = 0
        self._pending = {}
        self._handlers: dict[str, Callable[..., Outcome]] = {}
        #: Audit events on the bus (a replaying kernel publishes nothing, so builds none).
        self._audit_events = True
        self._parked = {}
        self._exit_waiters = {}  # pid -> park keys
        self._receivers = {}  # (pid, queue) -> park keys
        self.queues = {}
        # Work held back until this round's log entries are durable.
        self._out = Outputs()
        self._dirty = False
        self._round_started = None
        self._recent = {}  # connection -> when its last reply left
        self.failed = None
        self.bound = False
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=config.effect_workers, thread_name_prefix="agentlibos-effect"
        )

    @staticmethod
    def _create_actor_inbox() -> Any:
        # The inbox also polls the kernel's ROUTER sockets: requests reach the decision on this
        # thread with no hop, and pykka messages (effect results, timers) wake the same poll.
        return KernelInbox()

    # --- actor lifecycle -----------------------------------------------------------------------
    @property
    def _inbox(self) -> KernelInbox:
        return cast(KernelInbox, self.actor_inbox)

    def on_start(self) -> None:
        self._routers = RouterSet(self._ctx, self._endpoints)
        self._pub = Publisher(self._ctx, self._event_endpoints)
        self._inbox.attach(self._routers)
        for prov in {id(p): p for p in self._ext.values()}.values():
            if prov.attach is not None:
                prov.attach(functools.partial(self._notice, prov.kind))
        self.bound = True
        start: dict[str, Any] = {"pid": os.getpid(), "world_root": str(self.config.world_root),
                                 "llm_observe": self.config.llm_observe}
        if self.config.modules:
            start["modules"] = list(self.config.modules)
        # A session's entries, its recovery's included, follow its kernel.start: a replay of the
        # earlier session ends where this one starts.
        self._stage("kernel.start", start)
        self._recover()
        self._flush()

    def state_hash(self) -> str:
        """A digest of the kernel's authority-relevant state; a faithful replay reproduces it."""
        caps = [[r.id, r.holder, r.handle, r.kind, r.scope, sorted(r.rights), r.approval, r.expires, r.uses,
                 r.parent, r.revoked, r.dropped] for r in sorted(self.caps.records.values(), key=lambda r: r.id)]
        procs = [[p.pid, p.ppid, p.image, p.state, p.status] for p in sorted(self.procs.values(), key=lambda p: p.pid)]
        budgets = {str(pid): {"limits": n.limits, "used": n.used} for pid, n in sorted(self.budgets.nodes.items())}
        images = {n: i.get("digest") for n, i in sorted(self.images.items())}
        return digest({"caps": caps, "procs": procs, "memory": {k: v for k, v in sorted(self.memory.items())},
                       "budgets": budgets, "images": images, "checkpoints": sorted(self.checkpoints)})

    def on_stop(self) -> None:
        for p in list(self._parked.values()):
            if p.timer:
                p.timer.cancel()
        try:
            self._tick = time.time()
            if not self.failed:
                try:
                    resume = self._resume_state()
                    if resume is None:
                        self._stage("kernel.stop", {"state_hash": self.state_hash()})
                    else:
                        self._stage("kernel.stop", {"state_hash": self.state_hash()}, payload=resume, has_payload=True)
                except Exception:
                    log.exception("kernel: could not record the final state hash")
            self._flush()
        finally:
            for prov in {id(p): p for p in self._ext.values()}.values():
                if prov.close is not None:
                    try:
                        prov.close()
                    except Exception:
                        log.exception("provider %s: close failed", prov.kind)
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._inbox.detach()
            self._routers.close()
            self._pub.close()

    def on_failure(self, *args: Any) -> None:  # pragma: no cover - on_receive never raises
        log.error("kernel actor failure: %r", args)

    # --- the host's requests ------------------------------------------------------------------
    def _host_request(self, conn: bytes, req: Request) -> None:
        """A request from the host connection: only host rows of the table, decided here, off the
        syscall path (the host is no process: no budget, no capability; nothing logged on its own)."""
        if self.failed:
            self._reply(conn, Reply.failure(req.id, "EIO", self.failed))
            return
        spec = self.syscalls.get(req.sys)
        if spec is None or spec.role != "host":
            self._reply(conn, Reply.failure(req.id, "ENOSYS", f"unknown host request {req.sys!r}"))
            return
        try:
            value = getattr(self, "_host_" + spec.name[5:].replace(".", "_"))(spec.validate(req.args))
        except KernelError as exc:
            self._reply(conn, Reply(req.id, False, error=exc))
            return
        except Exception as exc:  # the host gets an answer, and the rest of the round is served
            log.exception("kernel: %s failed", req.sys)
            self._reply(conn, Reply.failure(req.id, "EIO", f"kernel error in {req.sys}: {type(exc).__name__}: {exc}"))
            return
        self._reply(conn, Reply(req.id, True, value))

    def _host_park(self, args: dict[str, Any]) -> dict[str, Any]:
        """The host is stopping and this process was idle between turns: keep its affordances for
        the stop entry, so that it resumes after a clean restart. Only a live hosted process."""
        proc = self.procs.get(args["pid"])
        if proc is None or proc.state not in LIVE or proc.state == "needs_attention":
            raise KernelError("ENOENT", f"no live process {args['pid']}")
        if proc.external:
            raise KernelError("EPERM", f"process {proc.pid} is run by an outside client, not by the host")
        tools = args.get("jit_tools") or {}
        instructions = args.get("instructions") or []
        if not all(isinstance(k, str) and isinstance(v, dict) for k, v in tools.items()):
            raise KernelError("EINVAL", "jit_tools maps each tool name to its definition")
        if not all(isinstance(i, str) for i in instructions):
            raise KernelError("EINVAL", "instructions are strings")
        self._host_parked[proc.pid] = {"messages": args["messages"], "jit_tools": tools, "instructions": instructions}
        return {"pid": proc.pid, "parked": True}

    def _host_failed(self, args: dict[str, Any]) -> dict[str, Any]:
        """The host could not run this process: it ends with status error (logged, and replayed
        as a stimulus), so that nobody waits on a process that will never attach."""
        proc = self.procs.get(args["pid"])
        if proc is None or proc.state not in LIVE:
            raise KernelError("ENOENT", f"no live process {args['pid']}")
        if proc.external:
            raise KernelError("EPERM", f"process {proc.pid} is run by an outside client, not by the host")
        reason = args["reason"][:500]
        self._stage("host", {"sys": "host.failed"}, pid=proc.pid, payload={"pid": proc.pid, "reason": reason},
                    has_payload=True)
        self._exit(proc, "error", f"the process host could not run it: {reason}")
        return {"pid": proc.pid}

    # --- a clean stop and the restart after it -------------------------------------------------
    def _resume_state(self) -> dict[str, Any] | None:
        """At a clean stop: what lets processes carry on after a restart: outside (external)
        processes, with a digest of their tokens, and hosted ones the host parked (idle between
        turns, with their affordances); for each its record and `self` memory; and the open budget
        nodes. None: nothing to resume."""
        procs = []
        for p in self.procs.values():
            parked = None if p.external else self._host_parked.get(p.pid)
            if (not p.external and parked is None) or p.state not in LIVE or p.state == "needs_attention":
                continue
            saved: dict[str, Any] = {
                "pid": p.pid, "ppid": p.ppid, "image": p.image, "model": p.model, "daemon": p.daemon,
                "state": "suspended" if p.state == "suspended" else "ready", "origin": p.origin,
                "requestable": p.requestable, "jit_tools": p.jit_tools, "skills": p.skills,
                "memory": dict(self.memory.get(f"self:{p.pid}", {}))}
            if parked is None:
                saved["token_sha256"] = hashlib.sha256(p.token.encode()).hexdigest()
            else:
                saved["hosted"] = True
                saved["affordances"] = parked
            procs.append(saved)
        return {"processes": procs, "budgets": self.budgets.snapshot()} if procs else None

    def _clean_stop(self) -> dict[str, Any]:
        """The resume state the earlier session left if it stopped cleanly (else nothing)."""
        try:
            head = self.log.head()[0]
            last = self.log.get(head) if head else None
            if last is None or last.kind != "kernel.stop":
                return {}
            present, state = self.log.payload(last.seq)
            return state if present and isinstance(state, dict) else {}
        except Exception:
            log.exception("kernel: could not read the earlier session's stop entry")
            return {}

    def _recover(self) -> None:
        """Continue after what the log holds. An effect logged as intended with no recorded result
        is `unknown`: never run again on its own; its process waits in needs_attention until an
        operator resolves it. After a clean stop, outside processes carry on (they say hello
        again with their tokens), and so do the hosted ones the host parked (the host starts them
        again with their conversation); every other live process of the earlier session is interrupted."""
        resume = self._clean_stop()
        resumable = {int(p["pid"]): p for p in resume.get("processes", [])}
        hosted: list[tuple[Proc, dict[str, Any]]] = []
        unknown = self._unknown_effects()
        for seq, (pid, sys) in sorted(unknown.items()):
            self._stage("effect.unknown", {"decision": seq, "pid": pid, "sys": sys}, pid=pid, cause=seq)
            self.unresolved[seq] = {"decision": seq, "pid": pid, "sys": sys}
        attention = {pid for pid, _ in unknown.values()}
        max_pid = 0
        for row in self.log_projection("processes"):
            pid = int(row["pid"])
            max_pid = max(max_pid, pid)
            state, status = str(row.get("state")), row.get("status")
            if state in LIVE and pid in resumable and pid not in attention:
                proc = self._resume_process(resumable[pid])
                if not proc.external:
                    hosted.append((proc, resumable[pid]))
                continue
            if state in LIVE and pid not in attention:
                self._stage("proc.state", {"pid": pid, "state": "exited", "status": "interrupted"})
                state, status = "exited", "interrupted"
            if pid not in attention:  # the earlier session's processes stay visible (ps, wait), ended
                ppid = row.get("ppid")
                self.procs[pid] = Proc(pid=pid, ppid=ppid if isinstance(ppid, int) else None,
                                       image=str(row.get("image") or ""), model="", token="", daemon=False,
                                       state=state, status=str(status) if status is not None else None)
        for proc in list(self.procs.values()):
            if proc.ppid is not None and proc.ppid in self.procs:
                self.procs[proc.ppid].children.add(proc.pid)
        for pid in sorted(attention):
            self._stage("proc.state", {"pid": pid, "state": "needs_attention", "status": "unknown effect"}, pid=pid)
            self.procs[pid] = Proc(pid=pid, ppid=None, image="", model="", token="", daemon=False,
                                   state="needs_attention", status="unknown effect")
        self._next_pid = max_pid + 1
        if resume.get("budgets"):
            # Budgets as they stood at the stop; what interrupted processes reserved goes back.
            self.budgets.restore(resume["budgets"])
            for pid in sorted(self.budgets.nodes, reverse=True):
                owner = self.procs.get(pid)
                if owner is None or owner.state not in LIVE or owner.state == "needs_attention":
                    self.budgets.release(pid)
        # Checkpoints are content (a snapshot and the handles it named): restored as recorded.
        try:
            for e in self.log.entries(kinds=["ckpt.create"]):
                present, snap = self.log.payload(e.seq)
                if present and isinstance(snap, dict) and isinstance(snap.get("id"), int):
                    self.checkpoints[snap["id"]] = snap
                    self._next_ckpt = max(self._next_ckpt, snap["id"])
        except Exception:
            log.exception("kernel: could not recover checkpoints from the log")
        # Images registered earlier (an image is content, never authority: safe to restore as is).
        try:
            for e in self.log.entries(kinds=["image.register"]):
                present, image = self.log.payload(e.seq)
                if present and isinstance(image, dict) and image.get("name"):
                    self.images[image["name"]] = image
        except Exception:
            log.exception("kernel: could not recover images from the log")
        self._recover_approvals()
        self._recover_shared_memory()
        # Capabilities: every record comes back for derivation chains, explain and revocation;
        # their holders ended with the earlier session, so none is held by anyone.
        max_cap = 0
        dropped_at_stop: dict[int, bool] = {}
        for row in self.log_projection("capabilities"):
            cid = int(row["cap"])
            dropped_at_stop[cid] = bool(row.get("dropped"))
            max_cap = max(max_cap, cid)
            try:
                rec = CapRecord(id=cid, holder=int(row["holder"]), handle=str(row["handle"]), kind=str(row["kind"]),
                                scope=json.loads(row["scope"]) if row.get("scope") else {},
                                rights=frozenset(json.loads(row["rights"]) if row.get("rights") else ()),
                                approval=str(row.get("approval") or "never"), expires=row.get("expires"),
                                uses=row.get("uses"), parent=row.get("parent"), via=str(row.get("via") or "operator"),
                                created_seq=int(row.get("created_seq") or 0), revoked=bool(row.get("revoked")),
                                dropped=True)
            except (TypeError, ValueError):
                log.exception("kernel: capability %s in the projection is unreadable; left out", cid)
                continue
            self.caps.records[cid] = rec
        for rec in self.caps.records.values():
            if rec.holder in resumable and rec.holder in self.procs and self.procs[rec.holder].state in LIVE:
                # A resumed process holds again what it held (revoked ones stay dead; dropped stay gone).
                self.caps._used_names.setdefault(rec.holder, set()).add(rec.handle)
                row_dropped = dropped_at_stop.get(rec.id, True)
                if not row_dropped:
                    rec.dropped = False
                    self.caps.handles.setdefault(rec.holder, {})[rec.handle] = rec.id
            parent = self.caps.records.get(rec.parent) if rec.parent is not None else None
            if parent is not None and rec.id not in parent.children:
                parent.children.append(rec.id)
        self.caps._next_id = max_cap + 1
        for proc, saved in hosted:
            # Queued until the host says hello; it starts the process waiting for input (none is given).
            aff = saved.get("affordances")
            if not isinstance(aff, dict):
                aff = {}
            messages = list(aff.get("messages") or [])
            proc.conversation = {"messages": messages}  # what a checkpoint taken before its next turn holds
            self._start_process(proc, {
                "restored": {"messages": messages, "jit_tools": dict(aff.get("jit_tools") or {}),
                             "skills": list(proc.skills)},
                "instructions": [str(i) for i in aff.get("instructions") or []]})

    def _recover_shared_memory(self) -> None:
        """Shared Object Memory namespaces outlive the processes that wrote them: rebuilt from
        the puts and deletes the log records as done (a `self` namespace ends with its process;
        checkpoints carry their own copy)."""
        writes: dict[int, tuple[str, str, Any, Any]] = {}
        try:
            for e in self.log.entries(kinds=["sys", "op", "result"]):
                b = e.body
                if e.kind == "result":
                    w = writes.pop(e.cause, None) if e.cause is not None else None
                    if w is not None and b.get("ok"):
                        op, store_key, key, value = w
                        if op == "put":
                            self.memory.setdefault(store_key, {})[key] = value
                        else:
                            self.memory.get(store_key, {}).pop(key, None)
                    continue
                name = b.get("sys")
                if name not in ("mem.put", "mem.delete", "op.mem.put") or b.get("decision", "allow") != "allow":
                    continue
                present, args = self.log.payload(e.seq)
                if not present or not isinstance(args, dict):
                    continue
                ns = args.get("ns") or "self"
                if not isinstance(ns, str) or ns == "self" or ns.startswith("self:"):
                    continue
                writes[e.seq] = ("delete" if name == "mem.delete" else "put", f"ns:{ns}", args.get("key"),
                                 args.get("value"))
        except Exception:
            log.exception("kernel: could not recover shared memory from the log")

    def _resume_process(self, saved: dict[str, Any]) -> Proc:
        """A process of the earlier session carries on: an outside one is known by its token's
        digest until it says hello again; a hosted one gets a fresh token (the host is given it)."""
        pid = int(saved["pid"])
        ppid = saved.get("ppid")
        proc = Proc(pid=pid, ppid=ppid if isinstance(ppid, int) else None, image=str(saved.get("image", "")),
                    model=str(saved.get("model", "")), token="", daemon=bool(saved.get("daemon")),
                    state=str(saved.get("state", "ready")), status=None, origin=str(saved.get("origin", "spawn")),
                    requestable=list(saved.get("requestable") or []), external=not saved.get("hosted"),
                    jit_tools=dict(saved.get("jit_tools") or {}), skills=list(saved.get("skills") or []))
        self.procs[pid] = proc
        if isinstance(saved.get("memory"), dict) and saved["memory"]:
            self.memory[f"self:{pid}"] = dict(saved["memory"])
        if proc.external:
            self._token_digests[str(saved["token_sha256"])] = pid
        else:
            proc.token = secrets.token_hex(16)
            self._tokens[proc.token] = pid
        self._stage("proc.state", {"pid": pid, "state": proc.state, "status": "resumed after a restart"}, pid=pid)
        return proc

    def _recover_approvals(self) -> None:
        """Approvals still pending when the earlier session ended stay in the queue: an operator
        sees what was asked and closes it, and the decision is logged. Their requester did not
        survive the restart, so an approval runs nothing; a timeout still denies."""
        asked: dict[int, Any] = {}
        try:
            for e in self.log.entries(kinds=["approval.ask", "approval.decide"]):
                aid = e.body.get("id")
                if not isinstance(aid, int):
                    continue
                self._approval_ids = max(self._approval_ids, aid)
                if e.kind == "approval.ask":
                    asked[aid] = e
                else:
                    asked.pop(aid, None)
            for aid, e in sorted(asked.items()):
                present, rendering = self.log.payload(e.seq)
                ap = Approval(aid, int(e.pid or 0), str(e.body.get("sys", "")), str(e.body.get("kind", "effect")),
                              rendering if present and isinstance(rendering, dict) else {}, e.ts, b"", 0,
                              int(e.cause or e.seq), None, None)
                ap.carried = digest(ap.rendering)
                ap.rendering = {**ap.rendering, "note": "asked before the kernel restarted: a yes lets the process's "
                                                        "retry of this same request run once, without asking again"}
                self.approvals[aid] = ap
                left = max(0.0, e.ts + self.config.approval_timeout_s - time.time())
                ap.timer = threading.Timer(left, self._fire_approval, (aid,))
                ap.timer.daemon = True
                ap.timer.start()
        except Exception:
            log.exception("kernel: could not recover pending approvals from the log")

    def _unknown_effects(self) -> dict[int, tuple[int, str]]:
        """Decisions that allowed an outside effect and have no result: crashed mid-effect. A
        decision still waiting for a human (asked, never approved) ran nothing: not unknown."""
        open_: dict[int, tuple[int, str]] = {}
        gate: dict[int, int] = {}  # approval id -> the decision it gates
        approved: set[int] = set()
        try:
            for e in self.log.entries(kinds=["sys", "result", "effect.resolved", "approval.ask", "approval.decide"]):
                b = e.body
                if e.kind == "sys" and b.get("decision") == "allow" and b.get("ok") is not True \
                        and (str(b.get("sys", "")).startswith(EFFECTFUL) or b.get("sys") in self._ext) \
                        and e.pid is not None:
                    open_[e.seq] = (e.pid, str(b["sys"]))
                elif e.kind == "result" and e.cause is not None:
                    open_.pop(e.cause, None)
                elif e.kind == "effect.resolved":
                    open_.pop(int(b.get("decision", 0)), None)
                elif e.kind == "approval.ask" and e.cause is not None:
                    gate[int(b.get("id", 0))] = e.cause
                elif e.kind == "approval.decide" and b.get("decision") == "approve":
                    approved.add(int(b.get("id", 0)))
            for aid, decision in gate.items():
                if aid not in approved:
                    open_.pop(decision, None)
        except Exception:
            log.exception("kernel: could not scan the log for unknown effects")
        return open_

    def log_projection(self, name: str) -> list[dict[str, Any]]:
        try:
            return list(self.log.projection(name))
        except Exception:  # a log without projections (fresh) has nothing to recover
            return []

    def _notice(self, kind: str, body: dict[str, Any]) -> None:  # any thread
        self._post(ProviderNotice(kind, dict(body)))

    def clock(self) -> float:
        return self._tick

    def on_receive(self, message: Any) -> Any:
        self._tick = time.time()
        try:
            if isinstance(message, Inbound):
                for conn, msg in message.batch:
                    if conn == self._host_conn and isinstance(msg, Request):
                        self._host_request(conn, msg)
                    else:
                        self._handle(conn, msg)
            elif isinstance(message, EffectDone):
                self._effect_done(message)
            elif isinstance(message, TimerFired):
                self._timer_fired(message.key)
            elif isinstance(message, DeadlineFired):
                proc = self.procs.get(message.pid)
                if proc is not None and proc.deadline_timer is not None and id(proc.deadline_timer) == message.token:
                    self._deadline(proc)
            elif isinstance(message, ApprovalTimeout):
                if message.id in self.approvals:
                    self._decide_approval(message.id, False, author="timeout", reason="no human answered in time")
            elif isinstance(message, ProviderNotice):
                pid = message.body.get("pid")
                seq = self._stage(f"{message.kind}.notice", message.body, pid=pid if isinstance(pid, int) else None)
                self._event(Topic(f"{message.kind}/"), {**message.body, "seq": seq})
            elif isinstance(message, Inspect):
                return message.fn(self)
        except Exception:  # the kernel keeps serving whatever one message did
            log.exception("kernel: unexpected error handling %r", type(message).__name__)
        finally:
            if self.actor_inbox.empty() and not self._linger():
                self._flush()
        return None

    def _linger(self) -> bool:
        """Adaptive group commit: when other clients were just answered and this round is young,
        wait a fraction of an fsync for their next requests, so one commit carries them all.
        True if input arrived (the round stays open); bounded by GROUP_WAIT_S per round."""
        if not self._out.replies or self._round_started is None:
            return False
        now = time.perf_counter()
        left = GROUP_WAIT_S - (now - self._round_started)
        if left <= 0:
            return False
        in_round = {conn for conn, _rid, _frame in self._out.replies}
        expected = any(t > now - ACTIVE_WINDOW_S and conn not in in_round for conn, t in self._recent.items())
        if not expected:
            return False
        return self._inbox.linger(left)

    # --- log, replies, group commit ------------------------------------------------------------
    def _stage(self, kind: str, body: dict[str, Any], *, pid: int | None = None, cause: int | None = None,
               payload: Any = None, has_payload: bool = False) -> int:
        if self.failed:
            raise LogWriteError(self.failed)
        if has_payload:
            entry = self.log.stage(kind, body, pid=pid, cause=cause, payload=payload, ts=self._tick)
        else:
            entry = self.log.stage(kind, body, pid=pid, cause=cause, ts=self._tick)
        self._dirty = True
        return entry.seq

    def _flush(self) -> None:
        """Group commit: the inbox drained, so make this round durable, then release its output.

        On this thread: with closed-loop clients a round already carries every waiting request
        (see `_linger`), and a hand-off to another thread costs more than it overlaps."""
        if not (self._out or self._dirty):
            return
        self._dirty = False
        self._round_started = None
        if not self.failed:
            try:
                self.log.flush()
            except Exception as exc:  # LogWriteError, or anything that means "not durable"
                self.failed = f"the log cannot be written ({exc}); the kernel accepts no more syscalls"
                log.error(self.failed)
        out, self._out = self._out, Outputs()
        self._release(out)

    def _release(self, out: Outputs) -> None:
        send = self._routers.reply
        if self.failed:
            # Nothing of this round is known durable: nothing may be acknowledged or run.
            for conn, rid, _frame in out.replies:
                send(conn, Reply.failure(rid, "EIO", self.failed).encode())
            for _ticket, _fn, conn, rid in out.effects:
                send(conn, Reply.failure(rid, "EIO", self.failed).encode())
            return
        now = time.perf_counter()
        recent = self._recent
        for conn, _rid, frame in out.replies:
            send(conn, frame)
            recent[conn] = now
        if len(recent) > 4096:
            for conn in [c for c, t in recent.items() if t < now - ACTIVE_WINDOW_S]:
                del recent[conn]
        for ticket, fn, _conn, _rid in out.effects:
            self._executor.submit(self._run_effect, ticket, fn)
        if out.events:
            self._pub.refresh()
            for topic, body in out.events:
                self._pub.publish(topic, body)
        for conn, frame in out.commands:
            send(conn, frame)

    def _reply(self, conn: bytes, reply: Reply) -> None:
        if self._round_started is None:
            self._round_started = time.perf_counter()
        self._out.replies.append((conn, reply.id, reply.encode()))

    def _event(self, topic: Topic, body: dict[str, Any]) -> None:
        self._out.events.append((topic, body))

    def _run_effect(self, ticket: int, fn: Callable[[], Any]) -> None:
        try:
            msg = EffectDone(ticket, value=fn())
        except KernelError as exc:
            msg = EffectDone(ticket, error=exc)
        except Exception as exc:  # a crash in a provider is an EIO reply, never a dead kernel
            msg = EffectDone(ticket, error=KernelError("EIO", f"provider failed: {type(exc).__name__}: {exc}"))
        self._post(msg)

    # --- dispatch ------------------------------------------------------------------------------
    def _handle(self, conn: bytes, msg: Any) -> None:
        if isinstance(msg, Hello):
            self._hello(conn, msg)
            return
        if not isinstance(msg, Request):
            self._reply(conn, Reply.failure(getattr(msg, "id", 0), "EINVAL", "only hello and req frames go to the kernel"))
            return
        caller = self._conns.get(conn)
        if caller is None:
            ended = self._ended_conns.get(conn)
            why = (f"process {ended[0]} has ended ({ended[1]})" if ended
                   else "this connection is not attached: send hello with a token first")
            self._reply(conn, Reply.failure(msg.id, "EPERM", why))
            return
        if self.failed:
            self._reply(conn, Reply.failure(msg.id, "EIO", self.failed))
            return
        try:
            self._request(conn, caller, msg)
        except LogWriteError as exc:
            self.failed = str(exc)
            self._reply(conn, Reply.failure(msg.id, "EIO", f"the log cannot be written: {exc}"))
        except Exception as exc:
            log.exception("kernel: %s failed", msg.sys)
            self._reply(conn, Reply.failure(msg.id, "EIO", f"kernel error in {msg.sys}: {type(exc).__name__}: {exc}"))

    def _hello(self, conn: bytes, msg: Hello) -> None:
        if msg.role == "operator" and secrets.compare_digest(msg.token, self.config.operator_token):
            self._conns[conn] = Caller("operator", OPERATOR)
            self._reply(conn, Reply(msg.id, True, {"role": "operator"}))
            return
        if msg.role == "host" and secrets.compare_digest(msg.token, self.config.host_token):
            if self._host_conn is not None and self._host_conn != conn:
                self._conns.pop(self._host_conn, None)  # one host: a new hello replaces the earlier one
            self._conns[conn] = Caller("host", OPERATOR)
            self._host_conn = conn
            backlog, self._host_backlog = self._host_backlog, []
            self._reply(conn, Reply(msg.id, True, {"role": "host"}))
            self._out.commands.extend((conn, c.encode()) for c in backlog)
            return
        pid = self._tokens.get(msg.token) if msg.role == "process" else None
        if pid is None and msg.role == "process" and self._token_digests:
            # A process resumed after a restart: known by its token's digest until it says hello.
            pid = self._token_digests.pop(hashlib.sha256(msg.token.encode()).hexdigest(), None)
            if pid is not None and pid in self.procs:
                self.procs[pid].token = msg.token
                self._tokens[msg.token] = pid
        proc = self.procs.get(pid) if pid is not None else None
        if proc is None or proc.state not in LIVE:
            self._reply(conn, Reply.failure(msg.id, "EPERM", "unknown or expired token"))
            return
        if proc.conn is not None and proc.conn != conn:
            self._conns.pop(proc.conn, None)
        proc.conn = conn
        self._conns[conn] = Caller("process", proc.pid)
        if proc.state == "embryo":
            self._set_state(proc, "ready")
        self._reply(conn, Reply(msg.id, True, {"pid": proc.pid, "ppid": proc.ppid, "image": proc.image}))

    def _request(self, conn: bytes, caller: Caller, req: Request) -> None:
        spec = self.syscalls.get(req.sys)
        if spec is None or spec.role != caller.role:
            if caller.role == "operator" and spec is None:
                msg = f"unknown operator request {req.sys!r}"
            elif req.sys in NOT_YET and req.sys not in self.syscalls:
                msg = f"{req.sys} is part of the ABI but not available in this kernel yet"
            else:
                msg = f"unknown syscall {req.sys!r}"
            seq = self._stage("sys", {"sys": req.sys[:128], "decision": "reject", "code": "ENOSYS"}, pid=caller.pid or None,
                              cause=req.cause, payload=req.args, has_payload=True)
            self._reply(conn, Reply.failure(req.id, "ENOSYS", msg, seq))
            return
        try:
            args = spec.validate(req.args)
        except KernelError as exc:
            seq = self._stage("sys", {"sys": spec.name, "decision": "reject", "code": exc.code, "message": exc.message},
                              pid=caller.pid or None, cause=req.cause, payload=req.args, has_payload=True)
            self._reply(conn, Reply(req.id, False, error=exc, seq=seq))
            return
        if caller.role == "operator":
            self._operator(conn, req, spec, args)
            return
        proc = self.procs[caller.pid]
        if proc.state not in LIVE:
            self._reply(conn, Reply.failure(req.id, "EPERM", f"process {proc.pid} has {proc.state}"))
            return
        if proc.state == "suspended" and spec.name != "proc.exit":
            # Held undecided: nothing is logged or charged until an operator resumes it.
            proc.held.append((conn, req))
            return
        if proc.interrupt and spec.name != "proc.exit":
            proc.interrupt = False
            err = KernelError("EINTR", "the operator interrupted this turn")
            seq = self._stage("sys", {"sys": spec.name, "decision": "fail", "code": err.code, "message": err.message},
                              pid=proc.pid, cause=req.cause, payload=args, has_payload=True)
            self._reply(conn, Reply(req.id, False, error=err, seq=seq))
            return
        self._syscall(conn, proc, req, spec, args)

    # --- the mediated path ---------------------------------------------------------------------
    def _syscall(self, conn: bytes, proc: Proc, req: Request, spec: SyscallSpec, args: dict[str, Any]) -> None:
        now = self.clock()
        node = self.budgets.nodes[proc.pid]
        charges = dict(spec.base_charges)
        handler = self._handlers.get(spec.provider)
        if handler is None:
            handler = self._handlers[spec.provider] = getattr(self, "_sys_" + spec.provider)
        outcome: Outcome
        exhausted = node.check(charges, now) if spec.budget else None
        if exhausted is not None:
            outcome = Outcome.deny("EBUDGET", f"budget exhausted: {exhausted}")
        else:
            try:
                outcome = handler(proc, spec, args, req.cap, now)
            except KernelError as exc:
                outcome = Outcome.deny(exc.code, exc.message)
            if outcome.extra_charges or outcome.check_only:
                charges.update(outcome.extra_charges)
                exhausted = node.check({**charges, **outcome.check_only}, now)
                if exhausted is not None:
                    outcome.close()
                    need = {**charges, **outcome.check_only}[exhausted]
                    outcome = Outcome.deny("EBUDGET", f"budget exhausted: {exhausted} (needs {need:g})")
            node.charge({d: a for d, a in charges.items() if exhausted is None or d == "syscalls"})
        allowed = outcome.code is None
        cap = outcome.cap
        decision = "allow" if allowed else ("deny" if outcome.code in DENIAL_CODES else "fail")
        body: dict[str, Any] = {"sys": spec.name, "decision": decision}
        if req.cap is not None:
            body["asked_cap"] = req.cap
        if cap is not None:
            body["cap"] = cap.id
            body["handle"] = cap.handle
        if not allowed:
            body["code"] = outcome.code
            body["message"] = outcome.message
        if outcome.detail:
            body["detail"] = outcome.detail
        human = allowed and self._needs_human(outcome)
        inline = (allowed and outcome.effect is None and outcome.park is None and outcome.apply is None
                  and outcome.human_question is None and not human)
        if inline:
            # An effect on kernel state is atomic with its entry: one entry records the decision
            # and the result, and nothing is visible outside before it is durable.
            body["ok"] = True
            seq = self._stage("sys", body, pid=proc.pid, cause=req.cause,
                              payload={"args": args, "value": outcome.value}, has_payload=True)
        else:
            seq = self._stage("sys", body, pid=proc.pid, cause=req.cause, payload=args, has_payload=True)
        if cap is not None and allowed and cap.uses is not None and spec.kind is not None:
            # A use is an effect authorized by the cap; deriving, granting or dropping it is not.
            cap.uses -= 1
            self._stage("cap.use", {"cap": cap.id, "uses": cap.uses}, pid=proc.pid, cause=seq)
        if self._audit_events:
            self._event(Topic.audit(), {"seq": seq, "pid": proc.pid, "sys": spec.name, "decision": decision,
                                        "code": outcome.code, "cap": body.get("handle")})
        if not allowed:
            self._reply(conn, Reply(req.id, False, error=KernelError(outcome.code or "EPERM", outcome.message), seq=seq))
            return
        if inline:
            self._reply(conn, Reply(req.id, True, outcome.value, seq=seq))
            return
        if outcome.human_question is not None:
            self._ask_approval(conn, req.id, proc, spec, args, cap, outcome, seq, question=outcome.human_question)
            return
        if human:
            self._ask_approval(conn, req.id, proc, spec, args, cap, outcome, seq)
            return
        self._carry_out(conn, req.id, proc, spec, outcome, seq)

    def _needs_human(self, outcome: Outcome) -> bool:
        """An allowed use waits for a human when its cap says `approval: always` or its provider
        asks for one for this call."""
        if "approvals" in self.config.ablate:
            return False
        return outcome.must_approve or (outcome.cap is not None and outcome.cap.approval == "always")

    def _carry_out(self, conn: bytes, rid: int, proc: Proc, spec: SyscallSpec, outcome: Outcome, seq: int) -> None:
        """Run what a logged decision allowed: an effect off this thread, an apply, or a park."""
        req = _Rid(rid)  # the request's id is all that is needed past this point
        if outcome.effect is not None:
            self._tickets += 1
            self._pending[self._tickets] = Pending(conn, req.id, proc.pid, spec.name, seq, outcome.after,
                                                   observe=outcome.observe)
            self._out.effects.append((self._tickets, outcome.effect, conn, req.id))
            return
        if outcome.park is not None:
            self._tickets += 1
            self._parked[self._tickets] = Parked(conn, req.id, proc.pid, spec.name, seq)
            outcome.park(self._tickets)
            return
        if outcome.apply is not None:
            try:
                value = outcome.apply(seq)
            except KernelError as exc:
                self._finish(conn, req.id, proc.pid, spec.name, seq, None, exc)
                return
            self._finish(conn, req.id, proc.pid, spec.name, seq, value, None)
            return
        self._finish(conn, req.id, proc.pid, spec.name, seq, outcome.value, None)

    # --- results of effects and waits ----------------------------------------------------------
    def _finish(self, conn: bytes, rid: int, pid: int, sys: str, cause: int, value: Any, error: KernelError | None) -> None:
        body: dict[str, Any] = {"sys": sys, "ok": error is None}
        if error is not None:
            body["code"] = error.code
            body["message"] = error.message
        seq = self._stage("result", body, pid=pid, cause=cause, payload=value, has_payload=error is None)
        if error is None:
            self._reply(conn, Reply(rid, True, value, seq=seq))
        else:
            self._reply(conn, Reply(rid, False, error=error, seq=seq))

    def _effect_done(self, msg: EffectDone) -> None:
        p = self._pending.pop(msg.ticket, None)
        if p is None:
            return
        if p.charge_after is not None and msg.error is None:
            p.charge_after(msg.value)
        if p.observe is not None:
            self._record_llm_call(p, msg)
        self._finish(p.conn, p.rid, p.pid, p.sys, p.decision_seq, msg.value, msg.error)

    def _record_llm_call(self, p: Pending, msg: EffectDone) -> None:
        """One `llm.call` entry and `llm/` event per model call, at the configured level. The
        latency is the kernel's own measure (effect start to result), kept in the payload."""
        ob = p.observe or {}
        value = msg.value if msg.error is None and isinstance(msg.value, dict) else None
        error = f"{msg.error.code}: {msg.error.message}" if msg.error is not None else None
        rec = call_record(self.config.llm_observe, model=(value or {}).get("model") or ob.get("model"), value=value,
                          latency_s=time.monotonic() - p.started, request=ob.get("request"), error=error,
                          secrets=ob.get("secrets", ()))
        if rec is None:
            return
        body = {k: rec[k] for k in ("model", "input_tokens", "output_tokens", "stop_reason", "cost_usd", "error")}
        body["level"] = self.config.llm_observe
        seq = self._stage("llm.call", body, pid=p.pid, cause=p.decision_seq, payload=rec, has_payload=True)
        self._event(Topic.llm(), {"pid": p.pid, "seq": seq, "decision": p.decision_seq, **rec})


@dataclass(frozen=True, slots=True)
class _Rid:
    id: int
