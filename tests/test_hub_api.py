"""The web side's JSON API over real sockets: a tracker with ``--web-port`` on loopback port 0, servers
registered and requests made through the tracker's own protocol, every endpoint read back."""

from __future__ import annotations

import http.client
import json
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from urllib.parse import urlsplit

import pytest

pytest.importorskip("aiohttp")

from tether.client.tracker import TrackerClient
from tether.hub import HubConfig
from tether.hub.history import History
from tether.hub.service import TrackerHubThread
from tether.hub.stream import DROPPED, EventStreams
from tether.protocol import Request, RequestOptions
from tether.tracker import TrackerConfig
from tether.tracker.events import TrackerEvent

from .conftest import CliProcess, RawPeer, wait_until
from .hub_kit import DEVICE, Device, get, get_ok, start_hub

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def hub() -> Iterator[TrackerHubThread]:
    with start_hub() as t:
        yield t


@pytest.fixture
def devices(hub: TrackerHubThread) -> Iterator[list[Device]]:
    made: list[Device] = []
    yield made
    for d in made:
        d.close()


def server_row(hub: TrackerHubThread, sid: str) -> dict[str, Any] | None:
    rows = get_ok(hub.web_url, "/api/v1/servers?limit=1000")["servers"]
    return next((r for r in rows if r["id"] == sid), None)


# -- servers ----------------------------------------------------------------------------------------


def test_servers_show_what_each_server_registered(hub: TrackerHubThread, devices: list[Device]) -> None:
    devices.append(Device(hub, "android", 9001, {"soc": "sd8"}))
    devices.append(Device(hub, "android", 9002, {"soc": "sd7"}))
    body = get_ok(hub.web_url, "/api/v1/servers")
    assert (body["total"], body["offset"], body["limit"]) == (2, 0, 100)
    first = body["servers"][0]
    assert first["id"] == first["address"] == "127.0.0.1:9001"
    assert first["key"] == "android"
    assert first["state"] == "free" and first["holder"] is None
    assert first["labels"] == {"soc": "sd8"}
    assert first["protocols"] == ["tether", "tvm"]
    assert first["device"] == DEVICE
    assert first["version"] == "test"
    assert first["peer"].startswith("127.0.0.1:")
    assert first["health"] == {"state": "ok", "reason": None, "since": None, "by": None, "failures": 0}
    assert first["recent_failures"] == []
    assert first["slots"] == {"total": 1, "free": 1, "granted": 0, "busy": 0}
    assert abs(first["since"] - time.time()) < 30
    summary = get_ok(hub.web_url, "/api/v1/summary")
    assert summary["servers"] == 2 and summary["by_state"]["free"] == 2 and summary["keys"] == 1


def test_a_grant_shows_the_holder_then_the_session(hub: TrackerHubThread, devices: list[Device]) -> None:
    device = Device(hub, "k", 9001)
    devices.append(device)
    with TrackerClient.connect(hub.host, hub.port) as client:
        client.request_grant("k", user="alice", timeout=5)
    row = server_row(hub, device.id)
    assert row is not None and row["state"] == "granted" and row["holder"] == "alice"
    sessions = get_ok(hub.web_url, "/api/v1/sessions")
    assert sessions["total"] == 1
    (session,) = sessions["sessions"]
    assert (session["key"], session["server"], session["user"], session["state"]) == (
        "k",
        device.id,
        "alice",
        "granted",
    )
    assert "matchkey" not in json.dumps(sessions) and device.matchkey not in json.dumps(sessions)
    device.session("start", client="127.0.0.1:40001")
    row = server_row(hub, device.id)
    assert row is not None and row["state"] == "busy" and row["holder"] == "alice"
    (session,) = get_ok(hub.web_url, "/api/v1/sessions")["sessions"]
    assert session["state"] == "busy" and session["client"] == "127.0.0.1:40001"
    device.session("end")
    device.offer()
    row = server_row(hub, device.id)
    assert row is not None and row["state"] == "free" and row["holder"] is None
    assert get_ok(hub.web_url, "/api/v1/sessions")["total"] == 0


def test_finished_sessions_reach_the_history(hub: TrackerHubThread, devices: list[Device]) -> None:
    device = Device(hub, "k", 9001)
    devices.append(device)
    with TrackerClient.connect(hub.host, hub.port) as client:
        for outcome in ("ok", "failed"):
            client.request_grant("k", user="alice", timeout=5)
            device.session("start")
            device.session("end", outcome=outcome, detail="worker lost" if outcome == "failed" else "")
            device.offer()
    rows = wait_until(lambda: get_ok(hub.web_url, "/api/v1/history")["sessions"], what="history rows")
    failed, ok = rows
    assert (failed["key"], failed["server"], failed["user"], failed["outcome"]) == ("k", device.id, "alice", "failed")
    assert failed["detail"] == "worker lost" and failed["started"] is True
    assert ok["outcome"] == "ok" and ok["waited_s"] >= 0 and ok["held_s"] >= 0 and ok["ended"] <= failed["ended"]
    assert device.matchkey not in json.dumps(rows)
    server = server_row(hub, device.id)
    assert server is not None and server["health"]["failures"] == 1
    assert server["recent_failures"][0]["outcome"] == "failed"


def test_an_admins_cordon_shows_everywhere(hub: TrackerHubThread, devices: list[Device]) -> None:
    device = Device(hub, "k", 9001)
    devices.append(device)
    devices.append(Device(hub, "k", 9002))
    reader = EventReader(hub.web_url)
    try:
        wait_until(lambda: get_ok(hub.web_url, "/api/v1/summary")["web"]["streams"] == 1, what="stream open")
        hub.call(lambda: hub.core.admin("cordon", device.id, "lead", "new firmware"))
        event = reader.next_event("health")
        assert (event["server"], event["state"], event["by"]) == (device.id, "cordoned", "lead")
    finally:
        reader.close()
    (row,) = get_ok(hub.web_url, "/api/v1/health")["servers"]
    assert (row["id"], row["state"], row["reason"], row["by"], row["connected"]) == (
        device.id,
        "cordoned",
        "new firmware",
        "lead",
        True,
    )
    server = server_row(hub, device.id)
    assert server is not None and server["state"] == "cordoned" and server["health"]["reason"] == "new firmware"
    assert get_ok(hub.web_url, "/api/v1/servers?state=cordoned")["total"] == 1
    assert get_ok(hub.web_url, "/api/v1/summary")["by_state"]["cordoned"] == 1
    device.close()
    devices.remove(device)
    row = wait_until(
        lambda: next((r for r in get_ok(hub.web_url, "/api/v1/health")["servers"] if not r["connected"]), None),
        what="the cordoned server listed while away",
    )
    assert row["id"] == device.id and row["state"] == "cordoned"


def test_queues_show_waiters_then_not(hub: TrackerHubThread, devices: list[Device]) -> None:
    devices.append(Device(hub, "k", 9001))
    with TrackerClient.connect(hub.host, hub.port) as holder, TrackerClient.connect(hub.host, hub.port) as waiter:
        holder.request_grant("k", user="alice", timeout=5)
        waiter.send(Request("k", "bob", 7, RequestOptions("r1", labels={"soc": "sd8"}, timeout=60, user="bob")))
        queue = wait_until(
            lambda: next((q for q in get_ok(hub.web_url, "/api/v1/queues")["queues"] if q["waiting"]), None),
            what="a waiter listed",
        )
        assert queue["key"] == "k" and queue["servers"] == 1 and queue["free"] == 0 and queue["granted"] == 1
        (w,) = queue["waiters"]
        assert (w["user"], w["priority"], w["labels"], w["timeout_s"]) == ("bob", 7, {"soc": "sd8"}, 60)
        assert w["waited_s"] >= 0 and queue["oldest_wait_s"] >= 0
        assert get_ok(hub.web_url, "/api/v1/queues?user=alice")["queues"] == []
        assert get_ok(hub.web_url, "/api/v1/queues?user=bob&key=k")["queues"][0]["waiting"] == 1
        assert get_ok(hub.web_url, "/api/v1/summary")["waiting"] == 1
        assert waiter.cancel("r1")
    (queue,) = get_ok(hub.web_url, "/api/v1/queues")["queues"]
    assert queue["waiting"] == 0 and queue["waiters"] == [] and queue["oldest_wait_s"] is None


def test_paging_and_filters(hub: TrackerHubThread, devices: list[Device]) -> None:
    for i in range(12):
        devices.append(Device(hub, "a" if i < 8 else "b", 9100 + i, {"soc": "sd8" if i % 2 else "sd7", "n": str(i)}))
    body = get_ok(hub.web_url, "/api/v1/servers?limit=5&offset=10")
    assert body["total"] == 12 and [r["id"] for r in body["servers"]] == ["127.0.0.1:9110", "127.0.0.1:9111"]
    pages = [get_ok(hub.web_url, f"/api/v1/servers?limit=5&offset={o}")["servers"] for o in (0, 5, 10)]
    assert [r["id"] for page in pages for r in page] == [f"127.0.0.1:{9100 + i}" for i in range(12)]
    assert get_ok(hub.web_url, "/api/v1/servers?key=b")["total"] == 4
    assert get_ok(hub.web_url, "/api/v1/servers?label=soc=sd8")["total"] == 6
    body = get_ok(hub.web_url, "/api/v1/servers?key=a&label=soc=sd8&label=n=3")
    assert [r["id"] for r in body["servers"]] == ["127.0.0.1:9103"]
    assert get_ok(hub.web_url, "/api/v1/servers?key=nope")["total"] == 0
    with TrackerClient.connect(hub.host, hub.port) as client:
        grant = client.request_grant("b", user="carol", timeout=5, labels={"n": "9"}, protocol="tether")
    assert grant.port == 9109
    body = get_ok(hub.web_url, "/api/v1/servers?user=carol")
    assert [r["id"] for r in body["servers"]] == ["127.0.0.1:9109"]
    assert get_ok(hub.web_url, "/api/v1/servers?state=granted")["total"] == 1
    assert get_ok(hub.web_url, "/api/v1/servers?state=free")["total"] == 11
    assert get_ok(hub.web_url, "/api/v1/sessions?user=carol")["total"] == 1
    assert get_ok(hub.web_url, "/api/v1/sessions?key=a")["total"] == 0


@pytest.mark.parametrize(
    ("path", "status", "needle"),
    [
        ("/api/v1/servers?limit=0", 400, "limit must be in 1..1000"),
        ("/api/v1/servers?limit=x", 400, "limit must be an integer"),
        ("/api/v1/servers?limit=100000", 400, "limit must be in"),
        ("/api/v1/servers?offset=-1", 400, "offset must be in"),
        ("/api/v1/servers?state=asleep", 400, "state must be one of"),
        ("/api/v1/servers?label=soc", 400, "label must be name=value"),
        ("/api/v1/servers?lable=soc=sd8", 400, "unknown parameter 'lable'"),
        ("/api/v1/servers?key=a&key=b", 400, "key given twice"),
        ("/api/v1/servers?key=" + "x" * 2000, 400, "longer than"),
        ("/api/v1/queues?state=free", 400, "unknown parameter"),
        ("/api/v1/history?limit=0", 400, "limit must be"),
        ("/api/v1/summary?x=1", 400, "unknown parameter"),
        ("/api/v1/nothing", 404, "no such page"),
        ("/api/v2/servers", 404, "no such page"),
    ],
)
def test_bad_requests_are_answered_in_json(hub: TrackerHubThread, path: str, status: int, needle: str) -> None:
    got, body = get(hub.web_url, path)
    assert got == status
    assert body["error"] == {400: "bad_request", 404: "not_found"}[status]
    assert needle in body["message"]


def test_only_get_and_small_bodies(hub: TrackerHubThread) -> None:
    parts = urlsplit(hub.web_url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=5)
    conn.request("POST", "/api/v1/servers", body=b"{}")
    resp = conn.getresponse()
    assert resp.status == 405 and json.loads(resp.read())["error"] == "method_not_allowed"
    conn.request("GET", "/api/v1/summary", body=b"x" * (HubConfig().max_body_bytes + 1))
    resp = conn.getresponse()
    resp.read()
    assert resp.status in (200, 413)  # a GET's body is never read; either way nothing is held
    conn.close()


def test_the_page_is_served_with_a_strict_policy(hub: TrackerHubThread) -> None:
    parts = urlsplit(hub.web_url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=5)
    conn.request("GET", "/")
    resp = conn.getresponse()
    page = resp.read().decode()
    conn.close()
    assert resp.status == 200 and resp.getheader("Content-Type", "").startswith("text/html")
    policy = resp.getheader("Content-Security-Policy", "")
    assert "default-src 'none'" in policy and "script-src 'sha256-" in policy and "connect-src 'self'" in policy
    assert "<title>tether pool</title>" in page
    assert "innerHTML" not in page and "http://" not in page and "https://" not in page  # nothing from elsewhere


# -- history, health ----------------------------------------------------------------------------------


def emit(hub: TrackerHubThread, kind: str, **fields: Any) -> None:
    hub.call(lambda: hub.core.events.emit(kind, **fields))


def test_history_keeps_the_last_finished_sessions(hub: TrackerHubThread) -> None:
    emit(hub, "grant", key="k", server="127.0.0.1:9001", user="alice", matchkey="m1", waited_s=1.5, id="r1")
    emit(hub, "session_end", key="k", server="127.0.0.1:9001", user="alice", matchkey="m1", held_s=3.0, outcome="ok")
    emit(hub, "session_end", key="j", server="127.0.0.1:9002", user="bob", matchkey="m2", held_s=1.0, outcome="failed")
    body = get_ok(hub.web_url, "/api/v1/history")
    assert body["source"] == "memory"
    newest, oldest = body["sessions"]
    assert (newest["key"], newest["user"], newest["outcome"], newest["waited_s"]) == ("j", "bob", "failed", None)
    assert (oldest["server"], oldest["waited_s"], oldest["held_s"], oldest["outcome"]) == (
        "127.0.0.1:9001",
        1.5,
        3.0,
        "ok",
    )
    assert "m1" not in json.dumps(body)
    assert [r["user"] for r in get_ok(hub.web_url, "/api/v1/history?user=alice")["sessions"]] == ["alice"]
    assert len(get_ok(hub.web_url, "/api/v1/history?limit=1")["sessions"]) == 1


def test_history_is_bounded() -> None:
    history = History(size=3)
    for i in range(10):
        history.on_event(TrackerEvent("grant", float(i), "k", "s", "u", {"matchkey": f"m{i}", "waited_s": 0.1}))
    for i in range(10):
        history.on_event(TrackerEvent("session_end", 10.0 + i, "k", "s", "u", {"matchkey": f"m{i}", "held_s": 1}))
    assert len(history) == 3
    assert [r["ended"] for r in history.rows(10)] == [19.0, 18.0, 17.0]


class FakeJournal:
    def __init__(self, fail: bool = False) -> None:
        self.fail = fail
        self.asked: list[dict[str, Any]] = []

    def finished(self, *, limit: int, key: str | None = None, user: str | None = None) -> list[dict[str, Any]]:
        self.asked.append({"limit": limit, "key": key, "user": user})
        if self.fail:
            raise OSError("disk gone")
        return [{"key": key, "user": user, "outcome": "ok", "server": "s", "waited_s": 0, "held_s": 1}]


def test_history_prefers_the_journal(caplog: pytest.LogCaptureFixture) -> None:
    journal = FakeJournal()
    config = TrackerConfig(host="127.0.0.1", port=0)
    with TrackerHubThread(config, HubConfig(host="127.0.0.1", port=0), journal=journal) as t:
        body = get_ok(t.web_url, "/api/v1/history?limit=7&key=k&user=u")
        assert body["source"] == "journal" and body["sessions"][0]["key"] == "k"
        assert journal.asked == [{"limit": 7, "key": "k", "user": "u"}]
        assert get_ok(t.web_url, "/api/v1/summary")["web"]["journal"] is True
        journal.fail = True
        body = get_ok(t.web_url, "/api/v1/history")
        assert body["source"] == "memory" and body["sessions"] == []
    assert "reading the journal's sessions failed" in caplog.text


def test_health_without_a_health_check_is_all_ok(hub: TrackerHubThread, devices: list[Device]) -> None:
    devices.append(Device(hub, "k", 9001))
    body = get_ok(hub.web_url, "/api/v1/health")
    if not hasattr(hub.core, "standing"):
        assert body == {"time": body["time"], "checked": False, "servers": []}
    else:
        assert body["checked"] is True and body["servers"] == []


def test_a_quarantined_server_shows_with_its_reason(hub: TrackerHubThread, devices: list[Device]) -> None:
    """Failed sessions in a row quarantine a server (the core's device health): the API says so, and why."""
    bad = Device(hub, "k", 9001)
    devices.append(bad)
    after = hub.core.config.quarantine_after
    with TrackerClient.connect(hub.host, hub.port) as client:
        for _ in range(after):
            client.request_grant("k", user="alice", timeout=5)
            bad.session("start")
            bad.session("end", outcome="failed", detail="worker lost")
            bad.offer()
    devices.append(Device(hub, "k", 9002))
    (row,) = get_ok(hub.web_url, "/api/v1/health")["servers"]
    assert (row["id"], row["state"], row["by"], row["connected"]) == (bad.id, "quarantined", "tracker", True)
    assert "failed sessions in a row" in row["reason"] and row["failures"] == after
    server = server_row(hub, bad.id)
    assert server is not None and server["state"] == "quarantined" and server["holder"] is None
    assert server["health"]["state"] == "quarantined"
    assert abs(server["since"] - time.time()) < 60  # its slot, withheld, was offered just now
    assert [f["outcome"] for f in server["recent_failures"]] == ["failed"] * after
    assert [r["id"] for r in get_ok(hub.web_url, "/api/v1/servers?state=quarantined")["servers"]] == [bad.id]
    assert [r["id"] for r in get_ok(hub.web_url, "/api/v1/servers?state=free")["servers"]] == ["127.0.0.1:9002"]
    assert get_ok(hub.web_url, "/api/v1/summary")["by_state"]["quarantined"] == 1


# -- events -----------------------------------------------------------------------------------------


class EventReader:
    """An ``/api/v1/events`` stream read line by line with a deadline."""

    def __init__(self, base: str) -> None:
        parts = urlsplit(base)
        self.conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
        self.conn.request("GET", "/api/v1/events")
        self.resp = self.conn.getresponse()

    def next_event(self, kind: str | None = None, timeout: float = 5.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = self.resp.readline().decode()
            if not line:
                raise EOFError("the stream ended")
            if line.startswith("data: "):
                event: dict[str, Any] = json.loads(line[6:])
                if kind is None or event.get("kind") == kind:
                    return event
        pytest.fail(f"no {kind or 'event'} within {timeout} s")

    def close(self) -> None:
        self.conn.close()


def test_events_are_relayed_without_matchkeys(hub: TrackerHubThread) -> None:
    reader = EventReader(hub.web_url)
    try:
        assert reader.resp.status == 200
        assert reader.resp.getheader("Content-Type") == "text/event-stream"
        wait_until(lambda: get_ok(hub.web_url, "/api/v1/summary")["web"]["streams"] == 1, what="stream open")
        emit(hub, "grant", key="k", server="127.0.0.1:9001", user="alice", matchkey="secret", waited_s=0.25, id="r")
        event = reader.next_event("grant")
        assert event["user"] == "alice" and event["server"] == "127.0.0.1:9001" and event["waited_s"] == 0.25
        assert "matchkey" not in event
    finally:
        reader.close()
    wait_until(lambda: get_ok(hub.web_url, "/api/v1/summary")["web"]["streams"] == 0, what="stream closed")


def test_a_grant_reaches_the_event_stream(hub: TrackerHubThread, devices: list[Device]) -> None:
    """The tracker's own events (``core.events``, emitted by the core) arrive as they happen."""
    devices.append(Device(hub, "k", 9001))
    reader = EventReader(hub.web_url)
    try:
        wait_until(lambda: get_ok(hub.web_url, "/api/v1/summary")["web"]["streams"] == 1, what="stream open")
        with TrackerClient.connect(hub.host, hub.port) as client:
            client.request_grant("k", user="alice", timeout=5)
        event = reader.next_event("grant")
        assert (event["key"], event["user"], event["server"]) == ("k", "alice", "127.0.0.1:9001")
        assert "matchkey" not in event
    finally:
        reader.close()


def test_streams_are_capped() -> None:
    with start_hub(max_streams=2) as t:
        readers = [EventReader(t.web_url) for _ in range(2)]
        try:
            wait_until(lambda: get_ok(t.web_url, "/api/v1/summary")["web"]["streams"] == 2, what="two streams")
            status, body = get(t.web_url, "/api/v1/events")
            assert status == 503 and body["error"] == "too_many_streams"
        finally:
            for r in readers:
                r.close()
        wait_until(lambda: get_ok(t.web_url, "/api/v1/summary")["web"]["streams"] == 0, what="streams closed")


def test_a_slow_stream_is_dropped_not_buffered() -> None:
    import asyncio

    async def run() -> None:
        streams = EventStreams(max_streams=4, queue_size=3)
        slow, fast = streams.open(), streams.open()
        assert slow is not None and fast is not None
        for i in range(3):
            streams.on_event(TrackerEvent("request", float(i), "k"))
            await fast.queue.get()
        assert len(streams) == 2 and slow.queue.qsize() == 3
        streams.on_event(TrackerEvent("request", 3.0, "k"))
        assert slow.dropped and len(streams) == 1 and streams.dropped == 1
        assert [slow.queue.get_nowait(), slow.queue.get_nowait()] == [DROPPED, None]
        assert not fast.dropped and fast.queue.qsize() == 1

    asyncio.run(run())


# -- the CLI ----------------------------------------------------------------------------------------


def test_cli_serves_the_page_on_the_trackers_loop(cli: Callable[..., CliProcess]) -> None:
    proc = cli("tracker", "--port", "0", "--web-port", "0")
    host, port = proc.listening()
    line = proc.wait_line("web page on ")
    url = line.split("web page on ", 1)[1].strip()
    assert url.startswith("http://127.0.0.1:") and url.endswith("/")  # --web-host defaults to --host
    server = RawPeer(host, port)  # a TVM server, registered with the CLI's tracker
    try:
        assert server.call([5, {"key": "server:cli", "addr": [None, 9009]}]) == 0
        assert server.call([3, "cli", [9009, "cli:1"], None]) == 0
        body = get_ok(url, "/api/v1/servers")
    finally:
        server.close()
    assert [(r["id"], r["key"], r["state"], r["protocols"]) for r in body["servers"]] == [
        ("127.0.0.1:9009", "cli", "free", ["tvm"])
    ]
    reader = EventReader(url)  # an open event stream does not hold the tracker's shutdown up
    try:
        assert proc.stop() == 0
    finally:
        reader.close()


def test_cli_with_a_journal_and_metrics(cli: Callable[..., CliProcess], tmp_path: Path) -> None:
    """``--db`` and ``--web-port`` together: the history is read from the journal (and is still there after
    a restart on the same file), and ``/metrics`` is served on the page's port."""
    db = tmp_path / "history.db"
    proc = cli("tracker", "--port", "0", "--web-port", "0", "--db", str(db))
    host, port = proc.listening()
    url = proc.wait_line("web page on ").split("web page on ", 1)[1].strip()
    device = Device(SimpleNamespace(host=host, port=port), "k", 9001)  # type: ignore[arg-type]
    try:
        with TrackerClient.connect(host, port) as client:
            client.request_grant("k", user="alice", timeout=5)
            device.session("start")
            device.session("end", outcome="ok")
            device.offer()
        body = wait_until(
            lambda: (b := get_ok(url, "/api/v1/history?user=alice"))["sessions"] and b, what="a journal row"
        )
        assert body["source"] == "journal"
        row = body["sessions"][0]
        assert (row["key"], row["server"], row["user"], row["outcome"], row["started"]) == (
            "k",
            device.id,
            "alice",
            "ok",
            True,
        )
        assert row["held_s"] >= 0 and row["waited_s"] >= 0 and row["granted"] <= row["ended"]
        with urllib.request.urlopen(url + "metrics", timeout=5) as resp:
            text = resp.read().decode()
        assert resp.headers["Content-Type"].startswith("text/plain")
        assert 'tether_tracker_sessions_total{key="k",outcome="ok"} 1.0' in text
    finally:
        device.close()
    assert proc.stop() == 0
    proc = cli("tracker", "--port", "0", "--web-port", "0", "--db", str(db))
    proc.listening()
    url = proc.wait_line("web page on ").split("web page on ", 1)[1].strip()
    rows = get_ok(url, "/api/v1/history")["sessions"]
    assert [(r["user"], r["outcome"]) for r in rows] == [("alice", "ok")]
    assert proc.stop() == 0


_CHECK_IMPORTS = """
import sys
import tether.cli.tracker as t
serve = t.TrackerServer.serve_until_stopped
async def report_then_stop(self):
    print("aiohttp imported:", "aiohttp" in sys.modules, flush=True)
    self.stop()
    await serve(self)
t.TrackerServer.serve_until_stopped = report_then_stop
from tether.cli import main
sys.exit(main(["tracker", "--port", "0", *sys.argv[1:]]))
"""


def test_the_tracker_without_web_port_does_not_import_aiohttp() -> None:
    done = subprocess.run([sys.executable, "-c", _CHECK_IMPORTS], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert "aiohttp imported: False" in done.stdout
    done = subprocess.run(
        [sys.executable, "-c", _CHECK_IMPORTS, "--web-port", "0"], capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 0, done.stderr
    assert "aiohttp imported: True" in done.stdout and "web page on http://127.0.0.1:" in done.stdout


def test_without_aiohttp_the_web_port_says_what_to_install() -> None:
    code = "import sys; sys.modules['aiohttp'] = None; from tether.cli import main; sys.exit(main(sys.argv[1:]))"
    done = subprocess.run(
        [sys.executable, "-c", code, "tracker", "--port", "0", "--web-port", "0"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 2
    assert "pip install 'tether[hub]'" in done.stderr
    assert "Traceback" not in done.stderr and "listening on" not in done.stdout
    # and without --web-port, the same interpreter runs the tracker
    done = subprocess.run(
        [sys.executable, "-c", code.replace("main(sys.argv[1:])", "main(['tracker', '--help'])")],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0 and "--web-port" in done.stdout


def test_more_routes_are_served_beside_the_api() -> None:
    """More routes join the page's port with :meth:`Hub.add_route` before the start; ``/metrics`` is there
    by itself (``HubConfig.metrics``)."""
    from aiohttp import web

    from tether.aio.loop_thread import LoopThread
    from tether.hub.service import TrackerHub

    async def metrics(request: web.Request) -> web.StreamResponse:
        return web.Response(text="tether_up 1\n")

    service = TrackerHub(TrackerConfig(host="127.0.0.1", port=0), HubConfig(host="127.0.0.1", port=0))
    service.hub.add_route("GET", "/extra", metrics)
    with LoopThread(service, "tracker-hub"):
        with urllib.request.urlopen(service.hub.url + "extra", timeout=5) as resp:
            assert resp.read() == b"tether_up 1\n"
        with urllib.request.urlopen(service.hub.url + "metrics", timeout=5) as resp:
            assert b"tether_tracker_" in resp.read()
        assert get_ok(service.hub.url, "/api/v1/summary")["servers"] == 0
        with pytest.raises(RuntimeError, match="before start"):
            service.hub.add_route("GET", "/late", metrics)
