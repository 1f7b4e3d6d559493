"""The tracker's Prometheus metrics (:mod:`tether.hub.metrics`): events fed by hand, and a real tracker over
loopback sockets scraped over HTTP and parsed with prometheus-client's own parser."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("prometheus_client")
pytest.importorskip("aiohttp")

from prometheus_client.parser import text_string_to_metric_families

from tether.client.tracker import TrackerClient
from tether.errors import RequestTimeout
from tether.hub.metrics import METRICS, OTHER, TrackerMetrics, serve_metrics
from tether.tracker import TrackerConfig, TrackerCore, TrackerThread
from tether.tracker.events import SESSION_OUTCOMES, TrackerEvent

from .conftest import RawPeer, wait_until

pytestmark = pytest.mark.timeout(60)

DASHBOARD = Path(__file__).resolve().parent.parent / "docs" / "grafana-dashboard.json"

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(body: bytes) -> Samples:
    """Every sample of a scrape: (sample name, labels) -> value."""
    out: Samples = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            out[sample.name, frozenset(sample.labels.items())] = sample.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def event(kind: str, key: str | None = None, **fields: Any) -> TrackerEvent:
    return TrackerEvent(kind, time.time(), key, "127.0.0.1:9000", "alice", fields)


# -- events fed by hand --------------------------------------------------------------------------


def test_event_counters_and_histograms() -> None:
    metrics = TrackerMetrics(TrackerCore())
    for waited in (0.0005, 0.02, 3.0):
        metrics.on_event(event("grant", "phone", waited_s=waited, id="r", matchkey="m", priority=1))
    metrics.on_event(event("grant", "phone", waited_s="soon"))  # not a number: counted, not observed
    metrics.on_event(event("session_end", "phone", held_s=12.5, outcome="ok", matchkey="m"))
    metrics.on_event(event("session_end", "phone", held_s=0.2, outcome="never_started"))
    metrics.on_event(event("session_end", "phone", held_s=-1, outcome="made-up"))  # bad time, unknown outcome
    metrics.on_event(event("request", "phone", id="r", priority=1))
    metrics.on_event(event("request_end", "phone", outcome="timeout", waited_s=5.0))
    metrics.on_event(event("request_end", "phone", outcome="cancelled", waited_s=1.0))
    metrics.on_event(event("register", "phone", slots=1))
    metrics.on_event(event("unregister", "phone", reason="silent"))
    metrics.on_event(event("health", "phone", state="quarantined", reason="3 failed sessions", by="tracker"))
    s = parse(metrics.render()[0])
    assert value(s, "tether_tracker_grants_total", key="phone") == 4
    assert value(s, "tether_tracker_wait_seconds_count", key="phone") == 3
    assert value(s, "tether_tracker_wait_seconds_sum", key="phone") == pytest.approx(3.0205)
    assert value(s, "tether_tracker_wait_seconds_bucket", key="phone", le="0.001") == 1
    assert value(s, "tether_tracker_wait_seconds_bucket", key="phone", le="0.025") == 2
    assert value(s, "tether_tracker_wait_seconds_bucket", key="phone", le="3600.0") == 3
    assert value(s, "tether_tracker_hold_seconds_count", key="phone") == 2
    assert value(s, "tether_tracker_hold_seconds_sum", key="phone") == pytest.approx(12.7)
    assert value(s, "tether_tracker_sessions_total", key="phone", outcome="ok") == 1
    assert value(s, "tether_tracker_sessions_total", key="phone", outcome="never_started") == 1
    assert value(s, "tether_tracker_sessions_total", key="phone", outcome="other") == 1
    assert value(s, "tether_tracker_requests_total") == 1
    assert value(s, "tether_tracker_requests_ended_total", outcome="timeout") == 1
    assert value(s, "tether_tracker_requests_ended_total", outcome="cancelled") == 1
    assert value(s, "tether_tracker_registrations_total") == 1
    assert value(s, "tether_tracker_unregistrations_total", reason="silent") == 1
    assert value(s, "tether_tracker_health_changes_total", state="quarantined") == 1


def test_key_labels_are_capped() -> None:
    """Keys come from peers: at most ``max_keys`` label values, the rest (and very long keys) as _other;
    requests alone never earn a key its own label."""
    metrics = TrackerMetrics(TrackerCore(), max_keys=3, max_key_chars=20)
    for i in range(6):
        metrics.on_event(event("register", f"k{i}"))
        metrics.on_event(event("grant", f"k{i}", waited_s=0.01))
    metrics.on_event(event("grant", "x" * 21, waited_s=0.01))
    metrics.on_event(event("request", "made-up"))
    s = parse(metrics.render()[0])
    keys = {dict(labels)["key"] for name, labels in s if name == "tether_tracker_grants_total"}
    assert keys == {"k0", "k1", "k2", OTHER}
    assert value(s, "tether_tracker_grants_total", key=OTHER) == 4
    assert value(s, "tether_tracker_key_labels") == 3
    assert metrics.key_label("made-up", admit=False) == OTHER


def test_many_keys_stay_bounded() -> None:
    metrics = TrackerMetrics(TrackerCore())
    for i in range(5000):
        metrics.on_event(event("grant", f"key-{i}", waited_s=0.001))
        metrics.on_event(event("session_end", f"key-{i}", held_s=1.0, outcome="ok"))
    s = parse(metrics.render()[0])
    keys = {dict(labels)["key"] for name, labels in s if name == "tether_tracker_grants_total"}
    assert len(keys) == 1001
    assert value(s, "tether_tracker_grants_total", key=OTHER) == 4000


def test_every_listed_metric_is_exported() -> None:
    """METRICS (what the dashboard and the docs rely on) is exactly what a scrape shows."""
    metrics = TrackerMetrics(TrackerCore())
    _feed_every_kind(metrics)
    families = {f.name: f.type for f in text_string_to_metric_families(metrics.render()[0].decode())}
    # (prometheus-client adds a ``<name>_created`` time to each counter and histogram series: standard, left out)
    families = {name: kind for name, kind in families.items() if not name.endswith("_created")}
    assert families == {name: kind for name, (kind, _) in METRICS.items()}


def _feed_every_kind(metrics: TrackerMetrics) -> None:
    metrics.on_event(event("grant", "k", waited_s=0.1))
    metrics.on_event(event("session_end", "k", held_s=1.0, outcome="ok"))
    metrics.on_event(event("request", "k"))
    metrics.on_event(event("request_end", "k", outcome="timeout"))
    metrics.on_event(event("register", "k"))
    metrics.on_event(event("unregister", "k", reason="closed"))
    metrics.on_event(event("health", "k", state="ok"))


def test_metrics_use_their_own_registry() -> None:
    from prometheus_client import REGISTRY

    before = set(REGISTRY._names_to_collectors)  # the process-wide registry, untouched
    first, second = TrackerMetrics(TrackerCore()), TrackerMetrics(TrackerCore())
    assert first.registry is not second.registry
    assert set(REGISTRY._names_to_collectors) == before


def test_attach_subscribes_once_and_close_unsubscribes() -> None:
    core = TrackerCore()
    metrics = TrackerMetrics(core)
    metrics.attach()
    metrics.attach()
    core.events.emit("grant", key="k", waited_s=0.5)
    metrics.close()
    core.events.emit("grant", key="k", waited_s=0.5)
    assert value(parse(metrics.render()[0]), "tether_tracker_grants_total", key="k") == 1
    assert not core.events.active


# -- a real tracker over sockets -----------------------------------------------------------------


@dataclass
class Metered:
    tracker: TrackerThread
    metrics: TrackerMetrics
    url: str

    def scrape(self) -> Samples:
        with urllib.request.urlopen(self.url, timeout=5) as reply:
            assert reply.headers["Content-Type"].startswith("text/plain; version=0.0.4")
            return parse(reply.read())

    def scrape_until(self, predicate: Callable[[Samples], bool], what: str, timeout: float = 5.0) -> Samples:
        found: list[Samples] = []

        def check() -> bool:
            found[:] = [self.scrape()]
            return predicate(found[0])

        wait_until(check, timeout=timeout, what=what)
        return found[0]


@contextlib.contextmanager
def metered_tracker(**options: Any) -> Iterator[Metered]:
    """A tracker on port 0 with metrics attached, /metrics served on its loop (port 0)."""
    with TrackerThread(TrackerConfig(host="127.0.0.1", port=0)) as tracker:
        loop: asyncio.AbstractEventLoop = tracker.call(asyncio.get_running_loop)

        def make() -> TrackerMetrics:
            metrics = TrackerMetrics(tracker.core, **options)
            metrics.attach()
            metrics.start()
            return metrics

        metrics: TrackerMetrics = tracker.call(make)
        server = asyncio.run_coroutine_threadsafe(serve_metrics(metrics, "127.0.0.1", 0), loop).result(10)
        try:
            yield Metered(tracker, metrics, f"http://127.0.0.1:{server.port}/metrics")
        finally:
            asyncio.run_coroutine_threadsafe(server.close(), loop).result(10)
            tracker.call(metrics.close)


@pytest.fixture
def metered() -> Iterator[Metered]:
    with metered_tracker(lag_interval_s=0.05) as m:
        yield m


@pytest.fixture
def peers(metered: Metered) -> Iterator[Callable[[], RawPeer]]:
    made: list[RawPeer] = []

    def make() -> RawPeer:
        peer = RawPeer(metered.tracker.host, metered.tracker.port)
        made.append(peer)
        return peer

    yield make
    for peer in made:
        peer.close()


def register(peer: RawPeer, key: str, port: int, put: bool = True) -> str:
    """A TVM-style server: UPDATE_INFO, then (``put``) one free slot; returns its matchkey."""
    assert peer.call([5, {"key": f"server:{key}", "addr": [None, port]}]) == 0
    matchkey = f"{key}:{port}"
    if put:
        assert peer.call([3, key, [port, matchkey], None]) == 0
    return matchkey


def test_gauges_over_real_sockets(metered: Metered, peers: Callable[[], RawPeer]) -> None:
    servers = [peers() for _ in range(3)]
    matchkeys = [register(s, "phone", 9000 + i) for i, s in enumerate(servers)]
    register(peers(), "board", 9100, put=False)  # registered, offers nothing
    client = peers()
    first = client.call([4, "phone", "alice", 1])
    second = client.call([4, "phone", "bob", 1])
    granted = {first[1][2], second[1][2]}
    assert granted <= set(matchkeys)
    busy = next(iter(sorted(granted)))
    assert servers[matchkeys.index(busy)].call([102, {"event": "start", "matchkey": busy, "peer": "1.2.3.4:5"}]) == 0
    waiting = peers()
    waiting.send_json([4, "phone", "carol", 1])  # takes the last free one
    assert waiting.recv_json()[0] == 0
    waiting.send_json([4, "phone", "dave", 1])  # waits
    nobody = peers()
    nobody.send_json([4, "nobody-serves-this", "eve", 1])  # waits, for a key with no server
    s = metered.scrape_until(lambda s: value(s, "tether_tracker_queue_depth", key="phone") == 1, "a phone waiter")
    assert value(s, "tether_tracker_servers", key="phone", state="busy") == 1
    assert value(s, "tether_tracker_servers", key="phone", state="granted") == 2
    assert value(s, "tether_tracker_servers", key="phone", state="free") == 0
    assert value(s, "tether_tracker_servers", key="board", state="unavailable") == 1
    assert value(s, "tether_tracker_slots", key="phone", state="busy") == 1
    assert value(s, "tether_tracker_slots", key="phone", state="granted") == 2
    s = metered.scrape_until(lambda s: value(s, "tether_tracker_queue_depth", key=OTHER) == 1, "the other waiter")
    assert value(s, "tether_tracker_queue_depth", key="nobody-serves-this") is None  # requests earn no label
    oldest = value(s, "tether_tracker_oldest_waiter_seconds", key="phone")
    assert oldest is not None and oldest >= 0
    assert value(s, "tether_tracker_connections", kind="server") == 4
    assert value(s, "tether_tracker_connections", kind="client") == 2  # the two with a request waiting
    assert value(s, "tether_tracker_connections", kind="other") == 1  # the first client, between requests
    assert (value(s, "tether_tracker_uptime_seconds") or 0) > 0
    assert value(s, "tether_tracker_loop_lag_seconds") is not None
    assert value(s, "tether_tracker_key_labels") == 2  # phone, board
    # the waiter's age grows with the tracker's clock
    metered.scrape_until(
        lambda later: (value(later, "tether_tracker_oldest_waiter_seconds", key="phone") or 0) > oldest,
        "the oldest waiter to age",
    )


def test_a_standing_other_than_ok_replaces_the_state(metered: Metered, peers: Callable[[], RawPeer]) -> None:
    """A server cordoned by an admin counts as ``cordoned``, not ``free`` (its slot, still offered, is
    ``withheld``); an admin's uncordon brings it back; both are health changes."""
    core = metered.tracker.core
    for i in range(3):
        register(peers(), "phone", 9000 + i)
    metered.scrape_until(lambda s: value(s, "tether_tracker_servers", key="phone", state="free") == 3, "3 free")
    metered.tracker.call(lambda: core.admin("cordon", "127.0.0.1:9001", by="admin"))
    s = metered.scrape_until(lambda s: value(s, "tether_tracker_servers", key="phone", state="free") == 2, "cordon")
    assert value(s, "tether_tracker_servers", key="phone", state="cordoned") == 1
    assert value(s, "tether_tracker_slots", key="phone", state="free") == 2
    assert value(s, "tether_tracker_slots", key="phone", state="withheld") == 1
    assert value(s, "tether_tracker_health_changes_total", state="cordoned") == 1
    metered.tracker.call(lambda: core.admin("uncordon", "127.0.0.1:9001", by="admin"))
    s = metered.scrape_until(lambda s: value(s, "tether_tracker_servers", key="phone", state="free") == 3, "uncordon")
    assert value(s, "tether_tracker_servers", key="phone", state="cordoned") is None
    assert value(s, "tether_tracker_slots", key="phone", state="free") == 3
    assert value(s, "tether_tracker_health_changes_total", state="ok") == 1


def test_the_cap_holds_for_servers_seen_at_a_scrape() -> None:
    with metered_tracker(max_keys=3) as metered:
        peers = [RawPeer(metered.tracker.host, metered.tracker.port) for _ in range(6)]
        try:
            for i, peer in enumerate(peers):
                register(peer, f"key{i}", 9000 + i)
            s = metered.scrape_until(
                lambda s: value(s, "tether_tracker_servers", key=OTHER, state="free") == 3, "three keys past the cap"
            )
            keys = {dict(labels)["key"] for name, labels in s if name == "tether_tracker_servers"}
            assert len(keys) == 4 and OTHER in keys
        finally:
            for peer in peers:
                peer.close()


def test_loop_lag_is_measured(metered: Metered) -> None:
    assert metered.metrics.lag_interval_s == 0.05

    def block_the_loop() -> None:
        time.sleep(0.3)  # the stimulus: the tracker's loop does nothing else meanwhile (not a synchronisation)

    metered.tracker.call(block_the_loop)

    def late_samples(s: Samples) -> float:
        total = value(s, "tether_tracker_loop_lag_samples_seconds_count") or 0
        return total - (value(s, "tether_tracker_loop_lag_samples_seconds_bucket", le="0.1") or 0)

    s = metered.scrape_until(lambda s: late_samples(s) >= 1, "a sample at least 0.1 s late")
    assert (value(s, "tether_tracker_loop_lag_samples_seconds_sum") or 0) >= 0.2
    assert value(s, "tether_tracker_loop_lag_seconds") is not None


def test_event_counters_over_real_sockets(metered: Metered, peers: Callable[[], RawPeer]) -> None:
    server, client = peers(), peers()
    matchkey = register(server, "phone", 9000)
    rounds = 25
    for i in range(rounds):
        reply = client.call([4, "phone", "alice", 1])
        assert reply == [0, ["127.0.0.1", 9000, matchkey]]
        assert server.call([102, {"event": "start", "matchkey": matchkey, "peer": "1.2.3.4:5"}]) == 0
        assert server.call([102, {"event": "end", "matchkey": matchkey}]) == 0
        if i < rounds - 1:
            assert server.call([3, "phone", [9000, matchkey], None]) == 0
    with (
        TrackerClient.connect(metered.tracker.host, metered.tracker.port) as tether_client,
        pytest.raises(RequestTimeout),
    ):
        tether_client.request_grant("phone", timeout=0.05)
    s = metered.scrape_until(
        lambda s: value(s, "tether_tracker_requests_ended_total", outcome="timeout") == 1, "the timeout"
    )
    assert value(s, "tether_tracker_grants_total", key="phone") == rounds
    assert value(s, "tether_tracker_wait_seconds_count", key="phone") == rounds
    assert value(s, "tether_tracker_hold_seconds_count", key="phone") == rounds
    assert sum(v for (name, labels), v in s.items() if name == "tether_tracker_sessions_total") == rounds
    assert value(s, "tether_tracker_registrations_total") == 1
    assert (value(s, "tether_tracker_requests_total") or 0) >= 1
    server.close()
    metered.scrape_until(
        lambda s: value(s, "tether_tracker_unregistrations_total", reason="closed") == 1, "the server's departure"
    )


def test_outcomes_are_among_the_documented_ones(metered: Metered, peers: Callable[[], RawPeer]) -> None:
    server, client = peers(), peers()
    matchkey = register(server, "phone", 9000)
    assert client.call([4, "phone", "alice", 1])[1][2] == matchkey
    server.close()  # the server leaves during its session
    s = metered.scrape_until(
        lambda s: any(n == "tether_tracker_sessions_total" for n, _ in s), "a session outcome", timeout=10
    )
    outcomes = {dict(labels)["outcome"] for name, labels in s if name == "tether_tracker_sessions_total"}
    assert outcomes <= SESSION_OUTCOMES


# -- the dashboard -------------------------------------------------------------------------------


def _panels(node: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in node.get("panels", []):
        yield panel
        yield from _panels(panel)  # rows hold panels


def test_the_dashboard_asks_only_for_exported_metrics() -> None:
    board = json.loads(DASHBOARD.read_text())
    assert board["schemaVersion"] >= 36
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert any(v["type"] == "datasource" and v["query"] == "prometheus" for v in variables.values())
    metrics = TrackerMetrics(TrackerCore())
    _feed_every_kind(metrics)
    body = metrics.render()[0]
    # sample names, and the gauges' names (those read from the core have no samples without servers)
    exported = {name for name, _ in parse(body)}
    exported |= {f.name for f in text_string_to_metric_families(body.decode()) if f.type == "gauge"}
    panels = list(_panels(board))
    assert len(panels) >= 7
    titles = " / ".join(p["title"].lower() for p in panels)
    for topic in ("servers", "queue", "grants", "wait", "hold", "outcome", "lag"):
        assert topic in titles, topic
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    for panel in panels:
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            names = set(re.findall(r"\btether_tracker_[a-z_]+", target["expr"]))
            assert names, (panel["title"], target["expr"])
            assert names <= exported, (panel["title"], names - exported)
            assert target["expr"].count("(") == target["expr"].count(")")
    quantiles = [t["expr"] for p in panels for t in p.get("targets", []) if "histogram_quantile" in t["expr"]]
    assert any("wait_seconds_bucket" in q and "0.5" in q for q in quantiles)
    assert any("wait_seconds_bucket" in q and "0.95" in q for q in quantiles)
    assert any("hold_seconds_bucket" in q and "0.95" in q for q in quantiles)


def test_mount_metrics_on_an_app_of_its_own() -> None:
    """What the hub does: ``mount_metrics(core, app's add_route)`` before the app starts, on the tracker's loop."""
    from aiohttp import web

    from tether.hub.metrics import mount_metrics

    with TrackerThread(TrackerConfig(host="127.0.0.1", port=0)) as tracker:
        loop: asyncio.AbstractEventLoop = tracker.call(asyncio.get_running_loop)

        async def page(request: web.Request) -> web.Response:
            return web.Response(text="the page")

        async def start() -> tuple[TrackerMetrics, web.AppRunner, int]:
            app = web.Application()
            app.router.add_get("/", page)
            metrics = mount_metrics(tracker.core, app.router.add_route, max_keys=10)
            runner = web.AppRunner(app, access_log=None)
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", 0).start()
            return metrics, runner, int(runner.addresses[0][1])

        metrics, runner, port = asyncio.run_coroutine_threadsafe(start(), loop).result(10)
        try:
            server = RawPeer(tracker.host, tracker.port)
            client = RawPeer(tracker.host, tracker.port)
            try:
                matchkey = register(server, "board", 9000)
                assert client.call([4, "board", "alice", 1]) == [0, ["127.0.0.1", 9000, matchkey]]
                metered = Metered(tracker, metrics, f"http://127.0.0.1:{port}/metrics")
                s = metered.scrape_until(
                    lambda s: value(s, "tether_tracker_grants_total", key="board") == 1, "the grant"
                )
                assert value(s, "tether_tracker_servers", key="board", state="granted") == 1
                assert metrics.max_keys == 10
            finally:
                server.close()
                client.close()
        finally:
            tracker.call(metrics.close)
            asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(10)
