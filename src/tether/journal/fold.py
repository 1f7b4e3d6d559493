"""Events into tables: the raw ``events`` log, and the ``sessions``, ``servers`` and ``health`` rows
folded from it (see :mod:`.schema`). Runs in the journal's writer thread, inside the caller's transaction.

Rules, by kind:

- ``grant`` opens a session row (``requested_at`` = wall - ``waited_s``).
- ``session_start`` and ``session_end`` find the newest open row (``ended_at`` NULL) with their
  ``matchkey``; without one (a grant from before the journal, or an event lost to a full queue) they
  open a row themselves (``granted_at`` then wall - ``held_s`` when known).
- ``request_end`` adds a row without a ``matchkey``: a request that never got a device.
- ``register``/``unregister`` upsert ``servers``; ``health`` upserts ``health``.
- ``request`` and unknown kinds go to the raw log only.

A session left open by a tracker run that ended (:func:`close_orphans`, at the next open) gets outcome
``unknown`` and ``held_s`` up to the last moment that run was known to write; a later ``session_end``
with its matchkey (the session outlived the restart) still closes it properly.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from ..tracker.events import TrackerEvent

__all__ = ["apply", "close_orphans", "encode_fields"]

#: the outcome given to sessions a tracker run left open (see the module's docstring)
ORPHAN_OUTCOME = "unknown"


_ENCODER = json.JSONEncoder(separators=(",", ":"), default=str)


def encode_fields(fields: Mapping[str, Any]) -> str:
    """An event's fields as compact JSON (values JSON cannot hold are written as their ``str``)."""
    return _ENCODER.encode(fields if isinstance(fields, dict) else dict(fields))


def _num(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _text(value: Any) -> str | None:
    if value is None:
        return None
    return value if isinstance(value, str) else _ENCODER.encode(value)


#: ``sessions`` columns in the order rows are built here (:func:`apply` inserts a batch's rows at once)
_COLUMNS = (
    "at", "matchkey", "key", "server", "user", "priority", "requested_at", "granted_at", "waited_s",
    "started_at", "ended_at", "held_s", "outcome", "detail",
)  # fmt: skip
_AT, _MATCHKEY, _KEY, _SERVER, _USER, _PRIORITY, _REQUESTED, _GRANTED, _WAITED = range(9)
_STARTED, _ENDED, _HELD, _OUTCOME, _DETAIL = range(9, 14)
_INSERT = f"INSERT INTO sessions ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' * len(_COLUMNS))})"


def _grant_row(e: TrackerEvent) -> list[Any]:
    f = e.fields
    waited = _num(f.get("waited_s"))
    requested = None if waited is None else e.wall - waited
    matchkey = _text(f.get("matchkey")) or ""
    priority = _num(f.get("priority"))
    return [e.wall, matchkey, e.key, e.server, e.user, priority, requested, e.wall, waited, *_NONE5]


_NONE5 = (None,) * 5


def _request_end_row(e: TrackerEvent) -> list[Any]:
    f = e.fields
    waited = _num(f.get("waited_s"))
    requested = None if waited is None else e.wall - waited
    outcome, detail = _text(f.get("outcome")), _text(f.get("detail", f.get("message")))
    row = [e.wall, None, e.key, e.server, e.user, _num(f.get("priority")), requested, None, waited, None]
    return [*row, e.wall, None, outcome, detail]


def _close_row(row: list[Any], e: TrackerEvent) -> None:
    held = _num(e.fields.get("held_s"))
    row[_ENDED] = e.wall
    row[_HELD] = held if held is not None else e.wall - (row[_GRANTED] or row[_STARTED] or row[_AT])
    row[_OUTCOME], row[_DETAIL] = _text(e.fields.get("outcome")), _text(e.fields.get("detail"))
    row[_SERVER] = row[_SERVER] or e.server
    row[_USER] = row[_USER] or e.user


#: the newest open row of a matchkey (the partial index ``sessions_open`` finds it)
_OPEN_ROW = "(SELECT max(id) FROM sessions WHERE matchkey = ? AND ended_at IS NULL)"


def _session_start(conn: sqlite3.Connection, e: TrackerEvent) -> None:
    matchkey = _text(e.fields.get("matchkey")) or ""
    cur = conn.execute(f"UPDATE sessions SET started_at = ? WHERE id = {_OPEN_ROW}", (e.wall, matchkey))
    if cur.rowcount == 0:
        conn.execute(
            "INSERT INTO sessions (at, matchkey, key, server, user, started_at) VALUES (?, ?, ?, ?, ?, ?)",
            (e.wall, matchkey, e.key, e.server, e.user, e.wall),
        )


def _session_end(conn: sqlite3.Connection, e: TrackerEvent) -> None:
    matchkey = _text(e.fields.get("matchkey")) or ""
    held = _num(e.fields.get("held_s"))
    outcome, detail = _text(e.fields.get("outcome")), _text(e.fields.get("detail"))
    cur = conn.execute(
        "UPDATE sessions SET ended_at = ?, held_s = coalesce(?, ? - coalesce(granted_at, started_at, at)),"
        f" outcome = ?, detail = ?, server = coalesce(server, ?), user = coalesce(user, ?) WHERE id = {_OPEN_ROW}",
        (e.wall, held, e.wall, outcome, detail, e.server, e.user, matchkey),
    )
    if cur.rowcount == 0:
        granted = None if held is None else e.wall - held
        conn.execute(
            "INSERT INTO sessions (at, matchkey, key, server, user, granted_at, ended_at, held_s, outcome, detail)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (granted or e.wall, matchkey, e.key, e.server, e.user, granted, e.wall, held, outcome, detail),
        )


def _register(conn: sqlite3.Connection, e: TrackerEvent) -> None:
    if e.server is None:
        return
    f = e.fields
    slots = f.get("slots")
    conn.execute(
        "INSERT INTO servers (server, key, peer, protocols, labels, device, slots, version, first_seen, last_seen,"
        " online) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 1) ON CONFLICT (server) DO UPDATE SET key = excluded.key,"
        " peer = excluded.peer, protocols = excluded.protocols, labels = excluded.labels, device = excluded.device,"
        " slots = excluded.slots, version = excluded.version, last_seen = excluded.last_seen, online = 1,"
        " reason = NULL",
        (
            e.server,
            e.key,
            _text(f.get("peer")),
            _text(f.get("protocols")),
            _text(f.get("labels")),
            _text(f.get("device")),
            slots if isinstance(slots, int) and not isinstance(slots, bool) else None,
            _text(f.get("version")),
            e.wall,
            e.wall,
        ),
    )


def _unregister(conn: sqlite3.Connection, e: TrackerEvent) -> None:
    if e.server is None:
        return
    conn.execute(
        "UPDATE servers SET online = 0, last_seen = ?, reason = ? WHERE server = ?",
        (e.wall, _text(e.fields.get("reason")), e.server),
    )


def _health(conn: sqlite3.Connection, e: TrackerEvent) -> None:
    if e.server is None:
        return
    conn.execute(
        "INSERT INTO health (server, state, reason, by, since) VALUES (?, ?, ?, ?, ?) ON CONFLICT (server) DO UPDATE"
        " SET state = excluded.state, reason = excluded.reason, by = excluded.by, since = excluded.since",
        (
            e.server,
            _text(e.fields.get("state")) or "ok",
            _text(e.fields.get("reason")),
            _text(e.fields.get("by")),
            e.wall,
        ),
    )


#: kinds folded one event at a time (rare: registrations, health changes)
_FOLD: dict[str, Callable[[sqlite3.Connection, TrackerEvent], None]] = {
    "register": _register,
    "unregister": _unregister,
    "health": _health,
}
_RAW_LOG = "INSERT INTO events (wall, kind, key, server, user, data) VALUES (?, ?, ?, ?, ?, ?)"


def apply(conn: sqlite3.Connection, events: Sequence[TrackerEvent]) -> None:
    """Write ``events`` to the raw log and fold them into the other tables, with the effect of applying
    them one by one in order. The caller holds the transaction. Raises :class:`sqlite3.Error`.

    A batch's new session rows are built in memory (a grant's start and end in the same batch never
    touch the database twice) and inserted at once; starts and ends of sessions granted in earlier
    batches update their rows, found by matchkey with one query per 500 matchkeys."""
    conn.executemany(_RAW_LOG, [(e.wall, e.kind, e.key, e.server, e.user, encode_fields(e.fields)) for e in events])
    rows: list[list[Any]] = []
    pending: dict[str, list[Any]] = {}  # open rows of this batch, by matchkey
    earlier: list[TrackerEvent] = []  # starts and ends of sessions granted before this batch
    for e in events:
        kind = e.kind
        if kind == "grant":
            row = _grant_row(e)
            rows.append(row)
            pending[row[_MATCHKEY]] = row
        elif kind in {"session_start", "session_end"}:
            open_row = pending.get(_text(e.fields.get("matchkey")) or "")
            if open_row is None:
                earlier.append(e)
            elif kind == "session_start":
                open_row[_STARTED] = e.wall
            else:
                _close_row(open_row, e)
                del pending[open_row[_MATCHKEY]]
        elif kind == "request_end":
            rows.append(_request_end_row(e))
        else:
            fold = _FOLD.get(kind)
            if fold is not None:
                fold(conn, e)
    if earlier:  # before the inserts: a matchkey granted again later in this batch is a new row
        _apply_earlier(conn, earlier)
    if rows:
        conn.executemany(_INSERT, rows)


def _apply_earlier(conn: sqlite3.Connection, events: list[TrackerEvent]) -> None:
    keys = list({_text(e.fields.get("matchkey")) or "" for e in events})
    ids: dict[str, int] = {}
    for i in range(0, len(keys), 500):
        chunk = keys[i : i + 500]
        marks = ", ".join("?" * len(chunk))
        sql = (
            f"SELECT matchkey, max(id) FROM sessions WHERE ended_at IS NULL AND matchkey IN ({marks}) GROUP BY matchkey"
        )
        ids.update(conn.execute(sql, chunk).fetchall())
    starts: list[tuple[float, int]] = []
    ends: list[tuple[Any, ...]] = []
    alone: list[TrackerEvent] = []  # no open row, or closed already in this batch: one at a time
    closed: set[str] = set()
    for e in events:
        matchkey = _text(e.fields.get("matchkey")) or ""
        rowid = ids.get(matchkey)
        if rowid is None or matchkey in closed:
            alone.append(e)
        elif e.kind == "session_start":
            starts.append((e.wall, rowid))
        else:
            f = e.fields
            held, outcome, detail = _num(f.get("held_s")), _text(f.get("outcome")), _text(f.get("detail"))
            ends.append((e.wall, held, e.wall, outcome, detail, e.server, e.user, rowid))
            closed.add(matchkey)
    conn.executemany("UPDATE sessions SET started_at = ? WHERE id = ?", starts)
    conn.executemany(
        "UPDATE sessions SET ended_at = ?, held_s = coalesce(?, ? - coalesce(granted_at, started_at, at)),"
        " outcome = ?, detail = ?, server = coalesce(server, ?), user = coalesce(user, ?) WHERE id = ?",
        ends,
    )
    for e in alone:
        (_session_start if e.kind == "session_start" else _session_end)(conn, e)


def close_orphans(conn: sqlite3.Connection) -> int:
    """Close what earlier tracker runs left open: sessions get outcome ``unknown`` and ``held_s`` up to
    the run's last write (or stop), servers go offline. Returns the number of sessions closed. The
    caller holds the transaction."""
    row = conn.execute("SELECT max(coalesce(stopped, last_write)) FROM runs").fetchone()
    last = row[0] if row is not None else None
    if last is None:
        return 0
    cur = conn.execute(
        "UPDATE sessions SET outcome = ?, detail = 'the tracker stopped before the session ended',"
        " held_s = max(0.0, ? - coalesce(granted_at, started_at, at))"
        " WHERE ended_at IS NULL AND outcome IS NULL AND matchkey IS NOT NULL",
        (ORPHAN_OUTCOME, last),
    )
    conn.execute(
        "UPDATE servers SET online = 0, reason = 'the tracker stopped', last_seen = max(last_seen, ?) WHERE online = 1",
        (last,),
    )
    return cur.rowcount
