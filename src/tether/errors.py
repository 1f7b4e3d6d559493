"""tether's exceptions, one tree.

::

    TetherError
    ├── ProtocolError                 bytes that break the wire protocol
    │   ├── LocalProtocolError        we were asked to send something invalid (a bug on this side)
    │   └── RemoteProtocolError       the peer sent something invalid (wrong magic, bad frame, bad JSON)
    │       └── FrameTooLarge         a length header above the limit, rejected before the payload
    ├── TransportError                the connection failed: retrying may help
    │   ├── ConnectFailed             could not connect to any address of a host
    │   └── ConnectionClosed          the peer closed while we waited for a reply
    ├── TrackerError                  the tracker answered, and the answer is no
    │   ├── RequestTimeout            no server was granted within the request's timeout (also TimeoutError)
    │   ├── RequestCancelled          the request was cancelled before a grant
    │   ├── RequestRejected           the tracker refused the request (bad options, unknown protocol)
    │   └── NotTetherTracker          a tether-only operation sent to a plain TVM tracker
    └── ConfigError                   invalid configuration (bad flag, port range)

Only :class:`TransportError` is worth a retry: everything else says something that a new attempt
will say again.
"""

from __future__ import annotations

__all__ = [
    "ConfigError",
    "ConnectFailed",
    "ConnectionClosed",
    "FrameTooLarge",
    "LocalProtocolError",
    "NotTetherTracker",
    "ProtocolError",
    "RemoteProtocolError",
    "RequestCancelled",
    "RequestRejected",
    "RequestTimeout",
    "TetherError",
    "TrackerError",
    "TransportError",
]


class TetherError(Exception):
    """Base of every exception tether raises on purpose."""


class ProtocolError(TetherError):
    """Bytes that break the wire protocol."""


class LocalProtocolError(ProtocolError):
    """This side was asked to encode something the protocol cannot carry."""


class RemoteProtocolError(ProtocolError):
    """The peer sent bytes that break the protocol; the connection cannot continue."""


class FrameTooLarge(RemoteProtocolError):
    """A length header announced more bytes than the limit (or zero or fewer)."""

    def __init__(self, length: int, limit: int) -> None:
        super().__init__(f"frame length {length} outside 1..{limit} bytes")
        self.length = length
        self.limit = limit


class TransportError(TetherError):
    """The connection failed; a retry may succeed."""


class ConnectFailed(TransportError):
    """No address of the host accepted a connection."""


class ConnectionClosed(TransportError):
    """The peer closed the connection before the expected reply arrived."""


class TrackerError(TetherError):
    """The tracker answered, and the answer is a refusal."""


class RequestTimeout(TrackerError, TimeoutError):
    """No server of the key was granted within the request's timeout (queue time, not session time)."""


class RequestCancelled(TrackerError):
    """The request was cancelled before a server was granted."""


class RequestRejected(TrackerError):
    """The tracker refused the request as malformed or unservable."""


class NotTetherTracker(TrackerError):
    """A tether-only operation was sent to a tracker that is not tether (TVM's own)."""


class ConfigError(TetherError, ValueError):
    """An invalid setting: a flag, an address, a port range."""
