"""Host-side API: trackers, native sessions on servers, queries."""

from .api import Tracker, connect_tracker
from .query import KeyRow, ServerRow, TrackerStatus, WaiterRow, query_tracker, status_from_summary
from .session import BenchmarkResult, RemoteModel, RemoteTensor, Session, connect
from .tracker import DEFAULT_TRACKER_PORT, TrackerClient, tracker_address_from_env

__all__ = [
    "BenchmarkResult",
    "RemoteModel",
    "RemoteTensor",
    "Session",
    "Tracker",
    "connect",
    "connect_tracker",
    "DEFAULT_TRACKER_PORT",
    "KeyRow",
    "ServerRow",
    "TrackerClient",
    "TrackerStatus",
    "WaiterRow",
    "query_tracker",
    "status_from_summary",
    "tracker_address_from_env",
]
