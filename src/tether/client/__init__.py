"""Host-side API: talk to trackers (and, later, sessions on servers)."""

from .query import KeyRow, ServerRow, TrackerStatus, WaiterRow, query_tracker, status_from_summary
from .tracker import DEFAULT_TRACKER_PORT, TrackerClient, tracker_address_from_env

__all__ = [
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
