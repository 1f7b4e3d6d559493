"""The ``tether`` command: ``tether tracker|query|...``. Thin: flags map onto config dataclasses.

Exit codes: 0 success, 1 the operation failed, 2 bad usage or an unreachable peer, 130 interrupted.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from .. import __version__
from . import bench, demo, pack, proxy, query, run, server, tracker

__all__ = ["main"]

_COMMANDS = {
    "tracker": tracker,
    "server": server,
    "proxy": proxy,
    "query": query,
    "run": run,
    "bench": bench,
    "pack": pack,
    "demo": demo,
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tether", description="Run compiled models on remote devices (TVM RPC compatible)."
    )
    parser.add_argument("--version", action="version", version=f"tether {__version__}")
    parser.add_argument(
        "--log-level",
        default="INFO",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="logging threshold (default INFO)",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in _COMMANDS.values():
        module.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    level = logging.WARNING if getattr(args, "silent", False) else getattr(logging, args.log_level)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        code: int = args.run(args)
    except KeyboardInterrupt:
        return 130
    return code
