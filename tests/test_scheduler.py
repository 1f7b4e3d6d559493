"""The scheduler's rules (see its module docstring), checked against a model by a Hypothesis state machine."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, consumes, invariant, rule

from tether.tracker.scheduler import Grant, Scheduler, Slot, Waiter

KEYS = ["a", "b"]  # two keys: queues must not leak into each other
USERS = ["u1", "u2", "u3"]
PROTOCOLS = ["tvm", "tether"]


def slot(key: str = "a", mk: str = "m", protocols: frozenset[str] = frozenset({"tvm"}), **labels: str) -> Slot:
    return Slot(key, mk, "h", 1, protocols=protocols, labels=labels)


def waiter(key: str = "a", user: str = "u", priority: float = 1, protocol: str = "tvm", **labels: str) -> Waiter:
    return Waiter(key, user, priority, protocol, labels)


def matches(s: Slot, w: Waiter) -> bool:
    return s.key == w.key and w.protocol in s.protocols and all(s.labels.get(k) == v for k, v in w.labels.items())


# -- examples -------------------------------------------------------------------------------------


def test_priority_then_fifo() -> None:
    sched = Scheduler()
    low, high1, high2 = waiter(user="x", priority=0), waiter(user="x", priority=5), waiter(user="x", priority=5)
    for w in (low, high1, high2):
        assert sched.request(w, 0) is None
    got = [sched.put(slot(mk=str(i)), 1) for i in range(3)]
    assert [g.waiter for g in got if g] == [high1, high2, low]


def test_round_robin_between_users_at_equal_priority() -> None:
    sched = Scheduler()
    alice = [waiter(user="alice") for _ in range(3)]
    bob = [waiter(user="bob") for _ in range(2)]
    for w in alice + bob:  # alice queued three before bob arrived
        sched.request(w, 0)
    order = [g.waiter for i in range(5) if (g := sched.put(slot(mk=str(i)), 1))]
    assert order == [alice[0], bob[0], alice[1], bob[1], alice[2]]


def test_request_takes_the_slot_free_longest() -> None:
    sched = Scheduler()
    first, second = slot(mk="1"), slot(mk="2")
    sched.put(first, 0)
    sched.put(second, 1)
    grant = sched.request(waiter(), 2)
    assert grant is not None and grant.slot is first


def test_plain_tvm_request_never_gets_a_tether_only_slot() -> None:
    sched = Scheduler()
    sched.put(slot(protocols=frozenset({"tether"})), 0)
    assert sched.request(waiter(protocol="tvm"), 0) is None
    assert sched.counts("a") == (1, 1)
    grant = sched.request(waiter(protocol="tether"), 0)
    assert grant is not None


def test_labels_must_all_match() -> None:
    sched = Scheduler()
    w = waiter(protocol="tvm", gpu="a100", os="linux")
    sched.request(w, 0)
    assert sched.put(slot(mk="1", gpu="a100"), 0) is None
    grant = sched.put(slot(mk="2", gpu="a100", os="linux", extra="x"), 0)
    assert grant is not None and grant.waiter is w


def test_expiry_and_zero_timeout() -> None:
    sched = Scheduler()
    w = waiter()
    w.deadline = 5.0
    sched.request(w, 0)
    assert sched.next_deadline() == 5.0
    assert sched.expire(4.9) == []
    assert sched.expire(5.0) == [w]
    assert sched.counts("a") == (0, 0)
    z = waiter()
    z.deadline = 0.0
    assert sched.request(z, 0.0) is None and not z.waiting


def test_memory_does_not_grow_with_grants() -> None:
    sched = Scheduler()
    for i in range(10_000):
        w = waiter()
        w.deadline = 1e9  # a far deadline: its heap entry goes stale when granted
        sched.request(w, i)
        sched.put(slot(mk=str(i)), i)
    assert sched.keys() == []
    assert len(sched._deadlines) <= 200  # stale entries are compacted, not kept per grant


def test_remove_is_idempotent() -> None:
    sched = Scheduler()
    s, w = slot(), waiter(key="b")
    sched.put(s, 0)
    sched.request(w, 0)
    assert sched.remove_slot(s) and not sched.remove_slot(s)
    assert sched.remove_waiter(w) and not sched.remove_waiter(w)
    with pytest.raises(ValueError):
        sched.put(s, 0) or sched.put(s, 0)


# -- the state machine ----------------------------------------------------------------------------


@dataclass
class _Level:
    turn: dict[str, int] = field(default_factory=dict)  # user -> event of its latest join or service


class SchedulerMachine(RuleBasedStateMachine):
    """Model: the free slots and waiters that should be queued, and each user's place in the turn order."""

    slots = Bundle("slots")
    waiters = Bundle("waiters")

    def __init__(self) -> None:
        super().__init__()
        self.sched = Scheduler()
        self.now = 0.0
        self.events = itertools.count()
        self.free: dict[Slot, int] = {}  # slot -> order it became free
        self.waiting: dict[Waiter, int] = {}  # waiter -> arrival order
        self.levels: dict[tuple[str, float], _Level] = {}
        self.granted_slots: set[Slot] = set()  # the objects, kept alive: ids would be reused
        self.done_waiters: set[Waiter] = set()
        self.counter = itertools.count()

    # model helpers

    def _level(self, w: Waiter) -> _Level:
        return self.levels.setdefault((w.key, w.priority), _Level())

    def _user_waiting(self, w: Waiter) -> bool:
        return any(o.key == w.key and o.priority == w.priority and o.user == w.user for o in self.waiting)

    def _leave(self, w: Waiter) -> None:
        del self.waiting[w]
        self.done_waiters.add(w)
        if not self._user_waiting(w):
            self._level(w).turn.pop(w.user, None)

    def _check_grant(self, grant: Grant, new_slot: Slot | None, new_waiter: Waiter | None) -> None:
        w, s = grant.waiter, grant.slot
        assert matches(s, w)
        assert s not in self.granted_slots, "slot handed out twice"
        self.granted_slots.add(s)
        assert w not in self.done_waiters, "waiter served twice"
        if new_slot is not None:  # a PUT served a queued waiter: the best one
            assert s is new_slot and w in self.waiting
            rivals = [o for o in self.waiting if matches(s, o)]
            best = max(o.priority for o in rivals)
            assert w.priority == best, "priority order"
            turn = self._level(w).turn
            same = [o for o in rivals if o.priority == best]
            assert turn[w.user] == min(turn[o.user] for o in same), "round robin between users"
            mine = [self.waiting[o] for o in same if o.user == w.user]
            assert self.waiting[w] == min(mine), "FIFO per user"
            self._leave(w)
            if self._user_waiting(w):
                self._level(w).turn[w.user] = next(self.events)  # served: to the back of the turn order
        else:  # a REQUEST took a free slot: the one free longest among those that match
            assert w is new_waiter and s in self.free
            assert self.free[s] == min(order for o, order in self.free.items() if matches(o, w)), "oldest slot"
            del self.free[s]
            self.done_waiters.add(w)

    # rules

    @rule(
        target=slots,
        key=st.sampled_from(KEYS),
        protocols=st.sampled_from([frozenset(PROTOCOLS), frozenset({"tvm"}), frozenset({"tether"})]),
        gpu=st.sampled_from([None, None, "x", "y"]),
    )
    def put(self, key: str, protocols: frozenset[str], gpu: str | None) -> Slot:
        s = Slot(key, f"m{next(self.counter)}", "h", 1, protocols=protocols, labels={} if gpu is None else {"gpu": gpu})
        grant = self.sched.put(s, self.now)
        if grant is None:
            self.free[s] = next(self.counter)
        else:
            self._check_grant(grant, s, None)
        return s

    @rule(
        target=waiters,
        key=st.sampled_from(["a", "a", "b"]),
        user=st.sampled_from(USERS),
        priority=st.sampled_from([1, 1, 2]),
        protocol=st.sampled_from(["tvm", "tvm", "tether"]),
        gpu=st.sampled_from([None, None, "x"]),
        timeout=st.sampled_from([None, None, 0.0, 1.0, 3.0]),
    )
    def request(
        self, key: str, user: str, priority: int, protocol: str, gpu: str | None, timeout: float | None
    ) -> Waiter:
        w = Waiter(key, user, priority, protocol, {} if gpu is None else {"gpu": gpu})
        if timeout is not None:
            w.deadline = self.now + timeout
        grant = self.sched.request(w, self.now)
        if grant is not None:
            self._check_grant(grant, None, w)
        elif w.waiting:
            if not self._user_waiting(w):
                self._level(w).turn[user] = next(self.events)
            self.waiting[w] = next(self.counter)
        else:
            assert timeout == 0.0
        return w

    @rule(user=st.sampled_from(USERS), n=st.integers(2, 3))
    def burst(self, user: str, n: int) -> None:
        """Several plain requests of one user at once: the case where turns between users matter."""
        for _ in range(n):
            self.request("a", user, 1, "tvm", None, None)

    @rule()
    def put_plain(self) -> None:
        self.put("a", frozenset(PROTOCOLS), None)

    @rule(s=consumes(slots))
    def remove_slot(self, s: Slot) -> None:
        assert self.sched.remove_slot(s) == (s in self.free)
        self.free.pop(s, None)

    @rule(w=consumes(waiters))
    def remove_waiter(self, w: Waiter) -> None:
        assert self.sched.remove_waiter(w) == (w in self.waiting)
        if w in self.waiting:
            self._leave(w)

    @rule(dt=st.sampled_from([0.5, 1.0, 2.0]))
    def advance(self, dt: float) -> None:
        self.now += dt
        expired = self.sched.expire(self.now)
        due = {w for w in self.waiting if w.deadline is not None and w.deadline <= self.now}
        assert set(expired) == due and len(expired) == len(due)
        for w in expired:
            self._leave(w)

    # invariants

    @invariant()
    def nothing_idle_that_could_be_served(self) -> None:
        for s in self.free:
            assert not any(matches(s, w) for w in self.waiting), "a free slot matches a waiter"

    @invariant()
    def counts_agree(self) -> None:
        for key in KEYS:
            free = sum(1 for s in self.free if s.key == key)
            pending = sum(1 for w in self.waiting if w.key == key)
            assert self.sched.counts(key) == (free, pending)
            assert sorted(id(w) for w in self.sched.waiters(key)) == sorted(id(w) for w in self.waiting if w.key == key)
            assert {id(s) for s in self.sched.free_slots(key)} == {id(s) for s in self.free if s.key == key}
        assert all(s.queued for s in self.free) and all(w.waiting for w in self.waiting)


SchedulerMachine.TestCase.settings = settings(max_examples=300, stateful_step_count=60, deadline=None)
test_scheduler_state_machine = SchedulerMachine.TestCase
