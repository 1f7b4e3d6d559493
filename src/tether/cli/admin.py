"""``tether admin drain|cordon|uncordon|release|check SERVER``: an admin's operations on one server.

``SERVER`` is the server's id at the tracker: the ``host:port`` its clients connect to (``tether query``
lists them; a server behind a proxy is ``proxyhost:port/key``). Every operation is idempotent:

- ``cordon``: grant it nothing more; sessions running go on;
- ``drain``: the same, and it reads ``draining`` until its last session ends, then ``cordoned``;
- ``uncordon``: back in the pool (also ends a quarantine, and clears its failure count);
- ``release``: end its sessions now (a stuck one): the tracker forgets them and tells a tether server
  to end them (its client gets ``SessionLost``);
- ``check``: ask a tether server for a canary now (a quarantined server that passes returns).

With authentication on, the token (``$TETHER_TOKEN`` or ``--token``) must have the admin role; without
it, only a peer on the tracker's own host is obeyed. Exit status: 0 done (or nothing to change), 1
refused or unknown server, 2 tracker unreachable.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from ..client.tracker import TrackerClient
from ..errors import AuthError, ProtocolError, TransportError
from ..protocol.tracker import ADMIN_OPS
from ._args import port, seconds, tracker_address
from ._tls import add_client_tls_flags, tls_from_args

__all__ = ["add_parser", "run"]


def add_parser(sub: Any) -> None:
    p = sub.add_parser("admin", help="drain, cordon, uncordon, release or check a server at the tracker")
    p.add_argument("op", choices=ADMIN_OPS, help="what to do")
    p.add_argument("server", help="the server's id: host:port as `tether query` lists it")
    p.add_argument("--reason", default=None, help="why (kept with the server's standing, shown everywhere)")
    p.add_argument("--host", default=None, help="tracker host (default $TVM_TRACKER_HOST or 127.0.0.1)")
    p.add_argument("--port", type=port, default=None, help="tracker port (default $TVM_TRACKER_PORT or 9190)")
    p.add_argument("--token", default=None, help="name:secret of an admin token (default $TETHER_TOKEN)")
    p.add_argument("--json", action="store_true", help="print the tracker's answer as JSON")
    p.add_argument("--timeout", type=seconds, default=5.0, help="seconds to wait for the tracker (default 5)")
    add_client_tls_flags(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    host, tport = tracker_address(args.host, args.port)
    try:
        with TrackerClient.connect(host, tport, args.timeout, tls=tls_from_args(args), token=args.token) as tracker:
            if not tracker.supports("admin"):
                print(f"tether admin: the tracker at {host}:{tport} has no admin operations", file=sys.stderr)
                return 1
            answer = tracker.admin(args.op, args.server, args.reason)
    except KeyError as exc:
        print(f"tether admin: {exc.args[0]}", file=sys.stderr)
        return 1
    except AuthError as exc:
        print(f"tether admin: refused: {exc}", file=sys.stderr)
        return 1
    except (TransportError, ProtocolError, TimeoutError, OSError) as exc:
        print(f"tether admin: cannot reach the tracker at {host}:{tport}: {exc}", file=sys.stderr)
        return 2
    if args.json:
        json.dump(answer, sys.stdout, indent=2)
        print()
        return 0
    standing = answer.get("standing", {})
    what = "done" if answer.get("changed") else "nothing to change"
    extra = ""
    if args.op == "release":
        extra = f", {answer.get('released', 0)} session(s) ended"
    elif args.op == "check":
        extra = ", canary asked for" if answer.get("canary") is not None else ", no canary (not a tether server)"
    reason = f" ({standing['reason']})" if standing.get("reason") else ""
    print(f"{args.op} {args.server}: {what}{extra}; now {standing.get('state', '?')}{reason}")
    return 0
