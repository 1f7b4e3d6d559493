"""``tether token NAME ROLE``: a keyring line with a fresh secret, and the client's ``TETHER_TOKEN``."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from ..errors import ConfigError
from ..protocol.auth import Keyring, Role, new_secret

__all__ = ["add_parser", "run"]


def add_parser(sub: Any) -> None:
    p = sub.add_parser("token", help="make a credential: a line for --auth-file and the TETHER_TOKEN to use")
    p.add_argument("name", help="who or what holds it (a person, a CI job, a device server)")
    p.add_argument("role", choices=[r.value for r in Role], help="admin, server or user")
    p.add_argument("--max-priority", type=float, default=None, help="user: highest priority its requests get")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    secret = new_secret()
    line = f"{args.name} {args.role} {secret}"
    if args.max_priority is not None:
        line += f" max_priority={args.max_priority:g}"
    try:
        Keyring.parse(line, "token")  # the same checks the tracker applies (name characters)
    except ConfigError as exc:
        print(f"tether token: {exc}", file=sys.stderr)
        return 2
    print(f"# add to the --auth-file of the tracker, proxy or server (then: kill -HUP its pid):\n{line}")
    print(f"# give to {args.name} (its environment; never on a command line):\nTETHER_TOKEN={args.name}:{secret}")
    return 0
