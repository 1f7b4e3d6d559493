"""The tracker: per-key queues of device servers, handed to clients by priority and fair share."""

from .config import TrackerConfig
from .core import TrackerCore
from .scheduler import Scheduler, Slot, Waiter
from .server import TrackerServer, TrackerThread, run_tracker

__all__ = [
    "Scheduler",
    "Slot",
    "TrackerConfig",
    "TrackerCore",
    "TrackerServer",
    "TrackerThread",
    "Waiter",
    "run_tracker",
]
