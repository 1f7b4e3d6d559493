"""Per-key queues of free slots and waiting requests. Pure: no I/O, and no clock read (callers pass ``now``).

A *slot* is one free place on a server (a PUT); a *waiter* is one REQUEST. The rules, checked by
``tests/test_scheduler.py``'s state machine:

1. A slot is free in its key's queue at most once, and leaves it exactly once: handed to one waiter
   (returned in a :class:`Grant`) or removed by its owner. No slot is handed out twice.
2. After every public call no free slot matches a waiting request of its key: grants happen at once.
3. A slot goes to the best matching waiter: highest priority first; at equal priority users take turns
   (round robin: a user just served moves behind every other waiting user of that priority); each
   user's requests in arrival order.
4. A request takes the matching free slot that has been free longest.
5. A waiter matches a slot when the slot serves the waiter's protocol and carries every label the
   waiter asks for, with the same value (or any value, where the waiter asks for ``"*"``).
6. A waiter leaves exactly once: granted, removed (cancel, disconnect) or expired at its deadline.

Costs: a grant is O(1) when the first waiting user's first request matches (the common case); the
worst case walks the waiters of the key. Memory is proportional to free slots plus waiters: nothing is
kept per grant.
"""

from __future__ import annotations

import bisect
import heapq
import itertools
from collections import deque
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Final, NamedTuple

from ..protocol.tracker import labels_match

__all__ = ["PROTOCOL_TVM", "Grant", "Scheduler", "Slot", "Waiter"]

#: The protocol every TVM server serves and every plain TVM REQUEST asks for.
PROTOCOL_TVM: Final = "tvm"
_TVM_ONLY: Final = frozenset({PROTOCOL_TVM})
_NO_LABELS: Final[frozenset[tuple[str, str]]] = frozenset()


@dataclass(eq=False, slots=True)
class Slot:
    """One free place on a server. ``owner`` is opaque here (the registry's connection)."""

    key: str
    matchkey: str
    host: str
    port: int
    owner: object = None
    protocols: frozenset[str] = _TVM_ONLY
    labels: Mapping[str, str] = field(default_factory=dict)
    free_since: float = 0.0
    own_terms: bool = False  # protocols/labels came with the PUT, not from the connection's info
    seq: int = 0  # set by the scheduler: order of arrival, oldest first
    queued: bool = False
    # (protocols, labels) as the scheduler grouped the slot when it was queued
    group: tuple[frozenset[str], frozenset[tuple[str, str]]] | None = None


@dataclass(eq=False, slots=True)
class Waiter:
    """One waiting request. ``deadline`` is absolute, on the caller's clock; None waits forever."""

    key: str
    user: str
    priority: float = 1
    protocol: str = PROTOCOL_TVM
    labels: Mapping[str, str] = field(default_factory=dict)
    deadline: float | None = None
    owner: object = None
    request_id: str | None = None
    since: float = 0.0
    seq: int = 0
    waiting: bool = False


class Grant(NamedTuple):
    """A slot handed to a waiter; both have left the queue."""

    waiter: Waiter
    slot: Slot


def _matches(protocols: frozenset[str], labels: Mapping[str, str], waiter: Waiter) -> bool:
    if waiter.protocol not in protocols:
        return False
    return labels_match(labels, waiter.labels)


class _Level:
    """Waiters of one priority: users in turn order, each with its requests in arrival order."""

    __slots__ = ("users",)

    def __init__(self) -> None:
        self.users: dict[str, deque[Waiter]] = {}


class _KeyQueue:
    __slots__ = ("free", "levels", "nfree", "npending", "priorities")

    def __init__(self) -> None:
        # free slots grouped by (protocols, labels); each group in arrival order
        self.free: dict[tuple[frozenset[str], frozenset[tuple[str, str]]], dict[Slot, None]] = {}
        self.levels: dict[float, _Level] = {}
        self.priorities: list[float] = []  # negated, ascending: best priority first
        self.nfree = 0
        self.npending = 0

    def empty(self) -> bool:
        return not self.nfree and not self.npending


class Scheduler:
    """All keys' queues. Every method returns the grants it caused; the caller delivers them."""

    def __init__(self) -> None:
        self._queues: dict[str, _KeyQueue] = {}
        self._seq = itertools.count(1)
        self._deadlines: list[tuple[float, int, Waiter]] = []
        self._stale_deadlines = 0

    # -- slots ---------------------------------------------------------------------------------

    def put(self, slot: Slot, now: float) -> Grant | None:
        """Offer ``slot``; hand it at once to the best matching waiter, if any."""
        if slot.queued:
            raise ValueError(f"slot {slot.matchkey!r} is already free in the queue")
        queue = self._queues.get(slot.key)
        if queue is None:
            queue = self._queues[slot.key] = _KeyQueue()
        slot.seq = next(self._seq)
        slot.free_since = now
        if queue.npending:
            waiter = self._best_waiter(queue, slot)
            if waiter is not None:
                self._drop_if_empty(slot.key, queue)
                return Grant(waiter, slot)
        sig = slot.group = (slot.protocols, frozenset(slot.labels.items()) if slot.labels else _NO_LABELS)
        group = queue.free.get(sig)
        if group is None:
            group = queue.free[sig] = {}
        group[slot] = None
        slot.queued = True
        queue.nfree += 1
        return None

    def remove_slot(self, slot: Slot) -> bool:
        """Withdraw a free slot; False when it is not free (already granted or removed)."""
        if not slot.queued:
            return False
        queue = self._queues[slot.key]
        sig = slot.group
        assert sig is not None
        group = queue.free[sig]
        del group[slot]
        if not group:
            del queue.free[sig]
        slot.queued = False
        queue.nfree -= 1
        self._drop_if_empty(slot.key, queue)
        return True

    # -- waiters -------------------------------------------------------------------------------

    def request(self, waiter: Waiter, now: float) -> Grant | None:
        """Queue ``waiter``, or grant it the matching slot that has been free longest."""
        if waiter.waiting:
            raise ValueError("waiter is already queued")
        waiter.seq = next(self._seq)
        waiter.since = now
        queue = self._queues.get(waiter.key)
        if queue is not None and queue.nfree:
            slot = self._oldest_slot(queue, waiter)
            if slot is not None:
                self.remove_slot(slot)
                return Grant(waiter, slot)
        if waiter.deadline is not None and waiter.deadline <= now:
            return None  # zero timeout and nothing free: expired before queueing
        if queue is None:
            queue = self._queues[waiter.key] = _KeyQueue()
        level = queue.levels.get(waiter.priority)
        if level is None:
            level = queue.levels[waiter.priority] = _Level()
            bisect.insort(queue.priorities, -waiter.priority)
        users = level.users
        if waiter.user in users:
            users[waiter.user].append(waiter)
        else:
            users[waiter.user] = deque((waiter,))
        queue.npending += 1
        waiter.waiting = True
        if waiter.deadline is not None:
            heapq.heappush(self._deadlines, (waiter.deadline, waiter.seq, waiter))
        return None

    def remove_waiter(self, waiter: Waiter) -> bool:
        """Withdraw a waiting request (cancel, disconnect); False when it is not waiting."""
        if not waiter.waiting:
            return False
        self._remove(waiter)
        if waiter.deadline is not None:
            self._note_stale()
        return True

    def expire(self, now: float) -> list[Waiter]:
        """Remove and return the waiters whose deadline is ``<= now``."""
        out: list[Waiter] = []
        heap = self._deadlines
        while heap and heap[0][0] <= now:
            _, _, waiter = heapq.heappop(heap)
            if waiter.waiting:
                self._remove(waiter)
                out.append(waiter)
            else:
                self._stale_deadlines -= 1  # it was counted stale when its waiter left
        return out

    def next_deadline(self) -> float | None:
        """The earliest deadline of a waiting request, or None."""
        heap = self._deadlines
        while heap and not heap[0][2].waiting:
            heapq.heappop(heap)
            self._stale_deadlines -= 1
        return heap[0][0] if heap else None

    # -- views ---------------------------------------------------------------------------------

    def keys(self) -> list[str]:
        return list(self._queues)

    def counts(self, key: str) -> tuple[int, int]:
        """(free slots, waiting requests) of ``key``."""
        queue = self._queues.get(key)
        return (queue.nfree, queue.npending) if queue is not None else (0, 0)

    def waiters(self, key: str) -> Iterator[Waiter]:
        """Waiting requests of ``key`` in the order they would be served if every slot matched."""
        queue = self._queues.get(key)
        if queue is None:
            return
        for negp in queue.priorities:
            level = queue.levels[-negp]
            turns = [deque(reqs) for reqs in level.users.values()]
            while turns:
                nxt = []
                for reqs in turns:
                    yield reqs.popleft()
                    if reqs:
                        nxt.append(reqs)
                turns = nxt

    def free_slots(self, key: str) -> Iterator[Slot]:
        queue = self._queues.get(key)
        if queue is None:
            return
        for group in queue.free.values():
            yield from group

    # -- internals -----------------------------------------------------------------------------

    def _oldest_slot(self, queue: _KeyQueue, waiter: Waiter) -> Slot | None:
        best: Slot | None = None
        for (protocols, _), group in queue.free.items():
            first = next(iter(group))
            if (best is None or first.seq < best.seq) and _matches(protocols, first.labels, waiter):
                best = first
        return best

    def _remove(self, waiter: Waiter) -> None:
        queue = self._queues[waiter.key]
        level = queue.levels[waiter.priority]
        requests = level.users[waiter.user]
        requests.remove(waiter)
        self._unqueue(queue, level, waiter, requests, rotate=False)

    def _best_waiter(self, queue: _KeyQueue, slot: Slot) -> Waiter | None:
        protocols, labels = slot.protocols, slot.labels
        for negp in queue.priorities:
            level = queue.levels[-negp]
            for requests in level.users.values():
                for waiter in requests:
                    if _matches(protocols, labels, waiter):
                        if requests[0] is waiter:
                            requests.popleft()
                        else:
                            requests.remove(waiter)
                        self._unqueue(queue, level, waiter, requests, rotate=True)
                        if waiter.deadline is not None:
                            self._note_stale()
                        return waiter
        return None

    def _unqueue(self, queue: _KeyQueue, level: _Level, waiter: Waiter, requests: deque[Waiter], rotate: bool) -> None:
        waiter.waiting = False
        queue.npending -= 1
        users = level.users
        if not requests:
            del users[waiter.user]
            if not users:
                del queue.levels[waiter.priority]
                queue.priorities.remove(-waiter.priority)
        elif rotate:
            del users[waiter.user]  # served: to the back of the turn order
            users[waiter.user] = requests
        self._drop_if_empty(waiter.key, queue)

    def _drop_if_empty(self, key: str, queue: _KeyQueue) -> None:
        if queue.empty():
            self._queues.pop(key, None)

    def _note_stale(self) -> None:
        # A waiter left before its deadline: its heap entry is dead weight. Rebuild when the dead
        # outnumber the live, so memory stays proportional to waiters, not to grants.
        self._stale_deadlines += 1
        if self._stale_deadlines > 64 and self._stale_deadlines * 2 > len(self._deadlines):
            self._deadlines = [e for e in self._deadlines if e[2].waiting]
            heapq.heapify(self._deadlines)
            self._stale_deadlines = 0
