"""Who may do what at the tracker: authentication (``--auth-file``) and the networks of TVM peers.

Rules, with a keyring (without one, every peer may do everything, as at TVM's tracker):

- a connection starts unauthenticated; PING and AUTH are always answered;
- a peer from an ``--allow-tvm`` network that has not authenticated is a *TVM peer*: it may do what a
  user and a server may (TVM's servers, clients and ``query_rpc_tracker`` cannot authenticate), never STOP;
- any other unauthenticated peer gets ``[-1, {"error": "unauthenticated", ...}]`` for anything else, and
  is closed;
- an authenticated peer acts with its credential's role: ``user`` requests, cancels and queries;
  ``server`` offers slots (PUT, UPDATE_INFO as ``server:K``, GET_PENDING_MATCHKEYS, SESSION, WITHDRAW) and
  queries; ``admin`` does all, STOP included (which still needs the stop key). Anything else gets
  ``"error": "forbidden"`` and the connection is closed;
- the verified name is the request's user: what a request claims as its user is ignored, and a user's
  ``max_priority`` caps the priority of its requests;
- a keyring reloaded (SIGHUP) applies at once: connections whose name is gone are closed, the others take
  their credential's new role and cap.

This module is pure (no I/O); :class:`~tether.tracker.core.TrackerCore` calls it for every message.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Iterable
from typing import Any

from ..errors import AuthError, AuthFailed, PermissionDenied
from ..protocol.auth import OFF, Credential, Keyring, Network, Responder, Role, address_in
from ..protocol.constants import TrackerCode
from ..protocol.tracker import (
    Admin,
    Auth,
    Cancel,
    Control,
    GetPendingMatchkeys,
    Ping,
    Put,
    Request,
    SessionEvent,
    Stop,
    Summary,
    TrackerMessage,
    UpdateInfo,
    Withdraw,
    encode_value,
)
from .registry import Connection

__all__ = ["Access", "PeerAccess"]

logger = logging.getLogger("tether.tracker")

_NEEDS: dict[type, Role | None] = {
    Summary: None,  # any authenticated peer
    Request: Role.USER,
    Cancel: Role.USER,
    Put: Role.SERVER,
    GetPendingMatchkeys: Role.SERVER,
    SessionEvent: Role.SERVER,
    Withdraw: Role.SERVER,
    Control: Role.SERVER,
    Stop: Role.ADMIN,
    Admin: Role.ADMIN,
}


class PeerAccess:
    """One connection's standing: its exchange in progress, then its verified credential."""

    __slots__ = ("credential", "exchange", "tvm")

    def __init__(self, tvm: bool) -> None:
        #: from an ``--allow-tvm`` network (and not authenticated)
        self.tvm = tvm
        self.exchange: Responder | None = None
        self.credential: Credential | None = None


class Access:
    """The tracker's keyring and ``--allow-tvm`` networks; ``keyring=None`` lets every peer do everything."""

    def __init__(self, keyring: Keyring | None = None, allow_tvm: Iterable[Network] = ()) -> None:
        self.keyring = keyring
        self.allow_tvm = tuple(allow_tvm)

    @property
    def enabled(self) -> bool:
        return self.keyring is not None

    def describe(self) -> str:
        """The startup line's account of the mode."""
        if self.keyring is None:
            return "authentication off: any peer may register, request and query (TVM compatible)"
        roles = ", ".join(f"{n} {r}" for r, n in sorted(self.keyring.roles().items()))
        tvm = ", ".join(str(n) for n in self.allow_tvm) or "none"
        return f"authentication on ({roles}); TVM peers allowed from: {tvm}"

    def admit(self, conn: Connection) -> None:
        if self.keyring is not None:
            conn.access = PeerAccess(address_in(conn.host, self.allow_tvm))

    # -- per message ---------------------------------------------------------------------------

    def check(self, conn: Connection, msg: TrackerMessage) -> None:
        """Raise :class:`AuthFailed`/:class:`PermissionDenied` (after sending the refusal) when ``conn`` may
        not send ``msg``."""
        peer = conn.access
        if peer is None or type(msg) is Ping or type(msg) is Auth:
            return
        cred = peer.credential
        if type(msg) is UpdateInfo:
            key = msg.info.get("key")
            needed = Role.SERVER if isinstance(key, str) and key.startswith("server") else None
        else:
            needed = _NEEDS.get(type(msg))
        if cred is None:
            if peer.tvm and needed is not Role.ADMIN:
                return
            what = (
                f"{type(msg).__name__.upper()} needs an admin token"
                if needed is Role.ADMIN
                else "this tracker requires a token"
            )
            self._refuse(conn, msg, "unauthenticated", f"{what}: set TETHER_TOKEN=name:secret")
        elif needed is not None and not cred.role.allows(needed):
            self._refuse(
                conn,
                msg,
                "forbidden",
                f"token {cred.name!r} has role {cred.role.value}, and {type(msg).__name__.upper()} needs "
                f"{needed.value}",
            )

    @staticmethod
    def _refuse(conn: Connection, msg: TrackerMessage, error: str, message: str) -> None:
        body: dict[str, Any] = {"error": error, "message": message}
        if type(msg) is Request and msg.options is not None:
            body["id"] = msg.options.request_id
        conn.link.send(encode_value([TrackerCode.FAIL.value, body]))
        raise (AuthFailed if error == "unauthenticated" else PermissionDenied)(message)

    def on_auth(self, conn: Connection, msg: Auth) -> None:
        """One AUTH step: reply with the next step, or refuse (and raise :class:`AuthFailed`)."""
        peer = conn.access
        try:
            if self.keyring is None or peer is None:
                raise AuthFailed("authentication is off at this tracker")
            if peer.credential is not None:
                raise AuthFailed("already authenticated")
            if peer.exchange is None:
                peer.exchange = Responder(self.keyring, "tracker")
                reply = peer.exchange.challenge(msg.step)
            else:
                cred, reply = peer.exchange.verify(msg.step)
                peer.exchange, peer.credential, peer.tvm = None, cred, False
                logger.info("%s authenticated as %s (%s)", conn.address, cred.name, cred.role.value)
        except AuthError as exc:
            if self.keyring is None:  # tell a client it may go on without; keep the connection
                conn.link.send(encode_value([TrackerCode.FAIL.value, {"error": OFF, "message": str(exc)}]))
                return
            conn.link.send(encode_value([TrackerCode.FAIL.value, Responder.refusal(str(exc))]))
            raise
        conn.link.send(encode_value([TrackerCode.SUCCESS.value, reply]))

    # -- what a verified peer gets -------------------------------------------------------------

    @staticmethod
    def user_of(conn: Connection) -> str | None:
        """The verified name of ``conn``, or None (not authenticated)."""
        peer = conn.access
        return peer.credential.name if peer is not None and peer.credential is not None else None

    @staticmethod
    def priority_cap(conn: Connection) -> float | None:
        peer = conn.access
        if peer is None or peer.credential is None or peer.credential.role is Role.ADMIN:
            return None
        return peer.credential.max_priority

    def reload(self, keyring: Keyring, connections: Iterable[Connection]) -> list[Connection]:
        """Use ``keyring`` from now on; the connections whose credential is gone (to be closed)."""
        self.keyring = keyring
        gone = []
        for conn in connections:
            peer = conn.access
            if peer is None:
                conn.access = PeerAccess(address_in(conn.host, self.allow_tvm))
                continue
            if peer.credential is not None:
                fresh = keyring.get(peer.credential.name)
                if fresh is None or not hmac.compare_digest(fresh.secret, peer.credential.secret):
                    gone.append(conn)
                else:
                    peer.credential = fresh
        return gone
