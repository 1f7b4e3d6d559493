"""The journal's disk use and write rate: N synthetic sessions (grant, session_start, session_end; plus a
register per server) recorded into a :class:`tether.journal.Journal` on a temporary file.

    python bench/journal_bench.py [--sessions 100000] [--servers 5000] [--users 64] [--dir DIR] [--json out.json]

Measured: the caller's cost of ``record()`` (what the tracker's event loop pays per event, microseconds),
the writer's rate (events written per second, from the first record to everything flushed), the file's
size after ``close()`` (WAL checkpointed into the database), bytes per session and per 100,000 sessions,
row counts, and how long ``usage()`` over all of it takes. Every event is kept (the queue is as large as
the run), so the rate is the writer's own, not the producer's.
"""

from __future__ import annotations

import argparse
import os
import random
import sqlite3
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "src"))

from benchlib import machine_info, timed_run, write_report  # noqa: E402
from tether.journal import Journal  # noqa: E402
from tether.tracker.events import TrackerEvent  # noqa: E402


def events(sessions: int, servers: int, users: int, t0: float, seed: int = 1) -> list[TrackerEvent]:
    """Registers, then ``sessions`` grant/start/end triples of realistic field sizes (a session every
    ~0.1 s of wall time, held 1-600 s)."""
    rnd = random.Random(seed)
    out = [
        TrackerEvent(
            "register",
            t0,
            f"key{i % 8}",
            f"10.{i // 65536 % 256}.{i // 256 % 256}.{i % 256}:9090",
            None,
            {
                "peer": f"10.0.0.1:{40000 + i}",
                "protocols": ["tether", "tvm"],
                "labels": {"soc": "sd8"},
                "slots": 1,
                "device": {"os": "Linux", "arch": "aarch64", "cores": 8, "memory": 8 << 30},
                "version": "0.1.0",
            },
        )
        for i in range(servers)
    ]
    t = t0
    for n in range(sessions):
        i = rnd.randrange(servers)
        key, server = f"key{i % 8}", f"10.{i // 65536 % 256}.{i // 256 % 256}.{i % 256}:9090"
        user, matchkey = f"user{rnd.randrange(users)}", f"{key}:{rnd.random():.17f}"
        waited, held = rnd.expovariate(1 / 2.0), rnd.uniform(1, 600)
        out += [
            TrackerEvent("grant", t, key, server, user,
                         {"id": n, "matchkey": matchkey, "waited_s": round(waited, 6), "priority": 1}),
            TrackerEvent("session_start", t + 0.05, key, server, user, {"matchkey": matchkey, "peer": "10.1.0.7:51234"}),
            TrackerEvent("session_end", t + held, key, server, user,
                         {"matchkey": matchkey, "held_s": round(held, 6), "outcome": "ok", "detail": "", "started": True}),
        ]  # fmt: skip
        t += 0.1
    out.sort(key=lambda e: e.wall)  # as the tracker emits them: ends interleave with later grants
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    feed = events(args.sessions, args.servers, args.users, time.time() - args.sessions * 0.1 - 600)
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        path = Path(tmp) / "history.db"
        journal = Journal(path, queue_max=len(feed) + 10, retention_days=0, prune_interval_s=0)
        started = time.perf_counter()
        for event in feed:
            journal.record(event)
        recorded = time.perf_counter()
        assert journal.flush(timeout=600), "not flushed"
        flushed = time.perf_counter()
        stats = journal.stats()
        usage_started = time.perf_counter()
        usage = journal.usage(by="key")
        usage_s = time.perf_counter() - usage_started
        assert journal.close(timeout=60)
        size = path.stat().st_size
        with sqlite3.connect(path) as conn:
            rows = {
                t: conn.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in ("events", "sessions", "servers")
            }
        conn.close()
    assert stats.written == len(feed) and stats.dropped == 0 and stats.failed == 0, stats
    assert sum(g["sessions"] for g in usage) == args.sessions
    write_s = flushed - started
    return {
        "bench": "journal",
        "machine": machine_info(sqlite=sqlite3.sqlite_version),
        "sessions": args.sessions,
        "servers": args.servers,
        "events": len(feed),
        "rows": rows,
        "record_us_per_event": (recorded - started) / len(feed) * 1e6,
        "write_s": write_s,
        "events_per_s": len(feed) / write_s,
        "sessions_per_s": args.sessions / write_s,
        "db_bytes": size,
        "bytes_per_session": size / args.sessions,
        "bytes_per_100k_sessions": size / args.sessions * 100_000,
        "usage_s": usage_s,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sessions", type=int, default=100_000)
    p.add_argument("--servers", type=int, default=5000)
    p.add_argument("--users", type=int, default=64)
    p.add_argument("--dir", default=None, help="where the temporary database goes (default: the system's temp dir)")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    report = timed_run(run, args)
    mb = report["db_bytes"] / 1e6
    print(
        f"{report['sessions']} sessions ({report['events']} events, {report['servers']} servers) on sqlite {sqlite3.sqlite_version}"
    )
    print(f"  record(): {report['record_us_per_event']:.2f} us per event on the caller's thread")
    print(
        f"  written:  {report['events_per_s']:,.0f} events/s ({report['sessions_per_s']:,.0f} sessions/s), {report['write_s']:.1f} s"
    )
    print(f"  file:     {mb:.1f} MB, {report['bytes_per_session']:.0f} bytes per session, "
          f"{report['bytes_per_100k_sessions'] / 1e6:.1f} MB per 100,000 sessions")  # fmt: skip
    print(f"  rows:     {report['rows']}; usage() over all of it: {report['usage_s']:.2f} s")
    write_report(report, args.json, "journal")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    main()
