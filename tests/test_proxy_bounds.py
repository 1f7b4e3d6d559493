"""Servers parked at the proxy are bounded, per peer address and in all: measured before, 300 sockets posing
as servers stayed forever and appeared as 300 slots at the tracker. One more gets TVM's MISMATCH."""

from __future__ import annotations

import logging
import socket
import struct
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tether.client.tracker import TrackerClient
from tether.protocol.constants import RPC_MAGIC, HandshakeCode
from tether.proxy import Matcher, ProxyConfig, ProxyThread
from tether.proxy.matcher import Pair, Refuse, Wait
from tether.tracker import TrackerConfig, TrackerThread

from .conftest import wait_until
from .test_tracker_bounds import second_loopback_address

pytestmark = pytest.mark.timeout(60)


def hello(key: str) -> bytes:
    raw = key.encode()
    return struct.pack("<ii", RPC_MAGIC, len(raw)) + raw


def recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError(f"closed after {len(buf)} of {n} bytes")
        buf += chunk
    return buf


def read_reply(sock: socket.socket) -> tuple[int, str | None]:
    """A handshake reply: the code, and the other side's key after SUCCESS."""
    (code,) = struct.unpack("<i", recv_exact(sock, 4))
    if code != HandshakeCode.SUCCESS:
        return code, None
    (n,) = struct.unpack("<i", recv_exact(sock, 4))
    return code, recv_exact(sock, n).decode()


@pytest.fixture
def proxy() -> Iterator[Callable[..., ProxyThread]]:
    started: list[ProxyThread] = []

    def start(**kwargs: Any) -> ProxyThread:
        kwargs.setdefault("port", 0)
        kwargs.setdefault("web_port", None)
        p = ProxyThread(ProxyConfig(**kwargs))
        started.append(p)
        return p

    yield start
    for p in started:
        p.stop()


@pytest.fixture
def sockets() -> Iterator[Callable[..., socket.socket]]:
    opened: list[socket.socket] = []

    def park(p: ProxyThread, key: str, source: str = "127.0.0.1") -> socket.socket:
        sock = socket.create_connection((p.host, p.port), timeout=10, source_address=(source, 0))
        opened.append(sock)
        sock.sendall(hello(key))
        return sock

    yield park
    for s in opened:
        s.close()


def parked(p: ProxyThread) -> int:
    return sum(1 for w in p.status()["waiting"] if w["role"] == "server")


def free_at(tracker: TrackerThread, key: str) -> int:
    with TrackerClient.connect(tracker.host, tracker.port, 5) as c:
        info = c.summary(timeout=5)["queue_info"].get(key)
    return int(info["free"]) if info else 0


# -- the matcher, pure ---------------------------------------------------------------------------------


def test_matcher_limits_servers_per_host_and_in_all() -> None:
    m = Matcher(tracker_mode=True, max_servers_per_host=2, max_servers=3)
    assert isinstance(m.arrive("a1", "server:k", 0.0, "10.0.0.1"), Wait)
    assert isinstance(m.arrive("a2", "server:k", 0.0, "10.0.0.1"), Wait)
    refused = m.arrive("a3", "server:k", 0.0, "10.0.0.1")
    assert isinstance(refused, Refuse) and refused.code == HandshakeCode.MISMATCH
    assert "from 10.0.0.1" in refused.reason
    assert isinstance(m.arrive("b1", "server:k", 0.0, "10.0.0.2"), Wait)
    full = m.arrive("b2", "server:k", 0.0, "10.0.0.2")
    assert isinstance(full, Refuse) and "3 servers parked" in full.reason
    m.leave("a1")  # one goes away: room for its address again
    assert isinstance(m.arrive("a4", "server:k", 0.0, "10.0.0.1"), Wait)
    matchkey = m.matchkey_of("a2")
    assert matchkey is not None
    assert isinstance(m.arrive("c", f"client:{matchkey}", 0.0, "10.0.0.9"), Pair)  # paired: no longer parked
    assert isinstance(m.arrive("a5", "server:k", 0.0, "10.0.0.1"), Wait)


def test_matcher_plain_mode_counts_servers_only() -> None:
    m = Matcher(max_servers_per_host=1)
    assert isinstance(m.arrive("s1", "server:x", 0.0, "h"), Wait)
    assert isinstance(m.arrive("s2", "server:y", 0.0, "h"), Refuse)
    assert isinstance(m.arrive("c1", "client:z", 0.0, "h"), Wait)  # clients are not counted
    assert isinstance(m.arrive("c2", "client:w", 0.0, "h"), Wait)
    assert isinstance(m.arrive("c3", "client:x", 0.0, "h"), Pair)  # s1 paired: room again
    assert isinstance(m.arrive("s3", "server:y", 0.0, "h"), Wait)
    assert m.expire("s3", 1e9)
    assert isinstance(m.arrive("s4", "server:y", 0.0, "h"), Wait)


# -- real sockets --------------------------------------------------------------------------------------


def test_servers_parked_per_address_in_tracker_mode(
    proxy: Callable[..., ProxyThread],
    tracker: TrackerThread,
    sockets: Callable[..., socket.socket],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="tether.proxy")
    p = proxy(tracker=(tracker.host, tracker.port), tracker_period=0.2)
    for _ in range(64):  # the default per address
        sockets(p, "server:fake")
    wait_until(lambda: parked(p) == 64, what="64 servers parked")
    for _ in range(12):
        assert read_reply(sockets(p, "server:fake")) == (HandshakeCode.MISMATCH, None)
    other = second_loopback_address()
    expected = 64
    if other is not None:
        sockets(p, "server:fake", other)  # another address still parks
        expected += 1
    wait_until(lambda: parked(p) == expected, what="the other address's server parked")
    wait_until(lambda: free_at(tracker, "fake") == expected, timeout=15, what="what is parked offered")
    assert p.status()["stats"]["refused"] == 12
    lines = [r.getMessage() for r in caplog.records if "--max-parked-per-peer" in r.getMessage()]
    assert 1 <= len(lines) <= 5, lines  # one line per refusal, a few per window in a flood


def test_servers_parked_in_all_plain_mode(
    proxy: Callable[..., ProxyThread], sockets: Callable[..., socket.socket]
) -> None:
    p = proxy(max_parked=3)
    first = sockets(p, "server:a")
    sockets(p, "server:b")
    sockets(p, "server:c")
    wait_until(lambda: parked(p) == 3, what="three servers parked")
    assert read_reply(sockets(p, "server:d")) == (HandshakeCode.MISMATCH, None)
    first.close()  # one leaves: room again
    wait_until(lambda: parked(p) == 2, what="the first server gone")
    sockets(p, "server:d")
    wait_until(lambda: parked(p) == 3, what="the fourth server parked")
    client = sockets(p, "client:d")  # a client pairs with a parked server as always
    code, key = read_reply(client)
    assert code == HandshakeCode.SUCCESS and key == "server:d"


def test_registrar_keeps_its_link_when_the_tracker_takes_no_more_slots(
    proxy: Callable[..., ProxyThread], sockets: Callable[..., socket.socket]
) -> None:
    with TrackerThread(TrackerConfig(host="127.0.0.1", port=0, max_proxy_slots=2)) as tracker:
        p = proxy(tracker=(tracker.host, tracker.port), tracker_period=0.2)
        for _ in range(3):
            sockets(p, "server:many")
        wait_until(lambda: p.status()["tracker"]["refused_puts"] >= 1, timeout=15, what="a PUT refused")
        assert free_at(tracker, "many") == 2
        status = p.status()["tracker"]
        assert status["connected"] and status["connects"] == 1, status
