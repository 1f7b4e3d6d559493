"""``tether.connect_tracker``: the entry point of the host-side API (blocking, like TVM's).

A :class:`Tracker` rides out a tracker restart: a connection that cannot be made is retried with backoff
(``connect_tracker``'s ``timeout``), and a request whose tracker connection breaks while it waits is sent
again, the same request (key, priority, user, labels, id), once the tracker answers, all within the
request's own timeout. Sessions already granted are separate connections and do not notice.
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from ..aio.tls import TLSLike, client_context
from ..errors import (
    ConnectFailed,
    ConnectionClosed,
    NotTetherTracker,
    RemoteProtocolError,
    RequestTimeout,
    SessionRefused,
    TLSError,
    TransportError,
)
from ..protocol.auth import Token, token_from_env
from ..protocol.tracker import Grant
from .query import TrackerStatus, status_from_summary
from .session import Session
from .tracker import TrackerClient, tracker_address_from_env

__all__ = ["Tracker", "connect_tracker"]

logger = logging.getLogger(__name__)

#: Backoff between attempts to reach the tracker: first wait and cap, in seconds.
_BACKOFF_FIRST_S = 0.05
_BACKOFF_MAX_S = 1.0
#: A granted server that refuses the session (gone, or its matchkey replaced) costs one new request;
#: after this many in a row the error is the caller's (TVM's client: ``max_retry=5``).
_MAX_REFUSED_GRANTS = 3

_ids = itertools.count(1)
_T = TypeVar("_T")


def connect_tracker(
    host: str | None = None,
    port: int | None = None,
    timeout: float = 5.0,
    *,
    token: Token | str | None = None,
    tls: TLSLike | None = None,
) -> Tracker:
    """Connect to a tracker (``TVM_TRACKER_HOST``/``TVM_TRACKER_PORT`` when not given).

    A refused or broken connection is tried again with backoff for up to ``timeout`` seconds (a tracker
    that is restarting), then :class:`~tether.errors.ConnectFailed` names the last error. ``token``
    (``name:secret``, default ``$TETHER_TOKEN``) authenticates where the tracker asks for it
    (:class:`~tether.errors.AuthFailed` when it is refused, never retried).

    ``tls`` (a :class:`~tether.aio.tls.TLSConfig` or an ``ssl.SSLContext``): TLS to the tracker, and to
    every server it grants (TLS after the session's handshake, end to end through a proxy). A TLS
    failure raises :class:`~tether.errors.TLSError` at once, without retries.
    """
    host, port = tracker_address_from_env(host, port)
    if tls is not None:
        client_context(tls)  # files that do not load: ConfigError now, not after connecting
    stop = threading.Event()
    creds = token_from_env(token)
    return Tracker(
        _connect(host, port, time.monotonic() + timeout, stop, tls, token=creds), stop=stop, tls=tls, token=creds
    )


def _connect(
    host: str,
    port: int,
    deadline: float | None,
    stop: threading.Event,
    tls: TLSLike | None = None,
    *,
    token: Token | None = None,
) -> TrackerClient:
    """A tracker connection, retried with backoff until ``deadline`` (None: forever) or ``stop``."""
    delay = _BACKOFF_FIRST_S
    first_failure: float | None = None
    while True:
        attempt = 5.0 if deadline is None else max(0.1, min(5.0, deadline - time.monotonic()))
        try:
            client = TrackerClient.connect(host, port, timeout=attempt, tls=tls, token=token)
            if stop.is_set():  # interrupted while connecting: nobody would interrupt this new connection
                client.close()
                raise ConnectFailed(f"tracker {host}:{port}: interrupted")
        except TLSError:
            raise  # a configuration to fix: no retry makes it work
        except (TransportError, RemoteProtocolError) as exc:
            now = time.monotonic()
            if first_failure is None:
                first_failure = now
            if stop.is_set() or (deadline is not None and now + delay > deadline):
                down = now - first_failure
                raise ConnectFailed(f"tracker {host}:{port} unreachable for {down:.1f} s: {exc}") from exc
            logger.debug("tracker %s:%d: %s; again in %.2f s", host, port, exc, delay)
            stop.wait(delay)
            delay = min(delay * 2, _BACKOFF_MAX_S)
            continue
        if first_failure is not None:
            logger.info("tracker %s:%d answers again after %.1f s", host, port, time.monotonic() - first_failure)
        return client


class Tracker:
    """Requests sessions on servers by key; also a context manager. One request at a time."""

    def __init__(
        self,
        client: TrackerClient,
        *,
        stop: threading.Event | None = None,
        tls: TLSLike | None = None,
        token: Token | None = None,
    ) -> None:
        self.client = client
        self._token = token
        self.host, self.port = client.host, client.port
        self._stop = stop or threading.Event()
        #: TLS for the tracker link (again after a reconnect) and the sessions it grants.
        self.tls = tls

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
        unservable_after: float | None = None,
    ) -> Session:
        """Wait (``timeout`` seconds of queue time, None: forever) for a server of ``key`` with every
        label in ``labels``, then open a native session on it. ``session_timeout`` (seconds, 0: none)
        bounds the session itself, from the handshake on. ``request_id``, ``unservable_after`` (fail fast
        with :class:`~tether.errors.Unservable` when no registered server could serve it): see
        :meth:`TrackerClient.request_grant`.

        A tracker that goes away meanwhile (a restart) is reconnected with backoff and the request sent
        again, within ``timeout``; past it, :class:`RequestTimeout` says the tracker was unreachable. A
        granted server that refuses the session (gone since the grant) is also worth a new request, up to
        3 times in a row.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        request_id = request_id or f"{os.getpid()}-t{next(_ids)}"
        refused = asked = 0
        while True:
            if self._stop.is_set():
                raise ConnectionClosed(f"the request for {key!r} was interrupted")
            if self.client.peer_closed():  # closed while it sat idle: connect again before asking
                closed = ConnectionClosed("the tracker closed the connection")
                self._reconnect_or_raise(closed, key, timeout, deadline, quiet=True)
            try:
                asked += 1
                grant = self._grant(
                    key, priority, user, labels, request_id=request_id, deadline=deadline, unservable=unservable_after
                )
            except RequestTimeout as exc:
                if asked > 1 and timeout is not None:  # asked again after a restart: say the whole wait
                    raise RequestTimeout(f"no free server of key {key!r} within {timeout:g} s ({exc})") from None
                raise
            except TLSError:
                raise
            except TransportError as exc:  # the tracker connection broke: a restart, or the network
                # (backing off also between a tracker that accepts and then drops each request, and the next)
                self._stop.wait(min(_BACKOFF_FIRST_S * 2 ** min(asked, 10), _BACKOFF_MAX_S, self._left(deadline)))
                self._reconnect_or_raise(exc, key, timeout, deadline)
                continue
            try:
                return Session.connect(
                    grant.host,
                    grant.port,
                    grant.matchkey,
                    session_timeout=session_timeout or None,
                    timeout=connect_timeout,
                    tls=self.tls,
                    token=self._token,
                )
            except (SessionRefused, ConnectFailed) as exc:
                refused += 1
                if refused >= _MAX_REFUSED_GRANTS or self._past(deadline):
                    raise
                logger.warning(
                    "granted server %s:%d refused the session (%s); asking again", grant.host, grant.port, exc
                )

    def _grant(
        self,
        key: str,
        priority: float,
        user: str,
        labels: Mapping[str, str] | None,
        *,
        request_id: str,
        deadline: float | None,
        unservable: float | None,
    ) -> Grant:
        tether = self.client.tether_version is not None
        if not tether and labels:
            raise NotTetherTracker(f"{self.host}:{self.port} is TVM's tracker: it cannot match labels")
        return self.client.request_grant(
            key,
            priority=priority,
            user=user,
            timeout=None if deadline is None else max(0.0, deadline - time.monotonic()),
            protocol="tether" if tether else "tvm",
            labels=labels,
            request_id=request_id,
            unservable_after=unservable,
        )

    def _reconnect_or_raise(
        self, exc: TransportError, key: str, timeout: float | None, deadline: float | None, *, quiet: bool = False
    ) -> None:
        """After the tracker link broke: a new connection within ``deadline``, or the right error.
        ``quiet``: the link was found closed before the request was sent (a tracker closes idle ones)."""
        self.client.close()
        if self._stop.is_set():
            raise exc
        if quiet:
            logger.debug("tracker %s:%d: %s; connecting again to ask for %r", self.host, self.port, exc, key)
        else:
            logger.warning("tracker %s:%d: %s; reconnecting to ask again for %r", self.host, self.port, exc, key)
        try:
            self.client = _connect(self.host, self.port, deadline, self._stop, self.tls, token=self._token)
        except ConnectFailed as failed:
            if self._stop.is_set():
                raise exc from None
            raise RequestTimeout(f"no server of key {key!r} within {timeout:g} s: {failed}") from failed

    @staticmethod
    def _past(deadline: float | None) -> bool:
        return deadline is not None and time.monotonic() >= deadline

    @staticmethod
    def _left(deadline: float | None) -> float:
        return float("inf") if deadline is None else max(0.0, deadline - time.monotonic())

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
        return self._call(lambda client: client.summary())

    def status(self) -> TrackerStatus:
        """The tracker's queues and servers as rows (what ``tether query`` prints)."""
        return self._call(
            lambda client: status_from_summary(
                client.summary(detail=client.tether_version is not None), f"{self.host}:{self.port}"
            )
        )

    def _fresh_if_closed(self) -> None:
        """The tracker closed this connection while it sat idle (or went away): connect again before use,
        quietly (a request on the old one would fail and be sent again, with a warning)."""
        if not self._stop.is_set() and self.client.peer_closed():
            logger.debug("tracker %s:%d closed the idle connection: connecting again", self.host, self.port)
            self.client.close()
            self.client = _connect(self.host, self.port, time.monotonic() + 5.0, self._stop)

    def _call(self, op: Callable[[TrackerClient], _T]) -> _T:
        """``op(client)``, once more on a fresh connection if the old one broke (a tracker restart)."""
        self._fresh_if_closed()
        try:
            return op(self.client)
        except TransportError:
            if self._stop.is_set():
                raise
            self.client.close()
            self.client = _connect(
                self.host, self.port, time.monotonic() + 5.0, self._stop, self.tls, token=self._token
            )
            return op(self.client)

    def interrupt(self) -> None:
        """Make a request blocked in another thread end now (ConnectionClosed), without reconnecting."""
        self._stop.set()
        self.client.interrupt()

    def close(self) -> None:
        self._stop.set()
        self.client.close()

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
