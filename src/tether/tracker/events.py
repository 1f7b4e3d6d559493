"""What happens at the tracker, as a stream of events for the rooms beside the core (journal, web side,
metrics, health). Pure: no I/O.

The core (:class:`~tether.tracker.core.TrackerCore`) calls :meth:`EventBus.emit` at each change below, on
its event loop; subscribers run synchronously in the order they subscribed and must be quick (put the event
on a queue, bump a counter): the tracker waits for them. A subscriber that raises is logged (rate-limited)
and kept; the core goes on.

Every event carries ``kind``, ``wall`` (``time.time()`` when it happened), and where they apply ``key``,
``server`` (the server's id, :func:`server_id`: the ``host:port`` its clients connect to, stable across
reconnects and tracker restarts) and ``user``. ``fields`` by kind:

=================  ======================================================================================
``register``       a server offered its first slot or changed its info: ``peer`` (its tracker connection),
                   ``protocols``, ``labels``, ``device``, ``slots``, ``version``
``unregister``     a server's connection is gone: ``peer``, ``reason`` ("closed" or "silent")
``request``        a request started waiting: ``id``, ``priority``, ``peer``
``grant``          a request got a slot: ``id``, ``matchkey``, ``waited_s``, ``priority``
``request_end``    a request left without a slot: ``id``, ``outcome`` ("timeout", "cancelled",
                   "rejected", "unservable", "closed"), ``waited_s``
``session_start``  the server reports the granted client connected: ``matchkey``, ``peer`` (the client)
``session_end``    a session is over: ``matchkey``, ``held_s`` (since the grant), ``outcome`` ("ok",
                   "failed", "no_request", "never_started", "server_lost", "released"), ``detail``
``health``         a server's standing changed: ``state`` ("ok", "cordoned", "draining", "quarantined"),
                   ``reason``, ``by`` (who: "tracker" or the admin's name)
=================  ======================================================================================

Sessions of TVM servers report nothing: their ``session_end`` comes when the server offers itself again
(outcome "ok") or leaves ("server_lost").
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from ..loglimit import PeerLogLimit

__all__ = [
    "EVENT_KINDS",
    "SESSION_OUTCOMES",
    "EventBus",
    "Subscriber",
    "TrackerEvent",
    "server_id",
]

logger = logging.getLogger("tether.tracker.events")

EVENT_KINDS: Final = frozenset(
    {"register", "unregister", "request", "grant", "request_end", "session_start", "session_end", "health"}
)
#: ``session_end`` outcomes; all but "ok" and "released" count as a failure of the server (device health).
SESSION_OUTCOMES: Final = frozenset({"ok", "failed", "no_request", "never_started", "server_lost", "released"})


def server_id(host: str, port: int) -> str:
    """A server's id: the address its clients connect to (``[v6]:port`` for IPv6)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@dataclass(slots=True)
class TrackerEvent:
    """One event; treat it as read-only (not frozen: a frozen dataclass costs ~2 us more to build, on the
    tracker's hot path, for every grant)."""

    kind: str
    wall: float
    key: str | None = None
    server: str | None = None
    user: str | None = None
    fields: Mapping[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready dict: the common fields, then ``fields`` flattened in."""
        out: dict[str, Any] = {"kind": self.kind, "wall": self.wall}
        if self.key is not None:
            out["key"] = self.key
        if self.server is not None:
            out["server"] = self.server
        if self.user is not None:
            out["user"] = self.user
        out.update(self.fields)
        return out


Subscriber = Callable[[TrackerEvent], None]


class EventBus:
    """Fan-out of :class:`TrackerEvent` to subscribers (see the module's docstring)."""

    def __init__(self, wall: Callable[[], float] = time.time) -> None:
        self._subscribers: list[Subscriber] = []
        self._wall = wall
        self._errors = PeerLogLimit(logger=logger, about="subscriber errors")

    def subscribe(self, subscriber: Subscriber) -> Callable[[], None]:
        """Add ``subscriber``; returns a function that removes it again."""
        self._subscribers.append(subscriber)

        def unsubscribe() -> None:
            if subscriber in self._subscribers:
                self._subscribers.remove(subscriber)

        return unsubscribe

    @property
    def active(self) -> bool:
        """Whether anyone listens (the core skips building events when nobody does)."""
        return bool(self._subscribers)

    def emit(
        self,
        kind: str,
        *,
        key: str | None = None,
        server: str | None = None,
        user: str | None = None,
        **fields: Any,
    ) -> None:
        if not self._subscribers:
            return
        event = TrackerEvent(kind, self._wall(), key, server, user, fields)
        for subscriber in list(self._subscribers):
            try:
                subscriber(event)
            except Exception:
                if self._errors.allow(getattr(subscriber, "__qualname__", "subscriber")):
                    logger.exception("event subscriber %r failed on %s", subscriber, kind)
