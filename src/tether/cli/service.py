"""``tether service install tracker|server|proxy [options] -- ROLE FLAGS``: a systemd unit that runs it.

The role's flags (after ``--``) are parsed now with the role's own parser, so that a typo is an error
here, not a unit that fails at boot. The unit restarts the role forever (``Restart=always``), gives it a
state directory of its own (``StateDirectory=``, ``WorkingDirectory=``; the tracker's history ``--db``
and the server's ``--work-dir`` go there unless given), and runs this very installation of tether (the
absolute path of the ``tether`` script, or ``python -m tether`` with this interpreter).

A system unit (root; ``/etc/systemd/system``) or a user unit (``~/.config/systemd/user``); an existing
unit is kept unless ``--force``. ``--dry-run`` prints the unit instead.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path
from typing import Any, NoReturn

from .. import __version__

__all__ = ["add_parser", "exec_quote", "render_unit", "run", "unit_name"]

ROLES = ("tracker", "server", "proxy")
#: The flag of each role that takes a path for its state, and the file or directory it gets by default.
_STATE_FLAGS = {"tracker": ("--db", "history.sqlite"), "server": ("--work-dir", "work")}


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "service",
        help="install a systemd unit that runs a tracker, server or proxy",
        usage="tether service install {tracker,server,proxy} [options] -- [ROLE FLAGS]",
    )
    p.add_argument("action", choices=["install"], help="what to do (install: write the unit)")
    _add_options(p, argparse.SUPPRESS)
    # the role, then options and the role's flags after --: read by run() (argparse cannot tell them apart)
    p.add_argument("rest", nargs=argparse.REMAINDER, metavar="{tracker,server,proxy} ... -- FLAGS")
    p.set_defaults(run=run, **_DEFAULTS)


_DEFAULTS: dict[str, Any] = {
    "name": None,
    "output": None,
    "user_unit": None,
    "run_as": None,
    "restart_sec": 5.0,
    "dry_run": False,
    "force": False,
}


def _add_options(p: argparse.ArgumentParser, default: Any) -> None:
    """The options of ``tether service install``; ``default`` SUPPRESS: unset ones leave the namespace alone."""
    p.add_argument("--name", default=default, help="unit name (default tether-ROLE, tether-server-KEY for a server)")
    p.add_argument(
        "--output",
        type=Path,
        default=default,
        help="directory to write into (default /etc/systemd/system for a system unit, ~/.config/systemd/user)",
    )
    kind = p.add_mutually_exclusive_group()
    kind.add_argument("--user", dest="user_unit", action="store_const", const=True, default=default, help="a user unit")
    kind.add_argument(
        "--system",
        dest="user_unit",
        action="store_const",
        const=False,
        default=default,
        help="a system unit (the default when run as root)",
    )
    p.add_argument("--run-as", default=default, metavar="USER", help="User= of a system unit")
    p.add_argument(
        "--restart-sec", type=float, default=default, help="seconds between a stop and the restart (default 5)"
    )
    p.add_argument("--dry-run", "--stdout", action="store_true", default=default, help="print the unit, write nothing")
    p.add_argument("--force", action="store_true", default=default, help="overwrite an existing unit")


def _split(args: argparse.Namespace) -> tuple[str, list[str]] | str:
    """(role, the role's flags) from ``rest``, this command's options in it read into ``args``; or why not."""
    rest = list(args.rest)
    cut = rest.index("--") if "--" in rest else len(rest)
    head, flags = rest[:cut], rest[cut + 1 :]
    inner = _InnerParser(prog="tether service install", add_help=False)
    inner.add_argument("role", choices=ROLES)
    _add_options(inner, argparse.SUPPRESS)
    try:
        inner.parse_args(head, namespace=args)
    except ValueError as exc:
        return f"{exc}: tether service install {{{','.join(ROLES)}}} [options] -- [the role's flags]"
    return args.role, flags


class _InnerParser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise ValueError(message)


# -- systemd's syntax ------------------------------------------------------------------------------

_PLAIN = re.compile(r"[A-Za-z0-9_@%+=:,./-]+")


def exec_quote(arg: str) -> str:
    """One ExecStart= argument as systemd reads it: ``%`` and ``$`` doubled (no specifier, no variable
    expansion), and double quotes (C escapes inside) around anything with spaces, quotes or backslashes."""
    text = arg.replace("%", "%%").replace("$", "$$")
    if text and _PLAIN.fullmatch(text):
        return text
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\t", "\\t")
    return f'"{escaped}"'


def unit_name(role: str, flags: list[str]) -> str:
    """``tether-tracker``, ``tether-proxy``, ``tether-server-KEY`` (the key made safe for a unit name)."""
    if role != "server":
        return f"tether-{role}"
    key = _flag_value(flags, "--key")
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "-", key or "").strip("-")
    return f"tether-server-{safe}" if safe else "tether-server"


def _flag_value(flags: list[str], flag: str) -> str | None:
    value = None
    for i, arg in enumerate(flags):
        if arg == flag and i + 1 < len(flags):
            value = flags[i + 1]
        elif arg.startswith(flag + "="):
            value = arg.split("=", 1)[1]
    return value


def tether_command() -> tuple[list[str], dict[str, str]]:
    """How a unit starts this installation: the ``tether`` script's absolute path when this process is
    one, else ``python -m tether``; and the environment it needs (PYTHONPATH when tether is found only
    through it)."""
    import tether

    script = Path(sys.argv[0]).resolve() if sys.argv and sys.argv[0] else None
    if script is not None and script.name == "tether" and script.is_file() and os.access(script, os.X_OK):
        return [str(script)], {}
    env = {}
    root = str(Path(tether.__file__).resolve().parent.parent)
    pythonpath = [str(Path(p).resolve()) for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if root in pythonpath:
        env["PYTHONPATH"] = root
    return [sys.executable, "-m", "tether"], env


def render_unit(
    role: str,
    flags: list[str],
    *,
    name: str,
    user_unit: bool,
    run_as: str | None = None,
    restart_sec: float = 5.0,
    command: tuple[list[str], dict[str, str]] | None = None,
) -> str:
    """The unit's text. ``flags``: the role's (already checked); the state flag is added when missing."""
    exe, env = command or tether_command()
    state = f"tether/{name}"
    extra: list[str] = []
    if role in _STATE_FLAGS:
        flag, leaf = _STATE_FLAGS[role]
        if _flag_value(flags, flag) is None:
            extra = [flag, f"%S/{state}/{leaf}"]  # %S: /var/lib (system) or ~/.local/state (user)
    argv = " ".join([*(exec_quote(a) for a in [*exe, role, *flags]), *extra])
    what = f"tether {role}" + (f" (key {_flag_value(flags, '--key')})" if role == "server" else "")
    lines = [
        f"# Written by `tether service install {role}` (tether {__version__}).",
        "[Unit]",
        f"Description={what.replace('%', '%%')}",
        "After=network-online.target",
        "Wants=network-online.target",
        "",
        "[Service]",
        "Type=simple",
        f"ExecStart={argv}",
        "Restart=always",
        f"RestartSec={restart_sec:g}",
        f"StateDirectory={state}",
        f"WorkingDirectory=%S/{state}",
        "Environment=PYTHONUNBUFFERED=1",
        *(f"Environment={exec_quote(f'{k}={v}')}" for k, v in sorted(env.items())),
        "KillMode=mixed",
        "TimeoutStopSec=30",
    ]
    if run_as:
        lines.append(f"User={run_as}")
    lines += ["", "[Install]", f"WantedBy={'default.target' if user_unit else 'multi-user.target'}", ""]
    return "\n".join(lines)


# -- the command -----------------------------------------------------------------------------------


def check_flags(role: str, flags: list[str]) -> str | None:
    """Why ``tether ROLE FLAGS`` would not start (its parser's one line, or its configuration's); None: fine."""
    import contextlib
    import io

    from ..errors import ConfigError
    from . import _parser

    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            args = _parser().parse_args([role, *flags])
    except SystemExit:
        return err.getvalue().strip() or f"tether {role}: invalid flags"
    if role == "server":
        from .server import config_from_args

        try:
            config_from_args(args)
        except ConfigError as exc:
            return f"tether server: {exc}"
    return None


def run(args: argparse.Namespace) -> int:
    split = _split(args)
    if isinstance(split, str):
        print(f"tether service: {split}", file=sys.stderr)
        return 2
    role, flags = split
    problem = check_flags(role, flags)
    if problem is not None:
        print(f"tether service: the {role}'s flags would not start it: {problem}", file=sys.stderr)
        return 2
    root = hasattr(os, "geteuid") and os.geteuid() == 0
    user_unit = (not root) if args.user_unit is None else args.user_unit
    if user_unit and args.run_as:
        print("tether service: --run-as (User=) is for a system unit (--system)", file=sys.stderr)
        return 2
    name = args.name or unit_name(role, flags)
    if not re.fullmatch(r"[A-Za-z0-9:_.@-]+", name):
        print(f"tether service: {name!r} is not a valid unit name", file=sys.stderr)
        return 2
    text = render_unit(role, flags, name=name, user_unit=user_unit, run_as=args.run_as, restart_sec=args.restart_sec)
    if args.dry_run:
        print(text, end="")
        return 0
    out_dir = args.output or (Path.home() / ".config/systemd/user" if user_unit else Path("/etc/systemd/system"))
    path = out_dir / f"{name}.service"
    if path.exists() and not args.force:
        print(f"tether service: {path} exists; --force replaces it", file=sys.stderr)
        return 1
    out_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    ctl = "systemctl --user" if user_unit else "systemctl"
    print(f"wrote {path}")
    print(f"enable and start it: {ctl} daemon-reload && {ctl} enable --now {name}")
    print(f"its log: journalctl {'--user ' if user_unit else ''}-u {name} -f")
    return 0
