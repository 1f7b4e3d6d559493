"""tether: run compiled neural-network models on remote devices, wire-compatible with Apache TVM's RPC.

Trust: like TVM's RPC, a tether server runs what its clients send. Run it on networks you trust.
"""

from __future__ import annotations

__version__ = "0.1.0"

from .client.query import TrackerStatus, query_tracker
from .client.tracker import TrackerClient
from .errors import (
    ConfigError,
    ConnectFailed,
    ConnectionClosed,
    NotTetherTracker,
    ProtocolError,
    RemoteProtocolError,
    RequestCancelled,
    RequestRejected,
    RequestTimeout,
    TetherError,
    TrackerError,
    TransportError,
)

__all__ = [
    "ConfigError",
    "ConnectFailed",
    "ConnectionClosed",
    "NotTetherTracker",
    "ProtocolError",
    "RemoteProtocolError",
    "RequestCancelled",
    "RequestRejected",
    "RequestTimeout",
    "TetherError",
    "TrackerClient",
    "TrackerError",
    "TrackerStatus",
    "TransportError",
    "__version__",
    "query_tracker",
]
