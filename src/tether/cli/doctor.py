"""``tether doctor``: check a tracker, its servers and this machine, and say what to fix.

One line per finding: ``ok``, ``FAIL`` or ``warn`` (``skip`` for what could not be checked), what was
seen, and for a failure ``fix: ...``. Exit code 0 when nothing failed, 1 otherwise. Every step has a
timeout (``--timeout``): the doctor never hangs. The checks themselves: :mod:`tether.client.doctor`.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from ..client.doctor import Report, diagnose
from ._args import hostport, seconds, tracker_address
from ._tls import add_client_tls_flags, tls_from_args

__all__ = ["add_parser", "render", "run"]


def add_parser(sub: Any) -> None:
    p = sub.add_parser("doctor", help="check a tracker and its servers; say what to fix")
    p.add_argument(
        "--tracker",
        type=hostport,
        default=None,
        metavar="HOST:PORT",
        help="the tracker (default: $TVM_TRACKER_HOST:$TVM_TRACKER_PORT, else 127.0.0.1:9190)",
    )
    p.add_argument("--key", default=None, help="the device key clients request (default: every key)")
    p.add_argument("--json", action="store_true", help="print JSON for scripts")
    p.add_argument("--timeout", type=seconds, default=3.0, help="seconds for each connect, reply and wait")
    p.add_argument(
        "--no-session", action="store_true", help="do not open sessions (take no device, not even for a moment)"
    )
    add_client_tls_flags(p)
    p.set_defaults(run=run)


def render(report: Report) -> str:
    width = max((len(c.name) for c in report.checks), default=0)
    lines = [f"tether doctor: tracker {report.tracker}\n"]
    for c in report.checks:
        fix = f"  fix: {c.fix}" if c.fix and c.status != "ok" else ""
        lines.append(f"{c.status:<4}  {c.name:<{width}}  {c.detail}{fix}\n")
    failed = sum(1 for c in report.checks if c.status == "FAIL")
    warned = sum(1 for c in report.checks if c.status == "warn")
    verdict = f"{failed} failed" if failed else "all passed"
    lines.append(f"{verdict}" + (f", {warned} warning(s)" if warned else "") + "\n")
    return "".join(lines)


def run(args: argparse.Namespace) -> int:
    host, port = args.tracker if args.tracker else tracker_address()
    timeout = max(args.timeout, 0.1)
    report = diagnose(
        host,
        port,
        args.key,
        timeout=timeout,
        session_timeout=max(10.0, 4 * timeout),
        sessions=not args.no_session,
        tls=tls_from_args(args),
    )
    if args.json:
        json.dump(report.to_json(), sys.stdout, indent=2)
        print()
    else:
        print(render(report), end="")
    return report.exit_code
