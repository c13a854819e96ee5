"""The Kernel actor: decides every syscall against capabilities and budgets, logs the decision
durably before the effect runs, runs effects off its own thread, and replies after commit.
"""

from __future__ import annotations

import collections
import concurrent.futures
import functools
import json
import logging
import os
import re
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import msgpack
import pykka
import yaml  # type: ignore[import-untyped]
import zmq

from agentlibos.bus import (
    DENIAL_CODES,
    Command,
    Hello,
    KernelError,
    LogWriteError,
    Publisher,
    Reply,
    Request,
    RouterSet,
    Topic,
)
from agentlibos.kernel import _fsops, _shell
from agentlibos.kernel._budget import BudgetTree, parse_budget
from agentlibos.kernel._caps import BUILTIN_KINDS, CapRecord, CapTable, Narrow, register_kind
from agentlibos.kernel._config import KernelConfig
from agentlibos.kernel._commit import Outputs
from agentlibos.kernel._inbox import Inbound, KernelInbox
from agentlibos.kernel._globs import PathSet, compile_glob
from agentlibos.kernel._models import CompletionRequest, ModelBackend
from agentlibos.bus._observe import OBSERVE_LEVELS, call_record
from agentlibos.kernel._paths import Root, resolve, split_path, strip_root
from agentlibos.kernel._provider import CallInfo, Provider
from agentlibos.kernel._table import NOT_YET, SYSCALLS, SyscallSpec, tool_name
from agentlibos.storage import LogBackend, digest

log = logging.getLogger("agentlibos.kernel")

#: Longest a commit round waits for requests from clients that were just answered (a fraction
#: of one fsync: it turns a trickle of arrivals into one commit instead of two).
GROUP_WAIT_S = 150e-6
ACTIVE_WINDOW_S = 2e-3
TOOL_NAME = re.compile(r"[a-z][a-z0-9_]{0,63}")
SKILL_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")
BUILTIN_TOOL_NAMES = frozenset(tool_name(n) for n in SYSCALLS) | frozenset(tool_name(n) for n in NOT_YET)
MAX_QUEUE = 1000
#: Syscalls whose effect happens outside the kernel (a crash between intent and result leaves it unknown).
EFFECTFUL = ("fs.", "shell.exec", "llm.complete", "rpc.", "mcp.", "pty.", "git.")
LIVE = ("embryo", "ready", "running", "blocked", "suspended", "needs_attention")
OPERATOR = 0  # the author recorded for operator requests


# --- messages the Kernel actor receives (immutable; the bus thread and workers send them) ------


@dataclass(frozen=True, slots=True)
class EffectDone:
    ticket: int
    value: Any = None
    error: KernelError | None = None


@dataclass(frozen=True, slots=True)
class TimerFired:
    key: int


@dataclass(frozen=True, slots=True)
class ApprovalTimeout:
    id: int


@dataclass(frozen=True, slots=True)
class DeadlineFired:
    pid: int
    token: int


@dataclass(frozen=True, slots=True)
class ProviderNotice:
    """A provider's notice (e.g. an MCP tool description changed): logged and published."""

    kind: str
    body: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Inspect:
    """Run a read-only function on the kernel thread (tests and the runtime use it)."""

    fn: Callable[[Kernel], Any]


# --- kernel-side state -------------------------------------------------------------------------


@dataclass(slots=True)
class Proc:
    pid: int
    ppid: int | None
    image: str
    model: str
    token: str
    daemon: bool
    state: str = "embryo"
    conn: bytes | None = None
    children: set[int] = field(default_factory=set)
    status: str | None = None
    result: Any = None
    input: Any = None
    # Affordances (what the model sees); never authority.
    jit_tools: dict[str, dict[str, Any]] = field(default_factory=dict)
    skills: list[str] = field(default_factory=list)
    conversation: dict[str, Any] = field(default_factory=dict)
    origin: str = "spawn"  # spawn | boot | fork
    held: list[tuple[bytes, Request]] = field(default_factory=list)  # requests waiting while suspended
    resume_state: str = "ready"
    #: The operator interrupted the current turn: the next syscall (other than proc.exit) gets EINTR.
    interrupt: bool = False
    #: What the operator may let this process ask for with cap.request (grant specs); none by default.
    requestable: list[dict[str, Any]] = field(default_factory=list)
    deadline: float | None = None
    deadline_timer: threading.Timer | None = None


@dataclass(slots=True)
class Approval:
    id: int
    pid: int
    sys: str
    kind: str  # effect | question
    rendering: dict[str, Any]
    created: float
    conn: bytes
    rid: int
    decision_seq: int
    outcome: Any
    cap: CapRecord | None
    timer: threading.Timer | None = None

    def view(self) -> dict[str, Any]:
        return {"id": self.id, "pid": self.pid, "sys": self.sys, "kind": self.kind, "rendering": self.rendering,
                "created": self.created}


@dataclass(slots=True)
class Caller:
    role: str
    pid: int


@dataclass(slots=True)
class Pending:
    """A request whose reply waits for its effect (or its condition) and the next commit."""

    conn: bytes
    rid: int
    pid: int
    sys: str
    decision_seq: int
    charge_after: Callable[[Any], None] | None = None
    started: float = field(default_factory=time.monotonic)
    observe: dict[str, Any] | None = None


@dataclass(slots=True)
class Parked:
    """A request that waits on a condition (a process's exit, a message); replied to on resume."""

    conn: bytes
    rid: int
    pid: int
    sys: str
    decision_seq: int
    timer: threading.Timer | None = None


def _now() -> float:
    return time.time()


class Kernel(pykka.ThreadingActor):
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
        self.syscalls: dict[str, SyscallSpec] = dict(SYSCALLS)
        self._ext: dict[str, Provider] = {}
        #: The capability kinds this kernel grants: the built-in ones and its providers' kinds.
        self.kinds: frozenset[str] = BUILTIN_KINDS
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
        self.models: dict[str, ModelBackend] = dict(models or {})
        self.caps = CapTable(attenuate="attenuation" not in config.ablate, cascade="cascade" not in config.ablate)
        self.budgets = BudgetTree()
        self.procs: dict[int, Proc] = {}
        self.images: dict[str, dict[str, Any]] = {}
        self.checkpoints: dict[int, dict[str, Any]] = {}
        self.unresolved: dict[int, dict[str, Any]] = {}
        self._next_ckpt = 0
        self.memory: dict[str, dict[str, Any]] = {}
        self.approvals: dict[int, Approval] = {}
        self._approval_ids = 0
        self._approval_times: dict[int, list[float]] = {}
        self._conns: dict[bytes, Caller] = {}
        self._ended_conns: dict[bytes, tuple[int, str]] = {}
        self._tokens: dict[str, int] = {}
        self._host_conn: bytes | None = None
        self._host_backlog: list[Command] = []
        self._next_pid = 1
        self._tickets = 0
        self._pending: dict[int, Pending] = {}
        self._parked: dict[int, Parked] = {}
        self._exit_waiters: dict[int, list[int]] = {}  # pid -> park keys
        self._receivers: dict[tuple[int, str], list[int]] = {}  # (pid, queue) -> park keys
        self.queues: dict[int, dict[str, collections.deque[dict[str, Any]]]] = {}
        # Work held back until this round's log entries are durable.
        self._out = Outputs()
        self._dirty = False
        self._round_started: float | None = None
        self._recent: dict[bytes, float] = {}  # connection -> when its last reply left
        self.failed: str | None = None
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
        self._recover()
        start: dict[str, Any] = {"pid": os.getpid(), "world_root": str(self.config.world_root),
                                 "llm_observe": self.config.llm_observe}
        if self.config.modules:
            start["modules"] = list(self.config.modules)
        self._stage("kernel.start", start)
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
                    self._stage("kernel.stop", {"state_hash": self.state_hash()})
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

    def _recover(self) -> None:
        """Continue after what the log holds. An effect logged as intended with no recorded result
        is `unknown`: never run again on its own; its process waits in needs_attention until an
        operator resolves it. Other live processes of the earlier session are interrupted."""
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
        # Capabilities: every record comes back for derivation chains, explain and revocation;
        # their holders ended with the earlier session, so none is held by anyone.
        max_cap = 0
        for row in self.log_projection("capabilities"):
            cid = int(row["cap"])
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
            parent = self.caps.records.get(rec.parent) if rec.parent is not None else None
            if parent is not None and rec.id not in parent.children:
                parent.children.append(rec.id)
        self.caps._next_id = max_cap + 1

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
                ap.rendering = {**ap.rendering, "note": "asked before the kernel restarted; the requester was "
                                                        "interrupted, so approving runs nothing"}
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
                        and str(b.get("sys", "")).startswith(EFFECTFUL) and e.pid is not None:
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
        try:
            self.actor_ref.tell(ProviderNotice(kind, dict(body)))
        except pykka.ActorDeadError:
            pass

    def clock(self) -> float:
        return self._tick

    def on_receive(self, message: Any) -> Any:
        self._tick = time.time()
        try:
            if isinstance(message, Inbound):
                for conn, msg in message.batch:
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
        try:
            self.actor_ref.tell(msg)
        except pykka.ActorDeadError:
            pass

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
            self._conns[conn] = Caller("host", OPERATOR)
            self._host_conn = conn
            backlog, self._host_backlog = self._host_backlog, []
            self._reply(conn, Reply(msg.id, True, {"role": "host"}))
            self._out.commands.extend((conn, c.encode()) for c in backlog)
            return
        pid = self._tokens.get(msg.token) if msg.role == "process" else None
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
        charges = {d: (1.0 if d in ("syscalls", "llm_calls") else 0.0) for d in spec.budget}
        handler = getattr(self, "_sys_" + spec.provider)
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
        inline = (allowed and outcome.effect is None and outcome.park is None and outcome.apply is None
                  and outcome.human_question is None and not self._needs_human(outcome))
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
        if self._needs_human(outcome):
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

    # --- human approvals and questions ---------------------------------------------------------
    def _ask_approval(self, conn: bytes, rid: int, proc: Proc, spec: SyscallSpec, args: dict[str, Any],
                      cap: CapRecord | None, outcome: Outcome | None, seq: int, *, question: dict[str, Any] | None = None) -> None:
        """Park a request for a human. The approver sees the kernel's rendering of the effect."""
        now = self.clock()
        recent = [t for t in self._approval_times.get(proc.pid, []) if t > now - 60]
        if len(recent) >= self.config.approvals_per_minute:
            self._finish(conn, rid, proc.pid, spec.name, seq, None, KernelError(
                "EDENIED", f"approval flood: more than {self.config.approvals_per_minute} requests a minute"))
            return
        recent.append(now)
        self._approval_times[proc.pid] = recent
        self._approval_ids += 1
        aid = self._approval_ids
        rendering = _sanitize({"sys": spec.name, "pid": proc.pid, "image": proc.image,
                               "cap": cap.handle if cap else None, **(outcome.detail or {} if outcome else {}),
                               **({"question": question} if question else {})})
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

    def _fire_approval(self, aid: int) -> None:
        try:
            self.actor_ref.tell(ApprovalTimeout(aid))
        except pykka.ActorDeadError:
            pass

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
            return {"id": aid, "decision": body["decision"], "note": "asked before a restart: nothing runs"}
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
        if remember and ap.cap is not None:
            out["remembered"] = self._remember(proc, ap, seq)
        assert ap.outcome is not None
        if ap.cap is not None and ap.cap.status(self.clock()) is not None:
            # Revoked or expired while it waited: the approval cannot resurrect it.
            code = ap.cap.status(self.clock()) or "EREVOKED"
            self._finish(ap.conn, ap.rid, ap.pid, ap.sys, ap.decision_seq, None,
                         KernelError(code, f"{ap.cap.handle} was revoked or expired while awaiting approval"))
            return out
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

    # --- parked requests (waits, receives) -----------------------------------------------------
    def _park_timeout(self, key: int, timeout_s: float | None) -> None:
        if timeout_s is None:
            return
        timer = threading.Timer(float(timeout_s), self._fire, (key,))
        timer.daemon = True
        self._parked[key].timer = timer
        timer.start()

    def _resume(self, key: int, value: Any = None, error: KernelError | None = None) -> bool:
        p = self._parked.pop(key, None)
        if p is None:
            return False
        if p.timer is not None:
            p.timer.cancel()
        self._finish(p.conn, p.rid, p.pid, p.sys, p.decision_seq, value, error)
        return True

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

    # --- capability lookup ---------------------------------------------------------------------
    def _authorize(self, proc: Proc, kind: str, handle: str | None, now: float,
                   covers: Callable[[CapRecord], bool], what: str = "this") -> CapRecord:
        """The held capability that authorizes this; deny with the most telling code otherwise."""
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
                raise KernelError("EPERM", f"{handle} does not authorize {what}")
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
            raise KernelError(dead, f"the {kind} capability that covered {what} is "
                                    f"{'revoked' if dead == 'EREVOKED' else 'expired or used up'}")
        raise KernelError("EPERM", f"no held {kind} capability authorizes {what}")

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

    # --- providers: memory ---------------------------------------------------------------------
    def _sys_memory(self, proc: Proc, spec: SyscallSpec, args: dict[str, Any], handle: str | None, now: float) -> Outcome:
        ns = args.get("ns") or "self"
        right = spec.rights[0]
        cap = self._authorize(proc, "memory", handle, now,
                              lambda c: c.scope["namespace"] == ns and right in c.rights,
                              f"{spec.name} in namespace {ns!r}")
        store_key = f"self:{cap.holder}" if ns == "self" else f"ns:{ns}"
        if ns == "self":
            # A `self` cap names the namespace of the process it was granted to.
            store_key = f"self:{self._self_owner(cap)}"
        store = self.memory.get(store_key)
        op = spec.name[4:]
        if op == "list":
            prefix = args.get("prefix", "")
            keys = sorted(k for k in (store or {}) if k.startswith(prefix))
            return Outcome.allow(cap, value={"keys": keys})
        key = args["key"]
        if not key or len(key) > 256:
            raise KernelError("EINVAL", "a memory key is 1 to 256 characters")
        if op == "get":
            if store is None or key not in store:
                raise KernelError("ENOENT", f"no key {key!r} in namespace {ns!r}")
            return Outcome.allow(cap, value={"value": store[key]})
        if op == "put":
            try:
                size = len(msgpack.packb(args["value"], use_bin_type=True))
            except Exception:
                raise KernelError("EINVAL", "the value is not msgpack-serializable") from None
            if size > self.config.mem_value_max_bytes:
                raise KernelError("EINVAL", f"value of {size} bytes exceeds the {self.config.mem_value_max_bytes}-byte limit")
            full = store is not None and key not in store and len(store) >= self.config.mem_keys_max
            if full:
                raise KernelError("EINVAL", f"namespace {ns!r} is full ({self.config.mem_keys_max} keys)")

            def put(_seq: int) -> Any:
                self.memory.setdefault(store_key, {})[key] = args["value"]
                return {}

            return Outcome.allow(cap, apply=put)
        if op == "delete":
            if store is None or key not in store:
                raise KernelError("ENOENT", f"no key {key!r} in namespace {ns!r}")

            def delete(_seq: int) -> Any:
                self.memory.get(store_key, {}).pop(key, None)
                return {}

            return Outcome.allow(cap, apply=delete)
        raise KernelError("ENOSYS", spec.name)

    def _self_owner(self, cap: CapRecord) -> int:
        # A derived `self` cap passed to another process still names the original holder's space.
        root = self.caps.chain(cap.id)[-1]
        return root.holder

    # --- providers: llm ------------------------------------------------------------------------
    def _sys_llm(self, proc: Proc, spec: SyscallSpec, args: dict[str, Any], handle: str | None, now: float) -> Outcome:
        model = args.get("model") or proc.model
        max_tokens = args.get("max_tokens")
        if max_tokens is not None and max_tokens <= 0:
            raise KernelError("EINVAL", "max_tokens must be positive")
        over: dict[str, Any] = {}

        def covers(cap: CapRecord) -> bool:
            if not any(compile_glob(m).fullmatch(model) for m in cap.scope["models"]):
                return False
            limit = cap.scope.get("max_tokens")
            if limit is not None and max_tokens is not None and max_tokens > limit:
                over["limit"] = limit
                return False
            return True

        cap = self._authorize(proc, "llm", handle, now, covers, f"model {model!r}" +
                              (f" with max_tokens {max_tokens}" if max_tokens else ""))
        backend = self._backend(model)
        if backend is None:
            raise KernelError("EINVAL", f"no model backend serves {model!r}")
        proc.conversation = {"messages": args["messages"], "system": args.get("system")}
        request = CompletionRequest(pid=proc.pid, image=proc.image, model=model, messages=args["messages"],
                                    tools=args.get("tools") or [], system=args.get("system"), max_tokens=max_tokens)
        node = self.budgets.nodes[proc.pid]

        def charge_tokens(value: Any) -> None:
            usage = value.get("usage", {}) if isinstance(value, dict) else {}
            node.charge({"llm_tokens": float(usage.get("input_tokens", 0) + usage.get("output_tokens", 0))})

        out = Outcome.allow(cap, effect=lambda: _turn_value(backend.complete(request)), detail={"model": model})
        # max_tokens is checked up front and refused whole; what is charged is the reported usage.
        out.check_only = {"llm_tokens": float(max_tokens or 0)}
        out.after = charge_tokens
        secret = getattr(backend, "_api_key", None)
        out.observe = {"model": model, "secrets": [secret] if isinstance(secret, str) else [],
                       "request": {"model": model, "system": args.get("system"), "messages": args["messages"],
                                   "tools": [t.get("name") for t in args.get("tools") or [] if isinstance(t, dict)],
                                   "max_tokens": max_tokens}}
        return out

    def _backend(self, model: str) -> ModelBackend | None:
        if model in self.models:
            return self.models[model]
        prefix = model.split(":", 1)[0]
        return self.models.get(prefix) or self.models.get("*")

    # --- providers: caps, budget, proc ---------------------------------------------------------
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

    def _sys_proc(self, proc: Proc, spec: SyscallSpec, args: dict[str, Any], handle: str | None, now: float) -> Outcome:
        name = spec.name
        if name == "proc.self":
            return Outcome.allow(None, value={"pid": proc.pid, "ppid": proc.ppid, "image": proc.image, "state": proc.state})
        if name == "proc.exit":
            status = args.get("status") or "ok"
            self._exit(proc, status, args.get("result"))
            return Outcome.allow(None, value={})
        if name == "proc.list":
            return Outcome.allow(None, value={"processes": [
                {"pid": c.pid, "image": c.image, "state": c.state, "status": c.status}
                for c in (self.procs[p] for p in sorted(proc.children))
            ]})
        if name == "proc.account":
            # The process host reports JIT tool time; a process can only charge itself.
            return Outcome.allow(None, value={}, extra={"jit_ms": float(args.get("jit_ms", 0))})
        if name == "proc.spawn":
            image = args["image"]
            cap = self._authorize(proc, "proc", handle, now, lambda c: "spawn" in c.rights and any(
                compile_glob(g).fullmatch(image) for g in c.scope.get("images", [])), f"spawning image {image!r}")
            limit = cap.scope.get("max_children")
            live = sum(1 for c in proc.children if self.procs[c].state in LIVE)
            if limit is not None and live >= limit:
                raise KernelError("EPERM", f"{cap.handle} allows at most {limit:g} live children")
            return self._child_outcome(proc, cap, image, args, now, "proc.spawn")
        target = args["pid"]
        right = "wait" if name == "proc.wait" else "signal"
        cap = self._authorize(proc, "proc", handle, now, lambda c: right in c.rights, f"{name} of {target!r}")
        if not isinstance(target, int) or not self._is_descendant(target, proc.pid):
            raise KernelError("EPERM", f"{target!r} is not a descendant of process {proc.pid}")
        child = self.procs[target]
        if name == "proc.kill":
            return Outcome.allow(cap, apply=lambda _seq: {"killed": self._kill(child)})
        # proc.wait
        if child.state not in LIVE:
            return Outcome.allow(cap, value={"pid": child.pid, "status": child.status, "result": child.result})
        timeout = args.get("timeout_s")

        def park(key: int) -> None:
            self._exit_waiters.setdefault(child.pid, []).append(key)
            self._park_timeout(key, timeout)

        out = Outcome.allow(cap)
        out.park = park
        return out

    def _is_descendant(self, pid: int, ancestor: int) -> bool:
        p = self.procs.get(pid)
        seen = 0
        while p is not None and p.ppid is not None and seen < 100_000:
            if p.ppid == ancestor:
                return True
            p = self.procs.get(p.ppid)
            seen += 1
        return False

    def _child_outcome(self, proc: Proc, cap: CapRecord, image: str, args: dict[str, Any], now: float,
                       via: str, on_child: Callable[[Proc], None] | None = None,
                       start_extra: dict[str, Any] | None = None) -> Outcome:
        """proc.spawn / image.boot: validate the whole capability list, then create on apply."""
        if image not in self.images:
            raise KernelError("ENOENT", f"no image {image!r} is registered")
        entries = args.get("caps") or []
        plan: list[tuple[CapRecord, Narrow, str]] = []
        names: set[str] = set()
        for e in entries:
            if not isinstance(e, dict) or not isinstance(e.get("handle"), str) or set(e) - {"handle", "narrow", "as"}:
                raise KernelError("EINVAL", "each caps entry is {handle, narrow?, as?}")
            src = self.caps.by_handle(proc.pid, e["handle"])
            if src is None:
                raise KernelError("EPERM", f"no capability handle {e['handle']!r} is held by this process")
            if "grant" not in src.rights:
                raise KernelError("EPERM", f"{src.handle} does not carry the grant right")
            narrow = Narrow.parse(e.get("narrow"))
            as_name = e.get("as") or src.handle
            if not isinstance(as_name, str) or as_name in ("self", "model") or as_name in names:
                raise KernelError("EINVAL", f"handle name {as_name!r} is reserved or given twice")
            names.add(as_name)
            self.caps.derive(src, narrow, holder=-1, now=now, handle=None, via=via, dry_run=True)
            plan.append((src, narrow, as_name))
        budget = parse_budget(args.get("budget"))
        node = self.budgets.nodes[proc.pid]
        for dim, amount in budget.items():
            rem = node.remaining(dim, now) if dim != "wall_s" else None
            if rem is not None and rem < amount:
                raise KernelError("EBUDGET", f"cannot reserve {amount:g} {dim}: {rem:g} left")
        img = self.images[image]
        model = img.get("model") or proc.model
        daemon = False

        # A child starts its first turn at once (with an empty message when no input was given).
        child_input = args.get("input") if args.get("input") is not None else ""

        def apply(seq: int) -> Any:
            child = self._create_process(image, proc.pid, model, budget, daemon, child_input, self.clock(), cause=seq)
            for src, narrow, as_name in plan:
                new = self.caps.derive(src, narrow, holder=child.pid, now=self.clock(), handle=as_name, via=via)
                assert new is not None
                self._log_cap(new, proc.pid, seq)
            if on_child is not None:
                on_child(child)
            self._start_process(child, start_extra)
            return {"pid": child.pid}

        out = Outcome.allow(cap, extra={"children": 1.0}, detail={"image": image, "caps": [p[2] for p in plan]})
        out.apply = apply
        return out

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

    # --- providers: tools and Skills (affordances: they change what the model sees, not authority)
    def _sys_tool(self, proc: Proc, spec: SyscallSpec, args: dict[str, Any], handle: str | None, now: float) -> Outcome:
        if spec.name == "tool.list":
            image = self.images.get(proc.image, {})
            return Outcome.allow(None, value={"builtin": list(image.get("tools", [])), "jit": sorted(proc.jit_tools)})
        name = args["name"]
        if spec.name == "tool.remove":
            if name not in proc.jit_tools:
                raise KernelError("ENOENT", f"no JIT tool {name!r}")
            del proc.jit_tools[name]
            return Outcome.allow(None, value={"removed": name})
        tool = self._check_tool(name, args.get("description", ""), args.get("input_schema"), args["source"])
        proc.jit_tools[name] = tool
        return Outcome.allow(None, value={"tool": name, "digest": digest(tool["source"])})

    def _check_tool(self, name: str, description: Any, schema: Any, source: Any) -> dict[str, Any]:
        if not isinstance(name, str) or not TOOL_NAME.fullmatch(name) or name in BUILTIN_TOOL_NAMES:
            raise KernelError("EINVAL", f"tool name {name!r} must match {TOOL_NAME.pattern} and not be a builtin tool")
        if not isinstance(source, str) or "\x00" in source:
            raise KernelError("EINVAL", "source must be text")
        size = len(source.encode("utf-8", "surrogatepass"))
        if size > self.config.jit_source_max_bytes:
            raise KernelError("EINVAL", f"source of {size} bytes exceeds the {self.config.jit_source_max_bytes}-byte limit")
        if "export default" not in source:
            raise KernelError("EINVAL", "a JIT tool module must `export default async function (input, sys)`")
        if schema is not None and not isinstance(schema, dict):
            raise KernelError("EINVAL", "input_schema must be a JSON Schema object")
        return {"description": str(description or ""), "input_schema": schema or {"type": "object"}, "source": source}

    def _skills_dir(self) -> Path:
        return Path(self.config.skills_dir) if self.config.skills_dir else self.config.state_dir / "skills"

    def _read_skill(self, name: str) -> dict[str, Any]:
        if not isinstance(name, str) or not SKILL_NAME.fullmatch(name):
            raise KernelError("EINVAL", f"skill name {name!r} must match {SKILL_NAME.pattern}")
        folder = self._skills_dir() / name
        try:
            text = (folder / "SKILL.md").read_text()
        except OSError:
            raise KernelError("ENOENT", f"no Skill {name!r} is installed") from None
        meta: dict[str, Any] = {}
        body = text
        if text.startswith("---"):
            head, sep, rest = text[3:].partition("\n---")
            if sep:
                try:
                    loaded = yaml.safe_load(head)
                except yaml.YAMLError as exc:
                    raise KernelError("EINVAL", f"Skill {name!r}: bad front matter: {exc}") from None
                meta = loaded if isinstance(loaded, dict) else {}
                body = rest.lstrip("\n")
        tools = []
        tools_dir = folder / "tools"
        if tools_dir.is_dir():
            for ts in sorted(tools_dir.glob("*.ts")):
                info: dict[str, Any] = {}
                side = ts.with_suffix(".json")
                if side.exists():
                    try:
                        info = json.loads(side.read_text())
                    except ValueError as exc:
                        raise KernelError("EINVAL", f"Skill {name!r}: {side.name}: {exc}") from None
                tool = self._check_tool(ts.stem, info.get("description", ""), info.get("input_schema"), ts.read_text())
                tools.append({"name": ts.stem, **tool})
        return {"name": str(meta.get("name", name)), "description": str(meta.get("description", "")),
                "instructions": body.strip(), "tools": tools}

    def _sys_skill(self, proc: Proc, spec: SyscallSpec, args: dict[str, Any], handle: str | None, now: float) -> Outcome:
        if spec.name == "skill.list":
            available = []
            root = self._skills_dir()
            if root.is_dir():
                for d in sorted(root.iterdir()):
                    if (d / "SKILL.md").exists() and SKILL_NAME.fullmatch(d.name):
                        try:
                            sk = self._read_skill(d.name)
                        except KernelError:
                            continue
                        available.append({"name": d.name, "description": sk["description"]})
            return Outcome.allow(None, value={"available": available, "loaded": list(proc.skills)})
        skill = self._read_skill(args["name"])
        for t in skill["tools"]:
            proc.jit_tools[t["name"]] = {k: t[k] for k in ("description", "input_schema", "source")}
        if args["name"] not in proc.skills:
            proc.skills.append(args["name"])
        return Outcome.allow(None, value=skill, detail={"skill": args["name"], "tools": [t["name"] for t in skill["tools"]]})

    # --- checkpoints ------------------------------------------------------------------------------
    def _snapshot(self, proc: Proc, label: str | None, seq_hint: int) -> dict[str, Any]:
        node = self.budgets.nodes[proc.pid]
        return {
            "pid": proc.pid, "image": proc.image, "model": proc.model, "label": label,
            "conversation": proc.conversation, "jit_tools": proc.jit_tools, "skills": proc.skills,
            "memory": dict(self.memory.get(f"self:{proc.pid}", {})),
            "queues": {q: list(d) for q, d in self.queues.get(proc.pid, {}).items()},
            "children": sorted(proc.children),
            "budget": {"limits": dict(node.limits), "used": dict(node.used)},
            # Handles name capability records; the records (and their revocation) stay in the kernel.
            "handles": {h: cid for h, cid in self.caps.handles.get(proc.pid, {}).items()},
            "log_seq": seq_hint,
        }

    def _find_checkpoint(self, ref: Any) -> dict[str, Any]:
        if isinstance(ref, int) and ref in self.checkpoints:
            return self.checkpoints[ref]
        if isinstance(ref, str):
            if ref.isdigit() and int(ref) in self.checkpoints:
                return self.checkpoints[int(ref)]
            for ck in reversed(list(self.checkpoints.values())):
                if ck.get("label") == ref:
                    return ck
        raise KernelError("ENOENT", f"no checkpoint {ref!r}")

    def _ckpt_covers(self, c: CapRecord, right: str, owner: int, caller: int) -> bool:
        target = c.scope.get("target", "self")
        return right in c.rights and ((target == "self" and owner == caller) or target == owner)

    def _sys_ckpt(self, proc: Proc, spec: SyscallSpec, args: dict[str, Any], handle: str | None, now: float) -> Outcome:
        if spec.name == "ckpt.list":
            mine = [{"checkpoint": cid, "label": ck.get("label"), "pid": ck["pid"], "log_seq": ck["log_seq"]}
                    for cid, ck in self.checkpoints.items() if ck["pid"] == proc.pid]
            return Outcome.allow(None, value={"checkpoints": mine})
        if spec.name == "ckpt.create":
            cap = self._authorize(proc, "checkpoint", handle, now,
                                  lambda c: self._ckpt_covers(c, "create", proc.pid, proc.pid), "ckpt.create")
            label = args.get("label")

            def create(seq: int) -> Any:
                snap = self._snapshot(proc, label, seq)
                self._next_ckpt += 1
                cid = self._next_ckpt
                snap["id"] = cid
                self.checkpoints[cid] = snap
                # The snapshot is one log entry: durable with the round's commit, never half-written.
                self._stage("ckpt.create", {"checkpoint": cid, "pid": proc.pid, "label": label}, pid=proc.pid,
                            cause=seq, payload=snap, has_payload=True)
                return {"checkpoint": cid}

            return Outcome.allow(cap, apply=create)
        ck = self._find_checkpoint(args["checkpoint"])
        right = spec.name.split(".")[1]
        cap = self._authorize(proc, "checkpoint", handle, now,
                              lambda c: self._ckpt_covers(c, right, ck["pid"], proc.pid),
                              f"{spec.name} of checkpoint {ck['id']} of pid {ck['pid']}")
        if spec.name == "ckpt.restore":
            if ck["pid"] != proc.pid:
                raise KernelError("EPERM", "a process restores only its own checkpoints; fork another's instead")

            def restore(seq: int) -> Any:
                # Handles come back as they were, pointing at the same records: a record revoked or
                # expired since stays dead; a handle dropped since is not re-added.
                table = self.caps.handles.setdefault(proc.pid, {})
                for h in list(table):
                    if h not in ck["handles"]:
                        del table[h]
                for h, cid in ck["handles"].items():
                    rec = self.caps.records.get(cid)
                    if rec is not None and not rec.dropped:
                        table[h] = cid
                proc.jit_tools = dict(ck["jit_tools"])
                proc.skills = list(ck["skills"])
                proc.conversation = ck["conversation"]
                self.memory[f"self:{proc.pid}"] = dict(ck["memory"])
                self.queues[proc.pid] = {q: collections.deque(v) for q, v in ck["queues"].items()}
                return {"checkpoint": ck["id"], "restored": self._affordances(ck)}

            return Outcome.allow(cap, apply=restore)
        # ckpt.fork: a new child from the snapshot, with an explicit capability list
        def from_snapshot(child: Proc) -> None:
            child.origin = "fork"
            child.jit_tools = dict(ck["jit_tools"])
            child.skills = list(ck["skills"])
            child.conversation = ck["conversation"]
            self.memory[f"self:{child.pid}"] = dict(ck["memory"])

        return self._child_outcome(proc, cap, ck["image"], args, now, "ckpt.fork", on_child=from_snapshot,
                                   start_extra={"restored": self._affordances(ck), "origin": "fork",
                                                "forked_by": proc.pid})

    def _affordances(self, ck: dict[str, Any]) -> dict[str, Any]:
        conv = ck.get("conversation") or {}
        return {"messages": conv.get("messages", []), "jit_tools": ck["jit_tools"], "skills": ck["skills"]}

    def _commit_image(self, proc: Proc, args: dict[str, Any], now: float, handle: str | None) -> Outcome:
        name = args["name"]
        ck = self._find_checkpoint(args["checkpoint"])
        cap = self._authorize(proc, "image", handle, now, lambda c: "commit" in c.rights and any(
            compile_glob(g).fullmatch(name) for g in c.scope.get("names", [])), f"image.commit as {name!r}")
        if ck["pid"] != proc.pid and not any(self._ckpt_covers(c, "fork", ck["pid"], proc.pid)
                                             for c in self.caps.held(proc.pid) if c.kind == "checkpoint"):
            raise KernelError("EPERM", f"checkpoint {ck['id']} belongs to pid {ck['pid']}")
        base = self.images.get(ck["image"], {})
        image = {"name": name, "prompt": base.get("prompt", ""), "tools": list(base.get("tools", [])),
                 "skills": list(ck["skills"]), "jit_tools": dict(ck["jit_tools"]), "model": base.get("model"),
                 "budget": dict(base.get("budget") or {}), "meta": {"from_checkpoint": ck["id"]}}
        image["digest"] = image_digest(image)
        existing = self.images.get(name)
        if existing is not None and existing.get("digest") != image["digest"]:
            raise KernelError("ECONFLICT", f"image {name!r} exists with other content (digest {existing['digest'][:12]})")

        def commit(seq: int) -> Any:
            self.images[name] = image
            self._stage("image.register", {"name": name, "from_checkpoint": ck["id"]}, pid=proc.pid, cause=seq,
                        payload=image, has_payload=True)
            return {"image": name, "digest": image["digest"]}

        return Outcome.allow(cap, apply=commit)

    # --- providers: messages -------------------------------------------------------------------
    def _sys_msg(self, proc: Proc, spec: SyscallSpec, args: dict[str, Any], handle: str | None, now: float) -> Outcome:
        queue = args.get("queue") or "inbox"
        if not isinstance(queue, str) or not queue or len(queue) > 64:
            raise KernelError("EINVAL", "a queue name is 1 to 64 characters")
        if spec.name == "msg.recv":
            q = self.queues.get(proc.pid, {}).get(queue)
            if q:
                return Outcome.allow(None, value=q.popleft())
            timeout = args.get("timeout_s")
            if timeout is not None and timeout <= 0:
                raise KernelError("ETIMEDOUT", f"no message on {queue!r}")

            def park(key: int) -> None:
                self._receivers.setdefault((proc.pid, queue), []).append(key)
                self._park_timeout(key, timeout)

            out = Outcome.allow(None)
            out.park = park
            return out
        to = args["to"]
        target_pid = proc.ppid if to == "parent" else to
        target = self.procs.get(target_pid) if isinstance(target_pid, int) else None

        def covers(c: CapRecord) -> bool:
            if "queues" in c.scope and queue not in c.scope["queues"]:
                return False
            for t in c.scope.get("to", []):
                if t == "parent" and target_pid == proc.ppid and target_pid is not None:
                    return True
                if t == "children" and target is not None and target.ppid == proc.pid:
                    return True
                if isinstance(t, int) and t == target_pid:
                    return True
                if isinstance(t, str) and target is not None and t == target.image and t not in ("parent", "children"):
                    return True
            return False

        cap = self._authorize(proc, "msg", handle, now, covers, f"sending to {to!r} on {queue!r}")
        if target is None or target.state not in LIVE:
            raise KernelError("ENOENT", f"no live process {to!r}")
        try:
            size = len(msgpack.packb(args["payload"], use_bin_type=True))
        except Exception:
            raise KernelError("EINVAL", "the payload is not msgpack-serializable") from None
        if size > self.config.mem_value_max_bytes:
            raise KernelError("EINVAL", f"payload of {size} bytes exceeds the {self.config.mem_value_max_bytes}-byte limit")
        message = {"from": proc.pid, "queue": queue, "payload": args["payload"]}
        waiting = self._receivers.get((target.pid, queue))

        def apply(seq: int) -> Any:
            message["seq"] = seq
            if waiting:
                self._resume(waiting.pop(0), dict(message))
            else:
                q = self.queues.setdefault(target.pid, {}).setdefault(queue, collections.deque())
                if len(q) >= MAX_QUEUE:
                    raise KernelError("EINVAL", f"queue {queue!r} of process {target.pid} is full ({MAX_QUEUE})")
                q.append(dict(message))
                if target.daemon and queue == "inbox":
                    # An idle agent wakes on mail: a turn starts with a notice; msg.recv reads it.
                    self._command(Command("deliver", target.pid, {"input": {
                        "notice": f"a message from process {proc.pid} is waiting on your inbox queue (msg_recv)"}}))
            return {"delivered": target.pid}

        out = Outcome.allow(cap, detail={"to": target.pid, "queue": queue, "bytes": size})
        out.apply = apply
        return out

    # --- providers: images ---------------------------------------------------------------------
    def _sys_image(self, proc: Proc, spec: SyscallSpec, args: dict[str, Any], handle: str | None, now: float) -> Outcome:
        def names_cover(c: CapRecord, name: str) -> bool:
            return any(compile_glob(g).fullmatch(name) for g in c.scope.get("names", []))

        if spec.name == "image.commit":
            return self._commit_image(proc, args, now, handle)
        if spec.name == "image.list":
            cap = self._authorize(proc, "image", handle, now, lambda c: "read" in c.rights, "listing images")
            visible = [
                {"name": n, "digest": i["digest"]} for n, i in sorted(self.images.items())
                if any(names_cover(c, n) for c in self.caps.held(proc.pid)
                       if c.kind == "image" and "read" in c.rights and c.status(now) is None)
            ]
            return Outcome.allow(cap, value={"images": visible})
        name = args["name"]
        right = "read" if spec.name == "image.show" else "boot"
        cap = self._authorize(proc, "image", handle, now, lambda c: right in c.rights and names_cover(c, name),
                              f"{spec.name} of {name!r}")
        if spec.name == "image.show":
            if name not in self.images:
                raise KernelError("ENOENT", f"no image {name!r}")
            return Outcome.allow(cap, value=self._image_view(name))
        return self._child_outcome(proc, cap, name, args, now, "image.boot",
                                   on_child=lambda child: setattr(child, "origin", "boot"))

    def _image_view(self, name: str) -> dict[str, Any]:
        i = self.images[name]
        return {k: i.get(k) for k in ("name", "digest", "prompt", "tools", "skills", "jit_tools", "budget", "model")}

    # --- processes -----------------------------------------------------------------------------
    def _set_state(self, proc: Proc, state: str, **extra: Any) -> None:
        proc.state = state
        body = {"pid": proc.pid, "state": state, **extra}
        self._stage("proc.state", body, pid=proc.pid)
        self._event(Topic.proc(proc.pid), body)
        self._event(Topic("proc/"), body)

    def _create_process(self, image: str, ppid: int | None, model: str, budget: dict[str, float], daemon: bool,
                        input: Any, now: float, cause: int | None = None) -> Proc:
        pid = self._next_pid
        self._next_pid += 1
        token = secrets.token_hex(16)
        img = self.images.get(image, {})
        proc = Proc(pid=pid, ppid=ppid, image=image, model=model, token=token, daemon=daemon, input=input,
                    jit_tools=dict(img.get("jit_tools") or {}), skills=list(img.get("skills") or []))
        self.budgets.create(pid, ppid, budget, now)
        self.procs[pid] = proc
        self._tokens[token] = pid
        if ppid is not None and ppid in self.procs:
            self.procs[ppid].children.add(pid)
        self._stage("proc.state", {"pid": pid, "ppid": ppid, "image": image, "state": "embryo", "model": model,
                                   "budget": budget}, pid=pid, cause=cause)
        # Every process holds its own memory namespace and the model that drives it.
        for name, kind, scope, rights in (
            ("self", "memory", {"namespace": "self"}, ["read", "write", "delete", "list"]),
            ("model", "llm", {"models": [model]}, ["complete"]),
        ):
            rec = self.caps.create(holder=pid, kind=kind, scope=scope, rights=rights, handle=name, via="spawn")
            self._log_cap(rec, None)
        return proc

    def _start_process(self, proc: Proc, extra: dict[str, Any] | None = None) -> None:
        image = self.images.get(proc.image, {})
        self._command(Command("start", proc.pid, {**(extra or {}),
            "token": proc.token, "ppid": proc.ppid, "image": proc.image, "model": proc.model,
            "prompt": image.get("prompt", ""), "tools": image.get("tools", []), "input": proc.input,
            "daemon": proc.daemon, "jit_tools": proc.jit_tools, "origin": proc.origin,
        }))

    def _command(self, cmd: Command) -> None:
        if self._host_conn is None:
            self._host_backlog.append(cmd)
        else:
            self._out.commands.append((self._host_conn, cmd.encode()))

    def _exit(self, proc: Proc, status: str, result: Any, state: str = "exited") -> None:
        if proc.state not in LIVE:
            return
        proc.status = status
        proc.result = result
        if proc.deadline_timer is not None:
            proc.deadline_timer.cancel()
            proc.deadline_timer = None
        self._set_state(proc, state, status=status)
        self.budgets.release(proc.pid)
        self.caps.release_process(proc.pid)
        for prov in {id(p): p for p in self._ext.values()}.values():
            if prov.on_exit is not None:
                try:
                    prov.on_exit(proc.pid)
                except Exception:
                    log.exception("provider %s: on_exit failed", prov.kind)
        self._tokens.pop(proc.token, None)
        if proc.conn is not None:
            self._conns.pop(proc.conn, None)
            self._ended_conns[proc.conn] = (proc.pid, state)
            if len(self._ended_conns) > 10_000:
                self._ended_conns.pop(next(iter(self._ended_conns)))
        # Live children are reparented to the exiting process's parent.
        parent = self.procs.get(proc.ppid) if proc.ppid is not None else None
        for cpid in proc.children:
            child = self.procs[cpid]
            if child.state in LIVE:
                child.ppid = proc.ppid
                if parent is not None:
                    parent.children.add(cpid)
        for key in self._exit_waiters.pop(proc.pid, []):
            self._resume(key, {"pid": proc.pid, "status": status, "result": result})
        # Its queues go with it; its own pending receives end.
        self.queues.pop(proc.pid, None)
        for qkey in [k for k in self._receivers if k[0] == proc.pid]:
            for key in self._receivers.pop(qkey):
                self._resume(key, error=KernelError("EPERM", f"process {proc.pid} has ended"))

    def _kill(self, proc: Proc, status: str = "killed") -> list[int]:
        killed = []
        stack = [proc.pid]
        while stack:
            p = self.procs[stack.pop()]
            stack.extend(c for c in p.children if self.procs[c].state in LIVE)
            if p.state in LIVE:
                self._command(Command("stop", p.pid))
                self._exit(p, status if p is proc else "killed", None, state="killed")
                killed.append(p.pid)
        return killed

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

    def _grant(self, pid: int, spec: dict[str, Any], now: float, cause: int) -> CapRecord:
        if not isinstance(spec, dict):
            raise KernelError("EINVAL", "a grant is a map with kind, scope and rights")
        kind = spec.get("kind")
        if kind not in self.kinds:
            raise KernelError("EINVAL", f"unknown capability kind {kind!r}")
        exp = spec.get("expires_in_s")
        rec = self.caps.create(
            holder=pid, kind=kind, scope=spec.get("scope", {}), rights=spec.get("rights", []),
            approval=spec.get("approval", "never"), expires=None if exp is None else now + float(exp),
            uses=spec.get("uses"), handle=spec.get("name"), via="operator",
        )
        self._log_cap(rec, None, cause)
        return rec

    def _op_spawn(self, conn: bytes, req: Request, args: dict[str, Any], seq: int) -> Any:
        now = self.clock()
        image = args["image"]
        if image not in self.images:
            raise KernelError("ENOENT", f"no image {image!r} is registered")
        img = self.images[image]
        budget = parse_budget(args.get("budget") if args.get("budget") is not None else img.get("budget"))
        model = args.get("model") or img.get("model") or "scripted"
        grants = args.get("caps") or []
        # Validate every grant before creating anything, so a bad grant leaves no half-made process.
        from agentlibos.kernel._caps import validate_rights, validate_scope

        for g in grants:
            if not isinstance(g, dict) or g.get("kind") not in self.kinds:
                raise KernelError("EINVAL", f"bad grant {g!r}: needs kind, scope, rights")
            validate_scope(g["kind"], g.get("scope", {}))
            validate_rights(g["kind"], g.get("rights", []))
        ceiling = []
        for g in args.get("requestable") or []:
            if not isinstance(g, dict) or g.get("kind") not in self.kinds:
                raise KernelError("EINVAL", f"bad requestable entry {g!r}: needs kind, scope, rights")
            ceiling.append({"kind": g["kind"], "scope": validate_scope(g["kind"], g.get("scope", {})),
                            "rights": sorted(validate_rights(g["kind"], g.get("rights", [])))})
        proc = self._create_process(image, None, model, budget, bool(args.get("daemon")), args.get("input"), now)
        proc.requestable = ceiling
        for g in grants:
            self._grant(proc.pid, g, now, seq)
        if args.get("external"):
            return {"pid": proc.pid, "token": proc.token}
        self._start_process(proc)
        return {"pid": proc.pid}

    def _op_grant(self, conn: bytes, req: Request, args: dict[str, Any], seq: int) -> Any:
        proc = self.procs.get(args["pid"])
        if proc is None or proc.state not in LIVE:
            raise KernelError("ENOENT", f"no live process {args['pid']}")
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
        proc = self.procs.get(args["pid"])
        if proc is None or proc.state not in LIVE:
            raise KernelError("ENOENT", f"no live process {args['pid']}")
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
        proc = self.procs.get(args["pid"])
        if proc is None or proc.state not in LIVE:
            raise KernelError("ENOENT", f"no live process {args['pid']}")
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
        proc = self.procs.get(args["pid"])
        if proc is None or proc.state not in LIVE:
            raise KernelError("ENOENT", f"no live process {args['pid']}")
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

    def _fire_deadline(self, pid: int) -> None:
        proc = self.procs.get(pid)
        token = id(proc.deadline_timer) if proc is not None and proc.deadline_timer is not None else 0
        try:
            self.actor_ref.tell(DeadlineFired(pid, token))
        except pykka.ActorDeadError:
            pass

    def _deadline(self, proc: Proc) -> None:
        proc.deadline_timer = None
        if proc.state not in LIVE:
            return
        seq = self._stage("proc.deadline", {"pid": proc.pid}, pid=proc.pid)
        self._event(Topic.proc(proc.pid), {"event": "deadline", "pid": proc.pid, "seq": seq})
        self._kill(proc, status="deadline")

    def _op_send(self, conn: bytes, req: Request, args: dict[str, Any], seq: int) -> Any:
        proc = self.procs.get(args["pid"])
        if proc is None or proc.state not in LIVE:
            raise KernelError("ENOENT", f"no live process {args['pid']}")
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

    def _fire(self, key: int) -> None:
        try:
            self.actor_ref.tell(TimerFired(key))
        except pykka.ActorDeadError:
            pass

    def _timer_fired(self, key: int) -> None:
        p = self._parked.get(key)
        if p is None:
            return
        for keys in list(self._exit_waiters.values()) + list(self._receivers.values()):
            if key in keys:
                keys.remove(key)
        self._resume(key, error=KernelError("ETIMEDOUT", f"{p.sys} timed out"))

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


_PARKED = object()


@dataclass(frozen=True, slots=True)
class _Rid:
    id: int


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


def image_digest(image: dict[str, Any]) -> str:
    """Content address of an image: sha256 of the canonical msgpack of everything but its name
    (never capabilities: an image has none)."""
    return digest({k: v for k, v in image.items() if k not in ("name", "digest", "meta")})


def _turn_value(result: Any) -> dict[str, Any]:
    value = result.to_value() if hasattr(result, "to_value") else result
    if not isinstance(value, dict) or not isinstance(value.get("content"), list):
        raise KernelError("EIO", "the model backend returned no content list")
    return value


class Outcome:
    """What a provider decided: deny with a code, or allow with a value, an effect, or a park."""

    __slots__ = ("code", "message", "cap", "value", "effect", "parked", "extra_charges", "detail", "after", "apply",
                 "park", "check_only", "human_question", "must_approve", "observe")

    def __init__(self) -> None:
        self.code: str | None = None
        self.message = ""
        self.cap: CapRecord | None = None
        self.value: Any = None
        self.effect: Callable[[], Any] | None = None
        self.parked = False
        self.extra_charges: dict[str, float] = {}
        self.check_only: dict[str, float] = {}
        self.human_question: dict[str, Any] | None = None
        #: The provider asks for a human whatever the capability says (git push...).
        self.must_approve = False
        #: For llm.complete: what the call record needs besides the result (model, request, secrets).
        self.observe: dict[str, Any] | None = None
        self.detail: dict[str, Any] | None = None
        self.after: Callable[[Any], None] | None = None
        # Runs on the kernel thread right after the decision is logged; returns the value.
        self.apply: Callable[[int], Any] | None = None
        # Parks the request: called with the park key once the decision is logged.
        self.park: Callable[[int], None] | None = None

    @classmethod
    def deny(cls, code: str, message: str) -> Outcome:
        o = cls()
        o.code, o.message = code, message
        return o

    @classmethod
    def allow(cls, cap: CapRecord | None, *, value: Any = None, effect: Callable[[], Any] | None = None,
              extra: dict[str, float] | None = None, detail: dict[str, Any] | None = None,
              apply: Callable[[int], Any] | None = None) -> Outcome:
        o = cls()
        o.apply = apply
        o.cap, o.value, o.effect = cap, value, effect
        o.extra_charges = extra or {}
        o.detail = detail
        return o

    def close(self) -> None:
        closer = getattr(self.effect, "close", None)
        if closer is not None:
            closer()


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
