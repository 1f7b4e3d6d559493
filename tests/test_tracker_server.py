"""The tracker over real loopback sockets: TVM's quirks, bad input, purges, liveness."""

from __future__ import annotations

import logging
import signal
import socket
import struct
import threading
import time
from collections.abc import Callable

import pytest

from tether.client.tracker import TrackerClient
from tether.errors import ConnectFailed, RemoteProtocolError, RequestTimeout
from tether.protocol import RPC_MAGIC, RPC_TRACKER_MAGIC, Request, RequestOptions
from tether.tracker import TrackerConfig, TrackerThread
from tether.tracker.server import PeerLogLimit

from .conftest import RawPeer, wait_until

MAGIC = struct.pack("<i", RPC_TRACKER_MAGIC)


def queue(tracker: TrackerThread, key: str) -> dict[str, int]:
    return tracker.call(lambda: tracker.core.summary()["queue_info"].get(key, {"free": 0, "pending": 0}))  # type: ignore[no-any-return]


def test_magic_and_first_message_in_one_chunk(tracker: TrackerThread) -> None:
    sock = socket.create_connection((tracker.host, tracker.port), timeout=5)
    body = b"[1]"
    sock.sendall(MAGIC + struct.pack("<i", len(body)) + body)
    got = b""
    while len(got) < 4 + 4 + 1:
        got += sock.recv(64)
    assert got == MAGIC + struct.pack("<i", 1) + b"0"
    sock.close()


def test_ping_after_a_waiting_request_is_answered_first(peer: Callable[..., RawPeer]) -> None:
    client = peer()
    client.send_json([4, "nobody", "", 1])
    assert client.call([1]) == 0
    server = peer()
    assert server.call([3, "nobody", [9000, "nobody:1"], None]) == 0
    assert client.recv_json() == [0, ["127.0.0.1", 9000, "nobody:1"]]


BAD_INPUTS = {
    "garbage": b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
    "wrong magic": struct.pack("<i", RPC_MAGIC) + b"\x00" * 8,
    "oversized length": MAGIC + struct.pack("<i", (1 << 20) + 1),
    "zero length": MAGIC + struct.pack("<i", 0),
    "negative length": MAGIC + struct.pack("<i", -5),
    "unknown code": MAGIC + struct.pack("<i", 4) + b"[99]",
    "bad json": MAGIC + struct.pack("<i", 5) + b"[1, }",
    "not a list": MAGIC + struct.pack("<i", 2) + b"{}",
    "bad PUT": MAGIC + struct.pack("<i", 8) + b'[3, "k"]',
}


#: Frames sent after the magic exchange (big enough to arrive in several reads).
def _frame(body: bytes) -> bytes:
    return struct.pack("<i", len(body)) + body


BAD_FRAMES = {
    "huge integer": _frame(b"[1, " + b"9" * 4998 + b"]"),
    "deep nesting": _frame(b"[" * 100000 + b"]" * 100000),
    # a NaN heartbeat made the liveness timer fire again and again, at once, forever
    "NaN heartbeat": _frame(b'[5, {"key": "server:x", "addr": [null, 1], "tether": {"heartbeat": NaN}}]'),
    "infinite priority": _frame(b'[4, "k", "", 1e999]'),
    # a key no UTF-8 can carry made every later SUMMARY raise
    "lone surrogate": _frame(b'[3, "\\udc00", [1, "m"], null]'),
}


@pytest.mark.parametrize("name", sorted(BAD_INPUTS))
def test_bad_input_closes_that_connection_only(tracker: TrackerThread, peer: Callable[..., RawPeer], name: str) -> None:
    bystander = peer()
    assert bystander.call([3, "k", [1, "k:1"], None]) == 0
    bad = peer(handshake=False)
    bad.sock.sendall(BAD_INPUTS[name])
    assert bad.closed_by_peer(), "the tracker must close a connection that breaks the protocol, without a reply"
    assert bystander.call([1]) == 0  # the tracker is unharmed, other connections too
    assert peer().call([1]) == 0  # and it serves the next client
    assert queue(tracker, "k") == {"free": 1, "pending": 0}


@pytest.mark.parametrize("name", sorted(BAD_FRAMES))
def test_frames_past_pythons_json_limits_close_that_connection_only(
    tracker: TrackerThread, peer: Callable[..., RawPeer], name: str
) -> None:
    bad = peer()
    bad.sock.sendall(BAD_FRAMES[name])
    assert bad.closed_by_peer()
    assert peer().call([1]) == 0
    assert peer().call([6, {"detail": True}])[0] == 0  # the summary is still good JSON


def test_bad_frames_cost_one_line_each_then_a_few_per_window(
    tracker: TrackerThread, peer: Callable[..., RawPeer], caplog: pytest.LogCaptureFixture
) -> None:
    """A fuzzer's frames: one log line per bad frame, never a traceback, at most 5 per peer per 10 s."""
    caplog.set_level(logging.INFO, logger="tether.tracker")
    for _ in range(40):
        bad = peer()
        bad.sock.sendall(BAD_FRAMES["deep nesting"])
        assert bad.closed_by_peer()
        bad.close()
    assert peer().call([1]) == 0
    lines = [r for r in caplog.records if r.name == "tether.tracker" and "closing" in r.getMessage()]
    assert len(lines) == 5, [r.getMessage() for r in lines]
    assert not any(r.exc_info for r in caplog.records), "a traceback was logged for a peer's bad frame"
    assert all("not usable JSON" in r.getMessage() and len(r.getMessage()) < 400 for r in lines)


def test_peer_log_limit_windows() -> None:
    now = [0.0]
    limit = PeerLogLimit(lines=2, window_s=10.0, max_hosts=2, clock=lambda: now[0])
    assert [limit.allow("a") for _ in range(4)] == [True, True, False, False]
    assert limit.allow("b")
    now[0] = 10.0
    assert limit.allow("a")  # a new window (and a line saying 2 were left out)
    limit.allow("c")  # a third host: the oldest is forgotten
    assert limit.allow("b") and limit.allow("b")


def test_half_a_frame_then_close(tracker: TrackerThread, peer: Callable[..., RawPeer]) -> None:
    bad = peer()
    bad.sock.sendall(struct.pack("<i", 100) + b"[3, ")
    bad.close()
    assert peer().call([1]) == 0


def test_waiter_that_disconnects_leaves_the_queue_at_once(tracker: TrackerThread, peer: Callable[..., RawPeer]) -> None:
    waiter = peer()
    waiter.send_json([4, "k", "", 1])
    wait_until(lambda: queue(tracker, "k")["pending"] == 1, what="request queued")
    waiter.close()
    wait_until(lambda: queue(tracker, "k")["pending"] == 0, timeout=1.0, what="dead waiter purged")
    server = peer()
    assert server.call([3, "k", [1, "k:1"], None]) == 0
    assert queue(tracker, "k") == {"free": 1, "pending": 0}, "the slot went to nobody dead"


def test_server_that_disconnects_leaves_at_once(tracker: TrackerThread, peer: Callable[..., RawPeer]) -> None:
    server = peer()
    assert server.call([3, "k", [1, "k:1"], None]) == 0  # no UPDATE_INFO: TVM would keep this forever
    assert queue(tracker, "k")["free"] == 1
    server.close()
    wait_until(lambda: queue(tracker, "k")["free"] == 0, timeout=1.0, what="slot removed")


def test_tether_server_that_stops_heartbeating_leaves_the_pool(
    tracker: TrackerThread, peer: Callable[..., RawPeer]
) -> None:
    server = peer()
    info = {"key": "server:hb", "addr": [None, 1], "tether": {"heartbeat": 0.2, "protocols": ["tether"]}}
    assert server.call([5, info]) == 0
    assert server.call([3, "hb", [1, "hb:1"], None]) == 0
    for _ in range(3):
        assert server.call([1]) == 0
    # The process hangs: TCP stays up, nothing more is sent.
    wait_until(lambda: queue(tracker, "hb")["free"] == 0, timeout=10.0, what="silent server removed")
    assert server.closed_by_peer()


def test_client_request_timeout_and_grant(tracker: TrackerThread) -> None:
    with TrackerClient.connect(tracker.host, tracker.port) as client:
        assert client.tether_version is not None
        with pytest.raises(RequestTimeout):
            client.request_grant("none", timeout=0.2)
        client.put("k", 7, "k:1")
        grant = client.request_grant("k", timeout=5, user="me")
        assert (grant.host, grant.port, grant.matchkey) == ("127.0.0.1", 7, "k:1")
        assert client.ping() > 0
    assert queue(tracker, "none")["pending"] == 0


def test_client_errors() -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    listener.close()
    with pytest.raises(ConnectFailed):
        TrackerClient.connect("127.0.0.1", port, timeout=2)
    with socket.create_server(("127.0.0.1", 0)) as not_a_tracker:

        def answer() -> None:
            conn, _ = not_a_tracker.accept()
            conn.recv(4)
            conn.sendall(b"HTTP/1.0 400\r\n\r\n")
            conn.close()

        thread = threading.Thread(target=answer)
        thread.start()
        with pytest.raises(RemoteProtocolError, match="not an RPC tracker"):
            TrackerClient.connect("127.0.0.1", not_a_tracker.getsockname()[1], timeout=2)
        thread.join(5)


def test_stop_message_stops_the_tracker() -> None:
    thread = TrackerThread(TrackerConfig(port=0, stop_key="secret"))
    with TrackerClient.connect(thread.host, thread.port) as client:
        assert not client.stop("wrong")
        assert client.stop("secret")
    assert thread.wait(5)


def test_ipv6_loopback() -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    try:
        thread = TrackerThread(TrackerConfig(host="::1", port=0))
    except Exception as exc:  # pragma: no cover - machines without ::1
        pytest.skip(f"::1 unavailable: {exc}")
    with thread, TrackerClient.connect("::1", thread.port) as client:
        assert client.ping() > 0


def test_many_concurrent_connections(tracker: TrackerThread) -> None:
    socks = [socket.create_connection((tracker.host, tracker.port), timeout=10) for _ in range(300)]
    for s in socks:
        s.sendall(MAGIC)
    for s in socks:
        assert s.recv(4) == MAGIC
    for s in socks:
        s.close()
    wait_until(lambda: tracker.call(lambda: len(tracker.core.connections)) == 0, what="all closed")


def test_cancel_a_waiting_request(tracker: TrackerThread) -> None:
    with TrackerClient.connect(tracker.host, tracker.port) as client:
        client.send(Request("busy", "me", 1, RequestOptions("r1", timeout=60)))
        assert client.cancel("r1") is True
        outcome = client.recv(time.monotonic() + 5)
        assert outcome[0] == -1 and outcome[1]["error"] == "cancelled"
        assert client.cancel("r1") is False
        assert queue(tracker, "busy")["pending"] == 0


def test_interrupted_request_is_withdrawn(tracker: TrackerThread) -> None:
    """Ctrl-C while waiting: the request is cancelled on the tracker, then the interrupt propagates."""
    with TrackerClient.connect(tracker.host, tracker.port) as client:

        def interrupt_once_queued() -> None:
            wait_until(lambda: queue(tracker, "nobody")["pending"] == 1, what="request queued")
            signal.pthread_kill(threading.main_thread().ident or 0, signal.SIGINT)

        # A process started in the background by a non-interactive shell inherits SIGINT ignored, and Python
        # then leaves it so: give this test Ctrl-C's usual meaning whatever started the run.
        previous = signal.signal(signal.SIGINT, signal.default_int_handler)
        interrupter = threading.Thread(target=interrupt_once_queued)
        interrupter.start()
        try:
            with pytest.raises(KeyboardInterrupt):
                client.request_grant("nobody", timeout=30)
        finally:
            signal.signal(signal.SIGINT, previous)
        interrupter.join(5)
        assert queue(tracker, "nobody")["pending"] == 0
        assert client.ping() > 0  # the connection is still usable
