"""What the tracker knows about each connection: its info, its free slots, the grants it is serving.

Invariants:

- a free slot belongs to exactly one connection (the one that PUT it, whatever else it sent) and is
  in the scheduler; when the connection closes, its slots leave at once;
- a granted slot leaves the scheduler and becomes a :class:`Held` record on its server's connection,
  ``granted`` until the server reports the session started (tether servers) and ``busy`` after; the
  record ends with the session (tether: SESSION end; TVM servers: their next PUT) or the connection;
- records never outlive their connection, and each connection keeps at most
  ``max_held_per_connection`` of them, so nothing accumulates per grant.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from ..errors import RemoteProtocolError
from ..protocol.keys import PROXY_PREFIX, server_key_name
from .scheduler import PROTOCOL_TVM, Slot, Waiter

if TYPE_CHECKING:
    from .access import PeerAccess

__all__ = ["Connection", "Held", "Link", "TetherInfo", "parse_tether_info", "waiter_wire"]

logger = logging.getLogger(__name__)

_dumps = json.JSONEncoder(ensure_ascii=False).encode


def waiter_wire(waiter: Waiter) -> str:
    """The parts of a waiter's SUMMARY row that never change, as JSON text without its closing brace."""
    timeout = None if waiter.deadline is None else round(waiter.deadline - waiter.since, 3)
    row = {
        "user": waiter.user,
        "priority": waiter.priority,
        "protocol": waiter.protocol,
        "labels": dict(waiter.labels),
        "id": waiter.request_id,
        "timeout_s": timeout,
    }
    return _dumps(row)[:-1]


class Link(Protocol):
    """How the tracker reaches one peer: the driver's transport, or a fake in tests."""

    def send(self, data: bytes) -> None: ...

    def close(self) -> None: ...


@dataclass(frozen=True, slots=True)
class TetherInfo:
    """tether's extension of UPDATE_INFO (``info["tether"]``); TVM servers send none of it."""

    protocols: frozenset[str] = frozenset({PROTOCOL_TVM})
    labels: Mapping[str, str] = field(default_factory=dict)
    heartbeat_s: float | None = None
    slots: int = 1
    device: Mapping[str, Any] = field(default_factory=dict)
    version: str | None = None


def parse_tether_info(raw: Any) -> TetherInfo:
    """Validate ``info["tether"]``; :class:`RemoteProtocolError` when a field has the wrong type."""
    if not isinstance(raw, dict):
        raise RemoteProtocolError("UPDATE_INFO 'tether' must be an object")
    protocols = raw.get("protocols", [PROTOCOL_TVM])
    if not isinstance(protocols, list) or not protocols or not all(isinstance(p, str) for p in protocols):
        raise RemoteProtocolError("UPDATE_INFO tether.protocols must be a non-empty list of strings")
    labels = raw.get("labels", {})
    if not isinstance(labels, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in labels.items()):
        raise RemoteProtocolError("UPDATE_INFO tether.labels must map strings to strings")
    heartbeat = raw.get("heartbeat")
    if heartbeat is not None and (
        isinstance(heartbeat, bool) or not isinstance(heartbeat, int | float) or not 0 < heartbeat < 1e6
    ):
        raise RemoteProtocolError("UPDATE_INFO tether.heartbeat must be a positive number of seconds")
    slots = raw.get("slots", 1)
    if isinstance(slots, bool) or not isinstance(slots, int) or slots < 1:
        raise RemoteProtocolError("UPDATE_INFO tether.slots must be a positive integer")
    device = raw.get("device", {})
    if not isinstance(device, dict):
        raise RemoteProtocolError("UPDATE_INFO tether.device must be an object")
    version = raw.get("version")
    return TetherInfo(
        protocols=frozenset(protocols),
        labels=dict(labels),
        heartbeat_s=None if heartbeat is None else float(heartbeat),
        slots=slots,
        device=device,
        version=None if version is None else str(version),
    )


@dataclass(slots=True)
class Held:
    """A slot handed out and not yet given back. Times are on the tracker's monotonic clock."""

    key: str
    matchkey: str
    state: str  # "granted" (not yet connected) or "busy" (session running)
    user: str
    requester: str  # "host:port" of the connection that requested it
    since: float
    peer: str | None = None  # who connected, when the server reported it
    request_id: str | None = None
    waited_s: float = 0.0
    server: str | None = None  # the server's id (:func:`~tether.tracker.events.server_id`)


@dataclass(eq=False, slots=True)
class Connection:
    """One TCP connection to the tracker: a server, a client, a proxy or a query."""

    cid: int
    link: Link
    host: str
    port: int
    opened: float
    last_seen: float
    info: dict[str, Any] | None = None
    tether: TetherInfo | None = None
    slots: dict[str, Slot] = field(default_factory=dict)  # free slots by matchkey
    held: dict[str, Held] = field(default_factory=dict)  # handed-out slots by matchkey, oldest first
    #: waiting requests -> their static part of a SUMMARY waiter row, as JSON text (see :func:`waiter_wire`)
    waiters: dict[Waiter, str] = field(default_factory=dict)
    silence_limit: float | None = None
    liveness_scheduled: bool = False
    #: the magic exchange is done (the driver says so; any message implies it)
    greeted: bool = False
    #: when it last sent a message or stopped holding something (a request granted, expired...), on the
    #: tracker's clock: a connection that holds nothing is idle from then (``idle_timeout_s``)
    active: float = 0.0
    closed: bool = False
    #: SUMMARY's pieces that change only with UPDATE_INFO, as JSON text (:meth:`refresh_wire`): the
    #: ``server_info`` entry, and the opening of this connection's ``tether.servers`` entry.
    wire_info: str = ""
    wire_entry: str = ""
    #: ``info["key"]`` ("" without one), and ``K`` for a server that registered as ``server:K`` (None for
    #: clients and proxies); both set by :meth:`refresh_wire`.
    info_key: str = ""
    server_key: str | None = None
    #: With authentication on: this peer's standing (:mod:`.access`); None when it is off.
    access: PeerAccess | None = None
    #: A server's id (:func:`~tether.tracker.events.server_id` of the address its first PUT offered); None
    #: until then, and for proxies (their slots are other servers).
    server_id: str | None = None

    def is_closed(self) -> bool:
        """``closed`` read afresh: the driver checks it after calls that may close the connection."""
        return self.closed

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def protocols(self) -> frozenset[str]:
        return self.tether.protocols if self.tether else frozenset({PROTOCOL_TVM})

    @property
    def labels(self) -> Mapping[str, str]:
        return self.tether.labels if self.tether else {}

    @property
    def single_session(self) -> bool:
        """A plain TVM server: serves one session at a time and reports nothing, so its next PUT
        means its last session is over. Proxies (``server:proxy[...]``) and tether servers are not."""
        return self.tether is None and not self.info_key.startswith(PROXY_PREFIX)

    def refresh_wire(self) -> None:
        """Call after every change of ``info`` or ``tether``. Encodes the static parts of this connection's
        SUMMARY rows once: a summary of 10,000 servers then joins strings instead of encoding 10,000 device
        descriptions."""
        info = self.info or {}
        key = info.get("key")
        self.info_key = key if isinstance(key, str) else ""
        self.server_key = server_key_name(self.info_key)
        # TVM's server_info entry: the info as sent, less tether's extension (its own detail carries that)
        self.wire_info = _dumps({k: v for k, v in info.items() if k != "tether"}) if self.info else ""
        entry: dict[str, Any] = {"key": self.info_key or None, "addr": info.get("addr"), "peer": self.address}
        if self.tether is not None:
            entry.update(
                protocols=sorted(self.tether.protocols),
                labels=dict(self.tether.labels),
                device=dict(self.tether.device),
                heartbeat_s=self.tether.heartbeat_s,
                version=self.tether.version,
            )
        else:
            entry["protocols"] = [PROTOCOL_TVM]
        self.wire_entry = _dumps(entry)[:-1]  # open: the summary appends the fields that move with time

    def remember(self, held: Held, limit: int) -> None:
        self.held[held.matchkey] = held
        while len(self.held) > limit:
            oldest = next(iter(self.held))
            logger.debug("connection %s: forgetting grant of %s, never reported finished", self.address, oldest)
            del self.held[oldest]
