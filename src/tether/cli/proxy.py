"""``tether proxy``: the flags of ``python -m tvm.exec.rpc_proxy``, plus the wait timeouts TVM hard-codes."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from typing import Any

from ..errors import ConfigError
from ._args import add_auth_flags, existing_file, hostport, non_negative, port, seconds
from ._tls import add_server_tls_flags, tls_from_args

__all__ = ["add_parser", "run"]


def add_parser(sub: Any) -> None:
    p = sub.add_parser("proxy", help="run a proxy (pairs servers and clients that cannot reach each other)")
    p.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; 0.0.0.0 or :: for the network)"
    )
    p.add_argument("--port", type=port, default=9090, help="first port to try (default 9090; 0: the OS chooses)")
    p.add_argument("--port-end", type=port, default=9199, help="end of the port range, exclusive (default 9199)")
    p.add_argument(
        "--web-port",
        type=port,
        default=8888,
        help="HTTP/WebSocket port, endpoint /ws (default 8888; 0: the OS chooses)",
    )
    p.add_argument("--no-web", action="store_true", help="serve no WebSocket endpoint")
    p.add_argument(
        "--tracker",
        type=hostport,
        default=None,
        metavar="HOST:PORT",
        help="a tracker to offer the servers to (tracker mode)",
    )
    p.add_argument(
        "--timeout-client", type=seconds, default=600.0, help="seconds a client waits for its server (default 600)"
    )
    p.add_argument(
        "--timeout-server", type=seconds, default=600.0, help="seconds a server waits for its client (default 600)"
    )
    p.add_argument(
        "--timeout-alloc",
        type=seconds,
        default=5.0,
        help="tracker mode: seconds a handed-out matchkey may go unused before it is renamed (default 5)",
    )
    p.add_argument("--custom-addr", default=None, help="tracker mode: address the tracker hands to clients")
    p.add_argument(
        "--max-parked-per-peer",
        type=non_negative,
        default=64,
        metavar="N",
        help="servers waiting at once from one address; one more gets MISMATCH (default 64; 0: no limit)",
    )
    p.add_argument(
        "--max-parked",
        type=non_negative,
        default=4096,
        metavar="N",
        help="servers waiting at once in all (default 4096; 0: no limit)",
    )
    p.add_argument("--index-page", type=existing_file, default=None, help="HTML page served at / on the web port")
    add_auth_flags(p, "TVM servers and clients")
    p.add_argument("--silent", action="store_true", help="log warnings and errors only")
    add_server_tls_flags(p, "proxy")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..proxy import ProxyConfig

    try:
        config = ProxyConfig(
            host=args.host,
            port=args.port,
            port_end=args.port_end,
            web_port=None if args.no_web else args.web_port,
            tracker=args.tracker,
            timeout_client=args.timeout_client,
            timeout_server=args.timeout_server,
            timeout_alloc=args.timeout_alloc,
            custom_addr=args.custom_addr,
            index_page=args.index_page,
            auth_file=None if args.auth_file is None else str(args.auth_file),
            allow_tvm=tuple(args.allow_tvm),
            max_parked_per_peer=args.max_parked_per_peer,
            max_parked=args.max_parked,
            tls=tls_from_args(args),
        )
        asyncio.run(_serve(config))
    except ConfigError as exc:
        print(f"tether proxy: {exc}", file=sys.stderr)
        return 2
    return 0


async def _serve(config: Any) -> None:
    from ..proxy import ProxyServer

    server = ProxyServer(config)
    await server.start()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, server.stop)
    loop.add_signal_handler(signal.SIGHUP, server.reload_auth)
    print(f"listening on {server.address}", flush=True)
    print(server.describe_auth(), flush=True)
    if server.ws_url:
        print(f"websocket on {server.ws_url}", flush=True)
    await server.serve_until_stopped()
