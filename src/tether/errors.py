"""tether's exceptions, one tree.

::

    TetherError
    ├── ProtocolError                 bytes that break the wire protocol
    │   ├── LocalProtocolError        we were asked to send something invalid (a bug on this side)
    │   ├── RemoteProtocolError       the peer sent something invalid (wrong magic, bad frame, bad JSON)
    │   │   ├── FrameTooLarge         a length header above the limit, rejected before the payload
    │   │   └── BadHeader             a well-framed session frame whose JSON header is unusable
    │   └── NotTetherServer           a tether client reached a server that speaks only TVM's protocol
    ├── TransportError                the connection failed: retrying may help
    │   ├── ConnectFailed             could not connect to any address of a host
    │   ├── ConnectionClosed          the peer closed while we waited for a reply
    │   │   └── SessionLost           the session's worker died or its connection broke mid-request
    │   ├── SessionRefused            the server or proxy answered the handshake with MISMATCH/DUPLICATE
    │   └── TLSError                  TLS failed: a certificate not trusted, one missing, TLS on one side only
    ├── TrackerError                  the tracker answered, and the answer is no
    │   ├── RequestTimeout            no server was granted within the request's timeout (also TimeoutError)
    │   ├── RequestCancelled          the request was cancelled before a grant
    │   ├── RequestRejected           the tracker refused the request (bad options, unknown protocol)
    │   │   └── Unservable            no registered server could serve it (key, protocol, labels)
    │   └── NotTetherTracker          a tether-only operation sent to a plain TVM tracker
    ├── RemoteError                   a session request failed on the device (type, message, traceback)
    │   ├── SessionTimeout            the session outlived its ``session_timeout`` (also TimeoutError)
    │   ├── RunTimeout                one request (load, run, benchmark) outlived its own time limit
    │   ├── WorkspaceError            a path outside the session's workspace, a missing file
    │   ├── ModelLoadError            a backend could not load the model
    │   ├── ModelRunError             the model raised while running
    │   ├── QuotaExceeded             a request over the session's quotas (upload size, workspace bytes),
    │   │                             refused before anything was allocated; the session goes on
    │   └── WorkerMemoryExceeded      the session's worker ran out of the memory the server allows it
    ├── AuthError                     authentication or authorisation failed (never worth a retry)
    │   ├── AuthFailed                who you are could not be verified (no token, wrong token, an impostor)
    │   └── PermissionDenied          verified, but your role may not do this
    └── ConfigError                   invalid configuration (bad flag, port range)

Only :class:`TransportError` is worth a retry: everything else says something that a new attempt
will say again. :class:`TLSError` is the exception: a configuration to fix (its message says what), so
tether's own retries give up on it at once.
"""

from __future__ import annotations

__all__ = [
    "AuthError",
    "AuthFailed",
    "BadHeader",
    "ConfigError",
    "ConnectFailed",
    "ConnectionClosed",
    "FrameTooLarge",
    "LocalProtocolError",
    "ModelLoadError",
    "ModelRunError",
    "NotTetherServer",
    "NotTetherTracker",
    "PermissionDenied",
    "ProtocolError",
    "QuotaExceeded",
    "RemoteError",
    "RemoteProtocolError",
    "RequestCancelled",
    "RequestRejected",
    "RequestTimeout",
    "RunTimeout",
    "SessionLost",
    "SessionRefused",
    "SessionTimeout",
    "TLSError",
    "TetherError",
    "TrackerError",
    "TransportError",
    "Unservable",
    "WorkerMemoryExceeded",
    "WorkspaceError",
    "remote_error",
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


class BadHeader(RemoteProtocolError):
    """A session frame whose fixed header was valid and whose JSON header is not usable (not JSON, an
    integer past Python's digit limit, nesting too deep, not an object). The frame was consumed whole
    but its payload: the connection can go on, so a server answers this frame alone with an error."""

    def __init__(self, message: str, frame_id: int = 0, payload_len: int = 0) -> None:
        super().__init__(message)
        self.frame_id = frame_id
        self.payload_len = payload_len


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


class Unservable(RequestRejected):
    """No server registered with the tracker could serve the request: none of its key (a misspelling?),
    none speaking its protocol, none with its labels. Sent after the request's ``unservable_after`` grace;
    the message says which."""


class NotTetherTracker(TrackerError):
    """A tether-only operation was sent to a tracker that is not tether (TVM's own)."""


class AuthError(TetherError):
    """Authentication or authorisation failed; a retry with the same credentials fails the same way."""


class AuthFailed(AuthError):
    """The peer could not be verified, or could not verify us: no token, a wrong one, or an impostor."""


class PermissionDenied(AuthError):
    """Authenticated, but the role may not do this (a user registering slots, STOP without admin)."""


class ConfigError(TetherError, ValueError):
    """An invalid setting: a flag, an address, a port range."""


class NotTetherServer(ProtocolError):
    """A tether client reached a server that speaks only TVM's session protocol (a plain TVM server)."""


class SessionLost(ConnectionClosed):
    """The session ended under a request: its worker died or the connection broke."""


class SessionRefused(TransportError):
    """The server or proxy refused the handshake (MISMATCH: wrong or stale key, busy; DUPLICATE)."""


class TLSError(TransportError):
    """TLS failed between this side and a peer: a certificate this side cannot verify (pass the CA that
    signed it), a name the certificate does not hold, a client certificate missing or refused, or TLS on
    one side only. The message says which and what to pass; retrying does not help."""


class RemoteError(TetherError):
    """A session request failed on the device; carries the remote type, message and traceback text."""

    def __init__(self, message: str, remote_type: str = "Error", remote_traceback: str = "") -> None:
        super().__init__(message)
        self.remote_type = remote_type
        self.remote_message = message
        self.remote_traceback = remote_traceback

    def __str__(self) -> str:
        text = f"{self.remote_type}: {self.remote_message}"
        if self.remote_traceback:
            text += "\n--- remote traceback ---\n" + self.remote_traceback.rstrip()
        return text


class SessionTimeout(RemoteError, TimeoutError):
    """The session outlived its ``session_timeout``; the device ended it (queue time never counts)."""


class RunTimeout(RemoteError, TimeoutError):
    """One request (``load_model``, ``run``, ``benchmark``) outlived the time limit it was sent with. The
    device cannot interrupt a model mid-run, so it ended the session's worker: the session is closed."""


class WorkspaceError(RemoteError):
    """A path that escapes the session's workspace, or a file that is not there."""


class ModelLoadError(RemoteError):
    """A backend could not load the model (wrong format, missing runtime, bad options)."""


class ModelRunError(RemoteError):
    """The model raised while running (bad inputs, a runtime error)."""


class QuotaExceeded(RemoteError):
    """A request the session's quotas do not allow: a payload announced larger than the server takes in
    one request (``--max-upload-mb``), or an upload that would take the workspace past its quota
    (``--workspace-quota-mb``). Refused from the request's header, before anything was allocated or
    written; the session goes on."""


class WorkerMemoryExceeded(RemoteError):
    """The session's worker could not allocate memory within the limit the server sets on it
    (``--worker-memory-mb``). The request failed; the session goes on when the worker survived it."""


_REMOTE_TYPES: dict[str, type[RemoteError]] = {
    "SessionTimeout": SessionTimeout,
    "RunTimeout": RunTimeout,
    "WorkspaceError": WorkspaceError,
    "ModelLoadError": ModelLoadError,
    "ModelRunError": ModelRunError,
    "QuotaExceeded": QuotaExceeded,
    "WorkerMemoryExceeded": WorkerMemoryExceeded,
}


def remote_error(remote_type: str, message: str, remote_traceback: str = "") -> RemoteError:
    """The typed exception for an error frame's ``type``."""
    return _REMOTE_TYPES.get(remote_type, RemoteError)(message, remote_type, remote_traceback)
