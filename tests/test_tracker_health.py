"""Events, device health and admin operations in the tracker's core: fake links, a hand-driven clock."""

from __future__ import annotations

from typing import Any

import pytest

from tether.protocol import Put, SessionEvent, decode_message, encode_message
from tether.protocol.tracker import Admin, Control
from tether.tracker.events import TrackerEvent
from tether.tracker.health import Health

from .test_tracker_core import Harness, tether_req

pytestmark = pytest.mark.timeout(30)

TETHER = {"protocols": ["tvm", "tether"], "heartbeat": 2, "slots": 1}


def recorder(h: Harness) -> list[TrackerEvent]:
    events: list[TrackerEvent] = []
    h.core.events.subscribe(events.append)
    return events


def session(h: Harness, server: Any, client: Any, rid: str, matchkey: str, outcome: str | None = "ok") -> None:
    """A request granted ``matchkey``, the session starts and ends with ``outcome``; the server offers the
    slot again under a new matchkey (as a tether server does)."""
    h.core.receive(client, tether_req("k", rid, protocol="tether", user="bob"))
    h.core.receive(server, SessionEvent("start", matchkey, "10.0.0.2:5555"))
    h.clock.now += 1.0
    h.core.receive(server, SessionEvent("end", matchkey, None, outcome, "worker killed" if outcome else None))


def test_events_follow_a_request_a_grant_and_a_session() -> None:
    h = Harness()
    events = recorder(h)
    server, _ = h.server("k", tether=TETHER)
    client, _clink = h.connect("10.0.0.2")
    h.core.receive(client, tether_req("k", "r0", protocol="tether", user="bob"))  # granted at once
    h.core.receive(client, tether_req("k", "r1", protocol="tether", user="bob"))  # waits
    h.clock.now += 2.0
    h.core.receive(server, SessionEvent("start", "k:9090:0", "10.0.0.2:5555"))
    h.clock.now += 3.0
    h.core.receive(server, SessionEvent("end", "k:9090:0"))
    h.core.receive(server, Put("k", 9090, "k:9090:1"))  # the next request gets it
    h.core.disconnect(client)
    kinds = [e.kind for e in events]
    assert kinds == ["register", "grant", "request", "session_start", "session_end", "grant"]
    grant, waited = events[1], events[5]
    assert grant.server == "10.0.0.9:9090" and grant.user == "bob" and grant.fields["waited_s"] == 0
    assert waited.fields["waited_s"] == pytest.approx(5.0) and waited.fields["id"] == "r1"
    end = events[4]
    assert end.fields["outcome"] == "ok" and end.fields["held_s"] == pytest.approx(3.0)
    # the second grant was never redeemed when its client left: still the server's until it says so
    h.core.disconnect(server)
    assert events[-2].kind == "session_end" and events[-2].fields["outcome"] == "never_started"
    assert events[-1].kind == "unregister" and events[-1].fields["reason"] == "closed"
    assert all(e.as_dict()["kind"] == e.kind for e in events)


def test_three_failures_in_a_row_quarantine_a_server_and_a_canary_brings_it_back() -> None:
    h = Harness(quarantine_after=3, canary_interval_s=30)
    events = recorder(h)
    server, slink = h.server("k", tether=TETHER)
    client, clink = h.connect("10.0.0.2")
    session(h, server, client, "a", "k:9090:0", "failed")
    h.core.receive(server, Put("k", 9090, "k:9090:1"))
    session(h, server, client, "b", "k:9090:1", "ok")  # an ok session resets the count
    h.core.receive(server, Put("k", 9090, "k:9090:2"))
    for i in range(3):
        session(h, server, client, f"c{i}", f"k:9090:{2 + i}", "no_request" if i else "failed")
        h.core.receive(server, Put("k", 9090, f"k:9090:{3 + i}"))
    standing = h.core.standing("10.0.0.9:9090")
    assert standing["state"] == "quarantined" and standing["failures"] == 3
    assert "3 failed sessions in a row" in standing["reason"] and len(standing["recent_failures"]) == 4
    assert [e.fields["state"] for e in events if e.kind == "health"] == ["quarantined"]
    clink.replies()
    # not granted: the request waits, and the reason says why
    h.core.receive(client, tether_req("k", "w", protocol="tether", user="bob", timeout=100))
    assert clink.replies() == []
    detail = h.summary(detail=True)["tether"]
    assert detail["keys"]["k"]["free"] == 0
    (entry,) = detail["servers"]
    assert entry["server"] == "10.0.0.9:9090" and entry["health"]["state"] == "quarantined"
    assert entry["slots"][0]["state"] == "quarantined"
    # the tracker asks the server for a canary; a failed one keeps it out
    h.advance(0.1)
    slink.replies()
    h.core.receive(server, Control({"poll": True}))
    ((code, orders),) = slink.replies()
    assert code == 0 and orders == [{"op": "canary", "id": orders[0]["id"]}]
    h.core.receive(server, Control({"canary": orders[0]["id"], "ok": False, "detail": "wrong output"}))
    assert slink.replies() == [0]
    assert h.core.standing("10.0.0.9:9090")["reason"] == "canary failed: wrong output"
    # the next round asks again; this one passes: the waiting request gets the server at once
    for _ in range(10):  # 30 s of a server that polls every 3 s
        h.clock.now += 3.0
        h.core.receive(server, Control({"poll": True}))
        h.core.on_timer()
    slink.replies()
    h.core.receive(server, Control({"poll": True}))
    ((_, orders),) = slink.replies()
    h.core.receive(server, Control({"canary": orders[0]["id"], "ok": True, "detail": "onnxruntime 1 ms"}))
    assert h.core.standing("10.0.0.9:9090")["state"] == "ok"
    (grant,) = clink.replies()
    assert grant[0] == 0 and grant[1][2] == "k:9090:5"
    # an answer to a canary nobody asked for is refused
    h.core.receive(server, Control({"canary": 999, "ok": True}))
    assert slink.replies()[-1] == -1


def test_admin_cordon_drain_uncordon_release_are_idempotent() -> None:
    h = Harness()
    events = recorder(h)
    server, slink = h.server("k", tether=TETHER)
    admin, alink = h.connect("127.0.0.1")

    def op(name: str, target: str = "10.0.0.9:9090") -> Any:
        h.core.receive(admin, Admin(name, target))
        ((code, body),) = alink.replies()
        return code, body

    code, body = op("cordon")
    assert code == 0 and body["changed"] and body["standing"]["state"] == "cordoned"
    assert op("cordon")[1]["changed"] is False  # idempotent
    client, clink = h.connect("10.0.0.2")
    h.core.receive(client, tether_req("k", "r", protocol="tether", timeout=5))
    assert clink.replies() == []  # cordoned: not granted
    assert "not granted: 10.0.0.9:9090 cordoned" in h.core._diagnose(next(iter(client.waiters)))[1]
    assert op("uncordon")[1]["standing"]["state"] == "ok"
    assert clink.replies()[0][0] == 0  # granted at once
    h.core.receive(server, SessionEvent("start", "k:9090:0", "10.0.0.2:1"))
    # drain: the running session goes on; the server is cordoned when it ends
    assert op("drain")[1]["standing"]["state"] == "draining"
    h.core.receive(server, SessionEvent("end", "k:9090:0"))
    assert h.core.standing("10.0.0.9:9090")["state"] == "cordoned"
    assert op("uncordon")[1]["changed"] is True
    # release: a stuck session ends at the tracker, and the server is told to end it
    h.core.receive(server, Put("k", 9090, "k:9090:1"))
    h.core.receive(client, tether_req("k", "r2", protocol="tether"))
    h.core.receive(server, SessionEvent("start", "k:9090:1", "10.0.0.2:1"))
    code, body = op("release")
    assert code == 0 and body["released"] == 1
    assert op("release")[1]["released"] == 0
    slink.replies()
    h.core.receive(server, Control({"poll": True}))
    assert slink.replies() == [[0, [{"op": "release", "matchkey": "k:9090:1"}]]]
    assert [e.fields["outcome"] for e in events if e.kind == "session_end"] == ["ok", "released"]
    # unknown servers: a clear error naming the near ones
    code, body = op("cordon", "10.0.0.9:9091")
    assert code == -1 and body["error"] == "unknown_server" and "10.0.0.9:9090" in body["message"]


def test_admin_without_authentication_only_from_the_trackers_host() -> None:
    h = Harness()
    h.server("k", tether=TETHER)
    remote, link = h.connect("10.0.0.5")
    h.core.receive(remote, Admin("cordon", "10.0.0.9:9090"))
    ((code, body),) = link.replies()
    assert code == -1 and body["error"] == "forbidden" and "--auth-file" in body["message"]
    assert h.core.standing("10.0.0.9:9090")["state"] == "ok"


def test_a_silent_server_counts_as_a_failure() -> None:
    h = Harness(quarantine_after=1)
    h.server("k", tether=TETHER)
    h.advance(10.0)  # 3 missed heartbeats of 2 s (capped at 9 s)
    assert h.core.standing("10.0.0.9:9090")["state"] == "quarantined"
    assert h.core.standing("10.0.0.9:9090")["recent_failures"][0]["outcome"] == "silent"
    # it comes back while quarantined: its slot is kept, not granted
    _server, _ = h.server("k", tether=TETHER)
    assert h.summary()["queue_info"]["k"]["free"] == 0


def test_new_messages_round_trip() -> None:
    for msg in (
        Admin("drain", "h:1", "rack move"),
        Control({"poll": True}),
        SessionEvent("end", "mk", None, "failed", "exit -9"),
    ):
        assert decode_message(encode_message(msg)[4:]) == msg


def test_health_rules() -> None:
    health = Health(quarantine_after=2, max_servers=2)
    assert not health.set("a", "ok", None, "x", 1.0)
    assert health.set("a", "cordoned", "why", "admin", 1.0) and not health.set("a", "cordoned", "w", "admin", 2.0)
    assert health.outcome("b", "failed", "", 1.0) is False and health.outcome("b", "failed", "", 2.0) is True
    with pytest.raises(OverflowError):
        health.set("c", "cordoned", None, "admin", 3.0)  # two servers withheld: the cap
    health.restore("a", "ok", None, None, None)  # ok is not restored (nothing to keep)
    with pytest.raises(ValueError):
        health.set("a", "gone", None, "admin", 1.0)
