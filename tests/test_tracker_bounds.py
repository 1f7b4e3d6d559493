"""What one peer can make the tracker hold, bounded: the attacks measured on loopback, each over real sockets,
then the core's rules with a hand-driven clock.

Measured before these bounds (see ``bench/bounds_bench.py``): silent sockets stayed forever and 1,100 of them
stopped a tracker under ``ulimit -n 1024`` from answering anyone; 200,000 queued requests grew it from 28 to
192 MB; 100,000 slots were accepted from one connection; a request with priority 1e300 outranked everyone.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import os
import queue
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

import tether
from tether.client.query import query_tracker
from tether.client.tracker import TrackerClient
from tether.errors import RequestRejected
from tether.protocol import RPC_TRACKER_MAGIC, Cancel, Put, Request, RequestOptions, SessionEvent, UpdateInfo, Withdraw
from tether.proxy import ProxyConfig, ProxyThread
from tether.tracker import TrackerConfig, TrackerThread
from tether.tracker.core import cap_priority

from .conftest import RawPeer, wait_until
from .test_tracker_core import Harness, tether_req

pytestmark = pytest.mark.timeout(120)

MAGIC = struct.pack("<i", RPC_TRACKER_MAGIC)


@contextlib.contextmanager
def tracker_with(**config: Any) -> Iterator[TrackerThread]:
    with TrackerThread(TrackerConfig(host="127.0.0.1", port=0, **config)) as t:
        yield t


def pending(tracker: TrackerThread, key: str) -> int:
    return int(tracker.call(lambda: tracker.core.scheduler.counts(key)[1]))


def free(tracker: TrackerThread, key: str) -> int:
    return int(tracker.call(lambda: tracker.core.scheduler.counts(key)[0]))


def raw_socket(tracker: TrackerThread, source: str = "127.0.0.1") -> socket.socket:
    sock = socket.create_connection((tracker.host, tracker.port), timeout=10, source_address=(source, 0))
    return sock


def closed_by_peer(sock: socket.socket, timeout: float = 15.0) -> bool:
    """True when the other side closes (or resets); False when it is still open after ``timeout`` s."""
    sock.settimeout(timeout)
    try:
        while True:
            if not sock.recv(4096):
                return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False


def second_loopback_address() -> str | None:
    """127.0.0.2 where this system routes it to loopback (Linux does), else None."""
    try:
        with socket.socket() as s:
            s.bind(("127.0.0.2", 0))
    except OSError:
        return None
    return "127.0.0.2"


def test_defaults() -> None:
    cfg = TrackerConfig()
    assert (cfg.handshake_timeout_s, cfg.idle_timeout_s) == (10.0, 60.0)
    assert (cfg.max_connections_per_peer, cfg.max_connections, cfg.fd_reserve) == (512, 0, 64)
    assert (cfg.max_waiters_per_connection, cfg.max_waiters_per_user, cfg.max_waiters_per_peer) == (1024, 4096, 4096)
    assert (cfg.max_slots_per_connection, cfg.max_proxy_slots, cfg.max_slots_per_peer) == (256, 4096, 8192)
    assert cfg.max_priority == 1000.0
    proxy = ProxyConfig()
    assert (proxy.max_parked_per_peer, proxy.max_parked) == (64, 4096)


# -- 1. handshake deadline ------------------------------------------------------------------------------


def test_a_connection_that_never_sends_the_magic_is_closed() -> None:
    with tracker_with(handshake_timeout_s=1, idle_timeout_s=0) as tracker:
        greeted = RawPeer(tracker.host, tracker.port)
        silent = raw_socket(tracker)
        half = raw_socket(tracker)
        half.sendall(MAGIC[:2])
        try:
            assert closed_by_peer(silent), "a silent connection stayed open past the handshake deadline"
            assert closed_by_peer(half), "half a magic held the connection open"
            assert greeted.call([1]) == 0  # as old as those two, but it greeted: still served
        finally:
            for s in (silent, half, greeted.sock):
                s.close()


# -- 2. idle deadline ---------------------------------------------------------------------------------


def test_idle_connections_close_while_servers_waiters_and_clients_keep_working(device_server: Any) -> None:
    with tracker_with(idle_timeout_s=2) as tracker:
        server = RawPeer(tracker.host, tracker.port)  # a TVM server: UPDATE_INFO, PUT, then silence
        assert server.call([5, {"key": "server:k", "addr": [None, 9000]}]) == 0
        assert server.call([3, "k", [9000, "k:1"], None]) == 0
        waiter = RawPeer(tracker.host, tracker.port)
        waiter.send_json([4, "later", "", 1])  # waits, silent, for a key nobody serves yet
        wait_until(lambda: pending(tracker, "later") == 1, what="the request queued")
        dev = device_server(key="dev", tracker=(tracker.host, tracker.port))
        proxy = ProxyThread(
            ProxyConfig(port=0, web_port=None, tracker=(tracker.host, tracker.port), tracker_period=0.2)
        )
        pool = tether.connect_tracker(tracker.host, tracker.port)  # one connection kept for repeated requests
        try:
            with pool.request("dev", timeout=10) as sess:
                sess.ping()
            wait_until(lambda: proxy.status()["tracker"]["connected"], what="the proxy registered")
            with contextlib.closing(RawPeer(tracker.host, tracker.port)) as idle:
                assert idle.call([1]) == 0
                assert closed_by_peer(idle.sock), "a connection holding nothing stayed open past the idle deadline"
            # everyone older than the closed one is still there
            assert server.call([1]) == 0 and free(tracker, "k") == 1
            assert server.call([3, "later", [9000, "later:1"], None]) == 0
            assert waiter.recv_json() == [0, ["127.0.0.1", 9000, "later:1"]]
            assert closed_by_peer(waiter.sock), "granted, it holds nothing: idle from then"
            status = proxy.status()["tracker"]
            assert status["connected"] and status["connects"] == 1, status
            wait_until(lambda: free(tracker, "dev") == 1, what="the device server offered again")
            assert dev.sessions_served == 1
            # the pool's connection was closed for idling: the next request reconnects and asks again
            with pool.request("dev", timeout=10) as sess:
                sess.ping()
            wait_until(lambda: pool.summary()["queue_info"]["dev"]["free"] == 1, what="the device server offered")
        finally:
            pool.close()
            proxy.stop()
            for p in (server, waiter):
                p.close()


def test_tvms_server_and_client_across_the_idle_deadline() -> None:
    """TVM's server keeps its tracker connection (PUT, then silence during a session); TVM's client keeps its
    TrackerSession between requests and reconnects when it finds it closed."""
    pytest.importorskip("tvm")
    from tvm import rpc

    from .test_tvm_interop import _port_range

    with tracker_with(idle_timeout_s=1) as tracker:
        port, port_end = _port_range()
        server = rpc.Server(
            host="127.0.0.1", port=port, port_end=port_end, tracker_addr=(tracker.host, tracker.port), key="tvmk"
        )
        try:
            wait_until(lambda: free(tracker, "tvmk") == 1, timeout=30, what="TVM's server registered")
            client = rpc.connect_tracker(tracker.host, tracker.port)
            sess = client.request("tvmk", session_timeout=60)
            with contextlib.closing(RawPeer(tracker.host, tracker.port)) as canary:
                assert canary.call([1]) == 0
                assert closed_by_peer(canary.sock)  # TVM's client's connection has idled as long: closed too
            sess.upload(bytearray(b"still here"), "x.txt")  # the session, and the server's tracker link, go on
            assert bytes(sess.download("x.txt")) == b"still here"
            del sess
            gc.collect()
            wait_until(lambda: free(tracker, "tvmk") == 1, timeout=30, what="TVM's server offered again")
            with contextlib.closing(RawPeer(tracker.host, tracker.port)) as canary:
                assert canary.call([1]) == 0
                assert closed_by_peer(canary.sock)
            assert free(tracker, "tvmk") == 1  # a server holding a free slot is never idle
            again = client.request("tvmk", session_timeout=60)  # on its closed connection: it reconnects
            again.upload(bytearray(b"again"), "y.txt")
            del again
            gc.collect()
            client.close()
        finally:
            server.terminate()


# -- 3. connections per peer address -------------------------------------------------------------------


def test_connections_per_peer_address(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="tether.tracker")
    with tracker_with(max_connections_per_peer=4) as tracker:
        peers = [RawPeer(tracker.host, tracker.port) for _ in range(4)]
        refused = []
        try:
            for _ in range(12):
                sock = raw_socket(tracker)
                refused.append(sock)
                with contextlib.suppress(OSError):  # it may be reset already
                    sock.sendall(MAGIC)
                assert closed_by_peer(sock), "a fifth connection from one address was served"
            other = second_loopback_address()
            if other is not None:
                with contextlib.closing(raw_socket(tracker, other)) as sock:
                    sock.sendall(MAGIC)
                    sock.settimeout(10)
                    assert sock.recv(4) == MAGIC  # another address is not affected
            peers.pop().close()
            wait_until(lambda: tracker.server.open_connections == 3, what="the closed one released")
            peers.append(RawPeer(tracker.host, tracker.port))  # room again
            assert peers[-1].call([1]) == 0
        finally:
            for p in peers:
                p.close()
            for s in refused:
                s.close()
    lines = [r.getMessage() for r in caplog.records if "refused a connection from 127.0.0.1" in r.getMessage()]
    assert 1 <= len(lines) <= 5, lines  # one line per refusal, a few per window in a flood


# -- 4. file descriptors run short ---------------------------------------------------------------------

_LIMITED = (
    "import resource, runpy, sys\n"
    "resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))\n"
    "sys.argv = ['tether', *sys.argv[1:]]\n"
    "runpy.run_module('tether', run_name='__main__', alter_sys=True)\n"
)


class _LimitedTracker:
    """``tether tracker`` in a child process limited to 256 file descriptors; its output read by a thread."""

    def __init__(self, *args: str) -> None:
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _LIMITED, "tracker", "--port", "0", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=dict(os.environ),
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))

    def wait_line(self, needle: str, timeout: float = 30.0) -> str:
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                pytest.fail(f"no line containing {needle!r} within {timeout} s; saw {self.seen}")
            try:
                line = self.lines.get(timeout=remaining)
            except queue.Empty:
                continue
            self.seen.append(line)
            if needle in line:
                return line

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._reader.join(10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


@pytest.mark.parametrize(
    ("mode", "args", "says"),
    [
        ("ahead of the limit", [], "closed to make room for new peers"),
        ("at EMFILE", ["--fd-reserve", "0"], "accept failed"),
    ],
)
def test_new_peers_are_answered_when_silent_sockets_use_up_the_descriptors(
    mode: str, args: list[str], says: str
) -> None:
    # no handshake or idle deadline here: only making room can answer the new peer
    child = _LimitedTracker("--handshake-timeout", "0", "--idle-timeout", "0", *args)
    silent: list[socket.socket] = []
    try:
        port = int(child.wait_line("listening on ").rsplit(":", 1)[1])
        server = RawPeer("127.0.0.1", port)  # a server registered before the flood: never closed to make room
        assert server.call([5, {"key": "server:k", "addr": [None, 9000]}]) == 0
        assert server.call([3, "k", [9000, "k:1"], None]) == 0
        for _ in range(300):  # more than the 256 descriptors the tracker has
            silent.append(socket.create_connection(("127.0.0.1", port), timeout=10))
        client = RawPeer("127.0.0.1", port, timeout=30)
        client.send_json([4, "k", "", 1])
        assert client.recv_json() == [0, ["127.0.0.1", 9000, "k:1"]]
        client.close()
        status = query_tracker("127.0.0.1", port, timeout=30)
        assert [(row.key, row.total) for row in status.keys] == [("k", 1)]
        child.wait_line(says)
        server.close()
    finally:
        for s in silent:
            s.close()
        child.stop()


# -- 5. waiting requests per connection and per user ---------------------------------------------------


def test_waiting_requests_per_connection(tracker: TrackerThread) -> None:
    peer = RawPeer(tracker.host, tracker.port)
    try:
        body = json.dumps([4, "nobody", "", 1]).encode()
        peer.sock.sendall((struct.pack("<i", len(body)) + body) * 1025)  # TVM's client, the default limit
        reply = peer.recv_json()
        assert reply[0] == -1 and reply[1]["error"] == "rejected", reply
        assert "too many waiting requests on this connection (limit 1024)" in reply[1]["message"]
        assert pending(tracker, "nobody") == 1024
    finally:
        peer.close()


def test_waiting_requests_per_user_and_per_address() -> None:
    with tracker_with(max_waiters_per_user=5) as tracker:
        alice1 = TrackerClient.connect(tracker.host, tracker.port)
        alice2 = TrackerClient.connect(tracker.host, tracker.port)
        anonymous = RawPeer(tracker.host, tracker.port)
        try:
            for i in range(3):
                alice1.send(Request("k", "alice", 1, RequestOptions(f"a{i}", user="alice")))
            for i in range(2):
                alice2.send(Request("k", "alice", 1, RequestOptions(f"b{i}", user="alice")))
            alice2.send(Request("k", "bob", 1, RequestOptions("bob", user="bob")))
            wait_until(lambda: pending(tracker, "k") == 6, what="six requests queued")
            with pytest.raises(RequestRejected, match="too many waiting requests of user 'alice' \\(limit 5\\)"):
                alice2.request_grant("k", user="alice", timeout=10)
            assert alice1.cancel("a0")
            assert alice1.recv(time.monotonic() + 5)[1]["error"] == "cancelled"
            alice1.send(Request("k", "alice", 1, RequestOptions("a3", user="alice")))  # room again
            wait_until(lambda: pending(tracker, "k") == 6, what="alice's new request queued")
            # a TVM client sends no user: its address is its user
            for _ in range(5):
                anonymous.send_json([4, "k", "", 1])
            wait_until(lambda: pending(tracker, "k") == 11, what="the anonymous requests queued")
            reply = anonymous.call([4, "k", "", 1])
            assert reply[0] == -1 and "of user '127.0.0.1'" in reply[1]["message"], reply
        finally:
            for c in (alice1, alice2):
                c.close()
            anonymous.close()
        wait_until(lambda: tracker.call(lambda: dict(tracker.core._user_waiters)) == {}, what="every count back to 0")


def test_waiting_requests_per_peer_address_whatever_their_users() -> None:
    """User names cost nothing: 200,000 requests under as many names still come from one address."""
    with tracker_with(max_waiters_per_peer=4) as tracker:
        peers = [RawPeer(tracker.host, tracker.port) for _ in range(2)]
        try:
            for i in range(4):
                peers[i % 2].send_json([4, "k", f"user{i}", 1])
            wait_until(lambda: pending(tracker, "k") == 4, what="four requests queued")
            reply = peers[1].call([4, "k", "someone else", 1])
            assert reply[0] == -1 and "too many waiting requests from 127.0.0.1 (limit 4)" in reply[1]["message"]
            other = second_loopback_address()
            if other is not None:  # another address is not affected
                with contextlib.closing(raw_socket(tracker, other)) as sock:
                    sock.sendall(MAGIC)
                    assert sock.recv(4) == MAGIC
                    body = json.dumps([4, "k", "", 1]).encode()
                    sock.sendall(struct.pack("<i", len(body)) + body)
                    wait_until(lambda: pending(tracker, "k") == 5, what="the other address's request queued")
        finally:
            for p in peers:
                p.close()


def test_tvms_client_gets_a_clear_error_when_rejected() -> None:
    pytest.importorskip("tvm")
    from tvm import rpc

    with tracker_with(max_waiters_per_user=1) as tracker:
        holder = RawPeer(tracker.host, tracker.port)
        try:
            holder.send_json([4, "k", "", 1])  # 127.0.0.1's one waiting request
            wait_until(lambda: pending(tracker, "k") == 1, what="queued")
            client = rpc.connect_tracker(tracker.host, tracker.port)
            with pytest.raises(RuntimeError, match=r"too many waiting requests of user '127\.0\.0\.1'"):
                client.request("k")
            client.close()
        finally:
            holder.close()


# -- 6. slots per connection ---------------------------------------------------------------------------


def test_free_slots_per_connection(tracker: TrackerThread, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="tether.tracker")
    server = RawPeer(tracker.host, tracker.port)
    proxy = RawPeer(tracker.host, tracker.port)
    try:
        assert server.call([5, {"key": "server:k", "addr": [None, 9000]}]) == 0
        for i in range(256):
            server.send_json([3, "k", [9000, f"k:{i}"], None])
        assert [server.recv_json() for _ in range(256)] == [0] * 256
        assert server.call([3, "k", [9000, "k:256"], None]) == -1  # one more: TVM's FAIL
        assert server.call([3, "k", [9000, "k:3"], None]) == 0  # offering one it has is fine
        assert free(tracker, "k") == 256
        # a proxy offers every server parked at it on one connection
        assert proxy.call([5, {"key": "server:proxy[p]", "addr": [None, 9001]}]) == 0
        for i in range(300):
            proxy.send_json([3, "p", [9001, f"p:{i}"], None])
        assert [proxy.recv_json() for _ in range(300)] == [0] * 300
        assert free(tracker, "p") == 300
    finally:
        server.close()
        proxy.close()
    assert len([r for r in caplog.records if "refused" in r.getMessage()]) == 1


def test_free_slots_per_peer_address() -> None:
    with tracker_with(max_slots_per_peer=3) as tracker:
        peers = [RawPeer(tracker.host, tracker.port) for _ in range(2)]
        try:
            for i in range(3):
                assert peers[i % 2].call([3, "k", [9000, f"k:{i}"], None]) == 0
            assert peers[1].call([3, "k", [9000, "k:3"], None]) == -1
            with TrackerClient.connect(tracker.host, tracker.port) as client:  # one is granted: room for one more
                client.request_grant("k", timeout=5)
            assert peers[1].call([3, "k", [9000, "k:3"], None]) == 0
        finally:
            for p in peers:
                p.close()
        wait_until(lambda: tracker.call(lambda: dict(tracker.core._peer_slots)) == {}, what="every count back to 0")


# -- 7. priority ---------------------------------------------------------------------------------------


def test_priority_is_capped_so_users_take_turns_at_the_cap(tracker: TrackerThread) -> None:
    attacker = RawPeer(tracker.host, tracker.port)
    victim = RawPeer(tracker.host, tracker.port)
    server = RawPeer(tracker.host, tracker.port)
    try:
        attacker.send_json([4, "k", "mallory", 1e300])
        attacker.send_json([4, "k", "mallory", 1e300])
        wait_until(lambda: pending(tracker, "k") == 2, what="the attacker's requests queued")
        victim.send_json([4, "k", "victor", 1000])
        wait_until(lambda: pending(tracker, "k") == 3, what="the victim's request queued")
        waiters = tracker.call(lambda: tracker.core.summary(detail=True)["tether"]["keys"]["k"]["waiters"])
        assert [w["priority"] for w in waiters] == [1000, 1000, 1000]
        assert server.call([3, "k", [9000, "k:1"], None]) == 0
        assert attacker.recv_json() == [0, ["127.0.0.1", 9000, "k:1"]]  # first in line
        assert server.call([3, "k", [9000, "k:2"], None]) == 0
        assert victim.recv_json() == [0, ["127.0.0.1", 9000, "k:2"]]  # then it is the other user's turn
    finally:
        for p in (attacker, victim, server):
            p.close()


def test_a_grant_never_redeemed_goes_to_the_next_request(tracker: TrackerThread, device_server: Any) -> None:
    device_server(key="k", tracker=(tracker.host, tracker.port), grant_timeout_s=0.3, poll_s=0.1)
    attacker = RawPeer(tracker.host, tracker.port)
    try:
        reply = attacker.call([4, "k", "mallory", 1e300])  # granted, and never connects
        assert reply[0] == 0
        with TrackerClient.connect(tracker.host, tracker.port) as victim:
            grant = victim.request_grant("k", priority=1, timeout=60)
        assert grant.matchkey != reply[1][2]
    finally:
        attacker.close()


# -- the core's rules, with a hand-driven clock --------------------------------------------------------


def test_core_handshake_and_idle_deadlines() -> None:
    h = Harness()
    silent, silent_link = h.connect()
    greeted, greeted_link = h.connect()
    h.core.greeted(greeted)
    h.advance(9.5)
    assert not silent_link.closed
    h.advance(1.0)
    assert silent_link.closed and silent not in h.core.connections
    assert not greeted_link.closed
    server, server_link = h.server("k")
    waiter, waiter_link = h.connect()
    h.core.receive(waiter, tether_req("other"))
    _beating, beating_link = h.server("b", tether={"heartbeat": 1.0})
    h.advance(48.0)
    assert not greeted_link.closed
    h.advance(2.0)  # 60 s after its greeting
    assert greeted_link.closed
    h.advance(500.0)  # a free slot, a waiting request: however long
    assert not server_link.closed and not waiter_link.closed
    assert beating_link.closed  # silent past its heartbeats: liveness, not idleness, removed it
    h.core.receive(server, Put("other", 9090, "other:1"))  # the request is granted: idle from now
    h.advance(59.0)
    assert not waiter_link.closed
    h.advance(2.0)
    assert waiter_link.closed and not server_link.closed


def test_core_idle_time_can_be_turned_off() -> None:
    h = Harness(handshake_timeout_s=0, idle_timeout_s=0)
    _conn, link = h.connect()
    h.advance(1e6)
    assert not link.closed
    assert h.core.next_deadline() is None


def test_core_sheds_the_longest_idle_first_never_servers_or_waiters() -> None:
    h = Harness()
    _old, old_link = h.connect()
    h.advance(1.0)
    h.server("k")
    waiter, _ = h.connect()
    h.core.receive(waiter, tether_req("other"))
    h.advance(1.0)
    _newer, newer_link = h.connect()
    h.advance(1.0)
    newest, newest_link = h.connect()
    h.core.greeted(newest)
    assert h.core.shed_idle(2) == 2
    assert old_link.closed and newer_link.closed and not newest_link.closed
    assert h.core.shed_idle(5) == 1 and newest_link.closed
    assert h.core.shed_idle(5) == 0
    assert len(h.core.connections) == 2  # the server and the waiter


def test_core_waiter_limits_and_counts() -> None:
    h = Harness(max_waiters_per_connection=2, max_waiters_per_user=3)
    a, alink = h.connect()
    b, blink = h.connect()
    for rid in ("1", "2", "3"):
        h.core.receive(a, tether_req("k", rid))
    assert alink.replies()[-1][1]["message"] == "too many waiting requests on this connection (limit 2)"
    h.core.receive(b, tether_req("k", "4"))
    h.core.receive(b, tether_req("k", "5"))
    assert blink.replies()[-1][1]["message"] == "too many waiting requests of user 'alice' (limit 3)"
    h.core.receive(b, tether_req("k", "6", user="bob"))
    assert blink.replies() == []
    c, _ = h.connect()
    h.core.receive(c, tether_req("k", "7", user="carol", timeout=1.0))
    assert h.core._user_waiters == {"alice": 3, "bob": 1, "carol": 1}
    h.advance(2.0)  # carol's expires
    _server, _ = h.server("k")  # alice's first is granted
    assert h.core._user_waiters == {"alice": 2, "bob": 1}
    h.core.disconnect(a)
    assert h.core._user_waiters == {"alice": 1, "bob": 1}
    h.core.disconnect(b)
    assert h.core._user_waiters == {}


def _assert_counts(core: Any) -> None:
    """The per-user and per-address counts agree with what the connections hold."""
    users: dict[str, int] = {}
    waiters: dict[str, int] = {}
    slots: dict[str, int] = {}
    for conn in core.connections:
        for waiter in conn.waiters:
            users[waiter.user] = users.get(waiter.user, 0) + 1
            waiters[conn.host] = waiters.get(conn.host, 0) + 1
        if conn.slots:
            slots[conn.host] = slots.get(conn.host, 0) + len(conn.slots)
    assert (core._user_waiters, core._peer_waiters, core._peer_slots) == (users, waiters, slots)


def test_core_counts_follow_every_way_in_and_out() -> None:
    h = Harness()
    server, _ = h.server("k", n=3, host="10.0.0.1", tether={"slots": 4, "heartbeat": 1.0})
    _assert_counts(h.core)
    client, clink = h.connect("10.0.0.2")
    h.core.receive(client, tether_req("k", "g"))  # granted at once
    h.core.receive(server, SessionEvent("start", "k:9090:1"))  # a session on a free slot: no longer free
    h.core.receive(server, Withdraw("k:9090:2"))
    _assert_counts(h.core)
    h.core.receive(client, tether_req("k", "w1", timeout=5))
    h.core.receive(client, tether_req("k", "w2", user="bob"))
    h.core.receive(client, tether_req("k", "w3", user="carol"))
    h.core.receive(client, Cancel("w3"))
    _assert_counts(h.core)
    h.advance(6.0)  # w1 expires; the silent server leaves
    _assert_counts(h.core)
    other, _ = h.server("k", host="10.0.0.3")  # w2 granted
    h.core.receive(other, Put("k", 9090, "k:more"))
    _assert_counts(h.core)
    for conn in h.core.connections:
        h.core.disconnect(conn)
    _assert_counts(h.core)
    assert h.core._peer_slots == h.core._peer_waiters == h.core._user_waiters == {}
    assert clink.replies()


def test_core_slot_limits() -> None:
    h = Harness(max_slots_per_connection=2, max_proxy_slots=3)
    conn, link = h.connect()
    for i in range(3):
        h.core.receive(conn, Put("k", 1, f"k:{i}"))
    assert link.replies() == [0, 0, -1]
    proxy, plink = h.connect()
    h.core.receive(proxy, UpdateInfo({"key": "server:proxy[k]", "addr": [None, 1]}))
    for i in range(4):
        h.core.receive(proxy, Put("k", 1, f"p:{i}"))
    assert plink.replies() == [0, 0, 0, 0, -1]


def test_cap_priority() -> None:
    assert cap_priority(1e300, "u", 1000) == 1000
    assert cap_priority(-1e300, "u", 1000) == -1000
    assert cap_priority(1, "u", 1000) == 1
    h = Harness(max_priority=10)
    conn, _ = h.connect()
    h.core.receive(conn, Request("k", "", 99))
    (row,) = h.summary(detail=True)["tether"]["keys"]["k"]["waiters"]
    assert row["priority"] == 10
