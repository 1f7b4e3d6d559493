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


def encode_fields(fields: Mapping[str, Any]) -> str:
    """An event's fields as compact JSON (values JSON cannot hold are written as their ``str``)."""
    return json.dumps(dict(fields), separators=(",", ":"), default=str)


def _num(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _text(value: Any) -> str | None:
    if value is None:
        return None
    return value if isinstance(value, str) else json.dumps(value, separators=(",", ":"), default=str)


def _grant(conn: sqlite3.Connection, e: TrackerEvent) -> None:
    waited = _num(e.fields.get("waited_s"))
    conn.execute(
        "INSERT INTO sessions (at, matchkey, key, server, user, priority, requested_at, granted_at, waited_s)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (
            e.wall,
            _text(e.fields.get("matchkey")) or "",
            e.key,
            e.server,
            e.user,
            _num(e.fields.get("priority")),
            None if waited is None else e.wall - waited,
            e.wall,
            waited,
        ),
    )


def _open_row(conn: sqlite3.Connection, matchkey: str) -> int | None:
    row = conn.execute("SELECT max(id) FROM sessions WHERE matchkey = ? AND ended_at IS NULL", (matchkey,)).fetchone()
    return None if row is None or row[0] is None else int(row[0])


def _session_start(conn: sqlite3.Connection, e: TrackerEvent) -> None:
    matchkey = _text(e.fields.get("matchkey")) or ""
    rowid = _open_row(conn, matchkey)
    if rowid is None:
        conn.execute(
            "INSERT INTO sessions (at, matchkey, key, server, user, started_at) VALUES (?, ?, ?, ?, ?, ?)",
            (e.wall, matchkey, e.key, e.server, e.user, e.wall),
        )
    else:
        conn.execute("UPDATE sessions SET started_at = ? WHERE id = ?", (e.wall, rowid))


def _session_end(conn: sqlite3.Connection, e: TrackerEvent) -> None:
    matchkey = _text(e.fields.get("matchkey")) or ""
    held = _num(e.fields.get("held_s"))
    outcome, detail = _text(e.fields.get("outcome")), _text(e.fields.get("detail"))
    rowid = _open_row(conn, matchkey)
    if rowid is None:
        granted = None if held is None else e.wall - held
        conn.execute(
            "INSERT INTO sessions (at, matchkey, key, server, user, granted_at, ended_at, held_s, outcome, detail)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (granted or e.wall, matchkey, e.key, e.server, e.user, granted, e.wall, held, outcome, detail),
        )
        return
    conn.execute(
        "UPDATE sessions SET ended_at = ?, held_s = coalesce(?, ? - coalesce(granted_at, started_at, at)),"
        " outcome = ?, detail = ?, server = coalesce(server, ?), user = coalesce(user, ?) WHERE id = ?",
        (e.wall, held, e.wall, outcome, detail, e.server, e.user, rowid),
    )


def _request_end(conn: sqlite3.Connection, e: TrackerEvent) -> None:
    waited = _num(e.fields.get("waited_s"))
    detail = e.fields.get("detail", e.fields.get("message"))
    conn.execute(
        "INSERT INTO sessions (at, key, server, user, priority, requested_at, waited_s, ended_at, outcome, detail)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (
            e.wall,
            e.key,
            e.server,
            e.user,
            _num(e.fields.get("priority")),
            None if waited is None else e.wall - waited,
            waited,
            e.wall,
            _text(e.fields.get("outcome")),
            _text(detail),
        ),
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


_FOLD: dict[str, Callable[[sqlite3.Connection, TrackerEvent], None]] = {
    "grant": _grant,
    "session_start": _session_start,
    "session_end": _session_end,
    "request_end": _request_end,
    "register": _register,
    "unregister": _unregister,
    "health": _health,
}


def apply(conn: sqlite3.Connection, events: Sequence[TrackerEvent]) -> None:
    """Write ``events`` to the raw log and fold them into the other tables, in order. The caller holds
    the transaction. Raises :class:`sqlite3.Error`."""
    conn.executemany(
        "INSERT INTO events (wall, kind, key, server, user, data) VALUES (?, ?, ?, ?, ?, ?)",
        [(e.wall, e.kind, e.key, e.server, e.user, encode_fields(e.fields)) for e in events],
    )
    for e in events:
        fold = _FOLD.get(e.kind)
        if fold is not None:
            fold(conn, e)


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
