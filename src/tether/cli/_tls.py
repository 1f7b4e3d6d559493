"""The TLS flags: one helper per kind of command, and the :class:`~tether.aio.tls.TLSConfig` they make.

Servers (``tether tracker``, ``server``, ``proxy``): ``--tls-cert FILE --tls-key FILE`` are the role's
certificate and key, ``--tls-ca FILE`` makes client certificates signed by that CA required. The device
server and the proxy also reach a TLS tracker with them (the CA checks the tracker's certificate, the
certificate and key are theirs to show). Clients (``tether query``, ``run``, ``bench``): ``--tls-ca`` checks
the servers' certificates, ``--tls-cert``/``--tls-key`` are a client certificate, ``--tls-server-name`` the
name to expect in the certificates (default: the host connected to).
"""

from __future__ import annotations

import argparse
from typing import Any

from ..aio.tls import TLSConfig
from ._args import existing_file

__all__ = ["add_client_tls_flags", "add_server_tls_flags", "tls_from_args"]


def add_server_tls_flags(p: Any, role: str) -> None:
    """``--tls-cert``, ``--tls-key``, ``--tls-ca`` on a server command (``role`` names it in the help)."""
    g = p.add_argument_group("TLS")
    g.add_argument(
        "--tls-cert", type=existing_file, default=None, metavar="FILE", help=f"the {role}'s certificate (PEM)"
    )
    g.add_argument(
        "--tls-key",
        type=existing_file,
        default=None,
        metavar="FILE",
        help="its private key (PEM; default: in --tls-cert)",
    )
    g.add_argument(
        "--tls-ca",
        type=existing_file,
        default=None,
        metavar="FILE",
        help="require client certificates signed by this CA (and check the tracker's against it)",
    )


def add_client_tls_flags(p: Any) -> None:
    """``--tls-ca``, ``--tls-cert``, ``--tls-key``, ``--tls-server-name`` on a client command."""
    g = p.add_argument_group("TLS (to a tracker and servers with --tls-cert)")
    g.add_argument(
        "--tls-ca",
        type=existing_file,
        default=None,
        metavar="FILE",
        help="speak TLS, and trust certificates signed by this CA (PEM)",
    )
    g.add_argument(
        "--tls-cert",
        type=existing_file,
        default=None,
        metavar="FILE",
        help="a client certificate, for servers that ask",
    )
    g.add_argument(
        "--tls-key", type=existing_file, default=None, metavar="FILE", help="its private key (default: in --tls-cert)"
    )
    g.add_argument(
        "--tls-server-name",
        default=None,
        metavar="NAME",
        help="the name the servers' certificates must hold (default: the host connected to)",
    )


def tls_from_args(args: argparse.Namespace) -> TLSConfig | None:
    """The TLS settings the flags give; None when no TLS flag was given."""
    ca, cert, key = (getattr(args, f"tls_{name}", None) for name in ("ca", "cert", "key"))
    name = getattr(args, "tls_server_name", None)
    if ca is None and cert is None and key is None and name is None:
        return None
    return TLSConfig(
        ca=None if ca is None else str(ca),
        cert=None if cert is None else str(cert),
        key=None if key is None else str(key),
        server_name=name,
    )
