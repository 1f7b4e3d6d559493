"""The tracker's logic with fake links and a hand-driven clock: no sockets, no sleeping."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tether.errors import RemoteProtocolError
from tether.protocol import (
    Cancel,
    GetPendingMatchkeys,
    Ping,
    Put,
    Request,
    RequestOptions,
    SessionEvent,
    Stop,
    Summary,
    UpdateInfo,
    Withdraw,
    decode_message,
)
from tether.tracker import TrackerConfig, TrackerCore
from tether.tracker.registry import Connection


class FakeLink:
    def __init__(self) -> None:
        self.sent: list[bytes] = []
        self.closed = False

    def send(self, data: bytes) -> None:
        self.sent.append(data)

    def close(self) -> None:
        self.closed = True

    def replies(self) -> list[Any]:
        out = [json.loads(frame[4:]) for frame in self.sent]
        self.sent.clear()
        return out


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Harness:
    def __init__(self, **config: Any) -> None:
        self.clock = Clock()
        self.stopped = False
        self.wakeups: list[float] = []
        self.core = TrackerCore(
            TrackerConfig(stop_key="sk", **config),
            clock=self.clock,
            wall=lambda: 0.0,
            wakeup=self.wakeups.append,
            on_stop=lambda: setattr(self, "stopped", True),
        )

    def connect(self, host: str = "10.0.0.9") -> tuple[Connection, FakeLink]:
        link = FakeLink()
        return self.core.connect(link, host, 40000), link

    def server(
        self, key: str, port: int = 9090, n: int = 1, tether: dict[str, Any] | None = None, host: str = "10.0.0.9"
    ) -> tuple[Connection, FakeLink]:
        conn, link = self.connect(host)
        info: dict[str, Any] = {"key": f"server:{key}", "addr": [None, port]}
        if tether is not None:
            info["tether"] = tether
        self.core.receive(conn, UpdateInfo(info))
        for i in range(n):
            self.core.receive(conn, Put(key, port, f"{key}:{port}:{i}"))
        assert link.replies() == [0] * (n + 1)
        return conn, link

    def summary(self, detail: bool = False) -> dict[str, Any]:
        conn, link = self.connect()
        self.core.receive(conn, Summary(detail))
        (reply,) = link.replies()
        self.core.disconnect(conn)
        assert reply[0] == 0
        return reply[1]  # type: ignore[no-any-return]

    def advance(self, dt: float) -> None:
        self.clock.now += dt
        self.core.on_timer()


def tether_req(key: str, rid: str = "r1", **opts: Any) -> Request:
    return Request(key, opts.pop("user", "alice"), opts.pop("priority", 1), RequestOptions(rid, **opts))


def test_put_request_grant_with_tvms_exact_reply() -> None:
    h = Harness()
    server, slink = h.server("foo")
    client, clink = h.connect("10.0.0.2")
    h.core.receive(server, GetPendingMatchkeys())
    assert slink.replies() == [["foo:9090:0"]]
    h.core.receive(client, Request("foo", "", 1))
    body = b'[0, ["10.0.0.9", 9090, "foo:9090:0"]]'
    assert clink.sent == [len(body).to_bytes(4, "little") + body]
    h.core.receive(server, GetPendingMatchkeys())
    assert slink.replies() == [[]]


def test_custom_addr_and_peer_ip() -> None:
    h = Harness()
    conn, _link = h.connect("10.1.1.1")
    h.core.receive(conn, UpdateInfo({"key": "server:k", "addr": [None, "9091"]}))
    h.core.receive(conn, Put("k", 9091, "k:1", "192.168.0.7"))
    summary = h.summary()
    assert summary["server_info"] == [{"key": "server:k", "addr": ["10.1.1.1", "9091"]}]
    client, clink = h.connect()
    h.core.receive(client, Request("k", "", 1))
    assert clink.replies()[-1] == [0, ["192.168.0.7", 9091, "k:1"]]


def test_duplicate_put_counts_once_and_slots_belong_to_their_connection() -> None:
    h = Harness()
    conn, _link = h.connect()
    for _ in range(3):
        h.core.receive(conn, Put("k", 1, "k:same"))  # no UPDATE_INFO at all
    assert h.summary()["queue_info"]["k"] == {"free": 1, "pending": 0}
    h.core.disconnect(conn)
    assert h.summary()["queue_info"]["k"] == {"free": 0, "pending": 0}


def test_waiter_whose_connection_closes_leaves_at_once() -> None:
    h = Harness()
    client, _ = h.connect()
    h.core.receive(client, Request("k", "", 1))
    assert h.summary()["queue_info"]["k"]["pending"] == 1
    h.core.disconnect(client)
    assert h.summary()["queue_info"]["k"]["pending"] == 0
    _server, _ = h.server("k")  # the slot stays free: nobody dead took it
    assert h.summary()["queue_info"]["k"] == {"free": 1, "pending": 0}


def test_tvm_server_put_again_ends_its_grant_but_a_proxy_keeps_others() -> None:
    h = Harness()
    server, _ = h.server("k")
    client, _ = h.connect()
    h.core.receive(client, Request("k", "", 1))
    assert h.summary(detail=True)["tether"]["keys"]["k"]["busy"] == 1
    h.core.receive(server, Put("k", 9090, "k:fresh"))
    detail = h.summary(detail=True)["tether"]
    assert detail["keys"]["k"] == {"total": 1, "free": 1, "busy": 0, "pending": 0, "waiters": []}

    proxy, _plink = h.connect()
    h.core.receive(proxy, UpdateInfo({"key": "server:proxy[p]", "addr": [None, 9090]}))
    h.core.receive(proxy, Put("p", 9090, "p:1"))
    h.core.receive(proxy, Put("p", 9090, "p:2"))
    h.core.receive(client, Request("p", "", 1))
    h.core.receive(proxy, Put("p", 9090, "p:3"))  # another server behind the proxy
    keys = h.summary(detail=True)["tether"]["keys"]
    assert keys["p"]["total"] == 3 and keys["p"]["busy"] == 1 and keys["p"]["free"] == 2


def test_proxy_offers_slots_with_their_own_protocols_and_labels_and_withdraws_them() -> None:
    h = Harness()
    proxy, plink = h.connect()
    h.core.receive(proxy, UpdateInfo({"key": "server:proxy[p]", "addr": [None, 9090]}))
    h.core.receive(proxy, Put("p", 9090, "p:tvm"))  # a TVM server behind the proxy
    h.core.receive(proxy, Put("p", 9090, "p:t", None, frozenset({"tether"}), {"soc": "a"}))
    h.core.receive(proxy, Put("p", 9090, "p:gone", None, frozenset({"tether", "tvm"}), {"soc": "b"}))
    assert plink.replies() == [0, 0, 0, 0]
    client, clink = h.connect()
    h.core.receive(client, tether_req("p", "r1", protocol="tether", labels={"soc": "a"}))
    (grant,) = clink.replies()
    assert grant[1][2] == "p:t" and grant[2]["server"]["protocols"] == ["tether"]
    assert grant[2]["server"]["labels"] == {"soc": "a"}
    # the server behind p:gone went away: withdrawn, nobody gets it; unknown matchkeys answer -1
    h.core.receive(proxy, Withdraw("p:gone"))
    h.core.receive(proxy, Withdraw("p:never"))
    assert plink.replies() == [0, -1]
    h.core.receive(client, tether_req("p", "r2", protocol="tether", labels={"soc": "b"}, timeout=0))
    (failed,) = clink.replies()
    assert failed[0] == -1
    # a plain TVM request only gets the TVM-capable slot, and a late UPDATE_INFO keeps the PUT's terms
    h.core.receive(
        proxy, UpdateInfo({"key": "server:proxy[p]", "addr": [None, 9090], "tether": {"protocols": ["tvm"]}})
    )
    h.core.receive(client, Request("p", "", 1))
    assert clink.replies() == [[0, ["10.0.0.9", 9090, "p:tvm"]]]


def test_heartbeat_silence_removes_server() -> None:
    h = Harness()
    server, link = h.server("k", tether={"heartbeat": 1.0, "protocols": ["tvm", "tether"]})
    assert h.wakeups and h.wakeups[-1] == pytest.approx(h.clock.now + 3.0)
    for _ in range(5):  # heartbeats keep it
        h.clock.now += 2.0
        h.core.receive(server, Ping())
        h.core.on_timer()
    assert not link.closed and h.summary()["queue_info"]["k"]["free"] == 1
    h.advance(2.9)
    assert not link.closed
    h.advance(0.2)
    assert link.closed
    assert h.summary()["queue_info"]["k"]["free"] == 0
    assert h.summary()["server_info"] == []


def test_silence_limit_is_capped() -> None:
    h = Harness()
    _, link = h.server("k", tether={"heartbeat": 60.0})
    h.advance(9.5)  # 3 x 60 s promised, but never more than max_silence_s (9 s)
    assert link.closed


def test_request_timeout_and_zero_timeout() -> None:
    h = Harness()
    client, link = h.connect()
    h.core.receive(client, tether_req("k", timeout=2.0))
    assert h.wakeups[-1] == pytest.approx(h.clock.now + 2.0)
    h.advance(1.0)
    assert link.replies() == []
    h.advance(1.5)
    (reply,) = link.replies()
    assert reply[0] == -1 and reply[1]["error"] == "timeout" and reply[1]["id"] == "r1"
    assert h.summary()["queue_info"]["k"]["pending"] == 0
    h.core.receive(client, tether_req("k", "r2", timeout=0))
    assert link.replies()[0][1]["error"] == "timeout"


def test_cancel() -> None:
    h = Harness()
    client, link = h.connect()
    h.core.receive(client, tether_req("k", "r1"))
    h.core.receive(client, Cancel("nope"))
    assert link.replies() == [-1]
    h.core.receive(client, Cancel("r1"))
    cancelled, ok = link.replies()
    assert cancelled[1]["error"] == "cancelled" and ok == 0
    assert h.summary()["queue_info"]["k"]["pending"] == 0


def test_plain_tvm_request_only_gets_tvm_capable_slots() -> None:
    h = Harness()
    h.server("k", tether={"protocols": ["tether"]})
    client, link = h.connect()
    h.core.receive(client, Request("k", "", 1))
    assert link.replies() == [] and h.summary()["queue_info"]["k"] == {"free": 1, "pending": 1}
    other, olink = h.connect()
    h.core.receive(other, tether_req("k", protocol="tether"))
    (grant,) = olink.replies()
    assert grant[0] == 0 and grant[2]["server"]["protocols"] == ["tether"]
    h.server("k", port=9091)  # a TVM server: the plain request gets it
    assert link.replies() == [[0, ["10.0.0.9", 9091, "k:9091:0"]]]


def test_labels_and_late_update_info_requeue() -> None:
    h = Harness()
    conn, _link = h.connect()
    h.core.receive(conn, Put("k", 1, "k:1"))  # offered before its labels were known
    client, clink = h.connect()
    h.core.receive(client, tether_req("k", labels={"gpu": "a100"}))
    assert clink.replies() == []
    h.core.receive(conn, UpdateInfo({"key": "server:k", "addr": [None, 1], "tether": {"labels": {"gpu": "a100"}}}))
    (grant,) = clink.replies()
    assert grant[1] == ["10.0.0.9", 1, "k:1"] and grant[2]["server"]["labels"] == {"gpu": "a100"}


def test_unknown_protocol_and_duplicate_id_rejected() -> None:
    h = Harness()
    client, link = h.connect()
    h.core.receive(client, tether_req("k", protocol="grpc"))
    assert link.replies()[0][1]["error"] == "rejected"
    h.core.receive(client, tether_req("k", "same"))
    h.core.receive(client, tether_req("k", "same"))
    assert link.replies()[0][1]["error"] == "rejected"


def test_session_events_show_holder_and_since() -> None:
    h = Harness()
    server, _slink = h.server("k", tether={"protocols": ["tvm", "tether"], "heartbeat": 2})
    client, _ = h.connect("10.0.0.2")
    h.core.receive(client, tether_req("k", protocol="tether", user="bob"))
    h.clock.now += 1.0
    h.core.receive(server, SessionEvent("start", "k:9090:0", "10.0.0.2:5555"))
    h.clock.now += 2.5
    (entry,) = h.summary(detail=True)["tether"]["servers"]
    (slot,) = entry["slots"]
    assert slot["state"] == "busy" and slot["user"] == "bob" and slot["peer"] == "10.0.0.2:5555"
    assert slot["since_s"] == pytest.approx(2.5)
    h.core.receive(server, Put("k", 9090, "k:9090:1"))  # a tether server's PUT does not end other sessions
    assert len(h.summary(detail=True)["tether"]["servers"][0]["slots"]) == 2
    h.core.receive(server, SessionEvent("end", "k:9090:0"))
    assert [s["state"] for s in h.summary(detail=True)["tether"]["servers"][0]["slots"]] == ["free"]


def test_a_replaced_unredeemed_grant_is_not_a_phantom_slot() -> None:
    """A 2-slot tether server whose grant was never redeemed offers the slot again under a new matchkey:
    the old grant leaves at once (WITHDRAW), or when the slot count says it must be over (no WITHDRAW)."""
    h = Harness()
    server, slink = h.server("k", n=2, tether={"protocols": ["tvm", "tether"], "slots": 2})
    client, _ = h.connect("10.0.0.2")
    h.core.receive(client, tether_req("k", rid="a", protocol="tether"))
    h.core.receive(client, tether_req("k", rid="b", protocol="tether"))
    states = [s["state"] for s in h.summary(detail=True)["tether"]["servers"][0]["slots"]]
    assert states == ["granted", "granted"]
    h.core.receive(server, Withdraw("k:9090:0"))
    h.core.receive(server, Put("k", 9090, "k:9090:2"))
    h.core.receive(server, Put("k", 9090, "k:9090:3"))  # no WITHDRAW for k:9090:1, granted just now:
    assert sorted(s["state"] for s in h.summary(detail=True)["tether"]["servers"][0]["slots"]) == [
        "free",
        "free",
        "granted",
    ]  # its session may be about to start (the SESSION report can come after this PUT)
    h.advance(11)
    h.core.receive(server, GetPendingMatchkeys())  # its next poll, 11 s on: that grant is over
    assert slink.replies() == [0, 0, 0, ["k:9090:2", "k:9090:3"]]
    detail = h.summary(detail=True)["tether"]
    assert [s["state"] for s in detail["servers"][0]["slots"]] == ["free", "free"]
    assert detail["keys"]["k"] | {"waiters": []} == {"total": 2, "free": 2, "busy": 0, "pending": 0, "waiters": []}
    h.core.receive(server, SessionEvent("start", "k:9090:2", "10.0.0.2:1"))
    h.core.receive(server, Put("k", 9090, "k:9090:4"))  # busy sessions are never dropped
    assert sorted(s["state"] for s in h.summary(detail=True)["tether"]["servers"][0]["slots"]) == [
        "busy",
        "free",
        "free",
    ]


def test_held_records_are_bounded_per_connection() -> None:
    h = Harness(max_held_per_connection=4)
    proxy, _ = h.connect()
    h.core.receive(proxy, UpdateInfo({"key": "server:proxy[k]", "addr": [None, 1]}))
    client, _ = h.connect()
    for i in range(50):
        h.core.receive(proxy, Put("k", 1, f"k:{i}"))
        h.core.receive(client, Request("k", "", 1))
    assert len(proxy.held) == 4


def test_stop() -> None:
    h = Harness()
    conn, link = h.connect()
    h.core.receive(conn, Stop("wrong"))
    assert link.replies() == [-1] and not h.stopped
    h.core.receive(conn, Stop("sk"))
    assert link.replies() == [0] and h.stopped


def test_fair_share_between_users_through_the_core() -> None:
    h = Harness()
    links = {}
    for user in ("alice", "alice", "alice", "bob"):
        conn, link = h.connect()
        links.setdefault(user, []).append(link)
        h.core.receive(conn, Request("k", user, 1))
    _server, _ = h.server("k", n=2)
    assert [bool(lk.sent) for lk in links["alice"]] == [True, False, False]
    assert links["bob"][0].sent


def test_priority_beats_arrival() -> None:
    h = Harness()
    low, low_link = h.connect()
    high, high_link = h.connect()
    h.core.receive(low, Request("k", "", 0))
    h.core.receive(high, Request("k", "", 10))
    h.server("k")
    assert high_link.sent and not low_link.sent


def test_summary_plain_is_tvms_shape_and_detail_counts_right() -> None:
    h = Harness()
    h.server("127.0.0.1:5555", port=9090)
    h.server("127.0.0.1:5555", port=9091)
    proxy, _ = h.connect()
    h.core.receive(proxy, UpdateInfo({"key": "server:proxy[a,b]", "addr": [None, 9000]}))
    h.core.receive(proxy, Put("a", 9000, "a:1"))
    h.core.receive(proxy, Put("b", 9000, "b:1"))
    client, _ = h.connect()  # a client connection shows in neither list
    h.core.receive(client, Ping())
    plain = h.summary()
    assert set(plain) == {"queue_info", "server_info"}
    assert plain["queue_info"]["127.0.0.1:5555"] == {"free": 2, "pending": 0}
    assert sorted(i["key"] for i in plain["server_info"]) == ["server:127.0.0.1:5555"] * 2 + ["server:proxy[a,b]"]
    keys = h.summary(detail=True)["tether"]["keys"]
    assert keys["127.0.0.1:5555"]["total"] == 2
    assert keys["a"]["total"] == 1 and keys["b"]["total"] == 1


def test_idle_keys_are_forgotten_beyond_the_cap() -> None:
    h = Harness(max_idle_keys=8)
    _client, _ = h.connect()
    h.server("kept")
    for i in range(40):
        conn, _ = h.connect()
        h.core.receive(conn, Request(f"k{i}", "", 1, RequestOptions(timeout=0)))
    queue_info = h.summary()["queue_info"]
    assert len(queue_info) <= 8 and "kept" in queue_info


def test_idle_keys_are_forgotten_beyond_their_total_size() -> None:
    """Found by bench/fuzz.py: 200 requests of 1 MB keys from peers that then left kept 192 MiB for
    idle_key_s (up to 4 GiB at max_idle_keys); keys in use are never forgotten."""
    h = Harness(max_idle_key_bytes=100_000)
    h.server("kept" * 10_000)
    for i in range(40):
        conn, _ = h.connect()
        h.core.receive(conn, Request(f"{i:02d}" + "k" * 10_000, "", 1, RequestOptions(timeout=0)))
        h.core.disconnect(conn)
    queue_info = h.summary()["queue_info"]
    assert sum(map(len, queue_info)) <= 100_000 and "kept" * 10_000 in queue_info
    assert h.core._known_bytes == sum(map(len, h.core._known_keys))


def test_a_key_with_nothing_left_leaves_the_summary_after_a_while() -> None:
    """A misspelt key (a waiter that timed out) or a key whose servers left is listed for idle_key_s more,
    then no longer (TVM's tracker lists it forever); a key that is served stays, however old."""
    h = Harness(idle_key_s=300)
    served, _ = h.server("served")
    gone, _ = h.server("gone")
    client, _ = h.connect()
    h.core.receive(client, tether_req("andriod", timeout=1))
    h.advance(2)  # the request times out
    h.core.disconnect(gone)
    h.advance(298)
    assert set(h.summary()["queue_info"]) == {"served", "gone", "andriod"}
    h.advance(5)
    assert set(h.summary()["queue_info"]) == {"served"}
    assert set(h.summary(detail=True)["tether"]["keys"]) == {"served"}
    h.core.receive(client, tether_req("andriod", rid="r2"))  # asked for again: listed again
    h.advance(1000)
    assert h.summary()["queue_info"]["andriod"] == {"free": 0, "pending": 1}
    assert served is not None


def _outcome(link: FakeLink) -> dict[str, Any]:
    (reply,) = link.replies()
    assert reply[0] == -1, reply
    return reply[1]  # type: ignore[no-any-return]


def test_a_request_no_server_could_serve_fails_with_the_reason() -> None:
    h = Harness(registration_grace_s=0)
    h.server("android", tether={"protocols": ["tvm", "tether"], "labels": {"soc": "sd8"}})
    h.server("boards", port=9090)  # TVM servers: TVM's protocol only
    h.server("boards", port=9091)
    client, link = h.connect("10.0.0.2")
    h.core.receive(client, tether_req("andriod", rid="typo", protocol="tether", unservable_after=5))
    h.core.receive(client, tether_req("boards", rid="tvm-only", protocol="tether", unservable_after=5))
    h.core.receive(
        client, tether_req("android", rid="labels", protocol="tether", labels={"soc": "sd7"}, unservable_after=5)
    )
    h.advance(4.9)
    assert link.replies() == []  # the grace: servers may still be registering
    h.advance(0.2)
    replies = [r[1] for r in link.replies()]
    outcomes = {o["id"]: (o["error"], o["message"]) for o in replies}
    assert outcomes["typo"] == ("unservable", "no server is registered with key 'andriod' (did you mean 'android'?)")
    assert outcomes["tvm-only"][0] == "unservable"
    assert "2 server(s) of key 'boards' speak only tvm, not tether: use TVM's client" in outcomes["tvm-only"][1]
    assert outcomes["labels"] == ("unservable", "no server of key 'android' has labels soc=sd7 (theirs: soc=sd8)")
    assert h.summary()["queue_info"]["andriod"]["pending"] == 0


def test_a_servable_request_waits_and_its_timeout_says_why() -> None:
    h = Harness(registration_grace_s=0)
    h.server("k", tether={"protocols": ["tvm", "tether"]})
    client, link = h.connect("10.0.0.2")
    h.core.receive(client, tether_req("k", rid="first", user="alice", protocol="tether"))
    assert link.replies()[0][0] == 0  # alice holds the only server
    h.core.receive(client, tether_req("k", rid="second", user="bob", protocol="tether", timeout=10, unservable_after=1))
    h.advance(5)
    assert link.replies() == []  # a busy server is a server: keep waiting
    h.advance(6)
    outcome = _outcome(link)
    assert outcome["error"] == "timeout"
    assert (
        outcome["message"] == "no free server of key 'k' within 11 s: its 1 matching server(s) are busy (held by alice)"
    )


def test_unservable_is_not_judged_while_servers_may_be_re_registering() -> None:
    h = Harness(registration_grace_s=10)
    client, link = h.connect("10.0.0.2")
    h.core.receive(client, tether_req("k", protocol="tether", unservable_after=1))
    h.advance(5)
    assert link.replies() == []  # the tracker started 5 s ago: its servers may not be back yet
    h.server("k", tether={"protocols": ["tvm", "tether"]})
    assert link.replies()[0][0] == 0  # and this one came back in time


def test_a_key_waited_on_longer_than_the_idle_time_is_listed_after_its_waiter_leaves() -> None:
    h = Harness(idle_key_s=300)
    client, _ = h.connect()
    h.core.receive(client, tether_req("k"))
    h.advance(1000)
    h.core.disconnect(client)  # the waiter leaves after 1000 s: the key was active until now
    h.advance(10)
    assert "k" in h.summary()["queue_info"]


def test_a_summary_of_one_key_holds_that_key_only() -> None:
    h = Harness()
    h.server("a", tether={"protocols": ["tvm", "tether"]})
    h.server("b", port=9091)
    client, _ = h.connect("10.0.0.2")
    h.core.receive(client, tether_req("b", rid="x", protocol="tvm", user="bob"))  # granted
    h.core.receive(client, tether_req("b", rid="y", protocol="tvm", user="carol"))  # waits
    value = json.loads(h.core.summary_json(detail=True, key="b"))
    assert set(value["queue_info"]) == {"b"} and set(value["tether"]["keys"]) == {"b"}
    assert [s["key"] for s in value["tether"]["servers"]] == ["server:b"]
    assert [w["user"] for w in value["tether"]["keys"]["b"]["waiters"]] == ["carol"]
    assert [i["key"] for i in value["server_info"]] == ["server:b"]
    assert set(h.summary(detail=True)["queue_info"]) == {"a", "b"}  # and the whole pool otherwise


def test_bad_tether_info_is_a_protocol_error() -> None:
    h = Harness()
    conn, _ = h.connect()
    with pytest.raises(RemoteProtocolError):
        h.core.receive(
            conn, decode_message(b'[5, {"key": "server:k", "addr": [null, 1], "tether": {"heartbeat": -1}}]')
        )


def test_ping_hello() -> None:
    h = Harness()
    conn, link = h.connect()
    h.core.receive(conn, Ping(hello=True))
    h.core.receive(conn, Ping())
    hello, plain = link.replies()
    assert hello[0] == 0 and "tether" in hello[1] and plain == 0
