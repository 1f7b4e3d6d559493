"""tether: run compiled neural-network models on remote devices, wire-compatible with Apache TVM's RPC.

Trust: like TVM's RPC, a tether server runs what its clients send. Run it on networks you trust.
"""

from __future__ import annotations

__version__ = "0.1.0"

from .aio.tls import TLSConfig
from .client.api import Tracker, connect_tracker
from .client.query import TrackerStatus, query_tracker
from .client.session import BenchmarkResult, RemoteModel, RemoteTensor, Session, connect
from .client.tracker import TrackerClient
from .errors import (
    AuthError,
    AuthFailed,
    ConfigError,
    ConnectFailed,
    ConnectionClosed,
    ModelLoadError,
    ModelRunError,
    NotTetherServer,
    NotTetherTracker,
    PermissionDenied,
    ProtocolError,
    QuotaExceeded,
    RemoteError,
    RemoteProtocolError,
    RequestCancelled,
    RequestRejected,
    RequestTimeout,
    RunTimeout,
    SessionLost,
    SessionRefused,
    SessionTimeout,
    TetherError,
    TLSError,
    TrackerError,
    TransportError,
    Unservable,
    WorkerMemoryExceeded,
    WorkspaceError,
)

__all__ = [
    "BenchmarkResult",
    "ModelLoadError",
    "ModelRunError",
    "NotTetherServer",
    "RemoteError",
    "RemoteModel",
    "RemoteTensor",
    "Session",
    "SessionLost",
    "SessionRefused",
    "SessionTimeout",
    "Tracker",
    "WorkspaceError",
    "connect",
    "connect_tracker",
    "ConfigError",
    "ConnectFailed",
    "ConnectionClosed",
    "NotTetherTracker",
    "ProtocolError",
    "RemoteProtocolError",
    "RequestCancelled",
    "RequestRejected",
    "RequestTimeout",
    "RunTimeout",
    "TetherError",
    "TrackerClient",
    "TrackerError",
    "TrackerStatus",
    "TransportError",
    "Unservable",
    "QuotaExceeded",
    "WorkerMemoryExceeded",
    "AuthError",
    "AuthFailed",
    "PermissionDenied",
    "TLSConfig",
    "TLSError",
    "__version__",
    "query_tracker",
]
