"""The Kernel's processes: create, start, exit and kill, deadlines, requests parked on a process or
a queue (waits, receives, their timeouts), and the proc.* and msg.* syscalls.
"""

from __future__ import annotations

import collections
import logging
import secrets
import threading
from collections.abc import Callable
from typing import Any


from agentlibos.bus import Command, KernelError, Topic
from agentlibos.kernel._budget import parse_budget
from agentlibos.kernel._caps import CapRecord, Narrow
from agentlibos.kernel._globs import compile_glob
from agentlibos.kernel._kcaps import CapsMixin
from agentlibos.kernel._kstate import LIVE, DeadlineFired, Outcome, Proc, TimerFired
from agentlibos.kernel._table import SyscallSpec

log = logging.getLogger("agentlibos.kernel")

MAX_QUEUE = 1000


class ProcsMixin(CapsMixin):
    """Process lifecycle, and the requests parked on a process or a queue."""

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
        extra = dict(extra or {})
        if "instructions" not in extra and proc.skills:
            # Skills it starts with (its image's, or a checkpoint's): their instructions join its
            # prompt, as skill.load's do.
            extra["instructions"] = self._skill_instructions(proc.skills)
        self._command(Command("start", proc.pid, {**extra,
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

    # --- deadlines -----------------------------------------------------------------------------
    def _fire_deadline(self, pid: int) -> None:
        proc = self.procs.get(pid)
        token = id(proc.deadline_timer) if proc is not None and proc.deadline_timer is not None else 0
        self._post(DeadlineFired(pid, token))

    def _deadline(self, proc: Proc) -> None:
        proc.deadline_timer = None
        if proc.state not in LIVE:
            return
        seq = self._stage("proc.deadline", {"pid": proc.pid}, pid=proc.pid)
        self._event(Topic.proc(proc.pid), {"event": "deadline", "pid": proc.pid, "seq": seq})
        self._kill(proc, status="deadline")

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

    def _fire(self, key: int) -> None:
        self._post(TimerFired(key))

    def _timer_fired(self, key: int) -> None:
        p = self._parked.get(key)
        if p is None:
            return
        for keys in list(self._exit_waiters.values()) + list(self._receivers.values()):
            if key in keys:
                keys.remove(key)
        self._resume(key, error=KernelError("ETIMEDOUT", f"{p.sys} timed out"))

    # --- providers: proc -----------------------------------------------------------------------
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
        size = self._check_value_size(args["payload"], "payload")
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
