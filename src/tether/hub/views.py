"""What the JSON API shows, read from the tracker's core: servers, queues, sessions, health, summary.

Pure: no I/O. Call only from the tracker's event loop (the core is single-threaded). Times in the rows
are wall-clock seconds since the epoch (``since``) or durations in seconds (``*_s``); each answer carries
the tracker's ``time`` so a reader on another clock can compute ages.

Costs: a page of servers is one pass over the connections to filter and sort (cheap attribute reads and
a tuple per server: a few milliseconds at 5,000 servers), then rows built for the page only. Matchkeys
never leave this module: whoever knows one can take a granted server's session.

A server is a tracker connection registered as ``server:K`` or offering or serving slots (a proxy's
connection is one row for every server parked at it, its key ``proxy[k1,k2]``). Its ``state``:

==============  ===========================================================================
``free``        nothing handed out, a free slot offered
``granted``     handed to a client that has not connected yet
``busy``        a session running (with ``--slots N``: at least one; ``slots`` tells how many)
``unavailable`` registered, no free slot and nothing handed out (between sessions)
``cordoned``,   the device's standing when it is not "ok" (``core.standing``, device health):
``draining``,   it wins over the states above, whose holder and sessions are still shown
``quarantined``
==============  ===========================================================================
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from .. import __version__
from ..protocol.keys import PROXY_PREFIX, SERVER_PREFIX, proxied_keys
from ..protocol.tracker import labels_match
from ..tracker.core import TrackerCore
from ..tracker.events import server_id
from ..tracker.registry import Connection, Held
from ..tracker.scheduler import Waiter

__all__ = [
    "HEALTH_STATES",
    "SERVER_STATES",
    "BadParam",
    "Clocks",
    "Filters",
    "HealthView",
    "Paging",
    "ServerOrder",
    "health",
    "parse_filters",
    "parse_limit",
    "parse_paging",
    "queues",
    "server_id_of",
    "servers",
    "sessions",
    "summary",
]

#: A server's standing (device health); "ok" when the core keeps none.
HEALTH_STATES: Final = ("ok", "cordoned", "draining", "quarantined")
SERVER_STATES: Final = ("free", "granted", "busy", "unavailable", *HEALTH_STATES[1:])
#: Waiters listed per key in ``/api/v1/queues`` (all are counted).
MAX_WAITERS_LISTED: Final = 200
#: Longest filter value accepted, in characters (keys and labels are bounded by the tracker's frames).
MAX_PARAM_CHARS: Final = 1024

Standing = Callable[[str], Mapping[str, Any]]
Params = Iterable[tuple[str, str]]


class BadParam(ValueError):
    """A query parameter the API cannot use: answered 400 with this message."""


@dataclass(frozen=True, slots=True)
class Clocks:
    """The tracker's monotonic ``now`` and the wall time at that instant: turns the core's monotonic times
    into wall times (``wall - (now - t)``)."""

    now: float
    wall: float

    def to_wall(self, t: float) -> float:
        return round(self.wall - (self.now - t), 3)

    def age(self, t: float) -> float:
        return round(max(0.0, self.now - t), 3)


@dataclass(frozen=True, slots=True)
class Filters:
    """Server-side filters: ``key``, ``label=name=value`` (each must match), ``user`` (a holder or waiter),
    ``state`` (a server's state)."""

    key: str | None = None
    labels: tuple[tuple[str, str], ...] = ()
    user: str | None = None
    state: str | None = None


@dataclass(frozen=True, slots=True)
class Paging:
    offset: int = 0
    limit: int = 100


def _int(name: str, text: str, low: int, high: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise BadParam(f"{name} must be an integer, not {text[:40]!r}") from None
    if not low <= value <= high:
        raise BadParam(f"{name} must be in {low}..{high}, not {value}")
    return value


def parse_filters(params: Params, allowed: Sequence[str], *, extra: Sequence[str] = ()) -> Filters:
    """The filters of a request's query (name, value pairs). :class:`BadParam` for a parameter not in
    ``allowed`` + ``extra`` (a misspelt filter would otherwise show everything), one given twice (but
    ``label``), a label without ``=``, an unknown ``state``, a value over :data:`MAX_PARAM_CHARS`."""
    found: dict[str, str] = {}
    labels: list[tuple[str, str]] = []
    for name, value in params:
        if name not in allowed and name not in extra:
            raise BadParam(f"unknown parameter {name[:40]!r}; this endpoint takes {', '.join([*allowed, *extra])}")
        if len(value) > MAX_PARAM_CHARS:
            raise BadParam(f"{name} is longer than {MAX_PARAM_CHARS} characters")
        if name == "label":
            label, sep, wanted = value.partition("=")
            if not sep or not label:
                raise BadParam(f"label must be name=value, not {value[:40]!r}")
            labels.append((label, wanted))
            continue
        if name in found:
            raise BadParam(f"{name} given twice")
        found[name] = value
    state = found.get("state") or None
    if state is not None and state not in SERVER_STATES:
        raise BadParam(f"state must be one of {', '.join(SERVER_STATES)}, not {state[:40]!r}")
    return Filters(found.get("key") or None, tuple(labels), found.get("user") or None, state)


def parse_paging(params: Params, default_limit: int, max_limit: int) -> Paging:
    """``offset`` (0..) and ``limit`` (1..``max_limit``) from a request's query; :class:`BadParam` else."""
    offset, limit = 0, default_limit
    for name, value in params:
        if name == "offset":
            offset = _int("offset", value, 0, 1 << 31)
        elif name == "limit":
            limit = _int("limit", value, 1, max_limit)
    return Paging(offset, limit)


def parse_limit(params: Params, default: int, maximum: int) -> int:
    return parse_paging(params, default, maximum).limit


# -- servers ----------------------------------------------------------------------------------------


def is_server(conn: Connection) -> bool:
    """A connection that is a server (or a proxy offering servers), not a client or a query."""
    return bool(conn.slots or conn.held) or conn.info_key.startswith(SERVER_PREFIX)


def server_id_of(conn: Connection) -> str:
    """The id of the server on ``conn``, as the core names it in events and standings: the ``host:port``
    its first PUT offered (:func:`~tether.tracker.events.server_id`); before any PUT, its UPDATE_INFO's
    ``addr``; else the connection's own address. A proxy's connection (its slots are other servers, named
    ``host:port/key`` by the core) is named by its own address."""
    if conn.server_id is not None:
        return conn.server_id
    if conn.server_key is not None:
        for slot in conn.slots.values():
            return server_id(slot.host, slot.port)
        addr = conn.info.get("addr") if conn.info else None
        if isinstance(addr, list | tuple) and len(addr) == 2 and isinstance(addr[1], int):
            return server_id(str(addr[0] if addr[0] is not None else conn.host), addr[1])
    return conn.address


def _row_key(conn: Connection) -> str:
    if conn.server_key is not None:
        return conn.server_key
    if conn.info_key.startswith(PROXY_PREFIX):
        return conn.info_key[len(SERVER_PREFIX) :]
    for slot in conn.slots.values():
        return slot.key
    for held in conn.held.values():
        return held.key
    return conn.info_key


def _serves_key(conn: Connection, key: str) -> bool:
    if conn.server_key is not None:
        return conn.server_key == key
    return (
        key in proxied_keys(conn.info_key)
        or any(s.key == key for s in conn.slots.values())
        or any(h.key == key for h in conn.held.values())
    )


def _base_state(conn: Connection) -> str:
    held = conn.held
    if not held:
        return "free" if conn.slots else "unavailable"
    for h in held.values():
        if h.state == "busy":
            return "busy"
    return "granted"


_OK_STANDING: Final[dict[str, Any]] = {
    "state": "ok",
    "reason": None,
    "since": None,
    "by": None,
    "failures": 0,
    "recent_failures": [],
}


class HealthView:
    """The core's standings for one answer: ``state(sid)`` is a dict lookup (the core's ``health.not_ok()``,
    read once), ``full(sid)`` the whole standing, for the rows shown. Without health in the core, every
    server is "ok" (``checked`` False)."""

    def __init__(self, core: TrackerCore) -> None:
        self._standing: Standing | None = getattr(core, "standing", None)
        not_ok = getattr(getattr(core, "health", None), "not_ok", None)
        self._not_ok: dict[str, str] | None = None
        if callable(not_ok):
            self._not_ok = {sid: str(getattr(st, "state", "ok")) for sid, st in not_ok().items()}

    @property
    def checked(self) -> bool:
        return self._standing is not None

    def not_ok_ids(self) -> list[str]:
        """Servers whose standing is not "ok", connected or not (as far as the core tells)."""
        return list(self._not_ok or ())

    def state(self, sid: str) -> str:
        if self._not_ok is not None:
            return self._not_ok.get(sid, "ok")
        return str(self.full(sid)["state"])

    def state_of(self, conn: Connection) -> str:
        """:meth:`state` of the server on ``conn`` (no id computed while every server is "ok")."""
        if self._not_ok is not None and not self._not_ok:
            return "ok"
        return self.state(server_id_of(conn))

    def full(self, sid: str) -> dict[str, Any]:
        """Server ``sid``'s standing: state, reason, since (wall), by, failures (in a row), recent_failures."""
        got = self._standing(sid) if self._standing is not None else None
        if not isinstance(got, Mapping):
            return {**_OK_STANDING, "recent_failures": []}
        out = {name: got.get(name, default) for name, default in _OK_STANDING.items()}
        out["recent_failures"] = list(out["recent_failures"] or ())
        return out


def _matches(conn: Connection, filters: Filters) -> bool:
    if filters.key is not None and not _serves_key(conn, filters.key):
        return False
    if filters.labels:
        labels = conn.labels
        if not labels_match(labels, dict(filters.labels)):
            return False
    return filters.user is None or any(h.user == filters.user for h in conn.held.values())


def _oldest_held(conn: Connection) -> Held | None:
    held = [h for h in conn.held.values() if h.state == "busy"] or list(conn.held.values())
    return min(held, key=lambda h: h.since) if held else None


def server_row(conn: Connection, clocks: Clocks, health_now: Mapping[str, Any]) -> dict[str, Any]:
    """One server as the API shows it (see the module's docstring for ``state``)."""
    sid = server_id_of(conn)
    state = _base_state(conn)
    if health_now["state"] != "ok":
        state = health_now["state"]
    oldest = _oldest_held(conn)
    if oldest is not None:
        since: float | None = clocks.to_wall(oldest.since)
    elif conn.slots:
        since = clocks.to_wall(min(s.free_since for s in conn.slots.values()))
    else:
        since = None
    tether = conn.tether
    held = sorted(conn.held.values(), key=lambda h: h.since)
    return {
        "id": sid,
        "key": _row_key(conn),
        "address": sid,
        "peer": conn.address,
        "state": state,
        "holder": oldest.user if oldest is not None else None,
        "since": since,
        "holders": [h.user for h in held],
        "slots": {
            "total": max(tether.slots if tether is not None else 1, len(conn.slots) + len(conn.held)),
            "free": len(conn.slots),
            "granted": sum(1 for h in held if h.state == "granted"),
            "busy": sum(1 for h in held if h.state == "busy"),
        },
        "device": dict(tether.device) if tether is not None else {},
        "labels": dict(conn.labels),
        "protocols": sorted(conn.protocols),
        "version": tether.version if tether is not None else None,
        "connected_since": clocks.to_wall(conn.opened),
        "last_seen_s": clocks.age(conn.last_seen),
        "health": {k: health_now[k] for k in ("state", "reason", "since", "by", "failures")},
        "recent_failures": list(health_now["recent_failures"]),
    }


class ServerOrder:
    """All servers in page order (key, then id), kept between answers and sorted again only when it may
    have changed: after :meth:`changed` (the hub calls it on ``register``/``unregister`` events), when the
    number of connections moved, or ``max_age_s`` after the last sort (for changes that send no event,
    such as a proxy's first PUT). Closed connections are skipped on the way out."""

    def __init__(self, max_age_s: float = 1.0) -> None:
        self.max_age_s = max_age_s
        self._generation = 0
        self._signature: tuple[int, int] | None = None
        self._sorted_at = 0.0
        self._conns: list[Connection] = []

    def changed(self) -> None:
        self._generation += 1

    def get(self, core: TrackerCore, now: float) -> list[Connection]:
        conns = core.connections
        signature = (self._generation, len(conns))
        if signature != self._signature or now - self._sorted_at > self.max_age_s:
            picked = [c for c in conns if is_server(c)]
            picked.sort(key=lambda c: (_row_key(c), server_id_of(c), c.cid))
            self._conns, self._signature, self._sorted_at = picked, signature, now
        return [c for c in self._conns if not c.closed]


def servers(
    core: TrackerCore,
    clocks: Clocks,
    filters: Filters,
    paging: Paging,
    health: HealthView,
    *,
    order: ServerOrder | None = None,
) -> dict[str, Any]:
    """``/api/v1/servers``: one page of the servers matching ``filters``, ordered by key then id, with
    the number matching in all (``total``). Rows are built for the page only."""
    conns = (order or ServerOrder()).get(core, clocks.now)
    if filters.key is not None or filters.labels or filters.user is not None:
        conns = [c for c in conns if _matches(c, filters)]
    wanted = filters.state
    if wanted in HEALTH_STATES:
        conns = [c for c in conns if health.state_of(c) == wanted]
    elif wanted is not None:
        conns = [c for c in conns if _base_state(c) == wanted and health.state_of(c) == "ok"]
    page = conns[paging.offset : paging.offset + paging.limit]
    rows = [server_row(c, clocks, health.full(server_id_of(c))) for c in page]
    return {"time": clocks.wall, "total": len(conns), "offset": paging.offset, "limit": paging.limit, "servers": rows}


# -- queues -----------------------------------------------------------------------------------------


def _waiter_row(waiter: Waiter, clocks: Clocks) -> dict[str, Any]:
    return {
        "user": waiter.user,
        "priority": waiter.priority,
        "protocol": waiter.protocol,
        "labels": dict(waiter.labels),
        "since": clocks.to_wall(waiter.since),
        "waited_s": clocks.age(waiter.since),
        "timeout_s": None if waiter.deadline is None else round(waiter.deadline - waiter.since, 3),
    }


def queues(core: TrackerCore, clocks: Clocks, filters: Filters) -> dict[str, Any]:
    """``/api/v1/queues``: per key, its servers (``servers`` in all; ``free``: those the tracker may grant now,
    so not a cordoned or quarantined one's; ``granted``, ``busy``) and its waiting requests in the
    order they would be served (the first :data:`MAX_WAITERS_LISTED` listed, all counted), the oldest
    one's wait. With ``user``: only keys where that user waits, and only that user's requests."""
    # [servers, granted, busy] per key, in one pass; free slots are the scheduler's (those it may grant)
    counts: dict[str, list[int]] = {}
    for conn in core.connections:
        own = conn.server_key
        if own is not None:
            row = counts.get(own)
            if row is None:
                row = counts[own] = [0, 0, 0]
            row[0] += 1
        elif conn.slots:
            for slot in conn.slots.values():  # servers behind a proxy: one slot each
                row = counts.get(slot.key)
                if row is None:
                    row = counts[slot.key] = [0, 0, 0]
                row[0] += 1
        for held in conn.held.values():
            row = counts.get(held.key)
            if row is None:
                row = counts[held.key] = [0, 0, 0]
            row[1 if held.state == "granted" else 2] += 1
            if own is None:
                row[0] += 1
    queued = core.scheduler.keys()  # (a list, not a dict's view)
    for key in queued:
        counts.setdefault(key, [0, 0, 0])
    out = []
    for key in sorted(counts):
        if filters.key is not None and key != filters.key:
            continue
        waiters = core.scheduler.waiters(key)
        mine = [w for w in waiters if w.user == filters.user] if filters.user is not None else list(waiters)
        if filters.user is not None and not mine:
            continue
        oldest = min((w.since for w in mine), default=None)
        nservers, granted, busy = counts[key]
        out.append(
            {
                "key": key,
                "servers": nservers,
                "free": core.scheduler.counts(key)[0],
                "granted": granted,
                "busy": busy,
                "waiting": len(mine),
                "oldest_wait_s": None if oldest is None else clocks.age(oldest),
                "waiters": [_waiter_row(w, clocks) for w in mine[:MAX_WAITERS_LISTED]],
            }
        )
    return {"time": clocks.wall, "queues": out}


# -- sessions and health ----------------------------------------------------------------------------


def sessions(core: TrackerCore, clocks: Clocks, filters: Filters, paging: Paging) -> dict[str, Any]:
    """``/api/v1/sessions``: the grants not yet given back (``granted``: the client has not connected;
    ``busy``: the session runs), oldest first, one page of them."""
    found: list[tuple[float, str, Held]] = []
    for conn in core.connections:
        if not conn.held:
            continue
        sid = server_id_of(conn)
        for held in conn.held.values():
            if filters.key is not None and held.key != filters.key:
                continue
            if filters.user is not None and held.user != filters.user:
                continue
            found.append((held.since, held.server or sid, held))
    found.sort(key=lambda item: (item[0], item[1]))
    page = found[paging.offset : paging.offset + paging.limit]
    rows = [
        {
            "key": held.key,
            "server": sid,
            "user": held.user,
            "state": held.state,
            "since": clocks.to_wall(since),
            "held_s": clocks.age(since),
            "client": held.peer or held.requester,
            "waited_s": round(held.waited_s, 3),
        }
        for since, sid, held in page
    ]
    return {"time": clocks.wall, "total": len(found), "offset": paging.offset, "limit": paging.limit, "sessions": rows}


def health(core: TrackerCore, clocks: Clocks, filters: Filters, health: HealthView) -> dict[str, Any]:
    """``/api/v1/health``: the servers whose standing is not "ok", with the reasons: those connected, and
    those the core remembers while they are away (a quarantined server that left stays quarantined:
    ``connected`` false; shown without a key, label or user filter). Empty while the core keeps no health."""
    rows: dict[str, dict[str, Any]] = {}
    if health.checked:
        for conn in core.connections:
            if not is_server(conn):
                continue
            if health.state_of(conn) == "ok" or not _matches(conn, filters):
                continue
            sid = server_id_of(conn)
            rows[sid] = {"id": sid, "key": _row_key(conn), "connected": True, **health.full(sid)}
        if filters.key is None and not filters.labels and filters.user is None:
            for sid in health.not_ok_ids():
                if sid not in rows:
                    rows[sid] = {"id": sid, "key": None, "connected": False, **health.full(sid)}
    out = sorted(rows.values(), key=lambda r: (r["key"] or "", r["id"]))
    return {"time": clocks.wall, "checked": health.checked, "servers": out}


def summary(core: TrackerCore, clocks: Clocks, health: HealthView, **extra: Any) -> dict[str, Any]:
    """``/api/v1/summary``: counts of servers by state, keys, waiting requests, sessions, grants."""
    by_state = dict.fromkeys(SERVER_STATES, 0)
    keys: set[str] = set()
    nservers = granted = busy = 0
    for conn in core.connections:
        if not is_server(conn):
            continue
        nservers += 1
        keys.add(conn.server_key if conn.server_key is not None else _row_key(conn))
        state = _base_state(conn)
        if health.checked:
            standing = health.state_of(conn)
            if standing != "ok":
                state = standing
        by_state[state] = by_state.get(state, 0) + 1
        for held in conn.held.values():
            if held.state == "busy":
                busy += 1
            else:
                granted += 1
    queued = core.scheduler.keys()
    waiting = sum(core.scheduler.counts(k)[1] for k in queued)
    return {
        "time": clocks.wall,
        "version": __version__,
        "servers": nservers,
        "by_state": by_state,
        "keys": len(keys),
        "waiting": waiting,
        "sessions": {"granted": granted, "busy": busy},
        "grants": core.grants,
        "connections": len(core.connections),
        **extra,
    }
