"""The last finished sessions, kept in memory from the tracker's events (``/api/v1/history``).

Fed by :class:`~tether.tracker.events.EventBus` on the tracker's loop: a ``grant`` remembers when and after
how long a wait a session's slot was handed out, its ``session_end`` turns that into a row. Bounded: the
last ``size`` rows, and at most ``4 * size`` grants whose session has not ended (the oldest forgotten
first: a grant whose end never comes costs nothing for ever). Matchkeys are only keys here: never shown.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from typing import Any

from ..tracker.events import TrackerEvent

__all__ = ["History"]


class History:
    """Finished sessions, newest last; :meth:`on_event` is the bus subscriber."""

    def __init__(self, size: int = 1000) -> None:
        self.size = size
        self._rows: deque[dict[str, Any]] = deque(maxlen=size)
        #: matchkey -> (granted at, wall; waited, seconds) of sessions not ended yet
        self._open: OrderedDict[str, tuple[float, float | None]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._rows)

    def on_event(self, event: TrackerEvent) -> None:
        if event.kind == "grant":
            matchkey = event.fields.get("matchkey")
            if isinstance(matchkey, str):
                waited = event.fields.get("waited_s")
                self._open[matchkey] = (event.wall, float(waited) if isinstance(waited, int | float) else None)
                self._open.move_to_end(matchkey)
                while len(self._open) > 4 * self.size:
                    self._open.popitem(last=False)
        elif event.kind == "session_end":
            self._end(event)

    def _end(self, event: TrackerEvent) -> None:
        fields = event.fields
        matchkey = fields.get("matchkey")
        granted, waited = self._open.pop(matchkey, (None, None)) if isinstance(matchkey, str) else (None, None)
        held = fields.get("held_s")
        held_s = float(held) if isinstance(held, int | float) else None
        if granted is None and held_s is not None:
            granted = event.wall - held_s
        self._rows.append(
            {
                "key": event.key,
                "server": event.server,
                "user": event.user,
                "granted": None if granted is None else round(granted, 3),
                "ended": round(event.wall, 3),
                "waited_s": None if waited is None else round(waited, 3),
                "held_s": None if held_s is None else round(held_s, 3),
                "outcome": fields.get("outcome"),
                "detail": fields.get("detail") or None,
                "started": fields.get("started"),
            }
        )

    def rows(self, limit: int, key: str | None = None, user: str | None = None) -> list[dict[str, Any]]:
        """Up to ``limit`` finished sessions, newest first, of ``key`` and ``user`` when given."""
        out: list[dict[str, Any]] = []
        for row in reversed(self._rows):
            if (key is None or row["key"] == key) and (user is None or row["user"] == user):
                out.append(row)
                if len(out) >= limit:
                    break
        return out
