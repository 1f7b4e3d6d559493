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
from ._args import add_auth_flags, non_negative, port, seconds
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
    _add_bounds(p)
    _add_health_flags(p)
    add_auth_flags(p, "TVM servers, clients and query_rpc_tracker")
    p.add_argument("--silent", action="store_true", help="log warnings and errors only")
    _add_tls_flags(p)
    p.set_defaults(run=run)


#: (flag, TrackerConfig field, type, metavar, help): what one peer can make the tracker hold
_BOUNDS: list[tuple[str, str, Any, str, str]] = [
    (
        "--handshake-timeout",
        "handshake_timeout_s",
        seconds,
        "S",
        "seconds a new connection has to send the magic (0: no limit)",
    ),
    (
        "--idle-timeout",
        "idle_timeout_s",
        seconds,
        "S",
        "close a connection silent this long that offers no slot, serves no grant, has no request waiting (0: never)",
    ),
    (
        "--max-connections-per-peer",
        "max_connections_per_peer",
        non_negative,
        "N",
        "connections open at once from one address (0: no limit)",
    ),
    (
        "--max-connections",
        "max_connections",
        non_negative,
        "N",
        "connections open at once; past it those holding nothing make room (0: the file descriptor limit less "
        "--fd-reserve)",
    ),
    ("--fd-reserve", "fd_reserve", non_negative, "N", "file descriptors kept free when --max-connections is 0"),
    (
        "--max-waiters-per-connection",
        "max_waiters_per_connection",
        non_negative,
        "N",
        "waiting requests per connection, more are rejected (0: no limit)",
    ),
    (
        "--max-waiters-per-user",
        "max_waiters_per_user",
        non_negative,
        "N",
        "waiting requests per user (the request's user, else the peer's address; 0: no limit)",
    ),
    (
        "--max-waiters-per-peer",
        "max_waiters_per_peer",
        non_negative,
        "N",
        "waiting requests from one address, whatever their users (0: no limit)",
    ),
    (
        "--max-slots-per-connection",
        "max_slots_per_connection",
        non_negative,
        "N",
        "free slots one connection may offer (PUT; 0: no limit)",
    ),
    (
        "--max-proxy-slots",
        "max_proxy_slots",
        non_negative,
        "N",
        "free slots a proxy's connection (server:proxy[...]) may offer (0: no limit)",
    ),
    (
        "--max-slots-per-peer",
        "max_slots_per_peer",
        non_negative,
        "N",
        "free slots offered from one address, all its connections together (0: no limit)",
    ),
    ("--max-priority", "max_priority", seconds, "P", "larger request priorities are clamped to this"),
]


def _add_bounds(p: argparse.ArgumentParser) -> None:
    defaults = TrackerConfig()
    group = p.add_argument_group("bounds", "what one peer can make the tracker hold")
    for flag, field, kind, metavar, text in _BOUNDS:
        default = getattr(defaults, field)
        group.add_argument(
            flag, dest=field, type=kind, default=default, metavar=metavar, help=f"{text} (default {default:g})"
        )


def _add_health_flags(p: argparse.ArgumentParser) -> None:
    defaults = TrackerConfig()
    group = p.add_argument_group("device health", "quarantine of failing servers; see `tether admin`")
    group.add_argument(
        "--quarantine-after",
        type=non_negative,
        default=defaults.quarantine_after,
        metavar="N",
        help="failed sessions in a row (worker lost, server gone, heartbeats stopped) that quarantine a server "
        f"(0: never; default {defaults.quarantine_after})",
    )
    group.add_argument(
        "--canary-interval",
        type=seconds,
        default=defaults.canary_interval_s,
        metavar="S",
        help="seconds between canaries asked of a quarantined tether server; one that passes returns it "
        f"(0: only an admin's uncordon; default {defaults.canary_interval_s:g})",
    )


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
        auth_file=None if args.auth_file is None else str(args.auth_file),
        allow_tvm=tuple(args.allow_tvm),
        **{field: getattr(args, field) for _, field, *_ in _BOUNDS},
        tls=tls_from_args(args),
        plain_port=args.plain_port,
        quarantine_after=args.quarantine_after,
        canary_interval_s=args.canary_interval,
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
    loop.add_signal_handler(signal.SIGHUP, server.reload_auth)
    print(f"listening on {server.address}", flush=True)
    print(server.core.access.describe(), flush=True)
    if config.tls is not None:
        _print_tls(server, config)
    if _is_loopback(server.host):
        hint = f"tether tracker --host 0.0.0.0 --port {server.port}"
        print(f"only this machine can reach this tracker; to accept devices from the network: {hint}", flush=True)
    await server.serve_until_stopped()
