"""The journal: tracker events in, sessions, servers, health and usage out; the writer thread's promises
(never blocks the caller, drops and counts when full, flushes on close), retention and row caps, schema
versions, reads while writing. Events are fed directly; the end to end test is test_journal_restart.py."""

from __future__ import annotations

import logging
import os
import signal
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tether.journal import Journal, JournalError, JournalReader
from tether.journal import store as store_module
from tether.journal.usage import Span, summarize
from tether.tracker.events import EventBus, TrackerEvent

from .conftest import wait_until

pytestmark = pytest.mark.timeout(60)

T0 = 1_700_000_000.0  # a fixed wall time in the past (2023-11-14)
DAY = 86_400.0


def ev(
    kind: str, wall: float, key: str | None = "dev", server: str | None = None, user: str | None = None, **fields: Any
) -> TrackerEvent:
    return TrackerEvent(kind, wall, key, server, user, fields)


def session(
    matchkey: str,
    granted: float,
    held: float,
    *,
    server: str = "h:1",
    user: str = "alice",
    key: str = "dev",
    waited: float = 0.0,
    outcome: str = "ok",
) -> list[TrackerEvent]:
    """A grant, its session's start 0.1 s later, its end ``held`` seconds after the grant."""
    return [
        ev("grant", granted, key, server, user, id=1, matchkey=matchkey, waited_s=waited, priority=1),
        ev("session_start", granted + 0.1, key, server, user, matchkey=matchkey, peer="10.0.0.9:5000"),
        ev(
            "session_end", granted + held, key, server, user, matchkey=matchkey, held_s=held, outcome=outcome, detail=""
        ),
    ]


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def make_journal(tmp_path: Path) -> Iterator[Callable[..., Journal]]:
    journals: list[Journal] = []

    def make(**kwargs: Any) -> Journal:
        kwargs.setdefault("wall", Clock(T0 + DAY))
        j = Journal(kwargs.pop("path", tmp_path / "history.db"), **kwargs)
        journals.append(j)
        return j

    yield make
    for j in journals:
        assert j.close(), "the writer did not stop"


def feed(j: Journal, events: list[TrackerEvent]) -> None:
    for e in events:
        j.record(e)
    assert j.flush(), "not written within the flush timeout"


# -- events in, tables out ------------------------------------------------------------------------


def test_a_session_is_one_row_with_its_wait_hold_and_outcome(make_journal: Callable[..., Journal]) -> None:
    j = make_journal()
    feed(j, session("m1", T0 + 10, 30.0, waited=2.5, outcome="failed"))
    [row] = j.sessions()
    assert row["matchkey"] == "m1" and row["key"] == "dev" and row["server"] == "h:1" and row["user"] == "alice"
    assert row["requested_at"] == pytest.approx(T0 + 7.5) and row["granted_at"] == T0 + 10 and row["waited_s"] == 2.5
    assert row["started_at"] == pytest.approx(T0 + 10.1)
    assert row["ended_at"] == T0 + 40 and row["held_s"] == 30.0 and row["outcome"] == "failed"
    assert [e["kind"] for e in j.events()] == ["session_end", "session_start", "grant"]  # the raw log, newest first
    assert j.events(kind="grant")[0]["matchkey"] == "m1"


def test_requests_without_a_grant_are_rows_of_their_own(make_journal: Callable[..., Journal]) -> None:
    j = make_journal()
    feed(j, [*session("m1", T0, 5.0), ev("request_end", T0 + 20, user="bob", id=7, outcome="timeout", waited_s=20.0)])
    assert [r["matchkey"] for r in j.sessions()] == ["m1"]  # granted ones by default
    [unserved] = j.sessions(granted=False)
    assert unserved["user"] == "bob" and unserved["outcome"] == "timeout" and unserved["waited_s"] == 20.0
    assert unserved["granted_at"] is None and unserved["requested_at"] == T0
    assert len(j.sessions(granted=None)) == 2


def test_session_queries_filter_and_come_newest_first(make_journal: Callable[..., Journal]) -> None:
    j = make_journal()
    events = []
    for i in range(10):
        events += session(f"m{i}", T0 + 100 * i, 10.0, server=f"h:{i % 2}", user="alice" if i < 5 else "bob")
    feed(j, events)
    assert [r["matchkey"] for r in j.sessions(limit=3)] == ["m9", "m8", "m7"]
    assert [r["matchkey"] for r in j.sessions(since=T0 + 200, until=T0 + 500)] == ["m4", "m3", "m2"]
    assert {r["user"] for r in j.sessions(user="bob")} == {"bob"} and len(j.sessions(user="bob")) == 5
    assert len(j.sessions(server="h:1")) == 5 and j.sessions(key="other") == []


def test_an_end_without_its_grant_still_makes_a_row(make_journal: Callable[..., Journal]) -> None:
    """A grant from before the journal opened (or lost to a full queue)."""
    j = make_journal()
    feed(j, [ev("session_end", T0 + 50, server="h:1", user="alice", matchkey="old", held_s=20.0, outcome="ok")])
    [row] = j.sessions()
    assert row["granted_at"] == T0 + 30 and row["held_s"] == 20.0 and row["ended_at"] == T0 + 50


def test_servers_and_health_keep_the_latest_state(make_journal: Callable[..., Journal]) -> None:
    j = make_journal()
    feed(
        j,
        [
            ev("register", T0, server="h:1", peer="h:40000", labels={"soc": "sd8"}, slots=1, protocols=["tether"]),
            ev("register", T0, "npu", server="h:2", peer="h:40001", slots=2),
            ev("health", T0 + 1, server="h:1", state="quarantined", reason="3 failed sessions in a row", by="tracker"),
            ev("health", T0 + 2, server="h:2", state="cordoned", reason="maintenance", by="admin"),
            ev("health", T0 + 3, server="h:2", state="ok", reason="uncordoned", by="admin"),
            ev("unregister", T0 + 4, server="h:2", peer="h:40001", reason="closed"),
        ],
    )
    assert j.health_states() == {
        "h:1": {"state": "quarantined", "reason": "3 failed sessions in a row", "by": "tracker", "since": T0 + 1}
    }
    servers = {s["server"]: s for s in j.servers()}
    assert servers["h:1"]["labels"] == {"soc": "sd8"} and servers["h:1"]["protocols"] == ["tether"]
    assert servers["h:1"]["online"] == 1 and servers["h:2"]["online"] == 0 and servers["h:2"]["reason"] == "closed"


def test_attach_records_what_a_bus_emits_until_close(tmp_path: Path) -> None:
    bus = EventBus(wall=Clock(T0))
    j = Journal(tmp_path / "h.db")
    j.attach(bus)
    bus.emit("grant", key="dev", server="h:1", user="alice", id=1, matchkey="m1", waited_s=0.0)
    assert j.flush()
    assert j.close()
    assert not bus.active  # close unsubscribed
    assert [r["matchkey"] for r in JournalReader(tmp_path / "h.db").sessions()] == ["m1"]


# -- usage ----------------------------------------------------------------------------------------


def test_usage_counts_sessions_failures_busy_fraction_and_waits(make_journal: Callable[..., Journal]) -> None:
    j = make_journal()
    events = [ev("register", T0, server=s, peer=s, slots=1) for s in ("h:1", "h:2")]
    events += session("a", T0 + 0, 100.0, server="h:1", user="alice", waited=1.0)
    events += session("b", T0 + 200, 100.0, server="h:1", user="alice", waited=2.0, outcome="failed")
    events += session("c", T0 + 400, 200.0, server="h:2", user="bob", waited=3.0, outcome="released")
    events += session("d", T0 + 700, 100.0, server="h:2", user="bob", waited=4.0, outcome="server_lost")
    events += [ev("request_end", T0 + 900, user="bob", id=9, outcome="timeout", waited_s=10.0)]
    events += [ev("request_end", T0 + 950, user="bob", id=10, outcome="cancelled", waited_s=50.0)]
    feed(j, events)
    [total] = j.usage(T0, T0 + 1000, by="all")
    assert total["sessions"] == 4 and total["failures"] == 2 and total["never_granted"] == 2
    assert total["busy_s"] == pytest.approx(500.0) and total["devices"] == 2
    assert total["busy_fraction"] == pytest.approx(500.0 / (1000.0 * 2))
    # waits: the four grants and the request that timed out (not the cancelled one)
    assert total["waits"] == 5 and total["wait_p50_s"] == pytest.approx(3.0)
    assert total["wait_p95_s"] == pytest.approx(4.0 + (10.0 - 4.0) * 0.8)
    assert total["outcomes"] == {"cancelled": 1, "failed": 1, "ok": 1, "released": 1, "server_lost": 1, "timeout": 1}
    by_user = {g["by"]: g for g in j.usage(T0, T0 + 1000, by="user")}
    assert by_user["alice"]["busy_s"] == pytest.approx(200.0) and by_user["alice"]["devices"] == 1
    assert by_user["bob"]["busy_fraction"] == pytest.approx(300.0 / 1000.0)
    assert by_user["bob"]["never_granted"] == 2 and by_user["alice"]["failures"] == 1
    by_server = {g["by"]: g for g in j.usage(T0, T0 + 1000, by="server")}
    assert by_server["h:1"]["busy_fraction"] == pytest.approx(0.2) and by_server["h:2"][
        "busy_fraction"
    ] == pytest.approx(0.3)


def test_busy_time_is_cut_to_the_window_and_idle_devices_count(make_journal: Callable[..., Journal]) -> None:
    j = make_journal()
    events = [ev("register", T0, server=s, peer=s, slots=1) for s in ("h:1", "h:2", "h:3", "h:4")]
    events += session("long", T0 + 500, 1000.0, server="h:1")  # 500..1500: half inside [1000, 2000)
    events += [ev("grant", T0 + 1800, server="h:2", user="bob", id=2, matchkey="open", waited_s=0.0)]  # still open
    feed(j, events)
    [key] = j.usage(T0 + 1000, T0 + 2000, by="key", now=T0 + 5000)
    assert key["sessions"] == 1  # "long" was granted before the window: its time counts, not the session
    assert key["busy_s"] == pytest.approx(500.0 + 200.0)
    assert key["devices"] == 4  # two never used, but registered: the fraction is of the key's devices
    assert key["busy_fraction"] == pytest.approx(700.0 / (1000.0 * 4))


def test_usage_of_an_empty_window_has_no_fraction(make_journal: Callable[..., Journal]) -> None:
    j = make_journal()
    feed(j, [ev("register", T0, server="h:1", peer="p", slots=1), *session("a", T0, 10.0)])
    assert j.usage(T0 + 50 * DAY, T0 + 51 * DAY, by="user", now=T0 + 52 * DAY) == []
    assert j.usage(T0 - 10 * DAY, T0 - 9 * DAY, by="user", now=T0 + DAY) == []  # before its first record
    # no time in the window: no fraction rather than 0 %
    [key] = summarize([Span(T0, "dev", "h:1", "alice", True, T0, T0 + 5, 1.0, "ok")], T0, T0, by="key")
    assert key["devices"] == 1 and key["busy_fraction"] is None
    with pytest.raises(ValueError, match="by must be"):
        j.usage(by="nobody")  # type: ignore[arg-type]


def test_timeline_gives_utilisation_per_slice_and_sorted_waits(make_journal: Callable[..., Journal]) -> None:
    j = make_journal()
    events = [ev("register", T0, server="h:1", peer="h:1", slots=1)]
    events += session("a", T0 + 0, 50.0, waited=3.0)  # busy the first half of slice 0
    events += session("b", T0 + 150, 100.0, waited=1.0)  # the second half of slice 1, the first of slice 2
    feed(j, events)
    start, end, util, waits = j.timeline(T0, T0 + 400, bins=4, now=T0 + 400)
    assert (start, end) == (T0, T0 + 400)
    assert util["dev"] == pytest.approx([0.5, 0.5, 0.5, 0.0])
    assert waits == {"dev": [1.0, 3.0]}


# -- restarts -------------------------------------------------------------------------------------


def test_a_reopened_journal_closes_what_the_last_run_left_open(tmp_path: Path) -> None:
    clock = Clock(T0)
    first = Journal(tmp_path / "h.db", wall=clock)
    feed(first, [ev("grant", T0, server="h:1", user="alice", id=1, matchkey="m1", waited_s=0.0)])
    clock.now = T0 + 60  # its last write: the session was held at least this long
    feed(first, [ev("register", T0 + 60, server="h:1", peer="p", slots=1)])
    first.close()
    clock.now = T0 + 3600
    second = Journal(tmp_path / "h.db", wall=clock)
    try:
        assert second.orphans_closed == 1
        [row] = second.sessions()
        assert row["outcome"] == "unknown" and row["held_s"] == pytest.approx(60.0) and row["ended_at"] is None
        assert second.servers()[0]["online"] == 0
        [total] = second.usage(T0, T0 + 3600, by="all", now=T0 + 3600)
        assert total["busy_s"] == pytest.approx(60.0) and total["failures"] == 0  # not the device's fault
        # the session outlived the restart and its end is reported to the new tracker run
        feed(second, [ev("session_end", T0 + 900, server="h:1", matchkey="m1", held_s=900.0, outcome="ok")])
        [row] = second.sessions()
        assert row["outcome"] == "ok" and row["held_s"] == 900.0 and row["ended_at"] == T0 + 900
    finally:
        second.close()


# -- the writer thread ------------------------------------------------------------------------------


def test_record_never_blocks_a_full_queue_drops_and_counts(
    make_journal: Callable[..., Journal], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    gate, writing = threading.Event(), threading.Event()
    real_apply = store_module.apply

    def stuck_disk(conn: sqlite3.Connection, events: Any) -> None:
        writing.set()
        assert gate.wait(30)
        real_apply(conn, events)

    monkeypatch.setattr(store_module, "apply", stuck_disk)
    j = make_journal(queue_max=10, batch_max=5)
    j.record(ev("grant", T0, server="h:1", id=0, matchkey="first", waited_s=0.0))
    assert writing.wait(10)  # the writer holds one event and waits on the "disk"
    for i in range(1, 101):  # none of these may wait for the writer
        j.record(ev("grant", T0 + i, server="h:1", id=i, matchkey=f"m{i}", waited_s=0.0))
    stats = j.stats()
    assert stats.queued == 10 and stats.dropped == 90 and stats.written == 0
    queue_full = [r for r in caplog.records if "journal queue full" in r.getMessage()]
    assert len(queue_full) == 1 and queue_full[0].levelno == logging.WARNING  # once, not 90 times
    gate.set()
    assert j.flush()
    assert j.stats().written == 11 and len(j.sessions()) == 11


def test_close_writes_everything_queued(tmp_path: Path) -> None:
    j = Journal(tmp_path / "h.db", batch_max=100)
    events = []
    for i in range(2000):
        events += session(f"m{i}", T0 + i, 0.5)
    for e in events:
        j.record(e)
    assert j.close(timeout=30)
    j.record(ev("grant", T0, server="h:1", matchkey="late"))  # after close: dropped, counted
    assert j.stats().dropped == 1 and j.stats().written == 6000 and not j.flush()
    reader = JournalReader(tmp_path / "h.db")
    assert len(reader.sessions(limit=10_000)) == 2000 and reader.sessions()[0]["outcome"] == "ok"
    assert j.close()  # again: nothing to do


def test_a_batch_the_database_refuses_is_counted_and_the_writer_goes_on(
    make_journal: Callable[..., Journal], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    real_apply = store_module.apply
    calls = {"n": 0}

    def fails_once(conn: sqlite3.Connection, events: Any) -> None:
        calls["n"] += 1
        if calls["n"] == 1:
            raise sqlite3.OperationalError("disk I/O error")
        real_apply(conn, events)

    monkeypatch.setattr(store_module, "apply", fails_once)
    j = make_journal()
    feed(j, session("lost", T0, 1.0))
    feed(j, session("kept", T0 + 10, 1.0))
    assert j.stats().failed == 3 and [r["matchkey"] for r in j.sessions()] == ["kept"]
    assert any("disk I/O error" in r.getMessage() for r in caplog.records)


def test_reads_while_writing_see_whole_batches(make_journal: Callable[..., Journal]) -> None:
    j = make_journal(batch_max=50)
    done = threading.Event()
    errors: list[BaseException] = []
    seen: list[list[int]] = [[] for _ in range(3)]

    def read(counts: list[int]) -> None:
        try:
            while not done.is_set():
                rows = j.sessions(limit=100_000)
                j.usage(T0, T0 + 10_000, by="server", now=T0 + 10_000)
                counts.append(len(rows))
                # a batch is one transaction: never a start without its grant's row, never a row half-closed
                assert all((r["ended_at"] is None) == (r["outcome"] is None) for r in rows)
        except BaseException as exc:  # reported below
            errors.append(exc)

    readers = [threading.Thread(target=read, args=(counts,)) for counts in seen]
    for t in readers:
        t.start()
    for i in range(1500):
        for e in session(f"m{i}", T0 + i, 0.5, server=f"h:{i % 7}"):
            j.record(e)
    assert j.flush()
    done.set()
    for t in readers:
        t.join(30)
    assert not errors, errors[0]
    assert all(counts and counts == sorted(counts) for counts in seen), "a reader saw rows disappear"
    assert len(j.sessions(limit=10_000)) == 1500


# -- retention and caps -----------------------------------------------------------------------------


def test_retention_deletes_old_rows_but_keeps_the_quarantine_list(make_journal: Callable[..., Journal]) -> None:
    clock = Clock(T0)
    j = make_journal(wall=clock, retention_days=7, prune_interval_s=0)
    old = [
        *session("old", T0, 10.0),
        ev("register", T0, server="gone:1", peer="p", slots=1),
        ev("unregister", T0 + 1, server="gone:1", reason="closed"),
        ev("health", T0 + 2, server="bad:1", state="quarantined", reason="lost workers", by="tracker"),
        ev("health", T0 + 2, server="fine:1", state="cordoned", by="admin"),
        ev("health", T0 + 3, server="fine:1", state="ok", by="admin"),
    ]
    feed(j, old)
    clock.now = T0 + 8 * DAY
    feed(j, session("new", T0 + 8 * DAY - 60, 10.0))
    assert j.prune_now()
    assert [r["matchkey"] for r in j.sessions()] == ["new"]
    assert {e["kind"] for e in j.events()} == {"grant", "session_start", "session_end"} and len(j.events()) == 3
    assert j.servers() == []
    assert list(j.health_states()) == ["bad:1"]  # kept whatever its age


def test_row_caps_keep_the_newest(make_journal: Callable[..., Journal]) -> None:
    j = make_journal(max_events=30, max_sessions=5, retention_days=0, prune_interval_s=0)
    events = []
    for i in range(40):
        events += session(f"m{i}", T0 + i, 0.5)
    feed(j, events)
    assert j.prune_now()
    assert [r["matchkey"] for r in j.sessions()] == [f"m{i}" for i in range(39, 34, -1)]
    assert len(j.events(limit=1000)) == 30 and j.events()[0]["matchkey"] == "m39"


def test_bad_settings_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="retention_days"):
        Journal(tmp_path / "h.db", retention_days=-1)
    with pytest.raises(ValueError, match="queue_max"):
        Journal(tmp_path / "h.db", queue_max=0)


# -- schema versions and files that are not journals ------------------------------------------------


def test_a_newer_schema_is_refused_with_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "h.db"
    Journal(path).close()
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE schema SET version = 99")
    conn.close()
    with pytest.raises(
        JournalError, match=r"schema version 99 was written by a newer tether; this one reads up to version 1"
    ):
        Journal(path)
    with pytest.raises(JournalError, match="newer tether"):
        JournalReader(path).sessions()
    with sqlite3.connect(path) as conn:  # left as it was
        assert conn.execute("SELECT version FROM schema").fetchone() == (99,)
    conn.close()


def test_files_that_are_not_journals_are_refused(tmp_path: Path) -> None:
    other = tmp_path / "other.db"
    with sqlite3.connect(other) as conn:
        conn.execute("CREATE TABLE t (x)")
    conn.close()
    with pytest.raises(JournalError, match="not a tether journal"):
        Journal(other)
    text = tmp_path / "notes.txt"
    text.write_text("hello, this is not SQLite at all" * 100)
    with pytest.raises(JournalError, match="not a tether journal"):
        Journal(text)
    with pytest.raises(JournalError, match="no such journal"):
        JournalReader(tmp_path / "missing.db").sessions()
    with pytest.raises(JournalError, match="no such directory"):
        Journal(tmp_path / "nowhere" / "h.db")


# -- the writer process (tether tracker --db) -------------------------------------------------------


def _writer_pid(j: Journal) -> int:
    pid = getattr(j._store, "pid", None)
    assert isinstance(pid, int)
    return pid


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie nobody reaped yet has ended)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def test_a_writer_process_writes_prunes_and_ends_the_run(make_journal: Callable[..., Journal], tmp_path: Path) -> None:
    clock = Clock(T0 + 100 * DAY)
    j = make_journal(process=True, retention_days=30, wall=clock)
    assert j.writer == "process"
    pid = _writer_pid(j)
    assert pid != os.getpid() and _alive(pid)
    feed(j, session("old", T0, 5.0) + session("new", T0 + 99 * DAY, 5.0, user="bob"))
    assert [r["matchkey"] for r in j.sessions()] == ["new", "old"] and j.stats().written == 6
    assert j.prune_now()
    assert [r["matchkey"] for r in j.sessions()] == ["new"]  # 100 days old: gone, by the journal's clock
    assert j.close()
    with sqlite3.connect(tmp_path / "history.db") as conn:
        [(stopped,)] = conn.execute("SELECT stopped FROM runs").fetchall()
    assert stopped == T0 + 100 * DAY  # the run's end came from this process's clock too
    wait_until(lambda: not _alive(pid), what="the writer process gone")


def test_a_lost_writer_process_is_replaced(
    make_journal: Callable[..., Journal], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from tether.journal import process as process_module

    monkeypatch.setattr(process_module, "RESPAWN_EVERY_S", 0.0)
    j = make_journal(process=True)
    feed(j, session("before", T0, 1.0))
    first = _writer_pid(j)
    os.kill(first, signal.SIGKILL)
    wait_until(lambda: j._store._proc is not None and j._store._proc.poll() is not None, what="the writer killed")  # type: ignore[attr-defined]
    feed(j, session("lost", T0 + 10, 1.0))  # the batch the dead writer was handed: failed, counted
    feed(j, session("after", T0 + 20, 1.0))
    assert j.stats().failed == 3 and j.stats().written == 6
    assert [r["matchkey"] for r in j.sessions()] == ["after", "before"]
    second = _writer_pid(j)
    assert second != first and _alive(second)
    assert any("not done" in r.getMessage() for r in caplog.records)
    assert any("a new writer process" in r.getMessage() for r in caplog.records)


_KILLED_TRACKER = """
import sys, time
from tether.journal import Journal
from tether.tracker.events import TrackerEvent
j = Journal(sys.argv[1], process=True)
j.record(TrackerEvent("grant", time.time(), "dev", "h:1", "alice", {"id": 1, "matchkey": "m", "waited_s": 0.0}))
assert j.flush()
print(j._store.pid, flush=True)
sys.stdin.read()
"""


def test_a_writer_outlives_no_tracker(tmp_path: Path) -> None:
    """A tracker killed outright (SIGKILL: no close) leaves no writer process behind, and its run is ended."""
    path = tmp_path / "h.db"
    with subprocess.Popen(
        [sys.executable, "-c", _KILLED_TRACKER, str(path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    ) as parent:
        try:
            assert parent.stdout is not None
            pid = int(parent.stdout.readline())
            assert _alive(pid)
        finally:
            parent.kill()
            parent.wait(30)
    wait_until(lambda: not _alive(pid), what="the writer process gone after its tracker")
    with sqlite3.connect(path) as conn:
        [(stopped,)] = conn.execute("SELECT stopped FROM runs").fetchall()
    assert stopped is not None
    assert [r["matchkey"] for r in JournalReader(path).sessions()] == ["m"]
