"""Each server's standing with the tracker: whether it may be granted, and why not. Pure: no I/O, no clock
read (callers pass wall times).

States and the rules between them (every operation is idempotent: asking for the state a server is
already in changes nothing and reports no change):

=============  ===================================================  ==========================================
state          what the tracker does                                how it is left
=============  ===================================================  ==========================================
``ok``         grants its free slots                                cordon, drain, N failures in a row
``cordoned``   grants nothing; sessions running go on               uncordon (an admin)
``draining``   grants nothing; becomes ``cordoned`` when its        uncordon; its last session ends
               last session ends
``quarantined``grants nothing; asks the server for a canary         a canary that passes (``by="canary"``),
               (tether servers) every ``canary_interval_s``         uncordon (an admin)
=============  ===================================================  ==========================================

A *failure* is a session that ended with an outcome other than "ok", "released" and "never_started" (a
worker lost, a session that ended before its first request, a server gone mid-session) or a server that
stopped heartbeating. ``quarantine_after`` failures in a row quarantine a server that is ``ok``; a
session that ends "ok" resets the count. Standings are kept by server id (``host:port``), so they
outlive the server's connection and, through the journal, the tracker: a restarted tracker is given the
standings it had (:meth:`Health.restore`).

Memory: standings of servers in state ``ok`` with no failures are not kept; at most ``max_servers``
standings are kept (the oldest ``ok`` ones are forgotten first).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any, Final

__all__ = ["FAILURE_OUTCOMES", "STATES", "WITHHELD", "Health", "Standing"]

STATES: Final = ("ok", "cordoned", "draining", "quarantined")
#: States in which a server's free slots are not granted.
WITHHELD: Final = frozenset({"cordoned", "draining", "quarantined"})
#: ``session_end`` outcomes (and ``silent``: a server that stopped heartbeating) that count as failures.
FAILURE_OUTCOMES: Final = frozenset({"failed", "no_request", "server_lost", "silent"})
#: How many recent failures each standing remembers.
RECENT: Final = 8


@dataclass(slots=True)
class Standing:
    """One server's standing. ``since`` is the wall time of the last change of ``state``."""

    state: str = "ok"
    reason: str | None = None
    since: float | None = None
    by: str | None = None
    failures: int = 0
    recent: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=RECENT))

    def as_dict(self) -> dict[str, Any]:
        return {
            "state": self.state,
            "reason": self.reason,
            "since": self.since,
            "by": self.by,
            "failures": self.failures,
            "recent_failures": list(self.recent),
        }

    @property
    def withheld(self) -> bool:
        return self.state in WITHHELD


_OK: Final = Standing()


class Health:
    """The standings of all servers (see the module docstring for the rules)."""

    def __init__(self, quarantine_after: int = 3, max_servers: int = 100_000) -> None:
        if quarantine_after < 0:
            raise ValueError("quarantine_after must be >= 0 (0: never quarantine)")
        self.quarantine_after = quarantine_after
        self.max_servers = max_servers
        self._standings: dict[str, Standing] = {}

    def get(self, server: str) -> Standing:
        """The standing of ``server`` (a shared ``ok`` record when none is kept: do not modify it)."""
        return self._standings.get(server, _OK)

    def withheld(self, server: str | None) -> bool:
        if server is None:
            return False
        standing = self._standings.get(server)
        return standing is not None and standing.state in WITHHELD

    def not_ok(self) -> dict[str, Standing]:
        """Servers whose state is not ``ok``."""
        return {s: st for s, st in self._standings.items() if st.state != "ok"}

    def set(self, server: str, state: str, reason: str | None, by: str, wall: float) -> bool:
        """Move ``server`` to ``state``; True when that changed its state. Leaving a withheld state for
        ``ok`` clears the failure count."""
        if state not in STATES:
            raise ValueError(f"unknown state {state!r}; one of {', '.join(STATES)}")
        standing = self._standings.get(server)
        if standing is None:
            if state == "ok":
                return False
            standing = self._keep(server)
        if standing.state == state:
            return False
        standing.state, standing.reason, standing.since, standing.by = state, reason, wall, by
        if state == "ok":
            standing.failures = 0
            if not standing.recent:
                del self._standings[server]
        return True

    def outcome(self, server: str, outcome: str, detail: str, wall: float) -> bool:
        """Count a session's (or heartbeat's) outcome; True when it quarantined the server."""
        if outcome not in FAILURE_OUTCOMES:
            standing = self._standings.get(server)
            if standing is not None and outcome == "ok":
                standing.failures = 0
            return False
        standing = self._standings.get(server) or self._keep(server)
        standing.failures += 1
        standing.recent.append({"wall": wall, "outcome": outcome, "detail": detail})
        if self.quarantine_after and standing.state == "ok" and standing.failures >= self.quarantine_after:
            why = f"{standing.failures} failed sessions in a row (last: {outcome}{': ' + detail if detail else ''})"
            standing.state, standing.reason, standing.since, standing.by = "quarantined", why, wall, "tracker"
            return True
        return False

    def restore(self, server: str, state: str, reason: str | None, by: str | None, since: float | None) -> None:
        """Take a standing from the journal (a restarted tracker keeps its quarantine list)."""
        if state not in STATES or state == "ok":
            return
        standing = self._standings.get(server) or self._keep(server)
        standing.state, standing.reason, standing.by, standing.since = state, reason, by, since

    def _keep(self, server: str) -> Standing:
        if len(self._standings) >= self.max_servers:
            for name, old in self._standings.items():
                if old.state == "ok":
                    del self._standings[name]
                    break
            else:
                raise OverflowError(f"more than {self.max_servers} servers withheld")
        standing = self._standings[server] = Standing()
        return standing
