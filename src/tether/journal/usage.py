"""Usage over a time window, from the journal's ``sessions`` rows: what ``tether usage`` prints. Pure
arithmetic over :class:`Span` records (fetched by :func:`fetch`); times are wall-clock seconds.

Definitions, for a window ``[start, end)``:

- a **session** is a granted row whose grant falls in the window; a **failure** is one whose outcome
  device health counts as one (:data:`tether.tracker.health.FAILURE_OUTCOMES`: ``failed``,
  ``no_request``, ``server_lost``): not ``ok``, ``released``, ``never_started`` (the client never came)
  or ``unknown`` (the tracker stopped first);
- a **request that never got a device** is an ungranted row ending in the window (any outcome:
  timeout, cancelled, rejected, unservable, closed);
- **busy seconds** are the parts of every granted session's time (grant to end; an open session to
  ``end``) that lie inside the window, sessions granted before the window included;
- **busy fraction** is busy seconds / (window seconds x devices seen): the devices the group's sessions
  used, and for ``by="key"`` also every server of the key registered during the window;
- **waits** are the ``waited_s`` of the window's grants and of its requests that timed out (others that
  left unserved did not wait for a device to free up); p50 and p95 interpolate linearly between ranks.
"""

from __future__ import annotations

import math
import sqlite3
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Literal

from ..tracker.health import FAILURE_OUTCOMES

__all__ = ["BY", "Span", "fetch", "percentile", "series", "summarize", "waits"]

BY: Final = ("user", "key", "server", "all")
By = Literal["user", "key", "server", "all"]
#: the outcomes counted as failures (as device health counts them)
FAILURES: Final = FAILURE_OUTCOMES


@dataclass(frozen=True, slots=True)
class Span:
    """One ``sessions`` row: ``begin``/``end`` its held interval (granted rows; ``end`` None while
    open), ``at`` the time that places it in a window."""

    at: float
    key: str | None
    server: str | None
    user: str | None
    granted: bool
    begin: float
    end: float | None
    waited_s: float | None
    outcome: str | None


def percentile(sorted_values: Sequence[float], p: float) -> float:
    """Linear interpolation between closest ranks (numpy's default); ``p`` in 0..100, values sorted."""
    pos = (len(sorted_values) - 1) * p / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


_COLUMNS = (
    "SELECT at, key, server, user, matchkey IS NOT NULL, coalesce(granted_at, started_at, at), ended_at, held_s,"
    " waited_s, outcome FROM sessions WHERE "
)


def fetch(conn: sqlite3.Connection, start: float, end: float, key: str | None = None) -> list[Span]:
    """The rows that matter to ``[start, end)``: placed in it, or held across its start."""
    keyed = " AND key = ?" if key is not None else ""
    extra: tuple[Any, ...] = (key,) if key is not None else ()
    queries = (
        (f"at >= ? AND at < ?{keyed}", (start, end, *extra)),
        (f"ended_at >= ? AND at < ?{keyed}", (start, start, *extra)),
        (f"ended_at IS NULL AND at < ?{keyed}", (start, *extra)),
    )
    spans: list[Span] = []
    for where, args in queries:
        for at, k, server, user, granted, begin, ended, held, waited, outcome in conn.execute(_COLUMNS + where, args):
            # closed as "unknown" at a restart (no end, a held time): held until then
            stop = begin + held if ended is None and held is not None else ended
            spans.append(Span(at, k, server, user, bool(granted), begin, stop, waited, outcome))
    return spans


def _overlap(span: Span, start: float, end: float) -> float:
    stop = end if span.end is None else min(span.end, end)
    return max(0.0, stop - max(span.begin, start))


@dataclass(slots=True)
class _Group:
    sessions: int = 0
    failures: int = 0
    never_granted: int = 0
    busy_s: float = 0.0
    devices: set[str] = field(default_factory=set)
    waits: list[float] = field(default_factory=list)
    outcomes: Counter[str] = field(default_factory=Counter)


def _name(span: Span, by: By) -> str | None:
    return None if by == "all" else getattr(span, by)


def summarize(
    spans: Iterable[Span],
    start: float,
    end: float,
    by: By = "user",
    key_servers: dict[str, set[str]] | None = None,
) -> list[dict[str, Any]]:
    """One dict per group (see the module's definitions), busiest first: ``by`` (the group's user, key
    or server; None for rows without one), ``sessions``, ``failures``, ``never_granted``, ``outcomes``
    (count per outcome, ungranted requests' included), ``busy_s``, ``devices``, ``busy_fraction``
    (None for an empty window or no device), ``waits`` (how many), ``wait_p50_s``, ``wait_p95_s`` (None
    without waits). ``key_servers``: the servers of each key registered during the window."""
    window = max(0.0, end - start)
    groups: dict[str | None, _Group] = {}
    for span in spans:
        g = groups.setdefault(_name(span, by), _Group())
        inside = start <= span.at < end
        if span.granted:
            g.busy_s += _overlap(span, start, end)
            if span.server is not None:
                g.devices.add(span.server)
        if not inside:
            continue
        if span.outcome is not None:
            g.outcomes[span.outcome] += 1
        if span.granted:
            g.sessions += 1
            g.failures += span.outcome in FAILURES
        else:
            g.never_granted += 1
        if span.waited_s is not None and (span.granted or span.outcome == "timeout"):
            g.waits.append(span.waited_s)
    for k, servers in (key_servers or {}).items():
        if by == "key":
            groups.setdefault(k, _Group()).devices |= servers
        elif by == "all":
            groups.setdefault(None, _Group()).devices |= servers
    out: list[tuple[float, int, str, dict[str, Any]]] = []
    for name, g in groups.items():
        waits = sorted(g.waits)
        capacity = window * len(g.devices)
        row: dict[str, Any] = {
            "by": name,
            "sessions": g.sessions,
            "failures": g.failures,
            "never_granted": g.never_granted,
            "outcomes": dict(sorted(g.outcomes.items())),
            "busy_s": g.busy_s,
            "devices": len(g.devices),
            "busy_fraction": g.busy_s / capacity if capacity > 0 else None,
            "waits": len(waits),
            "wait_p50_s": percentile(waits, 50) if waits else None,
            "wait_p95_s": percentile(waits, 95) if waits else None,
        }
        out.append((-g.busy_s, -g.sessions, str(name), row))
    out.sort(key=lambda item: item[:3])
    return [item[3] for item in out]


def series(
    spans: Iterable[Span],
    start: float,
    end: float,
    bins: int,
    key_servers: dict[str, set[str]] | None = None,
) -> dict[str, list[float]]:
    """Utilisation over time per key: ``bins`` equal slices of ``[start, end)``, each the busy fraction of
    the key's devices (the servers its sessions used or registered during the window) in that slice."""
    if bins < 1 or end <= start:
        return {}
    width = (end - start) / bins
    busy: dict[str, list[float]] = {}
    devices: dict[str, set[str]] = {k: set(v) for k, v in (key_servers or {}).items()}
    for span in spans:
        if not span.granted or span.key is None:
            continue
        row = busy.setdefault(span.key, [0.0] * bins)
        if span.server is not None:
            devices.setdefault(span.key, set()).add(span.server)
        stop = end if span.end is None else min(span.end, end)
        lo = max(span.begin, start)
        i = max(0, int((lo - start) / width))
        while lo < stop and i < bins:
            edge = start + (i + 1) * width
            row[i] += min(stop, edge) - lo
            lo, i = edge, i + 1
    return {k: [b / (width * max(1, len(devices.get(k, ())))) for b in row] for k, row in sorted(busy.items())}


def waits(spans: Iterable[Span], start: float, end: float) -> dict[str, list[float]]:
    """The waits (seconds, sorted) per key in ``[start, end)``, as :func:`summarize` counts them."""
    out: dict[str, list[float]] = {}
    for span in spans:
        if start <= span.at < end and span.waited_s is not None and (span.granted or span.outcome == "timeout"):
            out.setdefault(span.key or "", []).append(span.waited_s)
    return {k: sorted(v) for k, v in sorted(out.items())}
