"""``tether server``: the flags of ``python -m tvm.exec.rpc_server``, plus tether's.

Runs on a bare device Python: nothing here imports beyond the standard library (``tether pack``
makes a single-file bundle of it).
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from typing import Any

from ..aio.net import format_hostport, parse_hostport
from ..errors import ConfigError
from ._args import add_auth_flags, label
from ._tls import add_server_tls_flags, tls_from_args

__all__ = ["add_parser", "run"]


def add_parser(sub: Any) -> None:
    p = sub.add_parser("server", help="run a device server (tether's native sessions and TVM's)")
    p.add_argument("--host", default="0.0.0.0", help="address to bind, or the proxy's with --through-proxy")
    p.add_argument("--port", type=int, default=9090, help="first port to try (default 9090; 0: the OS chooses)")
    p.add_argument("--port-end", type=int, default=9199, help="end of the port range, exclusive (default 9199)")
    p.add_argument("--tracker", default=None, help="HOST:PORT of the tracker to register with")
    p.add_argument("--key", default="", help="the key clients request this device by")
    p.add_argument("--through-proxy", action="store_true", help="connect out to the proxy at --host:--port")
    p.add_argument(
        "--proxy-url", default=None, help="connect out to a proxy's WebSocket endpoint (ws://HOST:PORT/ws) instead"
    )
    p.add_argument("--custom-addr", default=None, help="address the tracker hands to clients (NAT, tunnels)")
    p.add_argument(
        "--load-library",
        default=None,
        help="colon-separated shared libraries each session's worker loads (RTLD_GLOBAL) before the session, "
        "whatever the backend (a vendor runtime, a TVM custom-op library)",
    )
    p.add_argument(
        "--no-fork",
        action="store_true",
        help="start each session worker as a fresh interpreter, not forked from one that imported the runtimes",
    )
    p.add_argument("--silent", action="store_true", help="log warnings and errors only")
    p.add_argument("--work-dir", default=None, help="where session workspaces live (default: a temporary directory)")
    p.add_argument(
        "--cache-mb",
        type=float,
        default=1024,
        help="keep uploads sent with a sha256 for later sessions, up to this many MiB (0: off; default 1024)",
    )
    p.add_argument(
        "--label",
        action="append",
        type=label,
        default=[],
        metavar="K=V",
        help="a label clients can ask for (repeatable)",
    )
    p.add_argument("--slots", type=int, default=1, help="concurrent sessions (default 1)")
    p.add_argument(
        "--max-queued",
        type=int,
        default=16,
        help="without --tracker: clients that may wait at once for a busy slot, like TVM's backlog (default 16)",
    )
    p.add_argument(
        "--queue-wait",
        type=float,
        default=300.0,
        help="without --tracker: seconds such a client may wait before MISMATCH (default 300)",
    )
    p.add_argument(
        "--max-session-time",
        type=float,
        default=3600.0,
        metavar="SECONDS",
        help="longest session, asked-for session timeouts included (capped to it); 0: no limit (default 3600)",
    )
    p.add_argument(
        "--max-upload-mb",
        type=float,
        default=1024,
        help="largest file or set of tensors one request may announce, refused before anything is allocated "
        "(0: no bound of its own; default 1024)",
    )
    p.add_argument(
        "--workspace-quota-mb",
        type=float,
        default=4096,
        help="bytes of files one session's workspace may hold, refused before a byte is written (0: none; "
        "default 4096)",
    )
    p.add_argument(
        "--worker-memory-mb",
        type=float,
        default=0,
        help="address space a session's worker may add past its start (RLIMIT_AS); past it an allocation fails "
        "with WorkerMemoryExceeded (0: no limit, the default)",
    )
    p.add_argument(
        "--max-handshakes-per-peer",
        type=int,
        default=8,
        help="handshakes one address may have in flight; a newer one sheds that address's oldest (default 8)",
    )
    p.add_argument(
        "--preload",
        default="auto",
        help="modules a waiting worker imports ahead of a session: comma list, 'auto' (installed runtimes) or 'none'",
    )
    p.add_argument("--no-prestart", action="store_true", help="start each session's worker only when it is granted")
    p.add_argument("--no-tvm", action="store_true", help="serve tether clients only, even when tvm is importable")
    add_auth_flags(p, "plain TVM clients")
    add_server_tls_flags(p, "server")
    p.set_defaults(run=run)


def config_from_args(args: argparse.Namespace) -> Any:
    from ..device.server import ServerConfig

    preload = (
        None if args.preload == "auto" else [] if args.preload == "none" else [m for m in args.preload.split(",") if m]
    )
    return ServerConfig(
        host=args.host,
        port=args.port,
        port_end=args.port_end,
        key=args.key,
        tracker=parse_hostport(args.tracker, 9190) if args.tracker else None,
        custom_addr=args.custom_addr,
        through_proxy=args.through_proxy,
        proxy_url=args.proxy_url,
        load_library=[p for p in (args.load_library or "").split(":") if p],
        work_dir=args.work_dir,
        cache_bytes=int(args.cache_mb * (1 << 20)),
        labels=dict(args.label),
        slots=args.slots,
        max_queued=args.max_queued,
        queue_wait_s=args.queue_wait,
        max_handshakes_per_peer=args.max_handshakes_per_peer,
        max_session_s=args.max_session_time,
        max_upload_bytes=int(args.max_upload_mb * (1 << 20)),
        workspace_quota_bytes=int(args.workspace_quota_mb * (1 << 20)),
        worker_memory_bytes=int(args.worker_memory_mb * (1 << 20)),
        preload=preload,
        prestart=not args.no_prestart,
        fork=not args.no_fork,
        serve_tvm=not args.no_tvm,
        auth_file=None if args.auth_file is None else str(args.auth_file),
        allow_tvm=tuple(args.allow_tvm),
        tls=tls_from_args(args),
    )


def _reachability_hint(config: Any) -> str | None:
    """The doctor's warning for an advertised address clients elsewhere cannot reach (no traffic sent)."""
    from ..client.doctor import advertise_hint

    if config.tracker is None or config.through_proxy or config.proxy_url:
        return None
    return advertise_hint(config.host, config.tracker[0], config.custom_addr)


def run(args: argparse.Namespace) -> int:
    from ..device.server import DeviceServer

    try:
        config = config_from_args(args)
        hint = _reachability_hint(config)
        if hint:
            print(f"tether server: warning: {hint}", file=sys.stderr, flush=True)
        server = DeviceServer(config)
        server.start()
    except ConfigError as exc:
        print(f"tether server: {exc}", file=sys.stderr)
        return 2
    done = threading.Event()

    def on_signal(signum: int, frame: Any) -> None:
        done.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)
    signal.signal(signal.SIGHUP, lambda signum, frame: server.reload_auth())
    if not args.through_proxy and not args.proxy_url:
        print(f"listening on {format_hostport(args.host, server.port)}", flush=True)
    print(server.describe_auth(), flush=True)
    if server.tls_context is not None:
        certs = "client certificates required" if args.tls_ca else "no client certificates asked"
        print(f"sessions are TLS ({certs}); tether clients only", flush=True)
    try:
        while not done.wait(3600):
            pass
    finally:
        server.stop()
    return 0
