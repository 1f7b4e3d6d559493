"""The only layer that touches sockets: listeners, connects, TCP options, blocking streams."""

from .net import Keepalive, bind_listener, connect_tcp, format_hostport, parse_hostport, quickack, tune_socket
from .stream import BlockingStream

__all__ = [
    "BlockingStream",
    "Keepalive",
    "bind_listener",
    "connect_tcp",
    "format_hostport",
    "parse_hostport",
    "quickack",
    "tune_socket",
]
