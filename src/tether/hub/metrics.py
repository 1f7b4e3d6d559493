"""The tracker's Prometheus metrics: what ``GET /metrics`` serves (``pip install 'tether[hub]'``).

:class:`TrackerMetrics` keeps its own :class:`prometheus_client.CollectorRegistry` (never the process-wide
one). Two kinds of numbers:

- *read at scrape time* from the core, in one pass over its connections (a few milliseconds at 5,000
  servers): servers and slots by key and state, queue depth and the oldest waiter's age per key, open
  connections by kind, uptime;
- *fed by the core's events* (:mod:`tether.tracker.events`; :meth:`TrackerMetrics.attach`): grants, wait and
  hold time histograms per key, session outcomes, requests that ended without a grant, registrations,
  health changes; and the event loop's lag, from a task of its own (:meth:`TrackerMetrics.start`).

Every name starts with ``tether_tracker_``; times are seconds (:data:`METRICS` lists them all):

===========================================  =========  ==============================================================
name                                          type       labels, meaning
===========================================  =========  ==============================================================
``servers``                                   gauge      key, state: a server's state: ``free`` (offers a slot),
                                                         ``granted`` (handed out, its client not yet connected),
                                                         ``busy`` (a session runs), ``unavailable`` (registered,
                                                         nothing offered), or its standing when not "ok"
                                                         (``cordoned``, ``draining``, ``quarantined``)
``slots``                                     gauge      key, state: places (a server may have several): ``free``
                                                         (queued, grantable), ``granted``, ``busy``, ``withheld``
                                                         (offered by a server whose standing is not "ok")
``queue_depth``                               gauge      key: requests waiting
``oldest_waiter_seconds``                     gauge      key: how long the longest-waiting request has waited
``connections``                               gauge      kind: ``server``, ``proxy``, ``client`` (requests waiting),
                                                         ``other`` (clients between requests, queries)
``uptime_seconds``                            gauge      since the metrics were attached (with the tracker)
``key_labels``                                gauge      distinct ``key`` label values in use (at most ``max_keys``)
``grants_total``                              counter    key
``wait_seconds``                              histogram  key: a granted request's wait, 1 ms to 1 h
``hold_seconds``                              histogram  key: a session's hold time, grant to end, 0.1 s to 1 day
``sessions_total``                            counter    key, outcome (``ok``, ``failed``, ``no_request``,
                                                         ``never_started``, ``server_lost``, ``released``)
``requests_total``                            counter    requests that started waiting
``requests_ended_total``                      counter    outcome: ended without a grant (``timeout``, ``cancelled``,
                                                         ``rejected``, ``unservable``, ``closed``)
``registrations_total``                       counter    servers registered (or their info changed)
``unregistrations_total``                     counter    reason (``closed``, ``silent``)
``health_changes_total``                      counter    state: standing changes (``ok``, ``cordoned``, ...)
``loop_lag_seconds``                          gauge      how late the event loop last woke a 0.5 s sleep
``loop_lag_samples_seconds``                  histogram  the same, every sample
===========================================  =========  ==============================================================

Label cardinality is bounded: keys come from untrusted peers, so at most ``max_keys`` distinct ``key``
values are kept (1,000 by default) and keys longer than ``max_key_chars`` are not used; the rest are counted
under ``key="_other"``. A key earns its own label when a server registers with it or is granted from it
(``register``, ``grant``, ``session_*`` and ``health`` events; servers and slots seen at a scrape): requests
alone, which anyone can make up, never take one, so queue depth and oldest waiter of a key nobody serves are
reported under ``_other``. Outcome, reason and state labels take only the documented values (else ``other``).

Threading: everything here runs on the tracker's event loop thread (events are emitted there; :meth:`render`
reads the core, so call it there too: the hub's handler does, and so does :func:`serve_metrics`).

The hub's app mounts ``/metrics`` with :func:`mount_metrics` (``mount_metrics(server.core, hub.add_route)``
before the hub starts; :func:`metrics_handler` is the aiohttp handler alone); :func:`serve_metrics` serves it
alone on a port of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from bisect import bisect_left
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from ..protocol.keys import PROXY_PREFIX
from ..tracker.events import SESSION_OUTCOMES, TrackerEvent, server_id
from ..tracker.health import STATES

if TYPE_CHECKING:
    from aiohttp import web
    from prometheus_client import CollectorRegistry
    from prometheus_client.metrics_core import Metric

    from ..tracker.core import TrackerCore
    from ..tracker.registry import Connection

__all__ = [
    "CONTENT_TYPE",
    "HOLD_BUCKETS_S",
    "LAG_BUCKETS_S",
    "METRICS",
    "OTHER",
    "WAIT_BUCKETS_S",
    "MetricsServer",
    "TrackerMetrics",
    "metrics_handler",
    "mount_metrics",
    "serve_metrics",
]

logger = logging.getLogger("tether.hub.metrics")

PREFIX: Final = "tether_tracker_"
#: Prometheus' text format 0.0.4: what every Prometheus version and scraper reads.
CONTENT_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"
#: The ``key`` label of keys past the cap (and ``outcome``/``reason``/``state`` of values not documented).
OTHER: Final = "_other"
#: Wait time buckets, seconds: 1 ms to 1 h.
WAIT_BUCKETS_S: Final = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
    600.0, 1800.0, 3600.0,
)  # fmt: skip
#: Hold time buckets, seconds: 0.1 s to a day.
HOLD_BUCKETS_S: Final = (
    0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 1800.0, 3600.0, 7200.0, 14400.0,
    28800.0, 86400.0,
)  # fmt: skip
#: Event loop lag buckets, seconds: 1 ms to 10 s.
LAG_BUCKETS_S: Final = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

#: ``request_end`` outcomes (:mod:`tether.tracker.events`); anything else is counted as "other".
REQUEST_OUTCOMES: Final = frozenset({"timeout", "cancelled", "rejected", "unservable", "closed"})
UNREGISTER_REASONS: Final = frozenset({"closed", "silent"})
HEALTH_STATES: Final = frozenset(STATES)
#: A server's states from its slots, before its standing (see the module's docstring).
SLOT_STATES: Final = ("free", "granted", "busy")

#: Every metric's full name (as exposed, histograms and counters without their suffixes), for dashboards and
#: tests: name -> (type, labels).
METRICS: Final[Mapping[str, tuple[str, tuple[str, ...]]]] = {
    PREFIX + "servers": ("gauge", ("key", "state")),
    PREFIX + "slots": ("gauge", ("key", "state")),
    PREFIX + "queue_depth": ("gauge", ("key",)),
    PREFIX + "oldest_waiter_seconds": ("gauge", ("key",)),
    PREFIX + "connections": ("gauge", ("kind",)),
    PREFIX + "uptime_seconds": ("gauge", ()),
    PREFIX + "key_labels": ("gauge", ()),
    PREFIX + "grants": ("counter", ("key",)),
    PREFIX + "wait_seconds": ("histogram", ("key",)),
    PREFIX + "hold_seconds": ("histogram", ("key",)),
    PREFIX + "sessions": ("counter", ("key", "outcome")),
    PREFIX + "requests": ("counter", ()),
    PREFIX + "requests_ended": ("counter", ("outcome",)),
    PREFIX + "registrations": ("counter", ()),
    PREFIX + "unregistrations": ("counter", ("reason",)),
    PREFIX + "health_changes": ("counter", ("state",)),
    PREFIX + "loop_lag_seconds": ("gauge", ()),
    PREFIX + "loop_lag_samples_seconds": ("histogram", ()),
}


def _known(value: Any, allowed: frozenset[str]) -> str:
    return value if isinstance(value, str) and value in allowed else "other"


def _seconds(value: Any) -> float | None:
    """A duration field of an event, or None when it is missing or not a finite number >= 0."""
    if type(value) is not float and (type(value) is not int):
        return None
    return float(value) if 0.0 <= value < _INF else None


_INF: Final = float("inf")


class _Histogram:
    """Counts per bucket (not cumulative; the last is +Inf) and the sum of what was observed, in plain
    Python: the tracker's loop is the only thread that touches it, so no lock is taken per event."""

    __slots__ = ("counts", "total")

    def __init__(self, buckets: int) -> None:
        self.counts = [0] * (buckets + 1)
        self.total = 0.0

    def observe(self, bounds: tuple[float, ...], value: float) -> None:
        self.counts[bisect_left(bounds, value)] += 1  # the first bucket whose bound is >= value
        self.total += value

    def cumulative(self, les: list[str]) -> list[tuple[str, float]]:
        """(le, count of observations <= le) per bucket, +Inf last: Prometheus' buckets."""
        out, running = [], 0
        for le, n in zip(les, self.counts, strict=True):
            running += n
            out.append((le, float(running)))
        return out


class _KeyStats:
    """What the events add up to for one ``key`` label value."""

    __slots__ = ("grants", "hold", "wait")

    def __init__(self) -> None:
        self.grants = 0
        self.wait = _Histogram(len(WAIT_BUCKETS_S))
        self.hold = _Histogram(len(HOLD_BUCKETS_S))


class TrackerMetrics:
    """Prometheus metrics of one :class:`~tether.tracker.core.TrackerCore` (see the module's docstring).

    ``TrackerMetrics(core)`` registers one collector in a registry of its own (or ``registry``);
    :meth:`attach` subscribes to ``core.events``; :meth:`start` starts the loop lag probe on the tracker's
    loop; :meth:`render` returns ``(body, content_type)`` for ``GET /metrics``; :meth:`close` undoes
    ``attach`` and ``start``. ``max_keys``: distinct ``key`` label values kept (more go to ``_other``);
    ``max_key_chars``: longer keys go to ``_other``; ``lag_interval_s``: seconds between lag samples.

    Counts are kept in plain Python and turned into Prometheus' families only at a scrape: an event costs
    about a microsecond of the tracker's loop, not the locks of ``prometheus_client``'s metric objects.
    Raises :class:`ImportError` without prometheus-client (``pip install 'tether[hub]'``).
    """

    def __init__(
        self,
        core: TrackerCore,
        *,
        registry: CollectorRegistry | None = None,
        max_keys: int = 1000,
        max_key_chars: int = 200,
        lag_interval_s: float = 0.5,
    ) -> None:
        from prometheus_client import CollectorRegistry

        self.core = core
        self.registry = registry if registry is not None else CollectorRegistry()
        self.max_keys = max_keys
        self.max_key_chars = max_key_chars
        self.lag_interval_s = lag_interval_s
        #: when the metrics were made (``time.monotonic()``): ``uptime_seconds`` counts from here
        self.started_at = time.monotonic()
        self._keys: set[str] = set()  # key label values in use (besides _other)
        #: the counts, by key label value, outcome...: read by the collector at a scrape
        self.by_key: dict[str, _KeyStats] = {}
        self.sessions: dict[tuple[str, str], int] = {}
        self.requests = 0
        self.requests_ended: dict[str, int] = {}
        self.registrations = 0
        self.unregistrations: dict[str, int] = {}
        self.health_changes: dict[str, int] = {}
        #: the loop's last lag (seconds) and every sample
        self.lag_s = 0.0
        self.lag = _Histogram(len(LAG_BUCKETS_S))
        self._unsubscribe: Callable[[], None] | None = None
        self._lag_task: asyncio.Task[None] | None = None
        self._lag_loop: asyncio.AbstractEventLoop | None = None
        self._handlers: dict[str, Callable[[TrackerEvent], None]] = {
            "session_end": self._on_session_end,
            "request": self._on_request,
            "request_end": self._on_request_end,
            "register": self._on_register,
            "unregister": self._on_unregister,
            "health": self._on_health,
            "session_start": self._on_session_start,
        }
        self.registry.register(_PoolCollector(self))

    # -- wiring --------------------------------------------------------------------------------

    def attach(self) -> None:
        """Subscribe to ``core.events`` (again: no effect)."""
        if self._unsubscribe is None:
            self._unsubscribe = self.core.events.subscribe(self.on_event)

    def detach(self) -> None:
        """Unsubscribe from ``core.events`` (not attached: no effect)."""
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None

    def start(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        """Start the loop lag probe on ``loop`` (default: the running loop). From another thread, pass the
        tracker's loop: the task is created there. A second call does nothing while the probe runs."""
        if self._lag_loop is not None:
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        target = loop or running
        if target is None:
            raise RuntimeError("TrackerMetrics.start() needs a loop: pass the tracker's, or call it from there")
        self._lag_loop = target
        if target is running:
            self._spawn_probe()
        else:
            target.call_soon_threadsafe(self._spawn_probe)

    def _spawn_probe(self) -> None:
        if self._lag_task is None and self._lag_loop is not None:
            self._lag_task = self._lag_loop.create_task(self._probe_lag(), name="tether-metrics-loop-lag")

    def close(self) -> None:
        """Stop the lag probe and unsubscribe. Call from the tracker's loop thread, or after it stopped."""
        self.detach()
        loop, task = self._lag_loop, self._lag_task
        self._lag_loop = self._lag_task = None
        if task is not None and loop is not None and not loop.is_closed():
            try:
                running = asyncio.get_running_loop()
            except RuntimeError:
                running = None
            if running is loop:
                task.cancel()
            else:
                with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                    loop.call_soon_threadsafe(task.cancel)

    async def _probe_lag(self) -> None:
        """Sleep ``lag_interval_s`` at a time; how much later than asked the loop woke is its lag."""
        loop = asyncio.get_running_loop()
        interval = self.lag_interval_s
        while True:
            asked = loop.time() + interval
            await asyncio.sleep(interval)
            lag = max(0.0, loop.time() - asked)
            self.lag_s = lag
            self.lag.observe(LAG_BUCKETS_S, lag)

    # -- exposition ----------------------------------------------------------------------------

    def render(self) -> tuple[bytes, str]:
        """The metrics in Prometheus' text format: ``(body, content_type)``. Call on the tracker's loop."""
        from prometheus_client import generate_latest

        return generate_latest(self.registry), CONTENT_TYPE

    # -- key labels ----------------------------------------------------------------------------

    def key_label(self, key: str | None, admit: bool = True) -> str:
        """The ``key`` label value for ``key``: itself when it has one already, or when ``admit`` and fewer
        than ``max_keys`` are in use (and it is at most ``max_key_chars`` long); else ``_other``."""
        if key is None:
            return OTHER
        if key in self._keys:
            return key
        if admit and len(self._keys) < self.max_keys and len(key) <= self.max_key_chars and key != OTHER:
            self._keys.add(key)
            return key
        return OTHER

    @property
    def key_labels(self) -> int:
        """Distinct ``key`` label values in use, ``_other`` aside."""
        return len(self._keys)

    def _stats(self, key: str | None) -> _KeyStats:
        stats = self.by_key.get(key) if key is not None else None
        if stats is None:
            label = self.key_label(key)
            stats = self.by_key.get(label)
            if stats is None:
                stats = self.by_key[label] = _KeyStats()
        return stats

    # -- events --------------------------------------------------------------------------------

    def on_event(self, event: TrackerEvent) -> None:
        """Count one event (the ``core.events`` subscriber). The two of every grant (``grant``, and
        ``session_end``) take the short way: a dict look-up, an addition, a bisection (about a microsecond)."""
        kind = event.kind
        if kind == "grant":
            key = event.key
            stats = self.by_key.get(key) if key is not None else None
            if stats is None:
                stats = self._stats(key)
            stats.grants += 1
            waited = event.fields.get("waited_s")
            if type(waited) is float and 0.0 <= waited < _INF:  # the core's round(): a float
                hist = stats.wait
                hist.counts[bisect_left(WAIT_BUCKETS_S, waited)] += 1
                hist.total += waited
            elif waited is not None and (waited := _seconds(waited)) is not None:
                stats.wait.observe(WAIT_BUCKETS_S, waited)
        elif kind == "session_end":
            self._on_session_end(event)
        else:
            handler = self._handlers.get(kind)
            if handler is not None:
                handler(event)

    def _on_session_end(self, event: TrackerEvent) -> None:
        key, fields = event.key, event.fields
        stats = self.by_key.get(key) if key is not None else None
        label = key if key is not None and stats is not None else self.key_label(key)
        held = fields.get("held_s")
        if type(held) is not float or not 0.0 <= held < _INF:
            held = _seconds(held)
        if held is not None:
            (stats or self._stats(label)).hold.observe(HOLD_BUCKETS_S, held)
        outcome = fields.get("outcome")
        if outcome not in SESSION_OUTCOMES:
            outcome = "other"
        name = (label, str(outcome))
        sessions = self.sessions
        sessions[name] = sessions.get(name, 0) + 1

    def _on_session_start(self, event: TrackerEvent) -> None:
        self.key_label(event.key)  # a granted key: it has a server

    def _on_request(self, event: TrackerEvent) -> None:
        self.requests += 1

    def _on_request_end(self, event: TrackerEvent) -> None:
        _bump(self.requests_ended, _known(event.fields.get("outcome"), REQUEST_OUTCOMES))

    def _on_register(self, event: TrackerEvent) -> None:
        self.key_label(event.key)
        self.registrations += 1

    def _on_unregister(self, event: TrackerEvent) -> None:
        _bump(self.unregistrations, _known(event.fields.get("reason"), UNREGISTER_REASONS))

    def _on_health(self, event: TrackerEvent) -> None:
        self.key_label(event.key)
        _bump(self.health_changes, _known(event.fields.get("state"), HEALTH_STATES))


class _PoolCollector:
    """Every family at each scrape: the gauges read from the core in one pass over its connections, and the
    counts the events added up."""

    def __init__(self, metrics: TrackerMetrics) -> None:
        self._metrics = metrics
        self._les = {  # each bucket's ``le`` label: 0.001, 1.0, ..., +Inf
            bounds: [*(repr(float(b)) for b in bounds), "+Inf"]
            for bounds in (WAIT_BUCKETS_S, HOLD_BUCKETS_S, LAG_BUCKETS_S)
        }

    def describe(self) -> Iterable[Metric]:
        """The names (no samples): the registry checks them against duplicates once, at registration."""
        return [*self._gauges(), *self._counted()]

    @staticmethod
    def _gauges() -> list[Any]:
        from prometheus_client.core import GaugeMetricFamily

        def gauge(name: str, doc: str, labels: list[str] | None = None) -> GaugeMetricFamily:
            return GaugeMetricFamily(PREFIX + name, doc, labels=labels)

        return [
            gauge(
                "servers", "Servers by key and state (a standing other than ok replaces the state).", ["key", "state"]
            ),
            gauge(
                "slots",
                "Server slots (places) by key and state (withheld: of a server not in good standing).",
                ["key", "state"],
            ),
            gauge("queue_depth", "Requests waiting, by key.", ["key"]),
            gauge("oldest_waiter_seconds", "Seconds the longest-waiting request of a key has waited.", ["key"]),
            gauge("connections", "Open tracker connections by kind.", ["kind"]),
            gauge("uptime_seconds", "Seconds since the metrics were attached to the tracker."),
            gauge("key_labels", "Distinct key label values in use (the rest count as key=_other)."),
        ]

    @staticmethod
    def _counted() -> list[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

        def counter(name: str, doc: str, labels: list[str] | None = None) -> CounterMetricFamily:
            return CounterMetricFamily(PREFIX + name, doc, labels=labels)

        def histogram(name: str, doc: str, labels: list[str] | None = None) -> HistogramMetricFamily:
            return HistogramMetricFamily(PREFIX + name, doc, labels=labels)

        return [
            counter("grants", "Requests granted a slot.", ["key"]),
            histogram("wait_seconds", "Seconds a granted request waited.", ["key"]),
            histogram("hold_seconds", "Seconds a session held its slot, grant to end.", ["key"]),
            counter("sessions", "Sessions ended, by outcome.", ["key", "outcome"]),
            counter("requests", "Requests that started waiting."),
            counter("requests_ended", "Requests that ended without a grant.", ["outcome"]),
            counter("registrations", "Servers registered or re-described (UPDATE_INFO, first PUT)."),
            counter("unregistrations", "Server connections gone.", ["reason"]),
            counter("health_changes", "Changes of a server's standing.", ["state"]),
            GaugeMetricFamily(PREFIX + "loop_lag_seconds", "How late the event loop last woke a timed sleep."),
            histogram("loop_lag_samples_seconds", "How late the event loop woke timed sleeps."),
        ]

    def collect(self) -> Iterable[Metric]:
        return [*self._collect_gauges(), *self._collect_counted()]

    def _collect_counted(self) -> list[Any]:
        m = self._metrics
        families = self._counted()
        grants, wait, hold, sessions, requests, ended, registrations, gone, health, lag, lag_samples = families
        wait_les, hold_les = self._les[WAIT_BUCKETS_S], self._les[HOLD_BUCKETS_S]
        for name, stats in sorted(m.by_key.items()):
            if stats.grants:
                grants.add_metric([name], stats.grants)
            if stats.grants or stats.wait.total:
                wait.add_metric([name], stats.wait.cumulative(wait_les), stats.wait.total)
            if any(stats.hold.counts):
                hold.add_metric([name], stats.hold.cumulative(hold_les), stats.hold.total)
        for (name, outcome), n in sorted(m.sessions.items()):
            sessions.add_metric([name, outcome], n)
        requests.add_metric([], m.requests)
        for outcome, n in sorted(m.requests_ended.items()):
            ended.add_metric([outcome], n)
        registrations.add_metric([], m.registrations)
        for reason, n in sorted(m.unregistrations.items()):
            gone.add_metric([reason], n)
        for state, n in sorted(m.health_changes.items()):
            health.add_metric([state], n)
        lag.add_metric([], m.lag_s)
        lag_samples.add_metric([], m.lag.cumulative(self._les[LAG_BUCKETS_S]), m.lag.total)
        return families

    def _collect_gauges(self) -> list[Any]:
        """One pass over the connections, counting by raw key (labels are looked up once per key after):
        per connection a few attribute reads, more only for those holding grants or requests. Free slots
        and queue depths come from the scheduler's counts, per key."""
        metrics = self._metrics
        core = metrics.core
        now = core.clock()
        not_ok = {sid: st.state for sid, st in core.health.not_ok().items()}  # the few servers withheld
        servers: dict[tuple[str, str], int] = {}  # (raw key, state) -> servers
        handed: dict[tuple[str, str], int] = {}  # (raw key, granted|busy|withheld) -> slots
        oldest: dict[str, float] = {}  # raw key -> the oldest waiter's ``since``
        n_server = n_proxy = n_client = n_other = 0
        for conn in core.connections:
            own = conn.server_key
            if own is not None:  # a registered server (the common case, kept short)
                n_server += 1
                held = conn.held
                if held:
                    state = _server_state(conn)
                    for record in held.values():
                        pair = (record.key, record.state)
                        handed[pair] = handed.get(pair, 0) + 1
                else:
                    state = "free" if conn.slots else "unavailable"
                if not_ok and conn.server_id in not_ok:
                    state = not_ok[conn.server_id]
                    if conn.slots:  # offered, kept out of the queue while withheld
                        _bump(handed, (own, "withheld"), len(conn.slots))
                pair = (own, state)
                servers[pair] = servers.get(pair, 0) + 1
            else:
                if conn.info_key.startswith(PROXY_PREFIX):
                    n_proxy += 1
                elif conn.waiters:
                    n_client += 1
                else:
                    n_other += 1
                if conn.slots or conn.held:  # a proxy (or a peer that PUTs without registering): a server per slot
                    for slot in conn.slots.values():
                        state = not_ok.get(server_id(slot.host, slot.port), "free") if not_ok else "free"
                        _bump(servers, (slot.key, state))
                        if state != "free":
                            _bump(handed, (slot.key, "withheld"))
                    for record in conn.held.values():
                        _bump(servers, (record.key, record.state))
                        _bump(handed, (record.key, record.state))
            if conn.waiters:
                for waiter in conn.waiters:
                    since = oldest.get(waiter.key)
                    if since is None or waiter.since < since:
                        oldest[waiter.key] = waiter.since
        # raw keys -> labels: servers and slots admit their keys; waiters' keys only use labels given already
        label = metrics.key_label
        by_state: dict[tuple[str, str], int] = {}
        slots: dict[tuple[str, str], int] = {}
        for (key, state), n in servers.items():
            _bump(by_state, (label(key), state), n)
        for (key, state), n in handed.items():
            _bump(slots, (label(key), state), n)
        depth: dict[str, int] = {}
        scheduler = core.scheduler
        queued: list[str] = scheduler.keys()
        for key in queued:
            free, pending = scheduler.counts(key)
            if free:
                _bump(slots, (label(key), "free"), free)
            if pending:
                _bump(depth, label(key, admit=False), pending)
        oldest_by: dict[str, float] = {}
        for key, since in oldest.items():
            name = label(key, admit=False)
            if name not in oldest_by or since < oldest_by[name]:
                oldest_by[name] = since
        families = self._gauges()
        servers_f, slots_f, depth_f, oldest_f, conns_f, uptime_f, keys_f = families
        # the three slot states of every key with a server, zero or not: continuous series for the dashboard
        for name in {k for k, _ in by_state} | {k for k, _ in slots}:
            for state in SLOT_STATES:
                by_state.setdefault((name, state), 0)
                slots.setdefault((name, state), 0)
        for (name, state), n in sorted(by_state.items()):
            servers_f.add_metric([name, state], n)
        for (name, state), n in sorted(slots.items()):
            slots_f.add_metric([name, state], n)
        for name in sorted(depth.keys() | oldest_by.keys()):
            depth_f.add_metric([name], depth.get(name, 0))
            oldest_f.add_metric([name], max(0.0, now - oldest_by[name]) if name in oldest_by else 0.0)
        for kind, n in (("server", n_server), ("proxy", n_proxy), ("client", n_client), ("other", n_other)):
            conns_f.add_metric([kind], n)
        uptime_f.add_metric([], time.monotonic() - metrics.started_at)
        keys_f.add_metric([], metrics.key_labels)
        return families


def _bump(counts: dict[Any, int], name: Any, n: int = 1) -> None:
    counts[name] = counts.get(name, 0) + n


def _server_state(conn: Connection) -> str:
    """A registered server's state from its slots: busy over granted over free; ``unavailable`` with none."""
    state = "free" if conn.slots else "unavailable"
    for held in conn.held.values():
        if held.state == "busy":
            return "busy"
        state = "granted"
    return state


# -- serving ---------------------------------------------------------------------------------------


def metrics_handler(metrics: TrackerMetrics) -> Callable[[web.Request], Any]:
    """An aiohttp handler for ``GET /metrics`` (mount it on the tracker's loop: it reads the core)."""
    from aiohttp import web

    async def handle(request: web.Request) -> web.Response:
        body, content_type = metrics.render()
        return web.Response(body=body, headers={"Content-Type": content_type})

    return handle


def mount_metrics(
    core: TrackerCore, add_route: Callable[[str, str, Callable[[web.Request], Any]], None], **options: Any
) -> TrackerMetrics:
    """Metrics for ``core`` served at ``GET /metrics`` of an app: made, attached, their loop lag probe started
    on the running loop (the tracker's), and the route added with ``add_route(method, path, handler)``
    (the hub's ``Hub.add_route``, before it starts). ``options`` go to :class:`TrackerMetrics`; the caller
    calls :meth:`TrackerMetrics.close` when the app stops."""
    metrics = TrackerMetrics(core, **options)
    metrics.attach()
    metrics.start()
    add_route("GET", "/metrics", metrics_handler(metrics))
    return metrics


@dataclass(slots=True)
class MetricsServer:
    """``/metrics`` served by :func:`serve_metrics`; ``await close()`` stops it."""

    host: str
    port: int
    runner: Any

    async def close(self) -> None:
        await self.runner.cleanup()


async def serve_metrics(metrics: TrackerMetrics, host: str = "127.0.0.1", port: int = 0) -> MetricsServer:
    """Serve ``GET /metrics`` alone on ``host:port`` (0: any free port; read it back from the result), on
    the running loop, which must be the tracker's. Raises :class:`OSError` when the port cannot be bound."""
    from aiohttp import web

    app = web.Application()
    app.router.add_get("/metrics", metrics_handler(metrics))
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    try:
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    addresses = runner.addresses  # (host, port, ...) of each bound socket
    bound = int(addresses[0][1]) if addresses else port
    return MetricsServer(host, bound, runner)
