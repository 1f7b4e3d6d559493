"""``tether query``: what a tracker holds (servers, queues, waiters), as a table or JSON.

Honours ``TVM_TRACKER_HOST``/``TVM_TRACKER_PORT`` like ``python -m tvm.exec.query_rpc_tracker``; reads
TVM's tracker too. An unreachable tracker is reported within ``--timeout`` seconds, exit code 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from ..client.query import TrackerStatus, query_tracker
from ..errors import ProtocolError, TransportError
from ._args import port, seconds, tracker_address
from ._tls import add_client_tls_flags, tls_from_args

__all__ = ["add_parser", "render", "run"]


def add_parser(sub: Any) -> None:
    p = sub.add_parser("query", help="show a tracker's servers and queues")
    p.add_argument("--host", default=None, help="tracker host (default $TVM_TRACKER_HOST or 127.0.0.1)")
    p.add_argument("--port", type=port, default=None, help="tracker port (default $TVM_TRACKER_PORT or 9190)")
    p.add_argument("--json", action="store_true", help="print JSON for scripts")
    p.add_argument("--timeout", type=seconds, default=5.0, help="seconds to wait for the tracker (default 5)")
    add_client_tls_flags(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    host, port = tracker_address(args.host, args.port)
    try:
        status = query_tracker(host, port, timeout=args.timeout, tls=tls_from_args(args))
    except (TransportError, ProtocolError, TimeoutError, OSError) as exc:
        reason = str(exc) or type(exc).__name__
        print(f"tether query: cannot read the tracker at {host}:{port}: {reason}", file=sys.stderr)
        print("  is a tracker running there? (tether tracker --host HOST --port PORT)", file=sys.stderr)
        return 2
    if args.json:
        json.dump(status.to_json(), sys.stdout, indent=2)
        print()
    else:
        print(render(status), end="")
    return 0


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return ""
    if seconds < 60:
        return f"{seconds:.1f}s"
    if seconds < 3600:
        return f"{seconds // 60:.0f}m{seconds % 60:02.0f}s"
    return f"{seconds // 3600:.0f}h{seconds % 3600 // 60:02.0f}m"


def _table(title: str, header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    line = "-" * (sum(widths) + 2 * (len(widths) - 1))

    def fmt(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip() + "\n"

    return f"{title}\n{line}\n{fmt(header)}{line}\n" + "".join(fmt(r) for r in rows) + f"{line}\n"


def render(status: TrackerStatus) -> str:
    """The seeds' table (Server List, Queue Status) plus state, holders and waiters."""
    kind = f"tether {status.tether_version}" if status.tether_version else "TVM tracker: no server states or waiters"
    out = [f"Tracker address {status.address} ({kind})\n\n"]
    servers = [
        [
            s.address,
            s.key,
            s.state,
            s.holder or "",
            _duration(s.since_s),
            ",".join(f"{k}={v}" for k, v in sorted(s.labels.items())),
        ]
        for s in status.servers
    ]
    out.append(_table("Server List", ["server-address", "key", "state", "holder", "since", "labels"], servers))
    out.append("\n")
    keys = [[k.key, str(k.total) + ("" if k.exact else "+"), str(k.free), str(k.pending)] for k in status.keys]
    out.append(_table("Queue Status", ["key", "total", "free", "pending"], keys))
    if status.waiters:
        out.append("\n")
        rows = [[w.key, w.user, f"{w.priority:g}", _duration(w.waited_s)] for w in status.waiters]
        out.append(_table("Waiting", ["key", "user", "priority", "waited"], rows))
    notes = [f"  {k.key}: {k.note}\n" for k in status.keys if k.note]
    for s in status.servers:
        if s.health:
            by = f" by {s.health['by']}" if s.health.get("by") else ""
            why = f": {s.health['reason']}" if s.health.get("reason") else ""
            notes.append(f"  {s.server or s.address}: {s.health.get('state')}{by}{why}\n")
    if any(not k.exact for k in status.keys):
        notes.append("  +: served through a proxy; TVM's tracker does not say how many servers are behind it\n")
    if notes:
        out.append("\nNotes\n")
        out.extend(notes)
    return "".join(out)
