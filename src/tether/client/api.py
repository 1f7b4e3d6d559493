"""``tether.connect_tracker``: the entry point of the host-side API (blocking, like TVM's)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..errors import NotTetherTracker
from .query import TrackerStatus, status_from_summary
from .session import Session
from .tracker import TrackerClient, tracker_address_from_env

__all__ = ["Tracker", "connect_tracker"]


def connect_tracker(host: str | None = None, port: int | None = None, timeout: float = 5.0) -> Tracker:
    """Connect to a tracker (``TVM_TRACKER_HOST``/``TVM_TRACKER_PORT`` when not given)."""
    host, port = tracker_address_from_env(host, port)
    return Tracker(TrackerClient.connect(host, port, timeout=timeout))


class Tracker:
    """Requests sessions on servers by key; also a context manager."""

    def __init__(self, client: TrackerClient) -> None:
        self.client = client
        self.host, self.port = client.host, client.port

    def request(
        self,
        key: str,
        priority: float = 1,
        session_timeout: float = 0,
        timeout: float | None = None,
        *,
        labels: Mapping[str, str] | None = None,
        user: str = "",
        connect_timeout: float = 10.0,
        request_id: str | None = None,
    ) -> Session:
        """Wait (``timeout`` seconds of queue time, None: forever) for a server of ``key`` with every
        label in ``labels``, then open a native session on it. ``session_timeout`` (seconds, 0: none)
        bounds the session itself, from the handshake on. ``request_id``: see
        :meth:`TrackerClient.request_grant`."""
        tether = self.client.tether_version is not None
        if not tether and labels:
            raise NotTetherTracker(f"{self.host}:{self.port} is TVM's tracker: it cannot match labels")
        grant = self.client.request_grant(
            key,
            priority=priority,
            user=user,
            timeout=timeout,
            protocol="tether" if tether else "tvm",
            labels=labels,
            request_id=request_id,
        )
        return Session.connect(
            grant.host, grant.port, grant.matchkey, session_timeout=session_timeout or None, timeout=connect_timeout
        )

    def request_and_run(
        self,
        key: str,
        model: str | Path,
        inputs: Mapping[str, Any] | None = None,
        *,
        fill: str | None = None,
        backend: str | None = None,
        options: Mapping[str, Any] | None = None,
        priority: float = 1,
        session_timeout: float = 0,
        timeout: float | None = None,
        labels: Mapping[str, str] | None = None,
    ) -> dict[str, Any]:
        """Request a server, upload ``model``, run it once, close: outputs as numpy arrays."""
        with self.request(key, priority, session_timeout, timeout, labels=labels) as sess:
            remote = sess.upload(model)
            return sess.load_model(remote, backend, **dict(options or {})).run(inputs, fill=fill)

    def summary(self) -> dict[str, Any]:
        return self.client.summary()

    def status(self) -> TrackerStatus:
        """The tracker's queues and servers as rows (what ``tether query`` prints)."""
        detail = self.client.tether_version is not None
        return status_from_summary(self.client.summary(detail=detail), f"{self.host}:{self.port}")

    def close(self) -> None:
        self.client.close()

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
