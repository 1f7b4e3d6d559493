"""A blocking tracker client: works against tether's tracker and TVM's alike.

::

    with TrackerClient.connect("127.0.0.1", 9190) as tracker:
        print(tracker.summary())
        grant = tracker.request_grant("android", timeout=60)   # Grant(host, port, matchkey)

Against TVM's tracker the tether-only parts degrade as they must: request timeouts are enforced on
this side (the waiting entry stays queued on TVM's tracker until its next PUT, TVM's bug), cancel
closes the connection, and ``summary(detail=True)`` returns TVM's plain summary.
"""

from __future__ import annotations

import itertools
import logging
import os
import time
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any

from ..aio.net import format_hostport
from ..aio.stream import BlockingStream
from ..aio.tls import TLSLike, dropped_after_handshake, looks_like_tls
from ..errors import (
    AuthFailed,
    ConnectionClosed,
    NotTetherTracker,
    RemoteProtocolError,
    RequestCancelled,
    RequestRejected,
    RequestTimeout,
    TLSError,
    Unservable,
)
from ..protocol.auth import Initiator, Role, Token, token_from_env
from ..protocol.constants import TrackerCode
from ..protocol.tracker import (
    Admin,
    Auth,
    Cancel,
    Control,
    GetPendingMatchkeys,
    Grant,
    Ping,
    Put,
    Request,
    RequestOptions,
    SessionEvent,
    Stop,
    Summary,
    TrackerClientStream,
    TrackerMessage,
    UpdateInfo,
    Withdraw,
    encode_message,
    parse_request_reply,
    raise_refusal,
)

__all__ = ["DEFAULT_TRACKER_PORT", "TrackerClient", "tracker_address_from_env"]

logger = logging.getLogger(__name__)

DEFAULT_TRACKER_PORT = 9190
_ids = itertools.count(1)


def tracker_address_from_env(host: str | None = None, port: int | None = None) -> tuple[str, int]:
    """``host``/``port`` if given, else ``TVM_TRACKER_HOST``/``TVM_TRACKER_PORT``, else 127.0.0.1:9190."""
    return (
        host or os.environ.get("TVM_TRACKER_HOST") or "127.0.0.1",
        port or int(os.environ.get("TVM_TRACKER_PORT") or DEFAULT_TRACKER_PORT),
    )


class TrackerClient:
    """One connection to a tracker. Not thread-safe: one call at a time.

    Raises :class:`~tether.errors.ConnectFailed` when no address answers, and
    :class:`~tether.errors.RemoteProtocolError` when the peer is not a tracker.
    """

    def __init__(self, stream: BlockingStream, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self._stream = stream
        self._codec = TrackerClientStream()
        self._replies: deque[Any] = deque()
        self._tether_version: str | None = None
        self._tracker_auth = False
        self._hello_done = False
        self._features: frozenset[str] = frozenset()
        #: The verified name and role, once authenticated (None: not, or the tracker does not ask).
        self.user: str | None = None
        self.role: Role | None = None

    @classmethod
    def connect(
        cls, host: str, port: int, timeout: float = 5.0, tls: TLSLike | None = None, *, token: Token | str | None = None
    ) -> TrackerClient:
        """Connect and exchange the magic, all within ``timeout`` seconds; with ``tls`` (a
        :class:`~tether.aio.tls.TLSConfig` or an ``ssl.SSLContext``) over TLS, to a tracker's TLS port.
        :class:`~tether.errors.TLSError` when TLS fails, or is spoken on one side only.

        ``token`` (``name:secret``; default ``$TETHER_TOKEN``): when the tracker requires authentication,
        prove who we are and check that the tracker knows our secret too. Raises
        :class:`~tether.errors.AuthFailed` when either fails."""
        token = token_from_env(token)
        stream = BlockingStream.connect(host, port, timeout, tls=tls)
        client = cls(stream, host, port)
        try:
            stream.send(TrackerClientStream.initial_bytes())
            deadline = time.monotonic() + timeout
            while not client._codec.connected:
                data = stream.recv(deadline) if tls is None else _recv_tls(stream, deadline, host, port, tls)
                if tls is None and looks_like_tls(data):
                    raise TLSError(
                        f"{host}:{port} is a TLS port: connect with TLS (tls=TLSConfig(ca=...), --tls-ca), "
                        "or to the tracker's plain port"
                    )
                client._replies.extend(client._codec.receive_data(data))
            if token is not None:
                client._authenticate(token, deadline)
        except TimeoutError as exc:
            stream.close()
            raise RemoteProtocolError(f"{host}:{port} did not answer the tracker magic within {timeout} s") from exc
        except BaseException:
            stream.close()
            raise
        return client

    def _authenticate(self, token: Token, deadline: float) -> None:
        if self.tether_version is None or not self._tracker_auth:
            return  # TVM's tracker, or tether's with authentication off: nothing to prove
        exchange = Initiator(token, "tracker")
        challenge = self._auth_step(exchange.hello(), deadline)
        verdict = self._auth_step(exchange.answer(challenge), deadline)
        self.role = exchange.finish(verdict)
        self.user = token.name

    def _auth_step(self, step: dict[str, Any], deadline: float) -> Any:
        self.send(Auth(step))
        reply = self.recv(deadline)
        if not (isinstance(reply, list) and len(reply) == 2 and isinstance(reply[1], dict)):
            raise RemoteProtocolError(f"unexpected AUTH reply {reply!r:.120}")
        if reply[0] != TrackerCode.SUCCESS:
            raise AuthFailed(str(reply[1].get("message", "authentication refused"))[:300])
        return reply[1]

    # -- plumbing ------------------------------------------------------------------------------

    def send(self, msg: TrackerMessage) -> None:
        """Send one message without waiting for its reply (pair with :meth:`recv`)."""
        self._stream.send(encode_message(msg))

    def recv(self, deadline: float | None = None) -> Any:
        """The next reply value; ``deadline`` on ``time.monotonic()``; raises TimeoutError past it."""
        return self._recv_where(lambda _: True, deadline)

    def _recv_where(self, wanted: Callable[[Any], bool], deadline: float | None) -> Any:
        """The first reply, queued or still to come, for which ``wanted`` is true; the others stay queued."""
        for i, value in enumerate(self._replies):
            if wanted(value):
                del self._replies[i]
                return value
        while True:
            values = self._codec.receive_data(self._stream.recv(deadline))
            for value in values:
                raise_refusal(value)  # authentication: the tracker refused, and closes the connection
            for i, value in enumerate(values):
                if wanted(value):
                    self._replies.extend(values[:i] + values[i + 1 :])
                    return value
            self._replies.extend(values)

    def call(self, msg: TrackerMessage, timeout: float | None = 30.0) -> Any:
        """Send ``msg`` and return its reply (valid for every message but a waiting REQUEST)."""
        self.send(msg)
        return self.recv(None if timeout is None else time.monotonic() + timeout)

    def close(self) -> None:
        self._stream.close()

    @property
    def closed(self) -> bool:
        return self._stream.closed

    def peer_closed(self) -> bool:
        """True when the tracker has closed this connection (a tracker closes connections that sit idle,
        holding nothing, and restarts); checked without waiting, before reuse."""
        return self._stream.peer_closed()

    def interrupt(self) -> None:
        """Wake a call blocked on this connection from another thread (it raises ConnectionClosed)."""
        self._stream.interrupt()

    def __enter__(self) -> TrackerClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- queries -------------------------------------------------------------------------------

    @property
    def tether_version(self) -> str | None:
        """The tether tracker's version, or None for another tracker (asked once, with a ping)."""
        if not self._hello_done:
            reply = self.call(Ping(hello=True))
            if isinstance(reply, list) and len(reply) == 2 and isinstance(reply[1], dict):
                self._tether_version = str(reply[1].get("tether"))
                self._tracker_auth = reply[1].get("auth") is True
                features = reply[1].get("features")
                if isinstance(features, list):
                    self._features = frozenset(str(f) for f in features)
            self._hello_done = True
        return self._tether_version

    def supports(self, feature: str) -> bool:
        """Whether the tracker said it has ``feature`` ("control": servers' orders; "admin": ADMIN)."""
        return self.tether_version is not None and feature in self._features

    def ping(self) -> float:
        """Round trip of one PING, in seconds."""
        start = time.perf_counter()
        reply = self.call(Ping())
        if reply != TrackerCode.SUCCESS:
            raise RemoteProtocolError(f"unexpected PING reply {reply!r:.80}")
        return time.perf_counter() - start

    def summary(self, detail: bool = False, timeout: float | None = 30.0, key: str | None = None) -> dict[str, Any]:
        """TVM's summary dict (``queue_info``, ``server_info``); ``detail`` adds tether's ``"tether"`` entry,
        of one ``key`` only when given (its queue, waiters and servers)."""
        reply = self.call(Summary(detail=detail, key=key if detail else None), timeout)
        if not (
            isinstance(reply, list)
            and len(reply) == 2
            and reply[0] == TrackerCode.SUCCESS
            and isinstance(reply[1], dict)
        ):
            raise RemoteProtocolError(f"unexpected SUMMARY reply {reply!r:.200}")
        return reply[1]

    def stop(self, stop_key: str) -> bool:
        """Ask the tracker to shut down; False when the key is wrong."""
        return bool(self.call(Stop(stop_key)) == TrackerCode.SUCCESS)

    # -- requests ------------------------------------------------------------------------------

    def request_grant(
        self,
        key: str,
        *,
        priority: float = 1,
        user: str = "",
        timeout: float | None = None,
        protocol: str = "tvm",
        labels: Mapping[str, str] | None = None,
        request_id: str | None = None,
        unservable_after: float | None = None,
    ) -> Grant:
        """Wait for a free server of ``key`` and return where to connect.

        ``timeout`` is queue time in seconds (None waits forever). Raises :class:`RequestTimeout`,
        :class:`RequestRejected`, :class:`RequestCancelled` (KeyboardInterrupt cancels the request on
        the tracker, then propagates), :class:`ConnectionClosed`. ``request_id`` names the request on
        tether's tracker (its waiters list it; unique per connection); by default ``"<pid>-<n>"``.
        ``unservable_after`` (tether's tracker; seconds): fail with :class:`Unservable` and the reason when,
        that long after the request, no registered server could serve it (None: wait for one to appear).
        """
        tether = self.tether_version is not None
        if not tether and (labels or protocol != "tvm"):
            raise NotTetherTracker(f"{self.host}:{self.port} is not a tether tracker: labels and protocols need one")
        if request_id is None:
            request_id = f"{os.getpid()}-{next(_ids)}"
        options = (
            RequestOptions(request_id, protocol, dict(labels or {}), timeout, user or None, unservable_after)
            if tether
            else None
        )
        self.send(Request(key, user, priority, options))
        # The tracker enforces a tether request's timeout; this side only guards against a silent tracker.
        deadline = None if timeout is None else time.monotonic() + timeout + (2.0 if tether else 0.0)
        try:
            reply = self.recv(deadline)
        except TimeoutError:
            self._abandon(request_id if tether else None)
            raise RequestTimeout(f"no free server of key {key!r} within {timeout} s") from None
        except KeyboardInterrupt:
            self._abandon(request_id if tether else None)
            raise
        return _grant_or_raise(parse_request_reply(reply), key)

    def cancel(self, request_id: str, timeout: float = 5.0) -> bool:
        """Withdraw a waiting request sent with :meth:`send`; False when it was no longer waiting.

        The request's own outcome (``[-1, {"error": "cancelled"}]``, or a grant that won the race) comes
        before the cancel's reply; it stays queued for :meth:`recv`.
        """
        self.send(Cancel(request_id))
        reply = self._recv_where(lambda v: not isinstance(v, list), time.monotonic() + timeout)
        return bool(reply == TrackerCode.SUCCESS)

    def _abandon(self, request_id: str | None) -> None:
        """Give up a request that is still waiting: cancel it (tether), or drop the connection (TVM)."""
        if request_id is None:
            self.close()
            return
        try:
            self.cancel(request_id)
            self._recv_where(lambda v: isinstance(v, list), time.monotonic() + 5.0)  # its outcome: dropped
        except (TimeoutError, ConnectionClosed, RemoteProtocolError):
            self.close()

    # -- server side (registration) ------------------------------------------------------------

    def update_info(self, info: dict[str, Any]) -> None:
        self._expect_ok(self.call(UpdateInfo(info)), "UPDATE_INFO")

    def put(self, key: str, port: int, matchkey: str, custom_addr: str | None = None) -> None:
        self._expect_ok(self.call(Put(key, port, matchkey, custom_addr)), "PUT")

    def pending_matchkeys(self) -> list[str]:
        reply = self.call(GetPendingMatchkeys())
        if not isinstance(reply, list):
            raise RemoteProtocolError(f"unexpected GET_PENDING_MATCHKEYS reply {reply!r:.80}")
        return [str(k) for k in reply]

    def withdraw(self, matchkey: str) -> bool:
        """tether's tracker only: take back ``matchkey``, free or granted-and-unredeemed, offered on this
        connection; False when the tracker did not know it."""
        return bool(self.call(Withdraw(matchkey)) == TrackerCode.SUCCESS)

    def session_event(
        self,
        event: str,
        matchkey: str,
        peer: str | None = None,
        outcome: str | None = None,
        detail: str | None = None,
    ) -> None:
        self._expect_ok(self.call(SessionEvent(event, matchkey, peer, outcome, detail)), "SESSION")

    def orders(self) -> list[dict[str, Any]]:
        """A server's orders from the tracker (CONTROL poll; tracker ``supports("control")`` only)."""
        reply = self.call(Control({"poll": True}))
        if not (isinstance(reply, list) and len(reply) == 2 and reply[0] == 0 and isinstance(reply[1], list)):
            raise RemoteProtocolError(f"unexpected CONTROL reply {reply!r:.80}")
        return [o for o in reply[1] if isinstance(o, dict)]

    def report_canary(self, canary_id: int, ok: bool, detail: str) -> bool:
        """Report a canary the tracker asked for; False when it no longer waits for this one."""
        return bool(self.call(Control({"canary": canary_id, "ok": ok, "detail": detail})) == TrackerCode.SUCCESS)

    def admin(self, op: str, server: str, reason: str | None = None) -> dict[str, Any]:
        """An admin's operation on a server (``cordon``, ``uncordon``, ``drain``, ``release``, ``check``);
        returns the tracker's answer (the server's standing). Raises :class:`PermissionDenied`/
        :class:`AuthFailed` when refused, :class:`KeyError` for a server the tracker does not know."""
        reply = self.call(Admin(op, server, reason))
        if isinstance(reply, list) and len(reply) == 2 and reply[0] == 0 and isinstance(reply[1], dict):
            return reply[1]
        if (
            isinstance(reply, list)
            and len(reply) == 2
            and isinstance(reply[1], dict)
            and reply[1].get("error") == "unknown_server"
        ):
            raise KeyError(str(reply[1].get("message")))
        raise_refusal(reply)
        raise RemoteProtocolError(f"unexpected ADMIN reply {reply!r:.80}")

    @staticmethod
    def _expect_ok(reply: Any, what: str) -> None:
        if reply != TrackerCode.SUCCESS:
            raise RemoteProtocolError(f"tracker answered {reply!r:.80} to {what}")


def _recv_tls(stream: BlockingStream, deadline: float, host: str, port: int, tls: TLSLike) -> bytes:
    """The tracker's first answer over TLS; a close before it is the tracker refusing this client's
    certificate (asyncio's TLS drops the connection without telling why)."""
    try:
        return stream.recv(deadline)
    except ConnectionClosed:
        raise dropped_after_handshake(format_hostport(host, port), tls) from None


def _grant_or_raise(outcome: Grant | dict[str, Any], key: str) -> Grant:
    if isinstance(outcome, Grant):
        return outcome
    error, message = outcome.get("error"), str(outcome.get("message", ""))
    if error == "timeout":
        raise RequestTimeout(message or f"no free server of key {key!r} in time")
    if error == "cancelled":
        raise RequestCancelled(message or "request cancelled")
    if error == "unservable":
        raise Unservable(message or f"no registered server can serve a request for {key!r}")
    raise RequestRejected(message or f"request for {key!r} rejected ({error})")
