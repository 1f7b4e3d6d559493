"""The ``tether`` command: ``tether tracker|query|...``. Thin: flags map onto config dataclasses.

Exit codes: 0 success, 1 the operation failed, 2 bad usage or an unreachable peer, 130 interrupted.

A user's mistake (a bad flag, a missing file, a port in use, an error on the device) is one line on
stderr, never a Python traceback; ``--verbose`` (``run``, ``bench``) adds the device's traceback.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from collections.abc import Sequence
from typing import Any, NoReturn

from .. import __version__
from ..errors import TetherError
from . import (
    adb,
    admin,
    bench,
    compare,
    compile,
    demo,
    doctor,
    pack,
    proxy,
    query,
    run,
    server,
    service,
    token,
    tracker,
    tune,
    usage,
)
from ._report import fail

__all__ = ["main"]

_COMMANDS = {
    "tracker": tracker,
    "server": server,
    "proxy": proxy,
    "query": query,
    "doctor": doctor,
    "run": run,
    "bench": bench,
    "compare": compare,
    "compile": compile,
    "tune": tune,
    "pack": pack,
    "token": token,
    "usage": usage,
    "admin": admin,
    "demo": demo,
    "adb": adb,
    "service": service,
}
_LOG_LEVELS = ["DEBUG", "INFO", "WARNING", "ERROR"]


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line (the usage of a subcommand with many flags fills a screen)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each flag's default, unless its help already says it or there is none to show."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        nothing = action.default is None or action.default is False or action.default in ("", [], argparse.SUPPRESS)
        if "default" in text or nothing:
            return text
        return super()._get_help_string(action) or text


class _Subcommands:
    """What each command module's ``add_parser(sub)`` gets: every subcommand has a description (its
    help line), shows its defaults, and takes ``--log-level`` after its name too."""

    def __init__(self, sub: Any) -> None:
        self._sub = sub

    def add_parser(self, name: str, **kwargs: Any) -> argparse.ArgumentParser:
        kwargs.setdefault("description", kwargs.get("help"))
        kwargs.setdefault("formatter_class", _HelpFormatter)
        command: argparse.ArgumentParser = self._sub.add_parser(name, **kwargs)
        # SUPPRESS: without it here, the value given before the subcommand (or INFO) stands
        command.add_argument(
            "--log-level", default=argparse.SUPPRESS, choices=_LOG_LEVELS, help="logging threshold (default INFO)"
        )
        return command


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="tether",
        description="Run compiled models on remote devices (TVM RPC compatible).",
        formatter_class=_HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"tether {__version__}")
    parser.add_argument("--log-level", default="INFO", choices=_LOG_LEVELS, help="logging threshold")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    commands = _Subcommands(sub)
    for module in _COMMANDS.values():
        module.add_parser(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exc:  # --help, --version, a usage error: its code, not an exception
        return exc.code if isinstance(exc.code, int) else 2
    level = logging.WARNING if getattr(args, "silent", False) else getattr(logging, args.log_level)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    if threading.current_thread() is threading.main_thread():
        # Ctrl-C (SIGINT) always means "stop, keep what finished, exit 130", also for a command started in
        # the background by a non-interactive shell, which inherits SIGINT ignored (Python then leaves it so)
        signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        code: int = args.run(args)
    except KeyboardInterrupt:
        return 130
    except (TetherError, OSError) as exc:  # a mistake the command did not report itself (bugs keep their traceback)
        return fail(f"tether {args.command}", exc, verbose=getattr(args, "verbose", False))
    return code
