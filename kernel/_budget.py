"""Hierarchical budgets: a node per process, reservations carved out of the parent, charges that
draw on the nearest node with a limit on each dimension.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from agentlibos.bus._errors import KernelError

DIMENSIONS = ("llm_tokens", "llm_calls", "syscalls", "wall_s", "children", "fs_bytes_written", "jit_ms")


def parse_budget(raw: Any) -> dict[str, float]:
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        raise KernelError("EINVAL", "budget must be a map of dimension -> amount")
    out: dict[str, float] = {}
    for dim, amount in raw.items():
        if dim not in DIMENSIONS:
            raise KernelError("EINVAL", f"unknown budget dimension {dim!r} (dimensions: {', '.join(DIMENSIONS)})")
        if not isinstance(amount, numbers.Real) or isinstance(amount, bool) or not math.isfinite(amount) or amount < 0:
            raise KernelError("EINVAL", f"budget {dim} must be a non-negative number")
        out[dim] = float(amount)
    return out


@dataclass(slots=True)
class BudgetNode:
    pid: int
    parent: BudgetNode | None
    started: float
    limits: dict[str, float] = field(default_factory=dict)
    used: dict[str, float] = field(default_factory=dict)
    # What this node reserved on its ancestors, returned when it is released.
    reserved_from: dict[str, BudgetNode] = field(default_factory=dict)
    released: bool = False
    # A node whose process exited stays open while live descendants still draw on it.
    exited: bool = False
    live_children: int = 0

    def drawing_node(self, dim: str) -> BudgetNode | None:
        node: BudgetNode | None = self
        while node is not None:
            if dim in node.limits:
                return node
            node = node.parent
        return None

    def remaining(self, dim: str, now: float) -> float | None:
        node = self.drawing_node(dim)
        if node is None:
            return None
        if dim == "wall_s":
            return node.limits[dim] - (now - node.started)
        return node.limits[dim] - node.used.get(dim, 0.0)

    def check(self, charges: Mapping[str, float], now: float) -> str | None:
        """The first dimension that cannot take its charge (or whose deadline passed), else None.

        Every deadline on the path to the root applies: a child never outlives an ancestor's."""
        node: BudgetNode | None = self
        while node is not None:
            limit = node.limits.get("wall_s")
            if limit is not None and now - node.started >= limit:
                return "wall_s"
            node = node.parent
        for dim, amount in charges.items():
            rem = self.remaining(dim, now)
            if rem is not None and (rem < amount or rem <= 0):
                return dim
        return None

    def charge(self, charges: Mapping[str, float]) -> None:
        for dim, amount in charges.items():
            node = self.drawing_node(dim)
            if node is not None:
                node.used[dim] = node.used.get(dim, 0.0) + amount

    def view(self, now: float) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for dim in DIMENSIONS:
            node = self.drawing_node(dim)
            if node is None:
                out[dim] = {"limit": None, "used": None, "remaining": None}
                continue
            used = (now - node.started) if dim == "wall_s" else node.used.get(dim, 0.0)
            out[dim] = {
                "limit": node.limits[dim],
                "used": used,
                "remaining": node.limits[dim] - used,
                "own": node is self,
            }
        return out


class BudgetTree:
    def __init__(self) -> None:
        self.nodes: dict[int, BudgetNode] = {}

    def create(self, pid: int, parent_pid: int | None, limits: Mapping[str, float], now: float) -> BudgetNode:
        """A node for a new process; amounts given are reserved from the parent's remainder at once."""
        parent = self.nodes.get(parent_pid) if parent_pid is not None else None
        node = BudgetNode(pid=pid, parent=parent, started=now, limits=dict(limits))
        if parent is not None:
            for dim, amount in limits.items():
                if dim == "wall_s":
                    continue  # a deadline, not a quantity: the child's own clock
                src = parent.drawing_node(dim)
                if src is None:
                    continue
                rem = src.limits[dim] - src.used.get(dim, 0.0)
                if rem < amount:
                    for d, s in node.reserved_from.items():
                        s.used[d] -= node.limits[d]
                    raise KernelError("EBUDGET", f"cannot reserve {amount:g} {dim}: {rem:g} left")
                src.used[dim] = src.used.get(dim, 0.0) + amount
                node.reserved_from[dim] = src
        self.nodes[pid] = node
        if parent is not None:
            parent.live_children += 1
        return node

    def snapshot(self) -> dict[str, Any]:
        """Every node still open (not released), for a clean stop: restored by `restore`."""
        return {str(pid): {"parent": n.parent.pid if n.parent is not None else None, "started": n.started,
                           "limits": dict(n.limits), "used": dict(n.used),
                           "reserved_from": {d: s.pid for d, s in n.reserved_from.items()},
                           "exited": n.exited, "live_children": n.live_children}
                for pid, n in self.nodes.items() if not n.released}

    def restore(self, snap: Mapping[str, Any]) -> None:
        """The open nodes of a snapshot, with their parents and reservations as they were."""
        for key, raw in snap.items():
            pid = int(key)
            self.nodes[pid] = BudgetNode(pid=pid, parent=None, started=float(raw["started"]),
                                         limits={d: float(v) for d, v in raw["limits"].items()},
                                         used={d: float(v) for d, v in raw["used"].items()},
                                         exited=bool(raw["exited"]), live_children=int(raw["live_children"]))
        for key, raw in snap.items():
            node = self.nodes[int(key)]
            parent = raw.get("parent")
            node.parent = self.nodes.get(parent) if parent is not None else None
            node.reserved_from = {d: self.nodes[src] for d, src in raw["reserved_from"].items() if src in self.nodes}

    def release(self, pid: int) -> None:
        """A process exited: what it left unspent of each reservation returns to where it came
        from, once no live descendant draws on its node any more."""
        node = self.nodes.get(pid)
        if node is None or node.exited:
            return
        node.exited = True
        while node is not None and node.exited and node.live_children == 0 and not node.released:
            node.released = True
            for dim, src in node.reserved_from.items():
                unspent = max(0.0, node.limits[dim] - node.used.get(dim, 0.0))
                src.used[dim] = src.used.get(dim, 0.0) - unspent
            parent = node.parent
            if parent is not None:
                parent.live_children -= 1
            node = parent
