"""The journal's SQLite side: one writer connection that writes batches of events, prunes and ends a run.

:class:`LocalStore` does it in the calling thread (the journal's writer thread);
:class:`~tether.journal.process.RemoteStore` does the same in a process of its own, so that the
tracker's process holds its interpreter lock for none of it. Both answer :class:`Store`. Times come from the
caller (``now``, wall-clock seconds): the journal's clock is the one authority, wherever the store runs.
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final, Protocol

from ..loglimit import PeerLogLimit
from ..tracker.events import TrackerEvent
from .fold import apply, close_orphans

__all__ = ["LocalStore", "Store", "StoreLimits", "begin_run"]

logger = logging.getLogger("tether.journal")

#: Rows deleted per table per pruning round.
PRUNE_CHUNK: Final = 20_000
_DAY_S: Final = 86_400.0


@dataclass(frozen=True, slots=True)
class StoreLimits:
    """Retention: rows older than ``retention_days`` go (0: no age limit); row caps (0: none)."""

    retention_days: float
    max_events: int
    max_sessions: int


class Store(Protocol):
    def write(self, events: Sequence[TrackerEvent], now: float) -> bool:
        """Write ``events`` in one transaction; False when it was refused (rolled back, logged)."""
        ...

    def prune(self, now: float) -> bool:
        """One pruning round; True when rows are left to delete (another round soon)."""
        ...

    def finish(self, now: float) -> None:
        """Mark the run stopped and let the connection go."""
        ...


def begin_run(conn: sqlite3.Connection, now: float) -> tuple[int, int]:
    """Close the sessions an earlier run left open and add this run's row: (run id, sessions closed)."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        closed = close_orphans(conn)
        cur = conn.execute("INSERT INTO runs (started, last_write) VALUES (?, ?)", (now, now))
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    assert cur.lastrowid is not None
    return cur.lastrowid, closed


class LocalStore:
    """:class:`Store` on ``conn`` (an :func:`~tether.journal.schema.open_writer` connection), in this process.
    Errors are logged through ``errors`` (a few lines a minute at most) and never raised."""

    def __init__(
        self, conn: sqlite3.Connection, path: str, run_id: int, limits: StoreLimits, errors: PeerLogLimit
    ) -> None:
        self.conn, self.path, self.run_id, self.limits, self._errors = conn, path, run_id, limits, errors

    def write(self, events: Sequence[TrackerEvent], now: float) -> bool:
        conn = self.conn
        try:
            conn.execute("BEGIN")
            apply(conn, events)
            conn.execute("UPDATE runs SET last_write = ? WHERE id = ?", (now, self.run_id))
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            if self._errors.allow("write"):
                logger.error("journal %s: %d event(s) not written: %s", self.path, len(events), exc)
            return False
        except Exception:  # a bug in folding: the tracker's history must not stop for it
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            if self._errors.allow("write"):
                logger.exception("journal %s: %d event(s) not written", self.path, len(events))
            return False
        return True

    def prune(self, now: float) -> bool:
        conn, more, limits = self.conn, False, self.limits
        cutoff = now - limits.retention_days * _DAY_S if limits.retention_days else None
        try:
            conn.execute("BEGIN")
            for table, column, cap in (("events", "wall", limits.max_events), ("sessions", "at", limits.max_sessions)):
                if cutoff is not None:
                    more |= self._delete(table, f"{column} < ?", cutoff)
                if cap:
                    # ids grow with time and retention deletes from the low end: max(id) - cap approximates
                    # the cap without counting rows (which reads the whole table)
                    more |= self._delete(table, f"id <= (SELECT max(id) FROM {table}) - ?", cap)
            if cutoff is not None:
                conn.execute("DELETE FROM servers WHERE online = 0 AND last_seen < ?", (cutoff,))
                conn.execute("DELETE FROM health WHERE state = 'ok' AND since < ?", (cutoff,))
                conn.execute(
                    "DELETE FROM runs WHERE id != ? AND coalesce(stopped, last_write) < ?", (self.run_id, cutoff)
                )
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            if self._errors.allow("prune"):
                logger.error("journal %s: old rows not deleted: %s", self.path, exc)
            return False
        return more

    def _delete(self, table: str, where: str, value: float) -> bool:
        """Delete up to :data:`PRUNE_CHUNK` rows of ``table`` (a fixed name) matching ``where``; True
        when that many went (more may be left)."""
        cur = self.conn.execute(
            f"DELETE FROM {table} WHERE id IN (SELECT id FROM {table} WHERE {where} LIMIT ?)", (value, PRUNE_CHUNK)
        )
        return cur.rowcount >= PRUNE_CHUNK

    def finish(self, now: float) -> None:
        try:
            self.conn.execute("UPDATE runs SET stopped = ? WHERE id = ?", (now, self.run_id))
        except sqlite3.Error as exc:
            logger.error("journal %s: the run's end not written: %s", self.path, exc)
        finally:
            self.conn.close()
