"""Checkpoints and images: a process's snapshots (create, restore, fork a child from one), and the
images committed from them, shown or booted (the ckpt.* and image.* syscalls).
"""

from __future__ import annotations

import collections
from typing import Any

from agentlibos.bus import KernelError
from agentlibos.kernel._caps import CapRecord
from agentlibos.kernel._globs import compile_glob
from agentlibos.kernel._kprocs import ProcsMixin
from agentlibos.kernel._kstate import Outcome, Proc
from agentlibos.kernel._table import SyscallSpec
from agentlibos.storage import digest


class CheckpointsMixin(ProcsMixin):
    """Snapshots of processes, and the images committed from them."""

    # --- checkpoints ---------------------------------------------------------------------------
    def _snapshot(self, proc: Proc, label: str | None, seq_hint: int) -> dict[str, Any]:
        node = self.budgets.nodes[proc.pid]
        return {
            "pid": proc.pid, "image": proc.image, "model": proc.model, "label": label,
            # Copies: the process goes on changing its own (a JIT tool defined or a Skill loaded
            # after the checkpoint must not appear in it).
            "conversation": dict(proc.conversation), "jit_tools": {k: dict(v) for k, v in proc.jit_tools.items()},
            "skills": list(proc.skills),
            "memory": dict(self.memory.get(f"self:{proc.pid}", {})),
            "queues": {q: list(d) for q, d in self.queues.get(proc.pid, {}).items()},
            "children": sorted(proc.children),
            "budget": {"limits": dict(node.limits), "used": dict(node.used)},
            # Handles name capability records; the records (and their revocation) stay in the kernel.
            "handles": {h: cid for h, cid in self.caps.handles.get(proc.pid, {}).items()},
            "log_seq": seq_hint,
        }

    def _take_checkpoint(self, proc: Proc, label: str | None, seq: int, author: str | None = None) -> int:
        """Snapshot `proc` as checkpoint N (returned), logged as one `ckpt.create` entry whose payload
        is the snapshot: durable with the round's commit, never half-written."""
        snap = self._snapshot(proc, label, seq)
        self._next_ckpt += 1
        cid = self._next_ckpt
        snap["id"] = cid
        body: dict[str, Any] = {"checkpoint": cid, "pid": proc.pid, "label": label}
        if author is not None:
            snap["author"] = body["author"] = author
        self.checkpoints[cid] = snap
        self._stage("ckpt.create", body, pid=proc.pid, cause=seq, payload=snap, has_payload=True)
        return cid

    def _restore_checkpoint(self, proc: Proc, ck: dict[str, Any]) -> dict[str, Any]:
        """Return `proc` to checkpoint `ck`; what the model sees of it (its affordances) is returned.
        Handles come back as they were, pointing at the same records: a record revoked or expired
        since stays dead; a handle dropped since is not re-added. A handle the process got since is
        dropped, and logged as such, so that a restarted kernel does not hand it back either."""
        table = self.caps.handles.setdefault(proc.pid, {})
        for h in list(table):
            if h not in ck["handles"]:
                rec = self.caps.drop(proc.pid, h)
                if rec is not None:
                    self._stage("cap.drop", {"cap": rec.id, "via": "ckpt.restore"}, pid=proc.pid)
        for h, cid in ck["handles"].items():
            rec = self.caps.records.get(cid)
            if rec is not None and not rec.dropped:
                table[h] = cid
        proc.jit_tools = dict(ck["jit_tools"])
        proc.skills = list(ck["skills"])
        proc.conversation = ck["conversation"]
        self.memory[f"self:{proc.pid}"] = dict(ck["memory"])
        self.queues[proc.pid] = {q: collections.deque(v) for q, v in ck["queues"].items()}
        return self._affordances(ck)

    def _find_checkpoint(self, ref: Any, pid: int | None = None) -> dict[str, Any]:
        """Checkpoint `ref`: an id, or the newest with that label (of process `pid`, if given)."""
        if isinstance(ref, int) and ref in self.checkpoints:
            return self.checkpoints[ref]
        if isinstance(ref, str):
            if ref.isdigit() and int(ref) in self.checkpoints:
                return self.checkpoints[int(ref)]
            for ck in reversed(list(self.checkpoints.values())):
                if ck.get("label") == ref and (pid is None or ck["pid"] == pid):
                    return ck
        raise KernelError("ENOENT", f"no checkpoint {ref!r}" + (f" of process {pid}" if pid is not None else ""))

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
            return Outcome.allow(cap, apply=lambda seq: {"checkpoint": self._take_checkpoint(proc, label, seq)})
        ck = self._find_checkpoint(args["checkpoint"])
        right = spec.name.split(".")[1]
        cap = self._authorize(proc, "checkpoint", handle, now,
                              lambda c: self._ckpt_covers(c, right, ck["pid"], proc.pid),
                              f"{spec.name} of checkpoint {ck['id']} of pid {ck['pid']}")
        if spec.name == "ckpt.restore":
            if ck["pid"] != proc.pid:
                raise KernelError("EPERM", "a process restores only its own checkpoints; fork another's instead")

            return Outcome.allow(cap, apply=lambda seq: {"checkpoint": ck["id"],
                                                         "restored": self._restore_checkpoint(proc, ck)})
        # ckpt.fork: a new child from the snapshot, with an explicit capability list
        return self._child_outcome(proc, cap, ck["image"], args, now, "ckpt.fork",
                                   on_child=lambda child: self._seed_from_checkpoint(child, ck),
                                   start_extra={"restored": self._affordances(ck), "origin": "fork",
                                                "forked_by": proc.pid})

    def _seed_from_checkpoint(self, child: Proc, ck: dict[str, Any]) -> None:
        """A forked process starts with the snapshot's affordances and its own copy of the
        snapshot's memory; never with its capabilities (the fork names those)."""
        child.origin = "fork"
        child.jit_tools = dict(ck["jit_tools"])
        child.skills = list(ck["skills"])
        child.conversation = ck["conversation"]
        self.memory[f"self:{child.pid}"] = dict(ck["memory"])

    def _affordances(self, ck: dict[str, Any]) -> dict[str, Any]:
        conv = ck.get("conversation") or {}
        return {"messages": conv.get("messages", []), "jit_tools": ck["jit_tools"], "skills": ck["skills"]}

    # --- providers: images ---------------------------------------------------------------------
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


def image_digest(image: dict[str, Any]) -> str:
    """Content address of an image: sha256 of the canonical msgpack of everything but its name
    (never capabilities: an image has none)."""
    return digest({k: v for k, v in image.items() if k not in ("name", "digest", "meta")})
