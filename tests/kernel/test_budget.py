"""BudgetTree: reservations carved out of the nearest limited ancestor, unreserved dimensions shared
with it, unspent reservations returned on exit, and no way to spend more than a root was given.
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    initialize,
    invariant,
    multiple,
    precondition,
    rule,
)

from agentlibos.bus import KernelError
from agentlibos.kernel import DIMENSIONS, BudgetTree, parse_budget


def _used(tree: BudgetTree, pid: int, dim: str) -> float:
    return tree.nodes[pid].used.get(dim, 0.0)


# --- reservations ------------------------------------------------------------------------------


def test_reservation_carves_out_of_parent_at_once() -> None:
    t = BudgetTree()
    root = t.create(1, None, {"syscalls": 10}, now=0)
    assert root.remaining("syscalls", 0) == 10
    child = t.create(2, 1, {"syscalls": 4}, now=0)
    assert root.remaining("syscalls", 0) == 6  # before the child spends anything
    assert child.remaining("syscalls", 0) == 4
    with pytest.raises(KernelError) as ei:
        t.create(3, 1, {"syscalls": 7}, now=0)
    assert ei.value.code == "EBUDGET"
    assert 3 not in t.nodes and root.remaining("syscalls", 0) == 6
    t.create(3, 1, {"syscalls": 6}, now=0)  # exactly the remainder
    assert root.remaining("syscalls", 0) == 0
    assert root.check({"syscalls": 1}, 0) == "syscalls"
    # The children spend from their own reservations only.
    assert child.check({"syscalls": 1}, 0) is None
    child.charge({"syscalls": 1})
    assert _used(t, 2, "syscalls") == 1 and _used(t, 1, "syscalls") == 10


def test_failed_reservation_rolls_back_every_dimension() -> None:
    t = BudgetTree()
    root = t.create(1, None, {"syscalls": 10, "llm_tokens": 500}, now=0)
    with pytest.raises(KernelError) as ei:
        t.create(2, 1, {"syscalls": 2, "llm_tokens": 1000}, now=0)
    assert ei.value.code == "EBUDGET"
    with pytest.raises(KernelError):
        t.create(2, 1, {"llm_tokens": 1000, "syscalls": 2}, now=0)
    assert root.remaining("syscalls", 0) == 10 and root.remaining("llm_tokens", 0) == 500
    assert 2 not in t.nodes


def test_reservation_comes_from_nearest_limited_ancestor() -> None:
    t = BudgetTree()
    root = t.create(1, None, {"llm_tokens": 100}, now=0)
    mid = t.create(2, 1, {"syscalls": 5}, now=0)  # no llm_tokens: shares the root's
    leaf = t.create(3, 2, {"llm_tokens": 30}, now=0)  # reserved from the root, through mid
    assert root.remaining("llm_tokens", 0) == 70
    assert mid.remaining("llm_tokens", 0) == 70
    assert leaf.remaining("llm_tokens", 0) == 30
    # mid has no limit on a dimension nobody limits.
    assert mid.remaining("fs_bytes_written", 0) is None and mid.check({"fs_bytes_written": 1e12}, 0) is None
    with pytest.raises(KernelError) as ei:
        t.create(4, 2, {"llm_tokens": 71}, now=0)
    assert ei.value.code == "EBUDGET"


def test_unreserved_dimension_draws_on_nearest_ancestor_with_a_limit() -> None:
    t = BudgetTree()
    root = t.create(1, None, {"llm_tokens": 100, "syscalls": 50}, now=0)
    mid = t.create(2, 1, {"syscalls": 5}, now=0)
    leaf = t.create(3, 2, {}, now=0)
    assert leaf.drawing_node("llm_tokens") is root
    assert leaf.drawing_node("syscalls") is mid
    assert leaf.drawing_node("jit_ms") is None
    leaf.charge({"llm_tokens": 30, "syscalls": 2, "jit_ms": 99})
    assert _used(t, 1, "llm_tokens") == 30 and _used(t, 2, "syscalls") == 2
    assert _used(t, 3, "llm_tokens") == 0 and _used(t, 3, "syscalls") == 0
    # Exactly as the ancestor does: what the leaf spends, the root and mid see gone too.
    assert root.remaining("llm_tokens", 0) == leaf.remaining("llm_tokens", 0) == 70
    assert mid.remaining("syscalls", 0) == leaf.remaining("syscalls", 0) == 3
    root.charge({"llm_tokens": 70})
    assert leaf.check({"llm_tokens": 1}, 0) == "llm_tokens"
    assert leaf.view(0)["llm_tokens"] == {"limit": 100, "used": 100, "remaining": 0, "own": False}


def test_release_returns_unspent_reservation() -> None:
    t = BudgetTree()
    root = t.create(1, None, {"syscalls": 10, "llm_tokens": 100}, now=0)
    child = t.create(2, 1, {"syscalls": 4, "llm_tokens": 40}, now=0)
    child.charge({"syscalls": 1, "llm_tokens": 40})
    t.release(2)
    assert root.remaining("syscalls", 0) == 9  # 3 unspent came back, 1 stays spent
    assert root.remaining("llm_tokens", 0) == 60
    t.release(2)  # a second release returns nothing more
    t.release(99)
    assert root.remaining("syscalls", 0) == 9
    # What came back can be reserved again.
    t.create(3, 1, {"syscalls": 9}, now=0)
    assert root.remaining("syscalls", 0) == 0


def test_check_names_the_exhausted_dimension() -> None:
    t = BudgetTree()
    n = t.create(1, None, {"syscalls": 2, "fs_bytes_written": 50}, now=0)
    assert n.check({"syscalls": 1, "fs_bytes_written": 50}, 0) is None  # exactly what is left
    assert n.check({"syscalls": 1, "fs_bytes_written": 51}, 0) == "fs_bytes_written"
    n.charge({"syscalls": 2})
    assert n.check({"syscalls": 1}, 0) == "syscalls"
    assert n.check({"syscalls": 1, "fs_bytes_written": 1}, 0) == "syscalls"
    assert n.check({"fs_bytes_written": 1}, 0) is None
    assert n.check({"llm_calls": 1}, 0) is None  # no limit on it anywhere
    # A charge whose size is known up front is refused whole, not partly.
    assert n.check({"fs_bytes_written": 1000}, 0) == "fs_bytes_written"


def test_wall_s_is_a_deadline() -> None:
    t = BudgetTree()
    n = t.create(1, None, {"wall_s": 10}, now=100)
    assert n.check({}, 105) is None
    assert n.remaining("wall_s", 105) == 5
    assert n.check({}, 110) == "wall_s"
    assert n.check({"syscalls": 1}, 111) == "wall_s"
    assert n.view(104)["wall_s"]["used"] == 4
    # A child without wall_s runs on its ancestor's clock.
    c = t.create(2, 1, {}, now=105)
    assert c.check({"syscalls": 1}, 109) is None
    assert c.check({"syscalls": 1}, 110) == "wall_s"


def test_child_cannot_outlive_an_ancestor_deadline() -> None:
    # EBUDGET: "a budget on the path to the root is exhausted". A child given more wall time than
    # its parent has left must be refused at creation or stopped at the parent's deadline.
    t = BudgetTree()
    t.create(1, None, {"wall_s": 10}, now=0)
    try:
        child = t.create(2, 1, {"wall_s": 100}, now=5)
    except KernelError as exc:
        assert exc.code == "EBUDGET"
        return
    assert child.check({"syscalls": 1}, 20) == "wall_s", "the child keeps running after its parent's deadline"


def test_exit_with_live_children_cannot_mint_budget() -> None:
    # The kernel releases a process's budget when it exits and reparents its live children.
    t = BudgetTree()
    root = t.create(1, None, {"syscalls": 10}, now=0)
    t.create(2, 1, {"syscalls": 10}, now=0)  # reserves all of root's
    grandchild = t.create(3, 2, {}, now=0)  # draws on 2's reservation
    t.release(2)  # 2 exits having spent nothing; grandchild 3 lives on
    spent = 0.0
    for who in (grandchild, root):
        while who.check({"syscalls": 1}, 0) is None and spent <= 20:
            who.charge({"syscalls": 1})
            spent += 1
    assert spent <= 10, f"{spent:g} syscalls spent under a root limited to 10"


@pytest.mark.parametrize(
    "raw",
    [[], "syscalls", {"tokens": 1}, {"syscalls": -1}, {"syscalls": "3"}, {"syscalls": True},
     {"syscalls": float("nan")}, {"syscalls": float("inf")}],
)
def test_parse_budget_refuses(raw: Any) -> None:
    with pytest.raises(KernelError) as ei:
        parse_budget(raw)
    assert ei.value.code == "EINVAL"


def test_parse_budget_accepts_every_dimension() -> None:
    assert parse_budget(None) == {}
    assert parse_budget({d: 1 for d in DIMENSIONS}) == {d: 1.0 for d in DIMENSIONS}


# --- a stateful model --------------------------------------------------------------------------

QUANTITIES = ("syscalls", "llm_tokens")  # few dimensions, so rules often meet on one
amounts = st.integers(0, 12).map(float)


class BudgetMachine(RuleBasedStateMachine):
    """Random process trees: spawn with reservations, charge live processes, let them exit.

    The model tracks, per node and dimension, what it reserved for each live child and what was
    spent on it (its own charges, those of descendants sharing it, and what exited children spent
    of their reservations), independently of the tree's own bookkeeping.
    """

    live = Bundle("live")

    def __init__(self) -> None:
        super().__init__()
        self.tree = BudgetTree()
        self.next_pid = 1
        self.parent: dict[int, int | None] = {}
        self.limits: dict[int, dict[str, float]] = {}
        self.alive: set[int] = set()
        self.exited: set[int] = set()
        self.finalized: set[int] = set()
        # pid -> dim -> (source pid, amount) it reserved
        self.reserved: dict[int, dict[str, tuple[int, float]]] = {}
        self.spent_on: dict[int, dict[str, float]] = {}  # drawing node -> dim -> amount
        self.charged_by: dict[int, dict[str, float]] = {}  # charging pid -> dim -> amount

    def _drawing(self, pid: int, dim: str) -> int | None:
        cur: int | None = pid
        while cur is not None:
            if dim in self.limits[cur]:
                return cur
            cur = self.parent[cur]
        return None

    def _expected_used(self, pid: int, dim: str) -> float:
        held = sum(a for c, r in self.reserved.items() if self._open(c) for d, (src, a) in r.items()
                   if d == dim and src == pid)
        return held + self.spent_on.get(pid, {}).get(dim, 0.0)

    def _open(self, pid: int) -> bool:
        """A node still holds its reservation while it or any descendant is alive."""
        return pid in self.alive or (pid in self.exited and pid not in self.finalized)

    def _finalize(self) -> None:
        """Exited nodes with no open child give back what they left unspent (cascading up)."""
        changed = True
        while changed:
            changed = False
            for pid in sorted(self.exited - self.finalized):
                if any(self._open(c) for c, p in self.parent.items() if p == pid):
                    continue
                for dim, (src, amount) in self.reserved[pid].items():
                    spent = min(amount, self._expected_used(pid, dim))
                    self.spent_on.setdefault(src, {})[dim] = self.spent_on.get(src, {}).get(dim, 0.0) + spent
                self.finalized.add(pid)
                changed = True

    def _remaining(self, pid: int, dim: str) -> float | None:
        src = self._drawing(pid, dim)
        return None if src is None else self.limits[src][dim] - self._expected_used(src, dim)

    @initialize(target=live, amount=st.integers(1, 12).map(float))
    def limited_root(self, amount: float) -> int:
        pid = self._spawn(None, dict.fromkeys(QUANTITIES, amount))
        assert pid is not None
        return pid

    @rule(target=live, limits=st.dictionaries(st.sampled_from(QUANTITIES), amounts, max_size=2))
    def root(self, limits: dict[str, float]) -> int:
        pid = self._spawn(None, limits)
        assert pid is not None
        return pid

    @rule(target=live, parent=live, limits=st.dictionaries(st.sampled_from(QUANTITIES), amounts, max_size=2))
    def child(self, parent: int, limits: dict[str, float]) -> Any:
        if parent not in self.alive:
            return multiple()  # it exited since; the bundle entry is stale
        pid = self._spawn(parent, limits)
        return multiple() if pid is None else pid

    def _spawn(self, ppid: int | None, limits: dict[str, float]) -> int | None:
        pid = self.next_pid
        fits = True
        if ppid is not None:
            for dim, amount in limits.items():
                rem = self._remaining(ppid, dim)
                if rem is not None and rem < amount:
                    fits = False
        before = {p: dict(n.used) for p, n in self.tree.nodes.items()}
        try:
            self.tree.create(pid, ppid, limits, now=0)
        except KernelError as exc:
            assert exc.code == "EBUDGET"
            assert not fits, f"reserving {limits} under {ppid} refused though the model says it fits"
            assert pid not in self.tree.nodes
            assert {p: {d: a for d, a in n.used.items() if a} for p, n in self.tree.nodes.items()} == \
                {p: {d: a for d, a in u.items() if a} for p, u in before.items()}, "a refused reservation left a mark"
            return None
        assert fits, f"reserving {limits} under {ppid} allowed beyond the remainder"
        self.next_pid += 1
        self.parent[pid] = ppid
        self.limits[pid] = dict(limits)
        self.alive.add(pid)
        self.reserved[pid] = {}
        if ppid is not None:
            for dim, amount in limits.items():
                src = self._drawing(ppid, dim)
                if src is not None:
                    self.reserved[pid][dim] = (src, amount)
        return pid

    @rule(pid=live, charges=st.dictionaries(st.sampled_from(QUANTITIES), amounts, min_size=1, max_size=2))
    def charge(self, pid: int, charges: dict[str, float]) -> None:
        if pid not in self.alive:
            return
        node = self.tree.nodes[pid]
        refused = node.check(charges, 0)
        fits = {d: (r is None or (r >= a and r > 0)) for d, a in charges.items() for r in [self._remaining(pid, d)]}
        if refused is not None:
            assert not fits[refused], f"{refused} refused with {self._remaining(pid, refused)} left"
            return
        assert all(fits.values()), f"check passed {charges} though the model says {fits}"
        node.charge(charges)
        for dim, amount in charges.items():
            src = self._drawing(pid, dim)
            if src is not None:
                self.spent_on.setdefault(src, {})[dim] = self.spent_on.get(src, {}).get(dim, 0.0) + amount
            self.charged_by.setdefault(pid, {})[dim] = self.charged_by.get(pid, {}).get(dim, 0.0) + amount

    @rule(pid=live, dim=st.sampled_from(QUANTITIES))
    def spend_everything(self, pid: int, dim: str) -> None:
        """A process spends all that is left to it on one dimension (the adversarial case)."""
        if pid not in self.alive:
            return
        rem = self._remaining(pid, dim)
        assert rem == self.tree.nodes[pid].remaining(dim, 0)
        if rem is not None and rem > 0:
            self.charge(pid, {dim: rem})

    @precondition(lambda self: self.alive)
    @rule(pid=consumes(live))
    def exit(self, pid: int) -> None:
        if pid not in self.alive:
            return
        # What it spent of its own reservation stays spent where the reservation came from; the
        # rest returns once no live descendant can draw on it any more.
        self.alive.discard(pid)
        self.exited.add(pid)
        self.tree.release(pid)
        self._finalize()

    @invariant()
    def used_within_limit_and_accounted(self) -> None:
        for pid, node in self.tree.nodes.items():
            for dim in QUANTITIES:
                used = node.used.get(dim, 0.0)
                if dim in node.limits and pid in self.alive:
                    assert used <= node.limits[dim], f"node {pid} used {used:g} of {node.limits[dim]:g} {dim}"
                if pid in self.alive:
                    assert used == self._expected_used(pid, dim), (
                        f"node {pid} {dim}: used {used:g}, but live children hold and it spent "
                        f"{self._expected_used(pid, dim):g}")

    @invariant()
    def no_subtree_outspends_its_limit(self) -> None:
        kids: dict[int, list[int]] = {}
        for p, pp in self.parent.items():
            if pp is not None:
                kids.setdefault(pp, []).append(p)
        for pid, lim in self.limits.items():
            stack, total = [pid], dict.fromkeys(lim, 0.0)
            while stack:
                p = stack.pop()
                stack.extend(kids.get(p, []))
                for dim in lim:
                    total[dim] += self.charged_by.get(p, {}).get(dim, 0.0)
            for dim, amount in lim.items():
                assert total[dim] <= amount, f"processes under {pid} spent {total[dim]:g} {dim}, limit {amount:g}"


BudgetMachine.TestCase.settings = settings(max_examples=300, stateful_step_count=40, deadline=None)
TestBudgetMachine = BudgetMachine.TestCase
