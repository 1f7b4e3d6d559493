"""The journal's read side: safe from any thread, each call on a read-only connection of its own (in WAL
mode readers see the last committed batch and never hold the writer up). Times are wall-clock seconds
since the epoch; ``since`` is inclusive, ``until`` exclusive. Every method raises :class:`JournalError`
when the file cannot be read."""

from __future__ import annotations

import contextlib
import json
import math
import os
import sqlite3
import time
from collections.abc import Iterator
from typing import Any

from . import usage as _usage
from .schema import JournalError, open_reader

__all__ = ["JournalReader"]


def _row(row: sqlite3.Row) -> dict[str, Any]:
    return {k: row[k] for k in row.keys()}  # noqa: SIM118 (sqlite3.Row iterates values, not keys)


def _bounds(since: float | None, until: float | None) -> list[Any]:
    return [-math.inf if since is None else since, math.inf if until is None else until]


def _decoded(value: Any) -> Any:
    if isinstance(value, str) and value[:1] in ("{", "["):
        with contextlib.suppress(ValueError):
            return json.loads(value)
    return value


class JournalReader:
    """Reads the journal at ``path`` (written by a tracker's :class:`~tether.journal.Journal`, now or
    earlier). Opening checks nothing; each call opens the file read-only and checks its schema."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)

    @contextlib.contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        conn = open_reader(self.path)
        try:
            yield conn
        except sqlite3.Error as exc:
            raise JournalError(f"{self.path}: cannot read the journal ({exc})") from exc
        finally:
            conn.close()

    def sessions(
        self,
        since: float | None = None,
        until: float | None = None,
        *,
        key: str | None = None,
        user: str | None = None,
        server: str | None = None,
        granted: bool | None = True,
        limit: int = 1000,
    ) -> list[dict[str, Any]]:
        """Sessions placed in ``[since, until)`` (by grant time; an ungranted request by its end), newest
        first, at most ``limit``. ``granted``: True (default) the granted sessions, False the requests
        that never got a device, None both. Each dict holds the ``sessions`` columns (:mod:`.schema`):
        ``id, at, matchkey, key, server, user, priority, requested_at, granted_at, waited_s, started_at,
        ended_at, held_s, outcome, detail``; ``ended_at`` None while open."""
        where, args = ["at >= ?", "at < ?"], _bounds(since, until)
        for column, value in (("key", key), ("user", user), ("server", server)):
            if value is not None:
                where.append(f"{column} = ?")
                args.append(value)
        if granted is not None:
            where.append("matchkey IS NOT NULL" if granted else "matchkey IS NULL")
        sql = f"SELECT * FROM sessions WHERE {' AND '.join(where)} ORDER BY at DESC, id DESC LIMIT ?"
        with self._connect() as conn:
            return [_row(r) for r in conn.execute(sql, (*args, limit))]

    def finished(self, *, limit: int, key: str | None = None, user: str | None = None) -> list[dict[str, Any]]:
        """The last ``limit`` granted sessions that have ended, newest end first, in the shape the web side's
        ``/api/v1/history`` answers (``key, server, user, granted, ended, waited_s, held_s, outcome, detail,
        started``): what :class:`~tether.hub.web.SessionJournal` asks of a journal."""
        where, args = ["matchkey IS NOT NULL", "ended_at IS NOT NULL"], []
        for column, value in (("key", key), ("user", user)):
            if value is not None:
                where.append(f"{column} = ?")
                args.append(value)
        sql = f"SELECT * FROM sessions WHERE {' AND '.join(where)} ORDER BY ended_at DESC, id DESC LIMIT ?"
        with self._connect() as conn:
            rows = conn.execute(sql, (*args, limit)).fetchall()

        def rounded(value: Any) -> Any:
            return round(value, 3) if isinstance(value, float) else value

        return [
            {
                "key": r["key"],
                "server": r["server"],
                "user": r["user"],
                "granted": rounded(r["granted_at"]),
                "ended": rounded(r["ended_at"]),
                "waited_s": rounded(r["waited_s"]),
                "held_s": rounded(r["held_s"]),
                "outcome": r["outcome"],
                "detail": r["detail"] or None,
                "started": r["started_at"] is not None,
            }
            for r in rows
        ]

    def events(
        self,
        since: float | None = None,
        until: float | None = None,
        *,
        kind: str | None = None,
        server: str | None = None,
        limit: int = 1000,
    ) -> list[dict[str, Any]]:
        """The raw log in ``[since, until)``, newest first, at most ``limit``: each event as
        :meth:`TrackerEvent.as_dict <tether.tracker.events.TrackerEvent.as_dict>` gives it, plus ``seq``,
        its row id (ascending in the order written)."""
        where, args = ["wall >= ?", "wall < ?"], _bounds(since, until)
        for column, value in (("kind", kind), ("server", server)):
            if value is not None:
                where.append(f"{column} = ?")
                args.append(value)
        sql = f"SELECT * FROM events WHERE {' AND '.join(where)} ORDER BY wall DESC, id DESC LIMIT ?"
        out = []
        with self._connect() as conn:
            for r in conn.execute(sql, (*args, limit)):
                event: dict[str, Any] = {"seq": r["id"], "kind": r["kind"], "wall": r["wall"]}
                for column in ("key", "server", "user"):
                    if r[column] is not None:
                        event[column] = r[column]
                event.update(json.loads(r["data"]))
                out.append(event)
        return out

    def health_states(self) -> dict[str, dict[str, Any]]:
        """The servers whose latest health state is not ``ok`` (cordoned, draining, quarantined): server id
        to ``{"state", "reason", "by", "since"}``. A restarted tracker reads its quarantine list here."""
        with self._connect() as conn:
            rows = conn.execute("SELECT * FROM health WHERE state != 'ok' ORDER BY server").fetchall()
        return {r["server"]: {k: r[k] for k in ("state", "reason", "by", "since")} for r in rows}

    def servers(self) -> list[dict[str, Any]]:
        """The last facts seen per server (``servers`` table; JSON columns decoded), by server id."""
        with self._connect() as conn:
            rows = conn.execute("SELECT * FROM servers ORDER BY server").fetchall()
        return [{k: _decoded(v) for k, v in _row(r).items()} for r in rows]

    def span(self) -> tuple[float, float] | None:
        """(first, last): from the first tracker run still on record to the last batch written; None for
        a journal never written."""
        with self._connect() as conn:
            first, last = conn.execute("SELECT min(started), max(coalesce(stopped, last_write)) FROM runs").fetchone()
            oldest = conn.execute("SELECT min(at) FROM sessions").fetchone()[0]
        if first is None:
            return None
        return (min(first, oldest) if oldest is not None else first), last

    def window(
        self, since: float | None = None, until: float | None = None, now: float | None = None
    ) -> tuple[float, float]:
        """The window usage covers: ``[since, until)`` cut to what the journal saw (its first run's start,
        and ``now``: default the clock). Empty (start == end) for a journal never written."""
        now = time.time() if now is None else now
        span = self.span()
        if span is None:
            return now, now
        start = span[0] if since is None else max(since, span[0])
        end = now if until is None else min(until, now)
        return start, max(start, end)

    def _key_servers(self, conn: sqlite3.Connection, start: float, end: float, key: str | None) -> dict[str, set[str]]:
        sql = "SELECT key, server FROM servers WHERE first_seen < ? AND (online = 1 OR last_seen >= ?)"
        out: dict[str, set[str]] = {}
        for k, server in conn.execute(sql, (end, start)):
            if k is not None and (key is None or k == key):
                out.setdefault(k, set()).add(server)
        return out

    def usage(
        self,
        since: float | None = None,
        until: float | None = None,
        *,
        key: str | None = None,
        by: _usage.By = "user",
        now: float | None = None,
    ) -> list[dict[str, Any]]:
        """Usage per user, key or server (``by``; ``"all"``: one total row) over :meth:`window`
        ``(since, until, now)``; the numbers and their definitions: :func:`tether.journal.usage.summarize`."""
        if by not in _usage.BY:
            raise ValueError(f"by must be one of {', '.join(_usage.BY)}, not {by!r}")
        start, end = self.window(since, until, now)
        with self._connect() as conn:
            spans = _usage.fetch(conn, start, end, key)
            key_servers = self._key_servers(conn, start, end, key)
        return _usage.summarize(spans, start, end, by, key_servers)

    def timeline(
        self,
        since: float | None = None,
        until: float | None = None,
        *,
        key: str | None = None,
        bins: int = 60,
        now: float | None = None,
    ) -> tuple[float, float, dict[str, list[float]], dict[str, list[float]]]:
        """For plots: ``(start, end, utilisation, waits)``: per key the busy fraction in each of ``bins``
        slices of the window, and its waits (seconds, sorted). See :mod:`tether.journal.usage`."""
        start, end = self.window(since, until, now)
        with self._connect() as conn:
            spans = _usage.fetch(conn, start, end, key)
            key_servers = self._key_servers(conn, start, end, key)
        return start, end, _usage.series(spans, start, end, bins, key_servers), _usage.waits(spans, start, end)
