"""Deterministic replay: run a fresh kernel through a recorded log's stimuli (operator requests,
process requests, effect results, model answers, timeouts), never running an effect, and check
that it makes the same decisions, entry by entry, and reaches the same final state hash.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from agentlibos.bus import Hello, KernelError, NondeterminismError, ReplayError, Request
from agentlibos.kernel._commit import Outputs
from agentlibos.kernel._config import KernelConfig
from agentlibos.kernel._kernel import Caller, EffectDone, Kernel
from agentlibos.kernel._kstate import LIVE
from agentlibos.storage import NO_PAYLOAD, LogEntry, SQLiteLog, digest

OPERATOR_CONN = b"\x00operator"
HOST_CONN = b"\x00host"
#: Body fields that record where and when a run happened, not what it decided.
VOLATILE = {"kernel.start": {"pid", "world_root"}}


@dataclass(slots=True)
class _Staged:
    seq: int
    ts: float
    pid: int | None
    kind: str
    cause: int | None
    body: dict[str, Any]


class _MemoryLog:
    """Just enough of a log for a replaying kernel: it keeps what it stages, in memory, from
    `first_seq` on; a later session's recovery reads the earlier sessions from `earlier`."""

    def __init__(self, first_seq: int = 1, earlier: SQLiteLog | None = None) -> None:
        self.staged: list[_Staged] = []
        self.first_seq = first_seq
        self._earlier = earlier

    def stage(self, kind: str, body: dict[str, Any], *, pid: int | None = None, cause: int | None = None,
              payload: Any = NO_PAYLOAD, ts: float | None = None) -> _Staged:
        e = _Staged(self.first_seq + len(self.staged), ts or 0.0, pid, kind, cause, body)
        self.staged.append(e)
        return e

    def flush(self) -> int:
        return 0

    def head(self) -> tuple[int, bytes]:
        # What a restarting kernel finds acknowledged: the earlier sessions.
        return self.first_seq - 1, b""

    def get(self, seq: int) -> LogEntry | None:
        return self._earlier.get(seq) if self._earlier is not None and seq < self.first_seq else None

    def payload(self, seq: int) -> tuple[bool, Any]:
        if self._earlier is None or seq >= self.first_seq:
            return False, None
        return self._earlier.payload(seq)

    def entries(self, start: int = 1, end: int | None = None, *, kinds: Any = None,
                pid: int | None = None) -> Iterator[LogEntry]:
        if self._earlier is None or self.first_seq == 1:
            return iter(())
        last = self.first_seq - 1 if end is None else min(end, self.first_seq - 1)
        return self._earlier.entries(start, last, kinds=kinds, pid=pid)

    def projection(self, name: str) -> list[dict[str, Any]]:
        if self._earlier is None or self.first_seq == 1:
            return []
        return self._earlier.projection(name, upto=self.first_seq - 1)


class _Nowhere:
    """Sockets of a replaying kernel: replies and events go nowhere (the log is what is compared)."""

    def reply(self, conn: bytes, frame: bytes) -> None:
        pass

    def refresh(self) -> None:
        pass

    def publish(self, topic: Any, body: Any) -> None:
        pass


class _NoModel:
    def complete(self, request: Any) -> Any:  # never called: effects are not run in a replay
        raise ReplayError("a replay never calls a model")


#: Decisions that depend on the world outside the kernel (the filesystem, installed Skills): a
#: replay takes the recorded facts for these and re-checks the capability and budget side only.
WORLD_DEPENDENT = ("fs.", "shell.exec", "skill.", "rpc.", "mcp.", "pty.")


class _ReplayKernel(Kernel):
    def __init__(self, config: KernelConfig, memory_log: _MemoryLog) -> None:
        # Providers with an empty configuration: their syscall rows and coverage rules, no peers.
        from agentlibos.kernel._mcp import make_mcp_provider
        from agentlibos.kernel._pty import make_pty_provider
        from agentlibos.kernel._rpc import make_rpc_provider

        from agentlibos.kernel._modules import load_modules

        super().__init__(config, memory_log, None, [], [], {"*": _NoModel()},  # type: ignore[arg-type]
                         [make_rpc_provider({}), make_mcp_provider({}),
                          make_pty_provider(path=config.path, world_root=str(config.world_root), env={}),
                          *load_modules(config.modules, config)])
        self._audit_events = False
        self._routers = _Nowhere()  # type: ignore[assignment]
        self._pub = _Nowhere()  # type: ignore[assignment]
        self.effects_by_decision: dict[int, int] = {}
        self.oracle: tuple[dict[str, Any], Any] | None = None

    def _skill_instructions(self, names: list[str]) -> list[str]:
        return []  # they go with a start command, and a replaying kernel's commands go nowhere

    def _from_record(self, proc: Any, spec: Any) -> Any:
        from agentlibos.kernel._kernel import Outcome

        assert self.oracle is not None
        body, payload = self.oracle
        if body.get("decision") != "allow":
            raise KernelError(body.get("code", "EPERM"), body.get("message", ""))
        cap = self.caps.records.get(body["cap"]) if body.get("cap") is not None else None
        if cap is not None and (cap.holder != proc.pid or cap.status(self.clock()) is not None
                                or self.caps.by_handle(proc.pid, cap.handle) is not cap):
            raise KernelError("EPERM", f"replay: cap {body['cap']} is not live in the replayed process")
        detail = body.get("detail")
        extra = {"fs_bytes_written": float(detail["bytes"])} if detail and "bytes" in detail else None
        if body.get("ok") is True:  # an inline result, recorded with its value
            value = payload.get("value") if isinstance(payload, dict) else None
            if spec.name == "skill.load" and isinstance(value, dict):
                for t in value.get("tools", []):
                    proc.jit_tools[t["name"]] = {k: t[k] for k in ("description", "input_schema", "source")}
                if value.get("name") and value["name"] not in proc.skills:
                    proc.skills.append(body.get("detail", {}).get("skill", value["name"]))
            return Outcome.allow(cap, value=value, extra=extra, detail=detail)
        return Outcome.allow(cap, effect=lambda: None, extra=extra, detail=detail)

    def _sys_fs(self, proc: Any, spec: Any, args: Any, handle: Any, now: float) -> Any:
        return self._from_record(proc, spec)

    def _sys_shell(self, proc: Any, spec: Any, args: Any, handle: Any, now: float) -> Any:
        return self._from_record(proc, spec)

    def _sys_skill(self, proc: Any, spec: Any, args: Any, handle: Any, now: float) -> Any:
        return self._from_record(proc, spec)

    def _sys_ext(self, proc: Any, spec: Any, args: Any, handle: Any, now: float) -> Any:
        out = self._from_record(proc, spec)
        prov = self._ext[spec.name]
        if prov.needs_approval is not None:  # the same rule as the run: a pure function of the call
            try:
                out.must_approve = bool(prov.needs_approval(spec.name, args))
            except Exception:
                out.must_approve = True
        return out

    def _reply(self, conn: bytes, reply: Any) -> None:
        pass  # nobody is waiting: the run's callers had their answers

    def _event(self, topic: Any, body: dict[str, Any]) -> None:
        pass  # events are not part of the log

    def _flush(self) -> None:
        out = self._out
        if out.effects:  # replies and events go nowhere; effects are matched with their results
            self._out = Outputs()
            self._release(out)
        else:
            out.commands.clear()

    def _release(self, out: Outputs) -> None:
        # Effects are never run again: their recorded results are fed back as stimuli.
        for ticket, _fn, _conn, _rid in out.effects:
            pending = self._pending.get(ticket)
            if pending is not None:
                self.effects_by_decision[pending.decision_seq] = ticket


@dataclass(slots=True)
class ReplayReport:
    entries: int = 0
    stimuli: int = 0
    state_hash: str | None = None
    recorded_hash: str | None = None
    seconds: float = 0.0
    #: Kernel sessions replayed (a restart on the same state directory starts the next one).
    sessions: int = 0
    notes: list[str] = field(default_factory=list)


def _comparable(kind: str, body: dict[str, Any]) -> dict[str, Any]:
    drop = VOLATILE.get(kind)
    return body if drop is None else {k: v for k, v in body.items() if k not in drop}


def replay(entries: Iterable[LogEntry], payload_of: Any, config: KernelConfig, *,
           earlier: SQLiteLog | None = None) -> ReplayReport:
    """Replay recorded entries; raise NondeterminismError at the first entry that differs.

    Each kernel session (from its kernel.start) is replayed by a fresh kernel; a later session's
    kernel first recovers from the earlier sessions' entries, read from `earlier` (without it,
    the replay stops where the second session starts)."""
    started = time.monotonic()
    report = ReplayReport()
    conns: dict[int, bytes] = {}
    worldly: dict[Any, bool] = {}
    rid = 0

    def session(start: dict[str, Any], first_seq: int) -> tuple[_ReplayKernel, _MemoryLog]:
        cfg = config
        # The Runtime Modules the run's kernel loaded bring syscall rows the replay needs too.
        if start.get("modules"):
            cfg = replace(cfg, modules=tuple(start["modules"]))
        # The level of LLM-call records the run kept (a log from before they existed kept none).
        cfg = replace(cfg, llm_observe=str(start.get("llm_observe", "off")))
        memory_log = _MemoryLog(first_seq, earlier)
        kernel = _ReplayKernel(cfg, memory_log)
        kernel._conns[OPERATOR_CONN] = Caller("operator", 0)
        return kernel, memory_log

    def conn_of(pid: int) -> bytes:
        if pid not in conns:
            conns[pid] = b"\x01pid-%d" % pid
        return conns[pid]

    def payload(e: LogEntry) -> Any:
        present, value = payload_of(e.seq)
        if not present:
            raise ReplayError(f"entry {e.seq} ({e.kind}) has no stored payload (purged by retention?): cannot replay")
        return value

    def stimulate(e: LogEntry) -> bool:
        """Feed the kernel what caused entry `e`, if `e` records an outside stimulus."""
        nonlocal rid
        k._tick = e.ts
        body = e.body
        if e.kind == "op":
            rid += 1
            k._handle(OPERATOR_CONN, Request(rid, body["sys"], payload(e), None, e.cause))
            return True
        if e.kind == "host":  # what the process host reported (a process it could not run)
            rid += 1
            k._host_request(HOST_CONN, Request(rid, body["sys"], payload(e), None, e.cause))
            return True
        if e.kind == "sys" and e.pid is None and body.get("decision") == "reject":
            # The operator asked for something that is not an operator request.
            rid += 1
            k._handle(OPERATOR_CONN, Request(rid, body["sys"], payload(e), None, e.cause))
            return True
        if e.kind == "sys" and e.pid is not None:
            args = full = payload(e)
            if body.get("decision") == "allow" and body.get("ok") is True and isinstance(args, dict) and "args" in args:
                args = args["args"]
            rid += 1
            name = body["sys"]
            world = worldly.get(name)
            if world is None:
                world = worldly[name] = str(name).startswith(WORLD_DEPENDENT) or name in k._ext
            k.oracle = (body, full) if world else None
            try:
                k._handle(conn_of(e.pid), Request(rid, body["sys"], args if isinstance(args, dict) else {},
                                                  body.get("asked_cap"), e.cause))
            finally:
                k.oracle = None
            return True
        if e.kind == "proc.state" and body.get("state") == "ready" and e.pid in k.procs:
            k._handle(conn_of(e.pid), Hello(0, k.procs[e.pid].token, "process"))
            return True
        if e.kind == "result" and e.cause is not None:
            error = None if body.get("ok") else KernelError(body.get("code", "EIO"), body.get("message", ""))
            value = payload(e) if body.get("ok") else None
            ticket = k.effects_by_decision.pop(e.cause, None)
            if ticket is not None:
                k._effect_done(EffectDone(ticket, value=value, error=error))
                return True
            parked = next((key for key, p in k._parked.items() if p.decision_seq == e.cause), None)
            if parked is not None and error is not None and error.code == "ETIMEDOUT":
                k._timer_fired(parked)
                return True
            return False
        if e.kind.endswith(".notice"):
            # A provider's own report (an MCP description changed): an outside stimulus.
            k._stage(e.kind, dict(body), pid=e.pid)
            return True
        if e.kind == "proc.deadline" and e.pid in k.procs:  # the operator's deadline timer fired
            k._deadline(k.procs[e.pid])
            return True
        if e.kind == "approval.decide" and body.get("author") == "timeout" and body.get("id") in k.approvals:
            k._decide_approval(body["id"], False, author="timeout", reason=body.get("reason", ""))
            return True
        return False

    recorded = list(entries)
    done: set[int] = set()
    first = recorded[0] if recorded else None
    k, mlog = session(first.body if first is not None and first.kind == "kernel.start" else {}, 1)

    def stimulate_from(i: int) -> bool:
        # A handler may log consequences before its own decision (a derive logs the new cap, then
        # the decision): the stimulus is the next entry that is one.
        for j in range(i, min(len(recorded), i + 64)):
            e2 = recorded[j]
            if e2.seq in done:
                continue
            if stimulate(e2):
                done.add(e2.seq)
                return True
            if e2.kind in ("kernel.start", "kernel.stop"):
                return False
        return False

    stopped = clean = False
    for i, e in enumerate(recorded):
        if e.kind == "kernel.start" and e.seq > 1:
            if earlier is None:
                report.notes.append(f"a second kernel session starts at seq {e.seq}; replay stops there")
                break
            if not clean:
                report.notes.append(f"the session before seq {e.seq} did not stop cleanly: its decisions "
                                    "were compared, its final state not")
            k, mlog = session(e.body, e.seq)
            stopped = clean = False
        elif stopped:
            # A log from before a session's recovery came after its kernel.start.
            report.notes.append(f"entries after the kernel.stop at seq {e.seq - 1} precede the next "
                                "kernel.start (an older log); replay stops there")
            break
        report.entries += 1
        if e.kind == "kernel.start":
            report.sessions += 1
            k._tick = e.ts
            k._stage("kernel.start", dict(e.body))
            if e.seq > 1:
                # What the restarted kernel recovered from the earlier sessions, then the
                # processes that carry on (they said hello before the restart).
                k._recover()
                for proc in k.procs.values():
                    if proc.state in LIVE and proc.state != "needs_attention":
                        proc.conn = conn_of(proc.pid)
                        k._conns[proc.conn] = Caller("process", proc.pid)
                k._flush()
        elif e.kind == "kernel.stop":
            report.recorded_hash = e.body.get("state_hash")
            report.state_hash = k.state_hash()
            if report.recorded_hash != report.state_hash:
                raise NondeterminismError(f"final state differs at seq {e.seq}: recorded {report.recorded_hash}, "
                                          f"replayed {report.state_hash}")
            k._stage("kernel.stop", dict(e.body))
            stopped = clean = True
        elif len(mlog.staged) + mlog.first_seq <= e.seq and e.seq not in done:
            if stimulate_from(i):
                report.stimuli += 1
            k._flush()
        at = e.seq - mlog.first_seq
        if at >= len(mlog.staged):
            raise NondeterminismError(f"seq {e.seq}: the recorded run has {e.kind} {_short(e.body)}, "
                                      "the replay produced nothing here")
        got = mlog.staged[at]
        if (got.kind, got.pid, got.cause, _comparable(got.kind, got.body)) != (
                e.kind, e.pid, e.cause, _comparable(e.kind, e.body)):
            raise NondeterminismError(
                f"seq {e.seq}: recorded {e.kind} pid={e.pid} cause={e.cause} {_short(e.body)}; "
                f"replayed {got.kind} pid={got.pid} cause={got.cause} {_short(got.body)}")
    report.seconds = time.monotonic() - started
    if not clean:
        report.recorded_hash = None
        report.state_hash = k.state_hash()
        report.notes.append("the recorded run has no kernel.stop entry (it did not stop cleanly): "
                            "decisions compared, final state not")
    return report


def _short(body: dict[str, Any]) -> str:
    text = repr(body)
    return text if len(text) < 240 else text[:239] + "…"


def replay_log(path: str | Path, *, state_dir: str | Path | None = None) -> ReplayReport:
    """Replay the log file at `path` (a run's log.db), every kernel session in it."""
    p = Path(path)
    with SQLiteLog.open_readonly(p) as log:
        cfg = KernelConfig.load(state_dir or p.parent)
        blobs: dict[int, tuple[LogEntry, bytes | None]] = {}

        def entries() -> Iterator[LogEntry]:
            # One pass over the log; each payload is kept until the replay asks for it.
            for e, blob in log.entries_with_payloads():
                blobs[e.seq] = (e, blob)
                yield e

        def payload_of(seq: int) -> tuple[bool, Any]:
            hit = blobs.pop(seq, None)
            if hit is None:
                return log.payload(seq)
            return SQLiteLog.decode_payload(*hit)

        return replay(entries(), payload_of, cfg, earlier=log)


__all__ = ["ReplayReport", "replay", "replay_log", "digest"]
