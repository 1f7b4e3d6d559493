"""``tether usage``: who used which devices, how busy they were and how long people waited, read from the
journal a tracker writes with ``--db`` (:mod:`tether.journal`); the tracker need not be running.

A table by default; ``--json`` and ``--csv`` for scripts (on stdout); ``--plot FILE`` draws utilisation
over time per key and the wait-time distribution. Exit codes: 0, 2 for bad usage or a journal that
cannot be read.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import re
import sys
import time
from typing import Any

from ..journal import JournalError, JournalReader
from ..journal.usage import BY

__all__ = ["add_parser", "parse_when", "render", "run"]

_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhdw])$")
_COLUMNS = ("sessions", "failures", "busy", "busy %", "devices", "wait p50", "wait p95", "never granted")


def parse_when(text: str, now: float | None = None) -> float:
    """A point in time: a duration back from ``now`` (``30m``, ``12h``, ``7d``, ``2w``; units s m h d w)
    or an ISO date or date-time (``2026-12-01``, ``2026-12-01T08:00``; local time unless it gives an
    offset). Raises :class:`argparse.ArgumentTypeError`."""
    now = time.time() if now is None else now
    m = _DURATION.match(text.strip())
    if m:
        return now - float(m.group(1)) * _UNITS[m.group(2)]
    try:
        when = dt.datetime.fromisoformat(text.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a duration back from now (30m, 12h, 7d) or an ISO date (2026-12-01[T08:00]), not {text!r}"
        ) from None
    return when.timestamp()  # naive: local time


def add_parser(sub: Any) -> None:
    p = sub.add_parser("usage", help="usage history from a tracker's --db journal: sessions, busy devices, waits")
    p.add_argument("--db", required=True, metavar="PATH", help="the journal (tether tracker --db PATH)")
    p.add_argument(
        "--since", type=parse_when, default=None, metavar="WHEN", help="from (7d, 12h, 2026-12-01; default 7d)"
    )
    p.add_argument("--until", type=parse_when, default=None, metavar="WHEN", help="up to (default now)")
    p.add_argument("--key", default=None, help="only this device key")
    p.add_argument("--by", choices=BY[:3], default="user", help="group by user, key or server")
    out = p.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true", help="print JSON for scripts")
    out.add_argument("--csv", action="store_true", help="print CSV, one row per group")
    p.add_argument(
        "--plot",
        default=None,
        metavar="FILE",
        help="draw utilisation over time per key and the wait-time distribution: .svg (no dependency), "
        ".png and others with matplotlib",
    )
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    now = time.time()
    since = args.since if args.since is not None else now - 7 * 86400.0
    reader = JournalReader(args.db)
    try:
        if args.plot:
            from ..journal.plot import check_plot_path

            check_plot_path(args.plot)
        start, end = reader.window(since, args.until, now)
        groups = reader.usage(start, end, key=args.key, by=args.by, now=now)
        total = reader.usage(start, end, key=args.key, by="all", now=now)
        if args.plot:
            from ..journal.plot import write_usage_plot

            _, _, util, waits = reader.timeline(start, end, key=args.key, now=now)
            write_usage_plot(args.plot, start, end, util=util, waits=waits, title=f"tether usage: {args.db}")
    except JournalError as exc:
        print(f"tether usage: {exc}", file=sys.stderr)
        return 2
    report = {
        "db": args.db,
        "since": start,
        "until": end,
        "window_s": end - start,
        "key": args.key,
        "by": args.by,
        "groups": groups,
        "total": total[0] if total else None,
    }
    if args.json:
        json.dump(report, sys.stdout, indent=2)
        print()
    elif args.csv:
        _write_csv(report)
    else:
        print(render(report), end="")
    if args.plot:
        print(f"plot written to {args.plot}", file=sys.stderr)
    return 0


def _write_csv(report: dict[str, Any]) -> None:
    by, groups, total = report["by"], report["groups"], report["total"]
    fields = [by, "sessions", "failures", "never_granted", "busy_s", "devices", "busy_fraction", "waits"]
    fields += ["wait_p50_s", "wait_p95_s", "outcomes"]
    writer = csv.writer(sys.stdout, lineterminator="\n")
    writer.writerow(fields)
    for row, name in [(g, g["by"]) for g in groups] + ([(total, "(total)")] if total else []):
        outcomes = ";".join(f"{k}={v}" for k, v in row["outcomes"].items())
        cells = [row[f] for f in fields[1:-1]]
        writer.writerow([name if name is not None else "", *("" if c is None else c for c in cells), outcomes])


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f}s"
    if seconds < 3600:
        return f"{seconds // 60:.0f}m{seconds % 60:02.0f}s"
    if seconds < 86400:
        return f"{seconds // 3600:.0f}h{seconds % 3600 // 60:02.0f}m"
    return f"{seconds // 86400:.0f}d{seconds % 86400 // 3600:02.0f}h"


def _wait(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return f"{seconds * 1000:.0f}ms" if seconds < 1 else _duration(seconds)


def _cells(row: dict[str, Any]) -> list[str]:
    fraction = row["busy_fraction"]
    return [
        str(row["sessions"]),
        str(row["failures"]),
        _duration(row["busy_s"]),
        "-" if fraction is None else f"{100 * fraction:.1f}%",
        str(row["devices"]),
        _wait(row["wait_p50_s"]),
        _wait(row["wait_p95_s"]),
        str(row["never_granted"]),
    ]


def _stamp(wall: float) -> str:
    return dt.datetime.fromtimestamp(wall).strftime("%Y-%m-%d %H:%M")


def render(report: dict[str, Any]) -> str:
    """The table ``tether usage`` prints from its JSON ``report``: a row per group, then the total."""
    db, start, end, by, key = report["db"], report["since"], report["until"], report["by"], report["key"]
    groups, total = report["groups"], report["total"]
    only = f", key {key}" if key else ""
    head = f"{db}: {_stamp(start)} .. {_stamp(end)} ({_duration(end - start)}{only}), by {by}\n"
    if not groups:
        return head + "no sessions or requests in this window\n"
    rows = [[str(g["by"]) if g["by"] is not None else "-", *_cells(g)] for g in groups]
    if total is not None:
        rows.append(["(total)", *_cells(total)])
    header = [by, *_COLUMNS]
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]

    def fmt(cells: list[str]) -> str:
        first = cells[0].ljust(widths[0])
        rest = "  ".join(c.rjust(w) for c, w in zip(cells[1:], widths[1:], strict=True))
        return f"{first}  {rest}\n"

    line = "-" * (sum(widths) + 2 * (len(widths) - 1)) + "\n"
    body, tail = (rows[:-1], line + fmt(rows[-1])) if total is not None else (rows, "")
    note = "busy %: held time / (window x devices seen); waits: grants and requests that timed out\n"
    return head + line + fmt(header) + line + "".join(map(fmt, body)) + tail + note
