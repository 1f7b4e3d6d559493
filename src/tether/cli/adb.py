"""``tether adb``: serve Android phones attached over USB, the forwards and the server kept up by adb.

Replaces the manual steps of TVM's Android docs (``adb reverse``, ``adb forward tcp:5000..5003``,
``adb push``, ``adb shell .../tvm_rpc server ...``); the logic is :mod:`tether.device.adb`.
"""

from __future__ import annotations

import argparse
import shlex
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from ..device.adb import (
    AdbConfig,
    Supervisor,
    check_devices,
    find_adb,
    list_devices,
    setup_commands,
    start_commands,
    tracker_is_here,
)
from ._args import existing_file, hostport, port, positive, seconds, tracker_address

__all__ = ["add_parser", "run"]

_EPILOG = """\
what it runs, per phone (PORT: the tracker's port; P: the phone's ports, from --port, a block per phone):
  adb -s SERIAL reverse tcp:PORT tcp:PORT   the phone's 127.0.0.1:PORT reaches the tracker on this host
  adb -s SERIAL forward tcp:P tcp:P         this host's 127.0.0.1:P reaches the server on the phone: the
                                            server registers as --custom-addr:P, the tracker hands clients
                                            that address, so host and phone port are the same number
  adb -s SERIAL push BUNDLE /data/local/tmp/tether/...
  adb -s SERIAL shell 'cd ... && exec python3 tether-server.pyz --port P --tracker 127.0.0.1:PORT ...'
tether's server takes all --slots sessions on one port (one forward per phone); tvm_rpc serves one session
at a time, so --slots N runs N of them on N ports, one forward each (TVM docs' 5000..5003). Ctrl-C stops
the servers and removes the forwards. A phone that reconnects is set up again; a server that exits is
restarted.
"""


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "adb",
        help="serve Android phones over adb: reverse to the tracker, forwards, push, start and keep servers up",
        epilog=_EPILOG,
    )
    # the epilog's lines as written, the flags' defaults shown as everywhere else
    p.formatter_class = type("AdbHelpFormatter", (argparse.RawDescriptionHelpFormatter, p.formatter_class), {})
    p.add_argument(
        "--serial",
        action="append",
        default=[],
        metavar="S",
        help="only this phone (repeatable; default: every attached phone, also those attached later)",
    )
    p.add_argument(
        "--tracker",
        type=hostport,
        default=None,
        metavar="HOST:PORT",
        help="the tracker, on this host: adb reverse reaches this host's 127.0.0.1:PORT "
        "(default: $TVM_TRACKER_HOST:$TVM_TRACKER_PORT, else 127.0.0.1:9190)",
    )
    p.add_argument("--key", required=True, help="the key the phones register under")
    server = p.add_mutually_exclusive_group(required=True)
    server.add_argument(
        "--bundle", type=existing_file, default=None, metavar="PYZ", help="tether's server zipapp (tether pack)"
    )
    server.add_argument(
        "--tvm-rpc", type=existing_file, default=None, metavar="PATH", help="TVM's C++ tvm_rpc binary for Android"
    )
    p.add_argument("--slots", type=positive, default=1, help="concurrent sessions per phone")
    p.add_argument(
        "--port",
        type=port,
        default=5000,
        help="first port for the forwards; each phone takes the next free block (1 port, or --slots with --tvm-rpc)",
    )
    p.add_argument(
        "--device-tracker-port",
        type=port,
        default=None,
        metavar="PORT",
        help="the phone's port that leads to the tracker (default: the tracker's port)",
    )
    p.add_argument(
        "--custom-addr",
        default="127.0.0.1",
        help="the address the tracker hands clients for a phone: 127.0.0.1 serves clients on this host",
    )
    p.add_argument("--device-dir", default="/data/local/tmp/tether", help="where the server goes on the phone")
    p.add_argument("--device-python", default="python3", metavar="PATH", help="the phone's Python, for --bundle")
    p.add_argument(
        "--push",
        action="append",
        type=existing_file,
        default=[],
        metavar="FILE",
        help="also push this file beside the server, e.g. libc++_shared.so for tvm_rpc (repeatable; "
        "tvm_rpc runs with LD_LIBRARY_PATH=--device-dir)",
    )
    p.add_argument(
        "--server-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="one more argument for the server on the phone, e.g. --server-arg=--label=soc=sd8g2 (repeatable)",
    )
    p.add_argument("--adb", default="adb", metavar="PATH", help="the adb executable")
    p.add_argument("--poll", type=seconds, default=2.0, metavar="S", help="seconds between looks at `adb devices`")
    p.add_argument("--dry-run", action="store_true", help="print the adb commands it would run, one a line; run none")
    p.add_argument(
        "--once",
        action="store_true",
        help="set up, start the servers in the background on the phones (nohup) and exit: no restarts",
    )
    p.set_defaults(run=run)


def config_from_args(args: argparse.Namespace, adb: str) -> AdbConfig:
    tracker_host, tracker_port = tracker_address(*(args.tracker or ()))
    if not tracker_is_here(tracker_host):
        print(
            f"tether adb: warning: {tracker_host} is not this host, and adb reverse leads the phones to this "
            f"host's 127.0.0.1:{tracker_port} only: run a tracker here, or tether adb on the tracker's host",
            file=sys.stderr,
        )
    return AdbConfig(
        key=args.key,
        tracker_port=tracker_port,
        device_tracker_port=args.device_tracker_port,
        bundle=args.bundle,
        tvm_rpc=args.tvm_rpc,
        slots=args.slots,
        base_port=args.port,
        custom_addr=args.custom_addr,
        device_dir=args.device_dir,
        device_python=args.device_python,
        push=tuple(Path(p) for p in args.push),
        server_args=tuple(args.server_arg),
        adb=adb,
        poll_s=args.poll,
    )


def run(args: argparse.Namespace) -> int:
    if args.dry_run:
        return _dry_run(args)
    adb = find_adb(args.adb)
    cfg = config_from_args(args, adb)
    serials, warnings = check_devices(list_devices(adb), args.serial)
    for warning in warnings:
        print(f"tether adb: {warning}", file=sys.stderr)
    supervisor = Supervisor(cfg, args.serial, say=_say)
    if args.once:
        return 0 if supervisor.setup_once(serials) else 1
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda signum, frame: supervisor.stop())
    supervisor.run()  # Ctrl-C: KeyboardInterrupt after its teardown (exit 130)
    return 0


def _dry_run(args: argparse.Namespace) -> int:
    """The commands, with ``adb`` as given; needs adb only to list the phones when no --serial names them."""
    cfg = config_from_args(args, args.adb)
    serials = args.serial or check_devices(list_devices(find_adb(args.adb)), [])[0]
    supervisor = Supervisor(cfg, serials, say=_say)
    for serial in serials:
        ports = supervisor.phone_ports(serial)
        for cmd in [*setup_commands(cfg, serial, ports), *start_commands(cfg, serial, ports, args.once)]:
            print(shlex.join(cmd))
    return 0


def _say(line: str) -> None:
    print(line, flush=True)
