"""``tether tracker --db PATH [--db-retention DAYS]``: the flags, and the journal they open.

The tracker's CLI calls :func:`add_flags` on its parser, opens the journal with :func:`opened` around
the event loop (closed, so everything queued is written, when the tracker has stopped) and calls
:func:`attach` once its :class:`~tether.tracker.server.TrackerServer` exists, before ``start()``: the
first event is recorded, and the server's ``journal`` attribute is set before it serves (a restarted
tracker reads its quarantine list back from :meth:`~tether.journal.JournalReader.health_states`).
"""

from __future__ import annotations

import argparse
import contextlib
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from .writer import Journal

if TYPE_CHECKING:
    from ..tracker.server import TrackerServer

__all__ = ["DEFAULT_RETENTION_DAYS", "add_flags", "attach", "describe", "open_from_args", "opened"]

DEFAULT_RETENTION_DAYS = 90.0


def _days(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a non-negative number of days, not {text!r}")
    return value


def add_flags(parser: Any) -> None:
    """Add ``--db`` and ``--db-retention`` to ``parser`` (an argparse parser or group)."""
    group = parser.add_argument_group("history", "every grant, session, registration and health change in SQLite")
    group.add_argument(
        "--db",
        default=None,
        metavar="PATH",
        help="write the tracker's history to this SQLite file (created when missing; read it with tether usage)",
    )
    group.add_argument(
        "--db-retention",
        type=_days,
        default=DEFAULT_RETENTION_DAYS,
        metavar="DAYS",
        help=f"delete history older than this (0: keep it; default {DEFAULT_RETENTION_DAYS:g})",
    )


def open_from_args(args: argparse.Namespace) -> Journal | None:
    """The journal ``--db`` names (None without it). Raises
    :class:`~tether.journal.JournalError` (a ConfigError: one line, exit code 2) when it cannot be used."""
    path = getattr(args, "db", None)
    if not path:
        return None
    return Journal(os.path.expanduser(path), retention_days=args.db_retention, process=True)


@contextlib.contextmanager
def opened(args: argparse.Namespace) -> Iterator[Journal | None]:
    """:func:`open_from_args`, closed (everything queued written) when the block ends."""
    journal = open_from_args(args)
    try:
        yield journal
    finally:
        if journal is not None:
            journal.close()


def attach(server: TrackerServer, journal: Journal | None) -> None:
    """Record ``server``'s events in ``journal``, expose it as ``server.journal`` (for the web side) and
    give the core the health standings the journal kept (cordoned, draining, quarantined servers stay so
    across a restart). Nothing without a journal."""
    if journal is None:
        return
    for sid, standing in journal.health_states().items():
        server.core.health.restore(sid, standing["state"], standing["reason"], standing["by"], standing["since"])
    journal.attach(server.core.events)
    server.journal = journal


def describe(journal: Journal) -> str:
    """The startup line: where the history goes, and what a restart took back from it."""
    keep = f"{journal.retention_days:g} days" if journal.retention_days else "no age limit"
    notes = [f"kept {keep}"]
    withheld = journal.health_states()
    if withheld:
        notes.append(
            f"{len(withheld)} server(s) not ok as before: "
            + ", ".join(f"{sid} {s['state']}" for sid, s in list(withheld.items())[:5])
            + (" ..." if len(withheld) > 5 else "")
        )
    if journal.orphans_closed:
        notes.append(f"{journal.orphans_closed} session(s) the last run left open closed as unknown")
    return f"history in {journal.path} ({'; '.join(notes)})"
