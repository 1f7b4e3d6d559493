"""tether's proxy: pairs servers and clients that cannot reach each other, over TCP or WebSocket.

See :mod:`tether.proxy.server` (listeners, handshakes, pairing), :mod:`tether.proxy.matcher` (the pools,
pure), :mod:`tether.proxy.relay` (the byte pump) and :mod:`tether.proxy.registrar` (tracker mode).
"""

from __future__ import annotations

from .matcher import Matcher
from .server import ProxyConfig, ProxyServer, ProxyThread

__all__ = ["Matcher", "ProxyConfig", "ProxyServer", "ProxyThread"]
