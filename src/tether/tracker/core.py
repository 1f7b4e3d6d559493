"""The tracker's logic, without I/O: messages in, replies out through each connection's :class:`Link`.

The driver (:mod:`.server`) calls :meth:`TrackerCore.connect` when a peer connects,
:meth:`~TrackerCore.receive` for every decoded message, :meth:`~TrackerCore.disconnect` when the
connection ends, and :meth:`~TrackerCore.on_timer` at the time passed to its ``wakeup`` callback.
The clock is injected, so tests drive time by hand.

Replies follow TVM byte for byte for TVM's messages (``0``, ``-1``, ``[0, [host, port, matchkey]]``,
``[0, {"queue_info": ..., "server_info": ...}]``); see :mod:`tether.protocol.tracker` for tether's additions.

Bounds (:class:`~tether.tracker.config.TrackerConfig`; what one peer can make the tracker hold): a connection
that has not sent the magic within ``handshake_timeout_s`` is closed, and so is one that holds nothing (no
free slot, no grant it serves, no waiting request, no heartbeat promised; :meth:`TrackerCore.holds_something`)
and has been silent for ``idle_timeout_s``: both checked on whole seconds of the clock. Waiting requests are
bounded per connection, per user and per peer address (one more is rejected), free slots per connection (a
proxy's higher) and per address (one more PUT is answered -1), priorities by :func:`cap_priority`. The
driver asks :meth:`TrackerCore.shed_idle` for room when file descriptors run short.
"""

from __future__ import annotations

import difflib
import heapq
import ipaddress
import itertools
import json
import logging
import math
import secrets
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from heapq import heappop as _heappop
from heapq import heappush as _heappush
from typing import Any

from ..loglimit import PeerLogLimit
from ..protocol.auth import Keyring
from ..protocol.constants import TrackerCode
from ..protocol.framing import encode_frame
from ..protocol.keys import PROXY_PREFIX
from ..protocol.tracker import (
    Admin,
    Auth,
    Cancel,
    Control,
    GetPendingMatchkeys,
    Ping,
    Put,
    Request,
    SessionEvent,
    Stop,
    Summary,
    TrackerMessage,
    UpdateInfo,
    Withdraw,
    encode_value,
    labels_match,
)
from .access import Access
from .config import TrackerConfig
from .events import EventBus, server_id
from .health import Health
from .registry import Connection, Held, Link, parse_tether_info, waiter_wire
from .scheduler import PROTOCOL_TVM, Grant, Scheduler, Slot, Waiter

__all__ = ["KNOWN_PROTOCOLS", "TrackerCore", "cap_priority"]

logger = logging.getLogger("tether.tracker")

#: Protocols a REQUEST may ask for; anything else is rejected at once instead of waiting forever.
KNOWN_PROTOCOLS = frozenset({PROTOCOL_TVM, "tether"})

_dumps = json.JSONEncoder(ensure_ascii=False).encode
_OK = encode_value(TrackerCode.SUCCESS.value)
#: Messages that change nothing SUMMARY reports (besides a heartbeat's time, which moves anyway).
_READ_ONLY = frozenset({Ping, Summary, GetPendingMatchkeys, Auth, Control})
#: A grant not redeemed for this long is over (a server replaces an unredeemed matchkey after 5 s).
_PHANTOM_AFTER_S = 10.0
#: A canary not reported within this long is asked for again (a server runs one for at most 60 s).
_CANARY_ANSWER_S = 120.0
#: Messages that change which servers could serve a key (see ``_servers_by_key``).
_SERVER_SIDE = frozenset({Put, UpdateInfo, Withdraw, SessionEvent})


@dataclass(slots=True)
class _KeyServers:
    """Who could serve one key: each server's (or proxied slot's) protocols and labels; grants of it held
    through a proxy (terms unknown); the users holding its grants."""

    terms: list[tuple[frozenset[str], Mapping[str, str]]] = field(default_factory=list)
    unknown: int = 0
    holders: list[str] = field(default_factory=list)
    #: "id state" of its servers that are not granted (cordoned, draining, quarantined)
    withheld: list[str] = field(default_factory=list)


_FAIL = encode_value(TrackerCode.FAIL.value)
#: Handshake and idle checks run on whole seconds of the clock: at 10,000 connections, one timer a second
#: at most, not one per connection (a deadline is kept up to this late).
_IDLE_TICK_S = 1.0


def cap_priority(priority: float, user: str, max_priority: float, user_cap: float | None = None) -> float:
    """The priority a request of ``user`` gets: ``priority`` clamped to ``[-max_priority, max_priority]``,
    and to ``user_cap`` (an authenticated user's ``max_priority`` in the auth file) when there is one.
    The one place that decides it. A request asking for more than the cap waits at the cap, where users
    take turns (round robin), so it cannot starve the others there; levels below are served whenever
    nobody waits at the cap (1e300 used to outrank every request)."""
    del user  # the cap comes with the user's credential (user_cap), not its claimed name
    capped = max(-max_priority, min(priority, max_priority))
    return capped if user_cap is None else min(capped, user_cap)


def _version() -> str:
    from .. import __version__

    return __version__


class TrackerCore:
    """All of the tracker's state; single-threaded (call it from one event loop only)."""

    def __init__(
        self,
        config: TrackerConfig | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        wakeup: Callable[[float], None] | None = None,
        on_stop: Callable[[], None] | None = None,
        access: Access | None = None,
    ) -> None:
        self.config = config or TrackerConfig()
        #: Who may do what (:mod:`.access`); without a keyring, everyone everything.
        self.access = access or Access()
        #: What happens here, for the rooms beside the core (journal, web side, metrics, health): :mod:`.events`
        self.events = EventBus(wall)
        #: Each server's standing (:mod:`.health`): cordoned, draining and quarantined servers get no grants.
        self.health = Health(self.config.quarantine_after)
        #: server id -> orders for it (CONTROL): releases and canaries, taken by its next poll
        self._orders: dict[str, list[dict[str, Any]]] = {}
        #: server id -> (canary id, when asked) of a canary asked for and not yet reported
        self._canaries: dict[str, tuple[int, float]] = {}
        self._canary_ids = itertools.count(1)
        self._next_canary_round = 0.0
        self.stop_key = self.config.stop_key or "tracker:" + secrets.token_hex(16)
        self.scheduler = Scheduler()
        self.grants = 0
        self.clock = clock
        self._wall = wall
        self._wakeup = wakeup or (lambda when: None)
        self._on_stop = on_stop or (lambda: None)
        self._started = clock()
        self._next_cid = 0
        self._conns: dict[int, Connection] = {}
        #: every key SUMMARY lists -> when it last had a server, a grant or a waiter (clock)
        self._known_keys: dict[str, float] = {}
        #: their length in all (a peer can ask for keys of up to a frame's 1 MiB each, then leave)
        self._known_bytes = 0
        self._liveness: list[tuple[float, int]] = []
        #: (when, seq, waiter): requests to check for a server that could serve them (``unservable_after``)
        self._grace: list[tuple[float, int, Waiter]] = []
        self._grace_seq = itertools.count()
        self._grace_kept = 0  # entries after the last sweep
        #: Bumped by every message or event that may change what SUMMARY says (not by queries).
        self._epoch = 0
        #: (detail, key, epoch, when, text) of the last summary: served again while nothing changed and it is
        #: younger than ``config.summary_reuse_s`` (a burst of queries at 10,000 servers).
        self._last_summary: tuple[bool, str | None, int, float, str] | None = None
        #: Bumped by what changes who serves a key (PUT, UPDATE_INFO, WITHDRAW, SESSION, grants, departures)
        self._registry_epoch = 0
        self._index: tuple[int, dict[str, _KeyServers]] | None = None
        #: (when, cid): each open connection's next handshake/idle check (one entry per connection)
        self._idle: list[tuple[float, int]] = []
        #: user -> requests of that user waiting now (``max_waiters_per_user``)
        self._user_waiters: dict[str, int] = {}
        #: peer address -> its requests waiting now, and its free slots (``max_waiters_per_peer``, ``..._slots_...``)
        self._peer_waiters: dict[str, int] = {}
        self._peer_slots: dict[str, int] = {}
        #: one line per refusal (a request, a PUT, an idle close), a few per window in a flood
        self.refusal_log = PeerLogLimit(clock=clock, logger=logger, about="refusals")
        self._handlers: dict[type, Callable[[Connection, Any], None]] = {
            Ping: self._on_ping,
            Stop: self._on_stop_msg,
            Put: self._on_put,
            Request: self._on_request,
            UpdateInfo: self._on_update_info,
            Summary: self._on_summary,
            GetPendingMatchkeys: self._on_get_pending,
            Cancel: self._on_cancel,
            SessionEvent: self._on_session,
            Withdraw: self._on_withdraw,
            Auth: self.access.on_auth,
            Control: self._on_control,
            Admin: self._on_admin,
        }

    # -- driver interface ----------------------------------------------------------------------

    def connect(self, link: Link, host: str, port: int) -> Connection:
        """Register a new connection from ``host:port``, before its magic (see :meth:`greeted`)."""
        now = self.clock()
        self._next_cid += 1
        conn = Connection(self._next_cid, link, host, port, now, now, active=now)
        self.access.admit(conn)
        conn.refresh_wire()
        self._conns[conn.cid] = conn
        self._epoch += 1
        due = self._next_check(conn, now)
        if due is not None:
            self._schedule_check(conn, due)
        return conn

    def greeted(self, conn: Connection) -> None:
        """The connection sent the magic and got it back: its handshake deadline is over."""
        if not conn.greeted:
            conn.greeted = True
            conn.active = self.clock()

    def receive(self, conn: Connection, msg: TrackerMessage) -> None:
        """Apply one message. Raises :class:`RemoteProtocolError` when its content is unacceptable, and
        :class:`~tether.errors.AuthError` when the peer may not send it (the refusal is sent); the driver
        then closes the connection."""
        if conn.access is not None:
            self.access.check(conn, msg)
        conn.greeted = True
        conn.last_seen = conn.active = self.clock()
        if type(msg) not in _READ_ONLY:
            self._epoch += 1
            if type(msg) in _SERVER_SIDE:
                self._registry_epoch += 1
        self._handlers[type(msg)](conn, msg)

    def disconnect(self, conn: Connection, reason: str = "closed") -> None:
        """The connection is gone: its slots, grants and waiting requests leave at once. ``reason``:
        "closed", or "silent" (a server that stopped heartbeating: a failure of its health)."""
        if conn.closed:
            return
        conn.closed = True
        self._epoch += 1
        self._registry_epoch += 1
        self._conns.pop(conn.cid, None)
        keys = {conn.server_key, *(s.key for s in conn.slots.values()), *(h.key for h in conn.held.values())}
        keys.update(w.key for w in conn.waiters)
        for key in keys:
            if key is not None:
                self._note_key(key)  # active until now: its idle time starts here
        for slot in conn.slots.values():
            self.scheduler.remove_slot(slot)
        now = self.clock()
        for waiter in conn.waiters:
            self.scheduler.remove_waiter(waiter)
            self._count_waiter(waiter.user, conn.host, -1)
            self._request_ended(waiter, "closed", now)
        for held in list(conn.held.values()):
            self._end_held(conn, held, "server_lost" if held.state == "busy" else "never_started", reason, now)
        if conn.server_id is not None:
            self.events.emit("unregister", key=conn.server_key, server=conn.server_id, peer=conn.address, reason=reason)
            if reason == "silent":
                self._count_outcome(conn.server_id, "silent", "stopped heartbeating", conn.server_key)
        if conn.slots or conn.held or conn.info:
            logger.info(
                "connection %s (%s) closed: %d free slot(s) and %d grant(s) removed",
                conn.address,
                conn.info_key or "no info",
                len(conn.slots),
                len(conn.held),
            )
        if conn.waiters:
            logger.info("connection %s closed: %d waiting request(s) withdrawn", conn.address, len(conn.waiters))
        _count(self._peer_slots, conn.host, -len(conn.slots))
        conn.slots.clear()
        conn.held.clear()
        conn.waiters.clear()

    def on_timer(self) -> float | None:
        """Expire requests and silent servers due by now; return the next time to call, or None."""
        now = self.clock()
        self._epoch += 1
        for waiter in self.scheduler.expire(now):
            owner = waiter.owner
            assert isinstance(owner, Connection)
            self._unlist(owner, waiter, now)
            self._note_key(waiter.key)
            logger.info(
                "request %s for %r by %s timed out after %.3g s",
                waiter.request_id,
                waiter.key,
                waiter.user,
                now - waiter.since,
            )
            why = self._diagnose(waiter)[1]
            self._request_ended(waiter, "timeout", now)
            self._fail(
                owner,
                waiter,
                "timeout",
                f"no free server of key {waiter.key!r} within {now - waiter.since:.3g} s: {why}",
            )
        while self._grace and self._grace[0][0] <= now:
            _, _, waiter = _heappop(self._grace)
            if waiter.waiting:
                self._fail_if_unservable(waiter, now)
        heap = self._liveness
        while heap and heap[0][0] <= now:
            _, cid = _heappop(heap)
            conn = self._conns.get(cid)
            if conn is None or conn.silence_limit is None:
                continue
            silent = now - conn.last_seen
            if silent >= conn.silence_limit:
                logger.warning(
                    "server %s (%s) silent for %.1f s: removed from the pool", conn.address, conn.info_key, silent
                )
                conn.liveness_scheduled = False
                self.disconnect(conn, "silent")
                conn.link.close()
            else:
                _heappush(heap, (conn.last_seen + conn.silence_limit, cid))
        self._check_idle(now)
        self._ask_canaries(now)
        return self.next_deadline()

    def next_deadline(self) -> float | None:
        candidates = [self.scheduler.next_deadline()]
        candidates += [heap[0][0] for heap in (self._liveness, self._grace, self._idle) if heap]
        if self._canary_due():
            candidates.append(self._next_canary_round)
        return min((c for c in candidates if c is not None), default=None)

    # -- bounds: handshake and idle deadlines, shedding ----------------------------------------------

    @staticmethod
    def holds_something(conn: Connection) -> bool:
        """True for a connection the tracker must keep however quiet it is: it offers free slots, serves
        grants, has requests waiting, or promised heartbeats (its liveness check covers it)."""
        return bool(conn.slots or conn.held or conn.waiters) or conn.silence_limit is not None

    def _next_check(self, conn: Connection, now: float) -> float | None:
        """When ``conn`` is due to be closed as things stand (``now`` + the idle time while it holds
        something: looked at again then), or None when no deadline applies."""
        cfg = self.config
        if not conn.greeted and cfg.handshake_timeout_s > 0:
            return conn.opened + cfg.handshake_timeout_s
        if cfg.idle_timeout_s <= 0:
            return None
        if self.holds_something(conn):
            return now + cfg.idle_timeout_s
        return conn.active + cfg.idle_timeout_s

    def _schedule_check(self, conn: Connection, due: float) -> None:
        when = math.ceil(due / _IDLE_TICK_S) * _IDLE_TICK_S
        _heappush(self._idle, (when, conn.cid))
        self._wakeup(when)

    def _check_idle(self, now: float) -> None:
        heap = self._idle
        while heap and heap[0][0] <= now:
            _, cid = _heappop(heap)
            conn = self._conns.get(cid)
            if conn is None:
                continue
            due = self._next_check(conn, now)
            if due is None:
                continue
            if due > now:
                self._schedule_check(conn, due)
                continue
            if self.refusal_log.allow(conn.host):
                if conn.greeted:
                    logger.info("closing %s: idle for %.0f s, holding nothing", conn.address, now - conn.active)
                else:
                    logger.info("closing %s: no handshake within %.3g s", conn.address, now - conn.opened)
            self.disconnect(conn)
            conn.link.close()

    def shed_idle(self, count: int) -> int:
        """Close up to ``count`` connections that hold nothing (see :meth:`holds_something`), idle longest
        first (those that never finished the handshake among them): room for new peers when file
        descriptors run short. Returns how many were closed."""
        if count <= 0:
            return 0
        idle = (c for c in self._conns.values() if not self.holds_something(c))
        victims = heapq.nsmallest(count, idle, key=lambda c: c.active)
        now = self.clock()
        for conn in victims:
            self.disconnect(conn)
            conn.link.close()
        if victims and self.refusal_log.allow("(making room)"):
            oldest = now - victims[0].active
            logger.warning(
                "%d connection(s) holding nothing closed to make room for new peers (idle up to %.0f s)",
                len(victims),
                oldest,
            )
        return len(victims)

    def cap_priority(self, priority: float, user: str, user_cap: float | None = None) -> float:
        """The priority ``user``'s request gets (:func:`cap_priority` with ``config.max_priority``)."""
        return cap_priority(priority, user, self.config.max_priority, user_cap)

    @property
    def connections(self) -> list[Connection]:
        return list(self._conns.values())

    def reload_keyring(self, keyring: Keyring) -> int:
        """Apply a reloaded keyring: connections whose credential is gone or changed are closed.
        Returns how many."""
        gone = self.access.reload(keyring, self._conns.values())
        for conn in gone:
            logger.warning("closing %s: its token %r was revoked", conn.address, self.access.user_of(conn))
            self.disconnect(conn)
            conn.link.close()
        return len(gone)

    # -- handlers ------------------------------------------------------------------------------

    def _on_ping(self, conn: Connection, msg: Ping) -> None:
        if msg.hello:
            hello = {"tether": _version(), "auth": self.access.enabled, "features": ["admin", "control"]}
            conn.link.send(encode_value([TrackerCode.SUCCESS.value, hello]))
        else:
            conn.link.send(_OK)

    def _on_stop_msg(self, conn: Connection, msg: Stop) -> None:
        if msg.key != self.stop_key:
            logger.warning("STOP with a wrong key from %s", conn.address)
            conn.link.send(_FAIL)
            return
        logger.info("STOP from %s: shutting down", conn.address)
        conn.link.send(_OK)
        self._on_stop()

    def _on_put(self, conn: Connection, msg: Put) -> None:
        now = self.clock()
        old = conn.slots.get(msg.matchkey)
        host = msg.custom_addr if msg.custom_addr is not None else conn.host
        if old is not None:
            same_terms = msg.protocols in (None, old.protocols) and msg.labels in (None, old.labels)
            if old.key == msg.key and old.port == msg.port and old.host == host and same_terms:
                conn.link.send(_OK)  # the same slot offered again: counts once
                return
            self.scheduler.remove_slot(old)
            del conn.slots[msg.matchkey]
        else:
            reason = self._too_many_slots(conn)
            if reason:
                if self.refusal_log.allow(conn.host):
                    logger.warning("PUT of %r from %s refused: %s", msg.key, conn.address, reason)
                conn.link.send(_FAIL)
                return
            _count(self._peer_slots, conn.host, 1)
        if conn.single_session:
            for done in list(conn.held.values()):  # a plain TVM server offers itself again: its session is over
                self._end_held(conn, done, "ok", "", now)
        else:
            again = conn.held.get(msg.matchkey)
            if again is not None:
                self._end_held(conn, again, "never_started" if again.state == "granted" else "ok", "", now)
            self._forget_phantom_grants(conn, now, putting=1)
        self._note_key(msg.key)
        own = msg.protocols is not None or msg.labels is not None
        protocols = msg.protocols if msg.protocols is not None else conn.protocols
        labels = msg.labels if msg.labels is not None else conn.labels
        slot = Slot(msg.key, msg.matchkey, host, msg.port, conn, protocols, labels, own_terms=own)
        conn.slots[msg.matchkey] = slot
        sid = self._slot_server(conn, slot)
        if conn.server_id != sid and conn.server_key is not None:
            conn.server_id = sid
            self._emit_register(conn)
        if self.health.withheld(sid):
            slot.free_since = now  # offered now (the scheduler sets it for the slots it queues)
            conn.link.send(_OK)  # kept, not granted: cordoned, draining or quarantined
            return
        grant = self.scheduler.put(slot, now)
        if grant is not None:
            self._deliver(grant, now)
        conn.link.send(_OK)

    def _too_many_slots(self, conn: Connection) -> str | None:
        cfg = self.config
        proxy = conn.info_key.startswith(PROXY_PREFIX)
        limit = cfg.max_proxy_slots if proxy else cfg.max_slots_per_connection
        if limit and len(conn.slots) >= limit:
            flag = "--max-proxy-slots" if proxy else "--max-slots-per-connection"
            return f"it already offers {len(conn.slots)} free slots ({flag})"
        if cfg.max_slots_per_peer and self._peer_slots.get(conn.host, 0) >= cfg.max_slots_per_peer:
            return f"{conn.host} already offers {cfg.max_slots_per_peer} free slots (--max-slots-per-peer)"
        return None

    def _forget_phantom_grants(self, conn: Connection, now: float, putting: int = 0) -> None:
        """A tether server declares its slot count; when it offers one more free slot than that count leaves
        room for, a grant it was never asked to serve (unredeemed; its matchkey replaced) is over: forget
        the oldest such ``granted`` record, if it is older than a server waits for a client (a younger one
        may be a session about to start, its SESSION report behind this PUT). Sessions reported ``busy``
        are never dropped. (Servers that withdraw replaced matchkeys never get here; this covers others.)
        Checked at each PUT (``putting``: the slot being offered) and each poll of the pending matchkeys."""
        if conn.tether is None or conn.server_key is None:
            return  # TVM servers (handled by single_session) and proxies (no slot count)
        excess = len(conn.slots) + putting + len(conn.held) - conn.tether.slots
        stale = [m for m, h in conn.held.items() if h.state == "granted" and now - h.since > _PHANTOM_AFTER_S]
        for matchkey in stale[: max(0, excess)]:
            logger.debug("connection %s: grant of %s replaced by a new slot", conn.address, matchkey)
            self._end_held(conn, conn.held[matchkey], "never_started", "its matchkey was replaced", now)
            self._epoch += 1  # (also from a poll, which changes nothing else)
            self._registry_epoch += 1

    def _on_request(self, conn: Connection, msg: Request) -> None:
        now = self.clock()
        opts = msg.options
        verified = self.access.user_of(conn)
        user = verified or (opts.user if opts and opts.user else None) or msg.user or conn.host
        priority = self.cap_priority(msg.priority, user, self.access.priority_cap(conn))
        if priority != msg.priority and self.refusal_log.allow(conn.host):
            logger.info(
                "request for %r by %s from %s: priority %g capped to %g",
                msg.key,
                user,
                conn.address,
                msg.priority,
                priority,
            )
        waiter = Waiter(msg.key, user, priority, owner=conn)
        if opts is not None:
            waiter.protocol = opts.protocol
            waiter.labels = opts.labels
            waiter.request_id = opts.request_id
            if opts.timeout is not None:
                waiter.deadline = now + opts.timeout
            reason = self._reject_reason(conn, waiter)
            if reason:
                self._fail(conn, waiter, "rejected", reason)
                return
        self._note_key(msg.key)
        grant = self.scheduler.request(waiter, now)
        if grant is not None:
            self._deliver(grant, now)
        elif waiter.waiting:
            reason = self._too_many_waiters(conn, user)
            if reason:
                self.scheduler.remove_waiter(waiter)
                if self.refusal_log.allow(conn.host):
                    logger.warning("request for %r by %s from %s rejected: %s", msg.key, user, conn.address, reason)
                self._fail(conn, waiter, "rejected", reason)
                return
            conn.waiters[waiter] = waiter_wire(waiter)
            self._count_waiter(user, conn.host, 1)
            if self.events.active:
                self.events.emit(
                    "request", key=waiter.key, user=user, id=waiter.request_id, priority=priority, peer=conn.address
                )
            if waiter.deadline is not None:
                self._wakeup(waiter.deadline)
            if opts is not None and opts.unservable_after is not None:
                # servers re-register after a tracker restart: give them that long before judging
                when = max(now + opts.unservable_after, self._started + self.config.registration_grace_s)
                _heappush(self._grace, (when, next(self._grace_seq), waiter))
                self._wakeup(when)
                if len(self._grace) > 2 * self._grace_kept + 64:  # entries of requests long gone: drop them
                    self._grace = [e for e in self._grace if e[2].waiting]
                    heapq.heapify(self._grace)
                    self._grace_kept = len(self._grace)
        else:  # a zero timeout with nothing free
            self._fail(conn, waiter, "timeout", f"no free server of key {msg.key!r} (timeout 0)")

    def _too_many_waiters(self, conn: Connection, user: str) -> str | None:
        cfg = self.config
        if cfg.max_waiters_per_connection and len(conn.waiters) >= cfg.max_waiters_per_connection:
            return f"too many waiting requests on this connection (limit {cfg.max_waiters_per_connection})"
        if cfg.max_waiters_per_user and self._user_waiters.get(user, 0) >= cfg.max_waiters_per_user:
            return f"too many waiting requests of user {user!r} (limit {cfg.max_waiters_per_user})"
        if cfg.max_waiters_per_peer and self._peer_waiters.get(conn.host, 0) >= cfg.max_waiters_per_peer:
            return f"too many waiting requests from {conn.host} (limit {cfg.max_waiters_per_peer})"
        return None

    def _count_waiter(self, user: str, host: str, delta: int) -> None:
        _count(self._user_waiters, user, delta)
        _count(self._peer_waiters, host, delta)

    def _unlist(self, conn: Connection, waiter: Waiter, now: float) -> None:
        """``waiter`` no longer waits (granted, expired, judged, cancelled): off its connection's list,
        whose idle time starts now if that was all it held."""
        if conn.waiters.pop(waiter, None) is not None:
            self._count_waiter(waiter.user, conn.host, -1)
            conn.active = now

    def _fail_if_unservable(self, waiter: Waiter, now: float) -> None:
        unservable, why = self._diagnose(waiter)
        if not unservable:
            return
        owner = waiter.owner
        assert isinstance(owner, Connection)
        self.scheduler.remove_waiter(waiter)
        self._unlist(owner, waiter, now)
        self._note_key(waiter.key)
        logger.info("request %s for %r by %s: %s", waiter.request_id, waiter.key, waiter.user, why)
        self._request_ended(waiter, "unservable", now)
        self._fail(owner, waiter, "unservable", why)

    def _servers_by_key(self) -> dict[str, _KeyServers]:
        """Who could serve each key, in one pass over the connections, reused until a server-side change
        (a flood of requests for made-up keys costs no pass each)."""
        if self._index is not None and self._index[0] == self._registry_epoch:
            return self._index[1]
        index: dict[str, _KeyServers] = {}
        for conn in self._conns.values():
            if conn.server_key is not None:
                entry = index.setdefault(conn.server_key, _KeyServers())
                entry.terms.append((conn.protocols, conn.labels))
                if self.health.withheld(conn.server_id):
                    entry.withheld.append(f"{conn.server_id} {self.health.get(conn.server_id or '').state}")
            for slot in conn.slots.values():
                if slot.key != conn.server_key:  # a proxy's slot: its own terms
                    index.setdefault(slot.key, _KeyServers()).terms.append((slot.protocols, slot.labels))
            for held in conn.held.values():
                entry = index.setdefault(held.key, _KeyServers())
                entry.holders.append(held.user)
                if held.key != conn.server_key:  # handed out through a proxy: terms unknown, maybe a match
                    entry.unknown += 1
        self._index = (self._registry_epoch, index)
        return index

    def _did_you_mean(self, key: str, known: Iterable[str]) -> str:
        """`` (did you mean 'a', 'b'?)`` from the keys served now, or "" (and nothing when there are many:
        difflib is quadratic in the keys' length and linear in their number)."""
        near = [k for k in known if k != key and abs(len(k) - len(key)) <= 3]
        if not near or len(near) > 500:
            return ""
        found = difflib.get_close_matches(key, sorted(near), n=3)
        return f" (did you mean {', '.join(map(repr, found))}?)" if found else ""

    def _diagnose(self, waiter: Waiter) -> tuple[bool, str]:
        """(whether no registered server could ever serve ``waiter``, why it waits) in words a user can act
        on: no server of the key (and the keys it may have meant), none speaking its protocol, none with
        its labels, or every matching server busy (and who holds them)."""
        key = waiter.key
        index = self._servers_by_key()
        servers = index.get(key) or _KeyServers()
        terms, unknown = servers.terms, servers.unknown
        if not terms and not unknown:
            return True, f"no server is registered with key {key!r}" + self._did_you_mean(key, index)
        speaking = [t for t in terms if waiter.protocol in t[0]]
        if not speaking and not unknown:
            spoken = " or ".join(sorted({p for t in terms for p in t[0]}))
            why = f"{len(terms)} server(s) of key {key!r} speak only {spoken}, not {waiter.protocol}"
            if waiter.protocol == "tether" and spoken == PROTOCOL_TVM:
                why += ": use TVM's client (tvm.rpc.connect_tracker) for them, or run `tether server` there"
            return True, why
        fitting = [t for t in speaking if labels_match(t[1], waiter.labels)]
        if not fitting and not unknown:
            wanted = ",".join(f"{k}={v}" for k, v in sorted(waiter.labels.items()))
            theirs = sorted({",".join(f"{k}={v}" for k, v in sorted(t[1].items())) or "(none)" for t in speaking})
            return True, f"no server of key {key!r} has labels {wanted} (theirs: {'; '.join(theirs[:5])})"
        others = self.scheduler.counts(key)[1] - (1 if waiter.waiting else 0)
        why = f"its {len(fitting) + unknown} matching server(s) are busy"
        if servers.holders:
            why += f" (held by {', '.join(sorted(set(servers.holders))[:5])})"
        if servers.withheld:
            why += f"; {len(servers.withheld)} not granted: {', '.join(sorted(servers.withheld)[:5])}"
        return False, why + (f"; {others} other request(s) waiting" if others > 0 else "")

    def _reject_reason(self, conn: Connection, waiter: Waiter) -> str | None:
        if waiter.protocol not in KNOWN_PROTOCOLS:
            return f"unknown protocol {waiter.protocol!r}; this tracker knows {sorted(KNOWN_PROTOCOLS)}"
        if waiter.request_id is not None and any(w.request_id == waiter.request_id for w in conn.waiters):
            return f"request id {waiter.request_id!r} is already waiting on this connection"
        return None

    def _on_update_info(self, conn: Connection, msg: UpdateInfo) -> None:
        info = dict(msg.info)
        addr = info.get("addr")
        if isinstance(addr, list):
            addr = list(addr)
            if addr[0] is None:
                addr[0] = conn.host
            info["addr"] = addr
        tether = parse_tether_info(info["tether"]) if "tether" in info else conn.tether
        first = conn.info is None
        if conn.info is None:
            conn.info = info
        else:
            conn.info.update(info)
        changed = tether != conn.tether
        conn.tether = tether
        conn.refresh_wire()
        if conn.server_key is not None:
            self._note_key(conn.server_key)
        if first and conn.info_key.startswith("server"):
            logger.info("server registered from %s: %s at %s", conn.address, conn.info_key, conn.info.get("addr"))
        if changed and conn.server_id is not None:
            self._emit_register(conn)
        if tether is not None and tether.heartbeat_s is not None:
            if conn.silence_limit is None:
                conn.last_seen = self.clock()
            conn.silence_limit = min(tether.heartbeat_s * self.config.heartbeat_misses, self.config.max_silence_s)
            if not conn.liveness_scheduled:
                conn.liveness_scheduled = True
                when = conn.last_seen + conn.silence_limit
                _heappush(self._liveness, (when, conn.cid))
                self._wakeup(when)
        if changed and conn.slots:
            self._requeue(conn)
        conn.link.send(_OK)

    def _requeue(self, conn: Connection) -> None:
        """Protocols or labels changed: re-offer the connection's free slots with the new ones."""
        now = self.clock()
        for slot in list(conn.slots.values()):
            if slot.own_terms:
                continue
            queued = self.scheduler.remove_slot(slot)
            slot.protocols, slot.labels = conn.protocols, conn.labels
            if not queued:
                continue  # withheld (cordoned...): stays out
            grant = self.scheduler.put(slot, now)
            if grant is not None:
                self._deliver(grant, now)

    def _on_summary(self, conn: Connection, msg: Summary) -> None:
        conn.link.send(encode_frame(f"[0, {self.summary_json(msg.detail, msg.key)}]".encode()))

    def _on_get_pending(self, conn: Connection, msg: GetPendingMatchkeys) -> None:
        if conn.held:
            self._forget_phantom_grants(conn, self.clock())
        conn.link.send(encode_value(list(conn.slots)))

    def _on_cancel(self, conn: Connection, msg: Cancel) -> None:
        for waiter in conn.waiters:
            if waiter.request_id == msg.request_id:
                self.scheduler.remove_waiter(waiter)
                self._unlist(conn, waiter, conn.active)
                self._note_key(waiter.key)
                self._request_ended(waiter, "cancelled", conn.active)
                self._fail(conn, waiter, "cancelled", "cancelled by the client")
                conn.link.send(_OK)
                return
        conn.link.send(_FAIL)

    def _on_withdraw(self, conn: Connection, msg: Withdraw) -> None:
        slot = conn.slots.pop(msg.matchkey, None)
        held = conn.held.get(msg.matchkey)
        if held is not None:
            self._end_held(conn, held, "never_started", "withdrawn by its server", self.clock())
        if slot is not None:
            self.scheduler.remove_slot(slot)
            _count(self._peer_slots, conn.host, -1)
        conn.link.send(_OK if slot is not None or held is not None else _FAIL)

    def _on_session(self, conn: Connection, msg: SessionEvent) -> None:
        now = self.clock()
        if msg.event == "start":
            held = conn.held.get(msg.matchkey)
            if held is None:  # a direct connection, not granted by this tracker
                key = conn.server_key or "?"
                held = Held(key, msg.matchkey, "busy", "?", "?", now, server=conn.server_id)
                slot = conn.slots.pop(msg.matchkey, None)
                if slot is not None:
                    self.scheduler.remove_slot(slot)
                    _count(self._peer_slots, conn.host, -1)
                conn.remember(held, self.config.max_held_per_connection)
            held.state, held.since, held.peer = "busy", now, msg.peer
            if self.events.active:
                self.events.emit(
                    "session_start",
                    key=held.key,
                    server=held.server,
                    user=held.user,
                    matchkey=msg.matchkey,
                    peer=msg.peer,
                )
        else:
            held = conn.held.get(msg.matchkey)
            if held is not None:
                self._end_held(conn, held, msg.outcome or "ok", msg.detail or "", now)
        conn.link.send(_OK)

    # -- events and device health ------------------------------------------------------------------

    @staticmethod
    def _slot_server(conn: Connection, slot: Slot) -> str:
        """The id of the server behind ``slot``: its address; behind a proxy (whose slots all share the
        proxy's address) the key too."""
        sid = server_id(slot.host, slot.port)
        return sid if conn.server_key is not None or conn.tether is not None else f"{sid}/{slot.key}"

    def _emit_register(self, conn: Connection) -> None:
        if not self.events.active:
            return
        tether = conn.tether
        self.events.emit(
            "register",
            key=conn.server_key,
            server=conn.server_id,
            peer=conn.address,
            protocols=sorted(conn.protocols),
            labels=dict(conn.labels),
            device=dict(tether.device) if tether else {},
            slots=tether.slots if tether else 1,
            version=tether.version if tether else None,
        )

    def _request_ended(self, waiter: Waiter, outcome: str, now: float) -> None:
        if self.events.active:
            self.events.emit(
                "request_end",
                key=waiter.key,
                user=waiter.user,
                id=waiter.request_id,
                outcome=outcome,
                waited_s=round(now - waiter.since, 6),
            )

    def _end_held(self, conn: Connection, held: Held, outcome: str, detail: str, now: float) -> None:
        """A grant or session of ``conn`` is over: forget it, tell the listeners, count its outcome."""
        conn.held.pop(held.matchkey, None)
        self._epoch += 1
        self._registry_epoch += 1
        sid = held.server
        if self.events.active:
            self.events.emit(
                "session_end",
                key=held.key,
                server=sid,
                user=held.user,
                matchkey=held.matchkey,
                held_s=round(now - held.since, 6),
                outcome=outcome,
                detail=detail,
                started=held.state == "busy",
            )
        if sid is None:
            return
        self._count_outcome(sid, outcome, detail, held.key)
        standing = self.health.get(sid)
        if standing.state == "draining" and not any(
            h.server == sid for c in self._conns_of(sid) for h in c.held.values()
        ):
            self._set_standing(
                sid,
                "cordoned",
                f"drained ({standing.reason})" if standing.reason else "drained",
                standing.by or "tracker",
            )

    def _count_outcome(self, sid: str, outcome: str, detail: str, key: str | None) -> None:
        if self.health.outcome(sid, outcome, detail, self._wall()):
            standing = self.health.get(sid)
            logger.warning("server %s (%s) quarantined: %s", sid, key, standing.reason)
            self._withhold(sid)
            self.events.emit("health", key=key, server=sid, state=standing.state, reason=standing.reason, by="tracker")
            self._next_canary_round = min(self._next_canary_round, self.clock())
            self._wakeup(self.clock())

    def _conns_of(self, sid: str) -> list[Connection]:
        """The connections serving server ``sid``: its own, or a proxy's for a server behind it."""
        if "/" not in sid:
            return [c for c in self._conns.values() if c.server_id == sid]
        return [
            c
            for c in self._conns.values()
            if c.server_id is None
            and (
                any(self._slot_server(c, s) == sid for s in c.slots.values())
                or any(h.server == sid for h in c.held.values())
            )
        ]

    def _slots_of(self, sid: str) -> list[Slot]:
        return [s for c in self._conns_of(sid) for s in c.slots.values() if self._slot_server(c, s) == sid]

    def _withhold(self, sid: str) -> None:
        for slot in self._slots_of(sid):
            self.scheduler.remove_slot(slot)
        self._epoch += 1
        self._registry_epoch += 1

    def _release_withheld(self, sid: str) -> None:
        now = self.clock()
        for slot in self._slots_of(sid):
            if not slot.queued:
                grant = self.scheduler.put(slot, now)
                if grant is not None:
                    self._deliver(grant, now)
        self._epoch += 1
        self._registry_epoch += 1

    def _set_standing(self, sid: str, state: str, reason: str | None, by: str) -> bool:
        was_withheld = self.health.withheld(sid)
        if not self.health.set(sid, state, reason, by, self._wall()):
            return False
        now_withheld = self.health.withheld(sid)
        if now_withheld and not was_withheld:
            self._withhold(sid)
        elif was_withheld and not now_withheld:
            self._canaries.pop(sid, None)
            self._release_withheld(sid)
        key = next((c.server_key for c in self._conns_of(sid) if c.server_key), None)
        logger.warning(
            "server %s%s: %s by %s%s", sid, f" ({key})" if key else "", state, by, f": {reason}" if reason else ""
        )
        self.events.emit("health", key=key, server=sid, state=state, reason=reason, by=by)
        return True

    def standing(self, sid: str) -> dict[str, Any]:
        """Server ``sid``'s standing (:class:`~.health.Standing` as a dict), ``ok`` when nothing is known."""
        return self.health.get(sid).as_dict()

    def admin(self, op: str, sid: str, by: str, reason: str | None = None) -> dict[str, Any]:
        """Apply an admin's operation to server ``sid`` (idempotent); returns its standing and what
        changed. Raises :class:`KeyError` for a server the tracker does not know."""
        conns = self._conns_of(sid)
        if not conns and sid not in self.health.not_ok():
            known = sorted({c.server_id for c in self._conns.values() if c.server_id} | set(self.health.not_ok()))
            near = difflib.get_close_matches(sid, known, n=3)
            hint = f" (did you mean {', '.join(map(repr, near))}?)" if near else ""
            raise KeyError(f"no server {sid!r} is registered{hint}")
        self._epoch += 1
        result: dict[str, Any] = {"server": sid, "op": op, "changed": False}
        why = reason or f"{op} by {by}"
        if op == "cordon":
            result["changed"] = self._set_standing(sid, "cordoned", why, by)
        elif op == "drain":
            busy = any(h.server == sid for c in conns for h in c.held.values())
            result["changed"] = self._set_standing(sid, "draining" if busy else "cordoned", why, by)
        elif op == "uncordon":
            result["changed"] = self._set_standing(sid, "ok", None, by)
        elif op == "release":
            released = []
            now = self.clock()
            for conn in conns:
                for held in list(conn.held.values()):
                    if held.server == sid:
                        released.append(held.matchkey)
                        if conn.tether is not None:
                            self._orders.setdefault(sid, []).append({"op": "release", "matchkey": held.matchkey})
                        self._end_held(conn, held, "released", why, now)
            result["released"] = len(released)
            result["changed"] = bool(released)
        elif op == "check":
            result["canary"] = self._ask_canary(sid, self.clock())
            result["changed"] = result["canary"] is not None
        result["standing"] = self.standing(sid)
        return result

    def _canary_due(self) -> bool:
        return self.config.canary_interval_s > 0 and any(
            st.state == "quarantined" for st in self.health.not_ok().values()
        )

    def _ask_canaries(self, now: float) -> None:
        """Every ``canary_interval_s``: ask each quarantined tether server (not yet asked) for a canary."""
        if now < self._next_canary_round or not self._canary_due():
            return
        self._next_canary_round = now + self.config.canary_interval_s
        for sid, standing in self.health.not_ok().items():
            if standing.state == "quarantined":
                asked = self._canaries.get(sid)
                if asked is None or now - asked[1] > max(self.config.canary_interval_s, _CANARY_ANSWER_S):
                    self._ask_canary(sid, now)

    def _ask_canary(self, sid: str, now: float) -> int | None:
        """Order a canary of tether server ``sid``; its id, or None when it cannot run one (a TVM server,
        a server behind a proxy, not connected)."""
        conn = next((c for c in self._conns.values() if c.server_id == sid and c.tether is not None), None)
        if conn is None:
            return None
        cid = next(self._canary_ids)
        self._canaries[sid] = (cid, now)
        orders = self._orders.setdefault(sid, [])
        orders[:] = [o for o in orders if o["op"] != "canary"]
        orders.append({"op": "canary", "id": cid})
        return cid

    def _on_control(self, conn: Connection, msg: Control) -> None:
        body = msg.body
        sid = conn.server_id
        if body.get("poll"):
            orders = self._orders.pop(sid, []) if sid is not None else []
            conn.link.send(encode_value([TrackerCode.SUCCESS.value, orders]))
            return
        canary = body.get("canary")
        asked = self._canaries.get(sid) if sid is not None else None
        if sid is None or asked is None or canary != asked[0]:
            conn.link.send(_FAIL)  # not asked for (or asked again since): ignored
            return
        del self._canaries[sid]
        detail = str(body.get("detail") or "")[:500]
        self._epoch += 1
        if body.get("ok") is True:
            logger.info("server %s passed its canary: %s", sid, detail)
            self._set_standing(sid, "ok", None, "canary")
        else:
            standing = self.health.get(sid)
            standing.recent.append({"wall": self._wall(), "outcome": "canary", "detail": detail})
            standing.reason = f"canary failed: {detail}" if detail else "canary failed"
            logger.warning("server %s failed its canary: %s", sid, detail)
            self.events.emit(
                "health", key=conn.server_key, server=sid, state=standing.state, reason=standing.reason, by="canary"
            )
        conn.link.send(_OK)

    def _on_admin(self, conn: Connection, msg: Admin) -> None:
        if not self.access.enabled and not _loopback(conn.host):
            message = "admin commands need authentication on this tracker (--auth-file), or a peer on its host"
            if self.refusal_log.allow(conn.host):
                logger.warning("ADMIN %s from %s refused: %s", msg.op, conn.address, message)
            conn.link.send(encode_value([TrackerCode.FAIL.value, {"error": "forbidden", "message": message}]))
            return
        by = self.access.user_of(conn) or conn.address
        try:
            result = self.admin(msg.op, msg.server, by, msg.reason)
        except KeyError as exc:
            conn.link.send(encode_value([TrackerCode.FAIL.value, {"error": "unknown_server", "message": exc.args[0]}]))
            return
        logger.info("ADMIN %s %s by %s: %s", msg.op, msg.server, by, "done" if result["changed"] else "no change")
        conn.link.send(encode_value([TrackerCode.SUCCESS.value, result]))

    # -- helpers -------------------------------------------------------------------------------

    def _deliver(self, grant: Grant, now: float) -> None:
        waiter, slot = grant.waiter, grant.slot
        self._registry_epoch += 1
        self._note_key(waiter.key)
        requester, server = waiter.owner, slot.owner
        assert isinstance(requester, Connection) and isinstance(server, Connection)
        self._unlist(requester, waiter, now)
        if server.slots.pop(slot.matchkey, None) is not None:
            _count(self._peer_slots, server.host, -1)
        sid = self._slot_server(server, slot)
        waited = now - waiter.since
        held = Held(slot.key, slot.matchkey, "granted", waiter.user, requester.address, now)
        held.request_id, held.waited_s, held.server = waiter.request_id, waited, sid
        server.remember(held, self.config.max_held_per_connection)
        self.grants += 1
        if self.events.active:
            self.events.emit(
                "grant",
                key=slot.key,
                server=sid,
                user=waiter.user,
                id=waiter.request_id,
                matchkey=slot.matchkey,
                waited_s=round(waited, 6),
                priority=waiter.priority,
            )
        target = [slot.host, slot.port, slot.matchkey]
        if waiter.request_id is None and waiter.protocol == PROTOCOL_TVM and not waiter.labels:
            reply: list[Any] = [0, target]  # exactly TVM's reply
        else:
            reply = [0, target, {"id": waiter.request_id, "server": self._server_facts(server, slot)}]
        requester.link.send(encode_value(reply))
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug("granted %s to %s (%s)", slot.matchkey, waiter.user, requester.address)

    def _fail(self, conn: Connection, waiter: Waiter, error: str, message: str) -> None:
        conn.link.send(
            encode_value([TrackerCode.FAIL.value, {"id": waiter.request_id, "error": error, "message": message}])
        )

    def _note_key(self, key: str) -> None:
        """``key`` is active now (a server, a grant, a waiter): SUMMARY lists it for ``idle_key_s`` more."""
        known = self._known_keys
        fresh = key not in known
        known[key] = self.clock()
        if fresh:
            self._known_bytes += len(key)
            if len(known) > self.config.max_idle_keys or self._known_bytes > self.config.max_idle_key_bytes:
                self._forget_idle_keys()

    def _registered_keys(self) -> set[str]:
        """Keys some connection serves now: registered as ``server:K``, or holding a grant of it."""
        keys: set[str] = set()
        for conn in self._conns.values():
            if conn.server_key is not None:
                keys.add(conn.server_key)
            if conn.held:
                keys.update(h.key for h in conn.held.values())
        return keys

    def _listed_queues(self) -> dict[str, dict[str, int]]:
        """SUMMARY's ``queue_info``: every known key but those idle (no server, grant or waiter) for longer
        than ``idle_key_s``, which are forgotten (TVM's tracker lists a misspelt key forever)."""
        now, idle_s = self.clock(), self.config.idle_key_s
        registered = self._registered_keys()
        queue_info = {}
        for key, last in list(self._known_keys.items()):
            free, pending = self.scheduler.counts(key)
            if free or pending or key in registered:
                self._known_keys[key] = now
            elif now - last > idle_s:
                self._forget_key(key)
                continue
            queue_info[key] = {"free": free, "pending": pending}
        return queue_info

    def _forget_idle_keys(self) -> None:
        active = self._registered_keys()
        active.update(k for k in self._known_keys if any(self.scheduler.counts(k)))
        target = self.config.max_idle_keys * 3 // 4
        byte_target = self.config.max_idle_key_bytes * 3 // 4
        for key in list(self._known_keys):
            if len(self._known_keys) <= target and self._known_bytes <= byte_target:
                break
            if key not in active:
                self._forget_key(key)

    def _forget_key(self, key: str) -> None:
        del self._known_keys[key]
        self._known_bytes -= len(key)

    @staticmethod
    def _server_facts(conn: Connection, slot: Slot | None = None) -> dict[str, Any]:
        facts: dict[str, Any] = {"key": conn.info_key, "addr": conn.info.get("addr") if conn.info else None}
        if conn.tether is not None:
            facts["protocols"] = sorted(conn.tether.protocols)
            facts["labels"] = dict(conn.tether.labels)
            facts["device"] = dict(conn.tether.device)
        if slot is not None and slot.own_terms:  # a server behind a proxy: what its PUT said
            facts["protocols"] = sorted(slot.protocols)
            facts["labels"] = dict(slot.labels)
        return facts

    # -- summary -------------------------------------------------------------------------------

    def summary(self, detail: bool = False) -> dict[str, Any]:
        """TVM's SUMMARY dict; with ``detail``, a ``"tether"`` entry with the whole truth."""
        value: dict[str, Any] = json.loads(self.summary_json(detail))
        return value

    def summary_json(self, detail: bool = False, key: str | None = None) -> str:
        """:meth:`summary` as JSON text, assembled from pieces each connection encoded when it last changed
        (:meth:`Connection.refresh_wire`, :func:`waiter_wire`): only what moves with time is encoded
        here, so a summary of 10,000 servers and 10,000 waiters costs string joins, not a 10 MB encode.
        While nothing changed, the last one is served again for ``config.summary_reuse_s`` seconds.
        ``key`` (with ``detail``): that key's queue, waiters and servers only."""
        now = self.clock()
        last = self._last_summary
        asked = (detail, key if detail else None, self._epoch)
        if last is not None and last[:3] == asked and now - last[3] < self.config.summary_reuse_s:
            return last[4]
        queue_info = self._listed_queues()
        conns: Iterable[Connection] = self._conns.values()
        only = asked[1]
        if only is not None:
            queue_info = {k: v for k, v in queue_info.items() if k == only}
            conns = [c for c in conns if c.server_key == only or _offers(c, only)]
        infos = ", ".join(c.wire_info for c in conns if c.wire_info and c.info_key.startswith("server"))
        text = f'{{"queue_info": {_dumps(queue_info)}, "server_info": [{infos}]'
        if detail:
            text += f', "tether": {self._detail_json(queue_info, conns)}'
        text += "}"
        self._last_summary = (*asked, now, text)
        return text

    def _detail_json(self, queue_info: dict[str, dict[str, int]], conns: Iterable[Connection]) -> str:
        now = self.clock()
        totals = dict.fromkeys(queue_info, 0)
        busy = dict.fromkeys(queue_info, 0)
        key_json: dict[str, str] = {}  # each key's JSON string, encoded once per summary

        def quoted(key: str) -> str:
            text = key_json.get(key)
            if text is None:
                text = key_json[key] = _dumps(key)
            return text

        servers = []
        withheld = self.health.not_ok()
        for conn in conns:
            if not (conn.slots or conn.held or conn.info_key.startswith("server")):
                continue
            per_key: dict[str, int] = {}
            slots = []
            for slot in conn.slots.values():
                per_key[slot.key] = per_key.get(slot.key, 0) + 1
                state = "free" if slot.queued else self.health.get(self._slot_server(conn, slot)).state
                slots.append(
                    f'{{"key": {quoted(slot.key)}, "state": "{state}", "since_s": {now - slot.free_since:.3f}}}'
                )
            for held in conn.held.values():
                per_key[held.key] = per_key.get(held.key, 0) + 1
                if held.key in busy:
                    busy[held.key] += 1
                held_row = {
                    "key": held.key,
                    "state": held.state,
                    "user": held.user,
                    "requester": held.requester,
                    "peer": held.peer,
                    "since_s": round(now - held.since, 3),
                }
                slots.append(_dumps(held_row))
            own = conn.server_key
            if own is not None and own not in per_key:
                per_key[own] = 1  # registered, between sessions: still one of the key's servers
            for key, n in per_key.items():
                if key in totals:
                    totals[key] += n
            seen = f', "last_seen_s": {now - conn.last_seen:.3f}' if conn.tether is not None else ""
            if conn.server_id is not None:
                seen += f', "server": {_dumps(conn.server_id)}'
                if conn.server_id in withheld:
                    seen += f', "health": {_dumps(withheld[conn.server_id].as_dict())}'
            servers.append(
                f'{conn.wire_entry}, "connected_s": {now - conn.opened:.3f}{seen}, "slots": [{", ".join(slots)}]}}'
            )
        keys = []
        for key, counts in queue_info.items():
            waiters = ", ".join(
                f'{_waiter_head(w)}, "waited_s": {now - w.since:.3f}}}' for w in self.scheduler.waiters(key)
            )
            row = (
                f'"total": {totals[key]}, "free": {counts["free"]}, "busy": {busy[key]}, "pending": {counts["pending"]}'
            )
            keys.append(f'{quoted(key)}: {{{row}, "waiters": [{waiters}]}}')
        head = {
            "version": _version(),
            "time": self._wall(),
            "uptime_s": round(now - self._started, 3),
            "grants": self.grants,
            "connections": len(self._conns),
        }
        return f'{_dumps(head)[:-1]}, "keys": {{{", ".join(keys)}}}, "servers": [{", ".join(servers)}]}}'


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.split("%", 1)[0]).is_loopback
    except ValueError:
        return False


def _count(counts: dict[str, int], name: str, delta: int) -> None:
    """Add ``delta`` to ``counts[name]``; a count of 0 leaves the dict (memory only for what is held)."""
    n = counts.get(name, 0) + delta
    if n > 0:
        counts[name] = n
    else:
        counts.pop(name, None)


def _offers(conn: Connection, key: str) -> bool:
    """True when ``conn`` (a proxy, say) has a free or handed-out slot of ``key``."""
    return any(s.key == key for s in conn.slots.values()) or any(h.key == key for h in conn.held.values())


def _waiter_head(waiter: Waiter) -> str:
    owner = waiter.owner
    head = owner.waiters.get(waiter) if isinstance(owner, Connection) else None
    return head or waiter_wire(waiter)
