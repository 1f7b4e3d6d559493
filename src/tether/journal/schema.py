"""The journal's SQLite schema, its version, and opening a database for writing or reading.

Tables (times are wall-clock seconds since the epoch, ``time.time()``; durations in seconds):

============  =====================================================================================
``schema``    one row: ``version`` (:data:`SCHEMA_VERSION` when written by this tether), ``created``
``events``    the raw log, one row per :class:`~tether.tracker.events.TrackerEvent`: ``wall``, ``kind``,
              ``key``, ``server``, ``user`` and ``data`` (the event's other fields as JSON)
``sessions``  one row per grant (``matchkey`` set, ``granted_at`` set) and one per request that left
              without a grant (``matchkey`` and ``granted_at`` NULL, ``outcome`` the request's); ``at`` is
              ``granted_at``, or the time the ungranted request ended: the time windows select on
``servers``   the last facts seen per server id (``register``/``unregister``), ``online`` 0 or 1
``health``    the latest health state per server id (``state``, ``reason``, ``by``, ``since``)
``runs``      one row per tracker run on this file: ``started``, ``last_write`` (the last batch written),
              ``stopped`` (NULL when it did not close: killed, or still running)
============  =====================================================================================

Row sizes on disk, measured with ``bench/journal_bench.py`` (100,000 sessions over 5,000 servers,
indexes included): 696 bytes per granted session, i.e. its three events (grant, start, end; roughly
150 bytes each) and its session row (roughly 250). :class:`~tether.journal.writer.Journal`'s row caps
(``max_events``, ``max_sessions``) bound the file: SQLite reuses the pages of deleted rows, it does not
shrink the file.

Versions: a database whose ``schema.version`` is below :data:`SCHEMA_VERSION` is migrated in place by
the steps in :data:`_MIGRATIONS` (none yet: version 1 is the first); one above it, or a file that is not
a tether journal, raises :class:`JournalError` and is left untouched.
"""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Final

from ..errors import ConfigError

__all__ = ["SCHEMA_VERSION", "JournalError", "open_reader", "open_writer"]

SCHEMA_VERSION: Final = 1

#: The writer's page cache (KiB): the indexes a batch touches stay in memory.
CACHE_KIB: Final = 16 * 1024

#: Seconds a connection waits for another's lock before it gives up (the writer holds one briefly).
BUSY_TIMEOUT_S: Final = 5.0


class JournalError(ConfigError):
    """The journal's database cannot be used: not a tether journal, written by a newer tether (a schema
    version above this one's), or not readable. The file is left as it was."""


_TABLES: Final = """
CREATE TABLE schema (version INTEGER NOT NULL, created REAL NOT NULL);
CREATE TABLE events (
    id INTEGER PRIMARY KEY,
    wall REAL NOT NULL,
    kind TEXT NOT NULL,
    key TEXT,
    server TEXT,
    user TEXT,
    data TEXT NOT NULL
);
CREATE INDEX events_wall ON events (wall);
CREATE TABLE sessions (
    id INTEGER PRIMARY KEY,
    at REAL NOT NULL,
    matchkey TEXT,
    key TEXT,
    server TEXT,
    user TEXT,
    priority REAL,
    requested_at REAL,
    granted_at REAL,
    waited_s REAL,
    started_at REAL,
    ended_at REAL,
    held_s REAL,
    outcome TEXT,
    detail TEXT
);
CREATE INDEX sessions_at ON sessions (at);
CREATE INDEX sessions_open ON sessions (matchkey) WHERE ended_at IS NULL;
CREATE INDEX sessions_ended ON sessions (ended_at);
CREATE TABLE servers (
    server TEXT PRIMARY KEY,
    key TEXT,
    peer TEXT,
    protocols TEXT,
    labels TEXT,
    device TEXT,
    slots INTEGER,
    version TEXT,
    first_seen REAL NOT NULL,
    last_seen REAL NOT NULL,
    online INTEGER NOT NULL,
    reason TEXT
);
CREATE TABLE runs (
    id INTEGER PRIMARY KEY,
    started REAL NOT NULL,
    last_write REAL NOT NULL,
    stopped REAL
);
CREATE TABLE health (
    server TEXT PRIMARY KEY,
    state TEXT NOT NULL,
    reason TEXT,
    by TEXT,
    since REAL NOT NULL
);
"""

#: ``_MIGRATIONS[v]`` turns a version ``v`` database into version ``v + 1`` (inside one transaction).
_MIGRATIONS: Final[dict[int, Callable[[sqlite3.Connection], None]]] = {}


def _version(conn: sqlite3.Connection, path: str) -> int | None:
    """The database's schema version; None for an empty database. Raises :class:`JournalError`."""
    try:
        tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    except sqlite3.DatabaseError as exc:  # not a database at all
        raise JournalError(f"{path}: not a tether journal ({exc})") from exc
    if not tables:
        return None
    if "schema" not in tables:
        raise JournalError(f"{path}: not a tether journal (an SQLite database without its schema table)")
    row = conn.execute("SELECT version FROM schema").fetchone()
    if row is None or not isinstance(row[0], int):
        raise JournalError(f"{path}: not a tether journal (its schema table has no version)")
    version: int = row[0]
    if version > SCHEMA_VERSION:
        raise JournalError(
            f"{path}: journal schema version {version} was written by a newer tether; this one reads up to "
            f"version {SCHEMA_VERSION} (upgrade tether, or give --db another file)"
        )
    return version


def open_writer(path: str | os.PathLike[str]) -> sqlite3.Connection:
    """Open (creating it and its tables when new) the journal at ``path`` for writing: WAL mode,
    ``synchronous=NORMAL`` (a power cut may lose the last transactions, never corrupt the file).
    Migrates an older schema. The connection may be handed to another thread (one at a time).
    Raises :class:`JournalError`."""
    name = os.fspath(path)
    parent = Path(name).parent
    if not parent.is_dir():
        raise JournalError(f"{name}: no such directory {str(parent)!r}")
    try:
        conn = sqlite3.connect(name, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False)
    except sqlite3.Error as exc:
        raise JournalError(f"{name}: cannot open the journal ({exc})") from exc
    try:
        version = _version(conn, name)
        if conn.execute("PRAGMA journal_mode = WAL").fetchone()[0] != "wal":
            raise JournalError(f"{name}: the journal needs WAL mode, which this file system does not allow")
        conn.execute("PRAGMA synchronous = NORMAL")
        conn.execute(f"PRAGMA cache_size = -{CACHE_KIB}")
        conn.execute("BEGIN IMMEDIATE")
        if version is None:
            # one statement at a time: executescript would commit the transaction
            for statement in _TABLES.split(";"):
                if statement.strip():
                    conn.execute(statement)
            conn.execute("INSERT INTO schema (version, created) VALUES (?, ?)", (SCHEMA_VERSION, time.time()))
        else:
            while version < SCHEMA_VERSION:
                _MIGRATIONS[version](conn)
                version += 1
                conn.execute("UPDATE schema SET version = ?", (version,))
        conn.execute("COMMIT")
    except JournalError:
        conn.close()
        raise
    except sqlite3.Error as exc:
        conn.close()
        raise JournalError(f"{name}: cannot use the journal ({exc})") from exc
    return conn


def open_reader(path: str | os.PathLike[str]) -> sqlite3.Connection:
    """A read-only connection to the journal at ``path`` (for any thread that opens it; readers never
    block the writer in WAL mode). Raises :class:`JournalError` when the file is missing or not a journal
    this tether reads (an older version is read as is only when it equals this one's)."""
    name = os.fspath(path)
    if not Path(name).is_file():
        raise JournalError(f"{name}: no such journal (the tracker writes it with --db {name})")
    try:
        conn = sqlite3.connect(
            Path(name).resolve().as_uri() + "?mode=ro", uri=True, timeout=BUSY_TIMEOUT_S, check_same_thread=False
        )
    except sqlite3.Error as exc:
        raise JournalError(f"{name}: cannot open the journal ({exc})") from exc
    try:
        version = _version(conn, name)
    except JournalError:
        conn.close()
        raise
    except sqlite3.Error as exc:
        conn.close()
        raise JournalError(f"{name}: cannot read the journal ({exc})") from exc
    if version != SCHEMA_VERSION:
        conn.close()
        what = "is empty" if version is None else f"has schema version {version}"
        raise JournalError(
            f"{name}: the journal {what}; this tether reads version {SCHEMA_VERSION} (a tracker started with "
            "--db on it migrates it)"
        )
    conn.row_factory = sqlite3.Row
    return conn
