"""``tether tracker``: the flags and defaults of ``python -m tvm.exec.rpc_tracker`` (host aside)."""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import signal
import sys
from typing import Any

from ..aio.net import format_hostport
from ..errors import ConfigError
from ..tracker import TrackerConfig, TrackerServer
from ._args import port, seconds
from ._tls import add_server_tls_flags, tls_from_args

__all__ = ["add_parser", "run"]


def add_parser(sub: Any) -> None:
    p = sub.add_parser("tracker", help="run a tracker (queues device servers by key)")
    p.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; 0.0.0.0 or :: for the network)"
    )
    p.add_argument("--port", type=port, default=9190, help="first port to try (default 9190; 0 lets the OS choose)")
    p.add_argument("--port-end", type=port, default=9199, help="end of the port range, exclusive (default 9199)")
    p.add_argument("--stop-key", default=None, help="key a STOP message must carry (default: random)")
    p.add_argument(
        "--registration-grace",
        type=seconds,
        default=TrackerConfig().registration_grace_s,
        metavar="S",
        help="after a start, seconds before a request is judged unservable: servers re-register meanwhile",
    )
    p.add_argument("--silent", action="store_true", help="log warnings and errors only")
    _add_tls_flags(p)
    p.set_defaults(run=run)


def _add_tls_flags(p: Any) -> None:
    add_server_tls_flags(p, "tracker")
    p.add_argument(
        "--plain-port",
        type=port,
        default=None,
        help="with --tls-cert: also listen in the clear on this port, for TVM's servers and clients (0: any)",
    )


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def run(args: argparse.Namespace) -> int:
    config = TrackerConfig(
        host=args.host,
        port=args.port,
        port_end=args.port_end,
        stop_key=args.stop_key,
        registration_grace_s=args.registration_grace,
        tls=tls_from_args(args),
        plain_port=args.plain_port,
    )
    if config.plain_port is not None and config.tls is None:
        print("tether tracker: --plain-port goes with --tls-cert (without TLS, --port is plain)", file=sys.stderr)
        return 2
    try:
        asyncio.run(_serve(config))
    except ConfigError as exc:
        print(f"tether tracker: {exc}", file=sys.stderr)
        return 2
    return 0


def _print_tls(server: TrackerServer, config: TrackerConfig) -> None:
    assert config.tls is not None
    clients = "client certificates required" if config.tls.ca else "no client certificates asked"
    if server.plain_port is None:
        plain = "no plain port (TVM's servers and clients cannot speak TLS: --plain-port)"
    else:
        plain = f"in the clear on {format_hostport(server.host, server.plain_port)}"
    print(f"TLS on that port ({clients}); {plain}", flush=True)


async def _serve(config: TrackerConfig) -> None:
    server = TrackerServer(config)
    await server.start()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, server.stop)
    print(f"listening on {server.address}", flush=True)
    if config.tls is not None:
        _print_tls(server, config)
    if _is_loopback(server.host):
        hint = f"tether tracker --host 0.0.0.0 --port {server.port}"
        print(f"only this machine can reach this tracker; to accept devices from the network: {hint}", flush=True)
    await server.serve_until_stopped()
