"""The journal: tracker events to SQLite, written by a thread of its own so the tracker never waits on disk.

Invariants:

- :meth:`Journal.record` never blocks: it appends the event to a bounded buffer (``queue_max`` events; an
  append, no lock, nobody woken: the writer looks every ``batch_wait_s``); when the buffer is full the
  event is dropped and counted (:attr:`JournalStats.dropped`), with one warning at first and then at most
  one per :data:`WARN_EVERY_S` seconds. The tracker's subscribers run on its
  event loop (:mod:`tether.tracker.events`): this is all the loop pays.
- The writer thread takes what is queued, up to ``batch_max`` events, and writes it in one transaction
  (:func:`.fold.apply`), in this thread or, with ``process=True`` (``tether tracker --db``), in a writer
  process of its own (:mod:`.process`): then the tracker's process holds its interpreter lock only to hand
  the batch over, never for the folding, JSON and SQLite work. A batch that fails (disk full, I/O error, a
  writer process lost) is rolled back, logged and counted (:attr:`JournalStats.failed`); the thread goes on
  (a few error lines a minute at most).
- Retention runs in the writer thread, every ``prune_interval_s`` seconds: rows older than
  ``retention_days`` go, then the oldest beyond the row caps (``max_events``, ``max_sessions``), at most
  :data:`~.store.PRUNE_CHUNK` rows per table per round (rounds repeat between batches until done), so a large
  deletion never holds the queue up for long. Non-ok health states are kept whatever their age: they are
  the quarantine list a restarted tracker reads back (:meth:`JournalReader.health_states`).
- :meth:`Journal.close` writes everything queued before it, marks the run stopped and ends the thread (and
  the writer process), waiting at most ``close_timeout_s`` seconds (a stuck disk: the thread is a daemon
  and is left behind).

Sessions a previous run left open are closed as ``unknown`` when the journal opens (:func:`.fold.close_orphans`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from ..loglimit import PeerLogLimit
from ..tracker.events import EventBus, TrackerEvent
from .reader import JournalReader
from .schema import JournalError, open_writer
from .store import LocalStore, Store, StoreLimits, begin_run

__all__ = ["DEFAULT_MAX_EVENTS", "DEFAULT_MAX_SESSIONS", "Journal", "JournalStats"]

logger = logging.getLogger("tether.journal")

#: Row caps by default: about 0.75 GB of events and 0.25 GB of sessions at the sizes in :mod:`.schema`.
DEFAULT_MAX_EVENTS: Final = 5_000_000
DEFAULT_MAX_SESSIONS: Final = 1_000_000
DEFAULT_QUEUE_MAX: Final = 100_000
#: Seconds between two warnings about dropped events.
WARN_EVERY_S: Final = 60.0


@dataclass(frozen=True, slots=True)
class JournalStats:
    """Counts since the journal opened (events): ``queued`` now, ``written`` to disk, ``dropped``
    (queue full, or recorded after close), ``failed`` (in a batch the database refused)."""

    queued: int
    written: int
    dropped: int
    failed: int


class _Flush:
    __slots__ = ("done",)

    def __init__(self) -> None:
        self.done = threading.Event()


class _Prune(_Flush):
    __slots__ = ()


_STOP: Final = object()


class Journal(JournalReader):
    """Tracker history in the SQLite file ``path`` (created when missing): write side and read side.

    ``retention_days``: rows older than this are deleted (0: no age limit). ``max_events``,
    ``max_sessions``: row caps (0: none); the disk used is bounded by them (sizes in :mod:`.schema`).
    ``queue_max``: events waiting for the writer before :meth:`record` drops. ``batch_max``: events per
    transaction; ``batch_wait_s``: seconds a batch gathers before it is written (a flush or close does
    not wait). ``prune_interval_s``: seconds between pruning rounds (0: only :meth:`prune_now`).
    ``wall``: the clock (``time.time``) for retention and the run's times. ``process``: write through a
    writer process of its own (:mod:`.process`) rather than in this process's writer thread.

    Raises :class:`JournalError` (a :class:`~tether.errors.ConfigError`) when the file cannot be used;
    :class:`ValueError` for a negative setting.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        retention_days: float = 90.0,
        max_events: int = DEFAULT_MAX_EVENTS,
        max_sessions: int = DEFAULT_MAX_SESSIONS,
        queue_max: int = DEFAULT_QUEUE_MAX,
        batch_max: int = 2000,
        batch_wait_s: float = 0.05,
        prune_interval_s: float = 300.0,
        close_timeout_s: float = 10.0,
        wall: Callable[[], float] = time.time,
        process: bool = False,
    ) -> None:
        for name, value in (
            ("retention_days", retention_days),
            ("max_events", max_events),
            ("max_sessions", max_sessions),
            ("prune_interval_s", prune_interval_s),
            ("close_timeout_s", close_timeout_s),
            ("batch_wait_s", batch_wait_s),
        ):
            if not value >= 0:
                raise ValueError(f"{name} must be >= 0, not {value!r}")
        if queue_max < 1 or batch_max < 1:
            raise ValueError("queue_max and batch_max must be >= 1")
        self.retention_days = retention_days
        self.max_events, self.max_sessions = max_events, max_sessions
        self.batch_max, self.prune_interval_s, self.close_timeout_s = batch_max, prune_interval_s, close_timeout_s
        self.batch_wait_s = batch_wait_s
        self._wall = wall
        self._errors = PeerLogLimit(lines=3, window_s=WARN_EVERY_S, logger=logger, about="journal errors")
        conn = open_writer(path)
        try:
            run_id, self.orphans_closed = begin_run(conn, wall())
        except sqlite3.Error as exc:
            conn.close()
            raise JournalError(f"{os.fspath(path)}: cannot write the journal ({exc})") from exc
        super().__init__(path)
        limits = StoreLimits(retention_days, max_events, max_sessions)
        self._store: Store
        if process:
            conn.close()
            from .process import RemoteStore

            self._store = RemoteStore(self.path, run_id, limits, self._errors)
        else:
            self._store = LocalStore(conn, self.path, run_id, limits, self._errors)
        #: "thread" or "process": where the SQLite writes run
        self.writer = "process" if process else "thread"
        self.queue_max = queue_max
        #: events and markers for the writer, oldest first (appends and pops are atomic: no lock)
        self._buffer: deque[object] = deque()
        self._wake = threading.Event()
        self._lock = threading.Lock()
        self._closed = False
        self._written = self._dropped = self._failed = 0
        self._warned_at = float("-inf")
        self._dropped_since_warning = 0
        self._unsubscribe: list[Callable[[], None]] = []
        self._thread = threading.Thread(target=self._run, name="tether-journal", daemon=True)
        self._thread.start()

    # -- write side, from any thread ------------------------------------------------------------

    def record(self, event: TrackerEvent) -> None:
        """Queue ``event`` for the writer; never blocks (a full queue drops it: see the module)."""
        if self._closed:
            self._dropped += 1
            return
        if len(self._buffer) >= self.queue_max:
            self._drop()
        else:
            self._buffer.append(event)  # the writer looks every batch_wait_s: nobody is woken per event

    def _drop(self) -> None:
        with self._lock:
            self._dropped += 1
            self._dropped_since_warning += 1
            now = time.monotonic()
            if now - self._warned_at < WARN_EVERY_S:
                return
            self._warned_at, n = now, self._dropped_since_warning
            self._dropped_since_warning = 0
        logger.warning(
            "journal queue full (%d events): %d event(s) dropped, not written to %s (a slow disk?)",
            self.queue_max,
            n,
            self.path,
        )

    def attach(self, bus: EventBus) -> Callable[[], None]:
        """Record every event ``bus`` emits (until :meth:`close`); returns a function that stops that."""
        unsubscribe = bus.subscribe(self.record)
        self._unsubscribe.append(unsubscribe)
        return unsubscribe

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until every event recorded before this call is written (or failed); False when
        ``timeout`` seconds passed first or the journal is closed."""
        return self._wait_for(_Flush(), timeout)

    def prune_now(self, timeout: float = 30.0) -> bool:
        """Apply retention and the row caps now (every round, after what is queued); False when
        ``timeout`` seconds passed first or the journal is closed."""
        return self._wait_for(_Prune(), timeout)

    def _wait_for(self, marker: _Flush, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        if self._closed:
            return False
        self._buffer.append(marker)
        self._wake.set()
        return marker.done.wait(max(0.0, deadline - time.monotonic()))

    def stats(self) -> JournalStats:
        return JournalStats(self._queued(), self._written, self._dropped, self._failed)

    def _queued(self) -> int:
        return sum(1 for item in list(self._buffer) if isinstance(item, TrackerEvent))

    def close(self, timeout: float | None = None) -> bool:
        """Stop recording, write what is queued, mark the run stopped, end the writer thread. Waits at
        most ``timeout`` seconds (default ``close_timeout_s``); False when the thread did not finish in
        time. Idempotent."""
        timeout = self.close_timeout_s if timeout is None else timeout
        with self._lock:
            if self._closed:
                self._thread.join(timeout)
                return not self._thread.is_alive()
            self._closed = True
        for unsubscribe in self._unsubscribe:
            unsubscribe()
        deadline = time.monotonic() + timeout
        self._buffer.append(_STOP)
        self._wake.set()
        self._thread.join(max(0.0, deadline - time.monotonic()))
        if self._thread.is_alive():
            logger.warning(
                "journal %s: the writer did not finish within %.1f s; %d event(s) may be lost",
                self.path,
                timeout,
                self._queued(),
            )
            return False
        return True

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the writer thread ------------------------------------------------------------------------

    def _run(self) -> None:
        next_prune = time.monotonic() if self.prune_interval_s else float("inf")  # once at the start
        stop = False
        while not stop:
            if len(self._buffer) < self.batch_max:  # a batch gathers for batch_wait_s unless someone waits on it
                self._wake.wait(max(0.0, min(next_prune - time.monotonic(), self.batch_wait_s)))
                self._wake.clear()
            items = self._take(self.batch_max)
            events: list[TrackerEvent] = []
            flushes: list[_Flush] = []
            for item in items:
                if isinstance(item, TrackerEvent):
                    events.append(item)
                elif isinstance(item, _Flush):
                    flushes.append(item)
                elif item is _STOP:
                    stop = True
            if events:
                self._write(events)
            if any(isinstance(m, _Prune) for m in flushes):
                while self._prune():
                    pass
            if time.monotonic() >= next_prune and not stop:
                more = self._prune()
                next_prune = time.monotonic() + (0.0 if more else self.prune_interval_s)
            for marker in flushes:
                marker.done.set()
            stop = stop or (self._closed and not self._buffer)
        self._finish()

    def _take(self, n: int) -> list[object]:
        items: list[object] = []
        buffer = self._buffer
        with contextlib.suppress(IndexError):
            while len(items) < n:
                items.append(buffer.popleft())
        return items

    def _write(self, events: list[TrackerEvent]) -> None:
        if self._store.write(events, self._wall()):
            self._written += len(events)
        else:
            self._failed += len(events)

    def _prune(self) -> bool:
        """One pruning round; True when rows are left to delete (another round soon)."""
        return self._store.prune(self._wall())

    def _finish(self) -> None:
        items = self._take(len(self._buffer) + 1)
        rest = [item for item in items if isinstance(item, TrackerEvent)]
        if rest:  # recorded while close() ran
            self._write(rest)
        for item in items:
            if isinstance(item, _Flush):
                item.done.set()
        self._store.finish(self._wall())
