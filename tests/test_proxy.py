"""tether's proxy: the matcher alone, then real sockets (TCP and WebSocket) and real tether sessions.

Plain mode pairs ``server:K`` and ``client:K`` in either order and forwards each side the other's whole
key; tracker mode offers servers to a tracker and pairs clients that bring a matchkey. Bad input always
gets a reply or a clean close, and the relay keeps its memory bounded when a side stops reading.
"""

from __future__ import annotations

import hashlib
import select
import socket
import struct
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import tether
from tether.aio.ws import ws_connect
from tether.client.query import query_tracker
from tether.client.tracker import TrackerClient
from tether.protocol.constants import RPC_MAGIC, HandshakeCode
from tether.protocol.websocket import Opcode, encode_frame
from tether.proxy import Matcher, ProxyConfig, ProxyThread
from tether.proxy.matcher import Pair, Refuse, Wait
from tether.proxy.relay import CHUNK
from tether.runtime.reference import write_reference_model
from tether.tracker import TrackerConfig, TrackerThread

from .conftest import RawPeer, wait_until
from .test_tvm_interop import tvm_tracker  # noqa: F401  (a fixture)

pytestmark = pytest.mark.timeout(60)

MAGIC = struct.pack("<i", RPC_MAGIC)


def hello(key: str) -> bytes:
    raw = key.encode()
    return MAGIC + struct.pack("<i", len(raw)) + raw


def recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError(f"closed after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


def read_reply(sock: socket.socket) -> tuple[int, str | None]:
    (code,) = struct.unpack("<i", recv_exact(sock, 4))
    if code != HandshakeCode.SUCCESS:
        return code, None
    (n,) = struct.unpack("<i", recv_exact(sock, 4))
    return code, recv_exact(sock, n).decode()


def closed_by_peer(sock: socket.socket, timeout: float = 5.0) -> bool:
    sock.settimeout(timeout)
    try:
        while True:
            if not sock.recv(65536):
                return True
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


@pytest.fixture
def proxy() -> Iterator[Callable[..., ProxyThread]]:
    started: list[ProxyThread] = []

    def start(**kwargs: Any) -> ProxyThread:
        kwargs.setdefault("port", 0)
        kwargs.setdefault("web_port", 0)
        p = ProxyThread(ProxyConfig(**kwargs))
        started.append(p)
        return p

    yield start
    for p in started:
        p.stop()


_open: list[socket.socket] = []


@pytest.fixture(autouse=True)
def _close_sockets() -> Iterator[None]:
    yield
    while _open:
        _open.pop().close()


def dial(host: str, port: int | None) -> socket.socket:
    assert port is not None
    sock = socket.create_connection((host, port), timeout=10)
    _open.append(sock)
    return sock


def connect(p: ProxyThread, key: str) -> socket.socket:
    sock = dial(p.host, p.port)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.sendall(hello(key))
    return sock


def waiting_keys(p: ProxyThread) -> list[str]:
    return sorted(w["key"] for w in p.status()["waiting"])


# -- the matcher, pure --------------------------------------------------------------------------------


def test_matcher_plain_mode() -> None:
    m = Matcher(timeout_client=5, timeout_server=7)
    s, c, c2 = object(), object(), object()
    assert m.arrive(s, "server:k -x=1", 0) == Wait("k", 7)
    assert m.arrive(c2, "server:k", 0) == Refuse(HandshakeCode.DUPLICATE, "another server already waits with key 'k'")
    got = m.arrive(c, "client:k extra -timeout=3", 1)
    assert isinstance(got, Pair) and got.other is s and got.other_key.raw == "server:k -x=1"
    assert m.counts() == {"servers": 0, "clients": 0}
    # the other order, and expiry
    assert m.arrive(c, "client:j", 0) == Wait("j", 5)
    assert not m.expire(c, 4.9)
    assert m.expire(c, 5.0) and not m.waiting(c)
    for bad in ("client:", "server:   ", "nothing", "proxy:k", ""):
        assert isinstance(m.arrive(object(), bad, 0), Refuse)


def test_matcher_tracker_mode_renames_unredeemed_matchkeys() -> None:
    names = iter(f"k:{i}" for i in range(100))
    m = Matcher(tracker_mode=True, alloc_timeout=5, new_matchkey=lambda name: next(names))
    s = object()
    assert m.arrive(s, "server:k", 0) == Wait("k:0", None)
    assert m.arrive(object(), "client:k", 0) == Refuse(HandshakeCode.MISMATCH, "no server waits with matchkey 'k'")
    assert m.stale({"k:0"}, 1) == []  # still listed free by the tracker
    assert m.stale(set(), 2) == []  # handed out: the clock starts
    assert m.stale(set(), 6.9) == []
    assert m.stale(set(), 7.1) == [("k:0", "k:1")]
    assert isinstance(m.arrive(object(), "client:k:0", 8), Refuse)  # the old matchkey is refused
    got = m.arrive(object(), "client:k:1 -timeout=2", 8)
    assert isinstance(got, Pair) and got.other is s
    assert m.leave(s) is None


# -- plain mode over TCP --------------------------------------------------------------------------------


@pytest.mark.parametrize("server_first", [True, False])
def test_pairs_either_order_and_forwards_full_keys(proxy: Callable[..., ProxyThread], server_first: bool) -> None:
    p = proxy()
    first, second = (
        ("server:dev -tether=1", "client:dev -timeout=30")
        if server_first
        else (
            "client:dev -timeout=30",
            "server:dev -tether=1",
        )
    )
    a = connect(p, first)
    wait_until(lambda: p.status()["waiting"] or None, what="the first peer waiting")
    b = connect(p, second)
    assert read_reply(a) == (HandshakeCode.SUCCESS, second)
    assert read_reply(b) == (HandshakeCode.SUCCESS, first)
    a.sendall(b"ping from a")
    assert recv_exact(b, 11) == b"ping from a"
    b.sendall(b"pong")
    assert recv_exact(a, 4) == b"pong"
    a.close()
    assert closed_by_peer(b), "the other side of the pair must be closed too"
    wait_until(lambda: not p.status()["relays"], what="the relay gone")


def test_duplicate_and_mismatch_after_wait_timeout(proxy: Callable[..., ProxyThread]) -> None:
    p = proxy(timeout_client=0.5, timeout_server=60)
    first = connect(p, "server:same")
    wait_until(lambda: waiting_keys(p) == ["server:same"], what="the server waiting")
    dup = connect(p, "server:same")
    assert read_reply(dup) == (HandshakeCode.DUPLICATE, None)
    assert closed_by_peer(dup)
    lonely = connect(p, "client:nobody")
    assert read_reply(lonely) == (HandshakeCode.MISMATCH, None)  # after timeout_client
    assert closed_by_peer(lonely)
    assert waiting_keys(p) == ["server:same"]
    first.close()


@pytest.mark.parametrize("key", ["client:", "server:   ", "nonsense", "proxy:x"])
def test_key_naming_nothing_gets_mismatch(proxy: Callable[..., ProxyThread], key: str) -> None:
    p = proxy()
    sock = connect(p, key)
    assert read_reply(sock) == (HandshakeCode.MISMATCH, None)
    assert closed_by_peer(sock)


@pytest.mark.parametrize(
    "data",
    [
        struct.pack("<i", 0x2F271) + b"rest",  # the tracker's magic
        b"GET / HTTP/1.1\r\n\r\n",
        MAGIC + struct.pack("<i", 1 << 30),  # a key length far beyond the limit
        MAGIC + struct.pack("<i", -5),
        MAGIC + struct.pack("<i", 2) + b"\xff\xfe",  # not UTF-8
    ],
    ids=["tracker magic", "http", "giant key", "negative length", "not utf-8"],
)
def test_bad_hello_is_closed(proxy: Callable[..., ProxyThread], data: bytes) -> None:
    p = proxy()
    sock = dial(p.host, p.port)
    sock.sendall(data)
    assert closed_by_peer(sock)
    assert p.status()["waiting"] == []


def test_silent_connection_closed_after_handshake_timeout(proxy: Callable[..., ProxyThread]) -> None:
    p = proxy(handshake_timeout=0.3)
    sock = dial(p.host, p.port)
    sock.sendall(MAGIC)  # and nothing more
    assert closed_by_peer(sock)


def test_bytes_before_pairing_close_the_waiter(proxy: Callable[..., ProxyThread]) -> None:
    p = proxy()
    early = connect(p, "server:eager")
    wait_until(lambda: waiting_keys(p) == ["server:eager"], what="the server waiting")
    early.sendall(b"too soon")
    assert closed_by_peer(early)
    wait_until(lambda: waiting_keys(p) == [], what="the pool emptied")
    # the key is free again: a new server waits without DUPLICATE, and pairs
    server = connect(p, "server:eager")
    client = connect(p, "client:eager")
    assert read_reply(client)[0] == HandshakeCode.SUCCESS
    assert read_reply(server)[0] == HandshakeCode.SUCCESS


def test_waiter_that_vanishes_leaves_the_pool(proxy: Callable[..., ProxyThread]) -> None:
    p = proxy()
    gone = connect(p, "client:ghost")
    wait_until(lambda: waiting_keys(p) == ["client:ghost"], what="the client waiting")
    gone.close()
    wait_until(lambda: waiting_keys(p) == [], what="the vanished client out of the pool")
    server = connect(p, "server:ghost")  # waits instead of pairing with the dead client
    wait_until(lambda: waiting_keys(p) == ["server:ghost"], what="the server waiting")
    server.close()


def test_slow_reader_back_pressure_keeps_memory_bounded(proxy: Callable[..., ProxyThread]) -> None:
    """A receiver that stops reading stalls the sender through TCP; the proxy holds at most one chunk."""
    p = proxy()
    server = connect(p, "server:slow")
    client = connect(p, "client:slow")
    assert read_reply(server)[0] == read_reply(client)[0] == HandshakeCode.SUCCESS
    for s in (server, client):
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 256 << 10)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 256 << 10)
    offered = 256 << 20
    block = np.random.default_rng(7).integers(0, 256, 1 << 20, dtype=np.uint8).tobytes()
    digest = hashlib.sha256()
    client.setblocking(False)
    sent = 0
    queued_max = 0
    while sent < offered:  # push until nothing moves for half a second: the pipeline is full
        try:
            n = client.send(memoryview(block)[sent % len(block) :])
            digest.update(memoryview(block)[sent % len(block) : sent % len(block) + n])
            sent += n
        except BlockingIOError:
            queued_max = max([queued_max, *(r["queued"][1] for r in p.status()["relays"])])
            if not select.select([], [client], [], 0.5)[1]:
                break
    assert sent < 64 << 20, f"the sender pushed {sent >> 20} MiB into a receiver that reads nothing"
    assert queued_max <= CHUNK + 16
    # the receiver catches up: every byte arrives, in order
    client.setblocking(True)
    received = hashlib.sha256()
    got = 0
    server.settimeout(10)
    while got < sent:
        data = server.recv(1 << 20)
        assert data
        received.update(data)
        got += len(data)
    assert received.hexdigest() == digest.hexdigest()
    client.close()
    assert closed_by_peer(server)


# -- WebSocket ------------------------------------------------------------------------------------------


def test_websocket_server_pairs_with_tcp_client_as_tvm_expects(proxy: Callable[..., ProxyThread]) -> None:
    """The browser runtime's way: magic, length and key as three messages; the reply as three messages;
    every relayed TCP chunk one binary message; WebSocket messages a byte stream on the TCP side."""
    p = proxy()
    assert p.ws_url is not None
    key = b"server:web -tether=1"
    with ws_connect(p.ws_url, timeout=10) as ws:
        ws.send(MAGIC)
        ws.send(struct.pack("<i", len(key)))
        ws.send(key)
        wait_until(lambda: waiting_keys(p) == ["server:web -tether=1"], what="the WebSocket server waiting")
        client = connect(p, "client:web")
        assert read_reply(client) == (HandshakeCode.SUCCESS, key.decode())
        assert ws.recv() == MAGIC
        assert ws.recv() == struct.pack("<i", len("client:web"))
        assert ws.recv() == b"client:web"
        ws.send(b"from ")
        ws.send(b"the browser")
        assert recv_exact(client, 16) == b"from the browser"
        client.sendall(b"x" * 3000)
        got = b""
        while len(got) < 3000:
            msg = ws.recv()
            assert msg is not None
            got += msg
        assert got == b"x" * 3000
    assert closed_by_peer(client), "the WebSocket closing closes the TCP side"


def test_websocket_bad_input(proxy: Callable[..., ProxyThread]) -> None:
    p = proxy()
    assert p.ws_url is not None
    with ws_connect(p.ws_url, timeout=10) as ws:
        ws.send(b"\x01\x02\x03\x04")  # wrong magic
        assert ws.recv() is None  # a close frame, then the end
    # an unmasked client frame breaks RFC 6455: closed
    raw = dial(p.host, p.web_port)
    raw.sendall(
        b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    head = b""
    while b"\r\n\r\n" not in head:
        head += raw.recv(1024)
    assert head.startswith(b"HTTP/1.1 101")
    raw.sendall(encode_frame(Opcode.BINARY, MAGIC, mask=False))
    assert closed_by_peer(raw)


@pytest.mark.parametrize(("path", "status"), [("/", b"200"), ("/status", b"200"), ("/nope", b"404"), ("/ws", b"426")])
def test_web_port_http(proxy: Callable[..., ProxyThread], path: str, status: bytes) -> None:
    p = proxy()
    raw = dial(p.host, p.web_port)
    raw.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    data = b""
    while chunk := raw.recv(65536):
        data += chunk
    assert data.split(b" ")[1] == status
    if path == "/status":
        assert b'"mode": "plain"' in data


# -- tether sessions through the proxy --------------------------------------------------------------------


def _session_round_trip(sess: tether.Session, tmp_path: Path) -> None:
    spec = {"name": "x", "dtype": "float32", "shape": [2, 3]}
    write_reference_model(
        tmp_path / "m.json",
        [spec],
        [{**spec, "name": "y"}],
        [{"op": "affine", "input": "x", "output": "y", "scale": 2.0, "bias": 1.0}],
    )
    sess.upload(tmp_path / "m.json", "m.json")
    model = sess.load_model("m.json")
    x = np.arange(6, dtype="float32").reshape(2, 3)
    np.testing.assert_array_equal(model.run({"x": x})["y"], x * 2 + 1)
    assert sess.download("m.json") == (tmp_path / "m.json").read_bytes()


def _connect_retrying(host: str, port: int, key: str) -> tether.Session:
    def attempt() -> tether.Session | None:
        try:
            return tether.connect(host, port, key=key, timeout=5)
        except tether.SessionRefused:
            return None  # the server is between sessions: not back at the proxy yet

    return wait_until(attempt, timeout=15, what="a session through the proxy")


@pytest.mark.parametrize("server_over", ["tcp", "ws"])
def test_tether_sessions_through_plain_proxy(
    proxy: Callable[..., ProxyThread], device_server: Any, tmp_path: Path, server_over: str
) -> None:
    p = proxy()
    if server_over == "tcp":
        server = device_server(key="plain", host=p.host, port=p.port, through_proxy=True)
    else:
        server = device_server(key="plain", proxy_url=p.ws_url)
    wait_until(lambda: any(w["key"].startswith("server:plain") for w in p.status()["waiting"]), what="server waiting")
    for _ in range(2):  # and again: the server went back to the proxy after the first session
        with _connect_retrying(p.host, p.port, "plain") as sess:
            _session_round_trip(sess, tmp_path)
        wait_until(lambda: server.busy_slots() == 0, timeout=10, what="the session over")


def test_tether_client_over_websocket(proxy: Callable[..., ProxyThread], device_server: Any, tmp_path: Path) -> None:
    p = proxy()
    assert p.ws_url is not None
    device_server(key="wsclient", host=p.host, port=p.port, through_proxy=True)
    wait_until(lambda: waiting_keys(p) != [], what="server waiting")
    with tether.connect(p.ws_url, key="wsclient", timeout=10) as sess:
        _session_round_trip(sess, tmp_path)


def _free(tracker: TrackerThread, key: str) -> int:
    with TrackerClient.connect(tracker.host, tracker.port, 5) as c:
        info = c.summary(timeout=5)["queue_info"].get(key)
    return int(info["free"]) if info else 0


def test_tracker_mode_tether_sessions_labels_and_query(
    proxy: Callable[..., ProxyThread], tracker: TrackerThread, device_server: Any, tmp_path: Path
) -> None:
    p = proxy(tracker=(tracker.host, tracker.port), tracker_period=0.2)
    device_server(key="npu", host=p.host, port=p.port, through_proxy=True, labels={"soc": "rk3588"})
    device_server(key="npu", proxy_url=p.ws_url, labels={"soc": "sd8g3"})
    wait_until(lambda: _free(tracker, "npu") == 2, timeout=15, what="both proxied servers offered")
    status = query_tracker(tracker.host, tracker.port)
    (row,) = [k for k in status.keys if k.key == "npu"]
    assert (row.total, row.free) == (2, 2)
    assert any(s.key == "server:proxy[npu]" for s in status.servers)
    with (
        tether.connect_tracker(tracker.host, tracker.port) as client,
        client.request("npu", labels={"soc": "sd8g3"}, timeout=10) as sess,
    ):
        assert sess.info()["labels"] == {"soc": "sd8g3"}
        _session_round_trip(sess, tmp_path)
        row = next(k for k in query_tracker(tracker.host, tracker.port).keys if k.key == "npu")
        assert (row.total, row.free, row.busy) == (2, 1, 1)
    wait_until(lambda: _free(tracker, "npu") == 2, timeout=15, what="the server offered again")


def test_tracker_mode_withdraws_vanished_server_and_renames_unused_grants(
    proxy: Callable[..., ProxyThread], tracker: TrackerThread
) -> None:
    p = proxy(tracker=(tracker.host, tracker.port), tracker_period=0.1, timeout_alloc=0.3)
    server = connect(p, "server:dev")
    wait_until(lambda: _free(tracker, "dev") == 1, what="the server offered")
    # a TVM-style REQUEST whose grant nobody redeems
    with TrackerClient.connect(tracker.host, tracker.port, 5) as c:
        grant = c.request_grant("dev", timeout=5)
    stale = grant.matchkey
    wait_until(lambda: _free(tracker, "dev") == 1, timeout=10, what="the unused grant renamed and offered again")
    late = connect(p, f"client:{stale}")
    assert read_reply(late) == (HandshakeCode.MISMATCH, None)
    # the server goes away: tether's tracker is told at once
    server.close()
    wait_until(lambda: _free(tracker, "dev") == 0, timeout=5, what="the vanished server withdrawn")


def test_tracker_mode_survives_tracker_restart(proxy: Callable[..., ProxyThread], tracker: TrackerThread) -> None:
    first = TrackerThread(TrackerConfig(host="127.0.0.1", port=0))
    port = first.port
    p = proxy(tracker=("127.0.0.1", port), tracker_period=0.1)
    server = connect(p, "server:phoenix")
    wait_until(lambda: _free(first, "phoenix") == 1, what="offered to the first tracker")
    first.stop()
    again = TrackerThread(TrackerConfig(host="127.0.0.1", port=port))
    try:
        wait_until(lambda: _free(again, "phoenix") == 1, timeout=15, what="offered again after the restart")
        with TrackerClient.connect(again.host, again.port, 5) as c:
            grant = c.request_grant("phoenix", timeout=5)
        client = connect(p, f"client:{grant.matchkey}")
        assert read_reply(client)[0] == HandshakeCode.SUCCESS
        assert read_reply(server)[0] == HandshakeCode.SUCCESS
    finally:
        again.stop()


@pytest.mark.tvm
def test_tracker_mode_with_tvms_tracker(proxy: Callable[..., ProxyThread], tvm_tracker: Any) -> None:  # noqa: F811
    """TVM's tracker takes the proxy's registration as it takes TVM's proxy's: ``server:proxy[k]``, one PUT
    per waiting server; tether's extensions (per-slot terms, WITHDRAW, SESSION) are never sent to it."""
    from .test_tvm_interop import free_of

    p = proxy(tracker=("127.0.0.1", tvm_tracker.port), tracker_period=0.2)
    servers = [connect(p, "server:tv -tether=1") for _ in range(2)]
    wait_until(lambda: free_of(tvm_tracker.port, "tv") == 2, timeout=15, what="both offered to TVM's tracker")
    peer = RawPeer("127.0.0.1", tvm_tracker.port)
    try:
        summary = peer.call([6])[1]
        assert [i["key"] for i in summary["server_info"]] == ["server:proxy[tv]"]
        host, port, matchkey = peer.call([4, "tv", "", 0])[1]
        assert (host, port) == ("127.0.0.1", p.port)
    finally:
        peer.close()
    client = connect(p, f"client:{matchkey}")
    assert read_reply(client) == (HandshakeCode.SUCCESS, "server:tv -tether=1")
    status = p.status()["tracker"]
    assert status["connected"] and status["tether"] is None and status["connects"] == 1
    assert len(servers) == 2


def test_tether_server_behind_proxy_outlives_wait_timeouts_and_proxy_restarts(
    proxy: Callable[..., ProxyThread], device_server: Any, tmp_path: Path
) -> None:
    """TVM's server gives up after 5 failed reconnects; tether's waits again after every MISMATCH and
    comes back when the proxy itself comes back."""
    first = proxy(timeout_server=0.2)
    port = first.port
    device_server(key="stubborn", host=first.host, port=port, through_proxy=True)
    wait_until(lambda: first.status()["stats"]["refused"] >= 3, timeout=20, what="three wait timeouts")
    first.stop()
    second = proxy(port=port, port_end=port + 1)  # the same port, a new proxy
    wait_until(lambda: waiting_keys(second) != [], timeout=20, what="the server back at the new proxy")
    with _connect_retrying(second.host, second.port, "stubborn") as sess:
        _session_round_trip(sess, tmp_path)


def test_websocket_bytes_right_behind_the_key_reach_the_other_side(proxy: Callable[..., ProxyThread]) -> None:
    """A WebSocket client that sends its first session bytes in the same message as its key, and more
    messages in the same read, loses none of them (over TCP the exact handshake read keeps them)."""
    p = proxy()
    assert p.ws_url is not None
    server = connect(p, "server:pipe")
    wait_until(lambda: waiting_keys(p) == ["server:pipe"], what="the server waiting")
    with ws_connect(p.ws_url, timeout=10) as ws:
        key = b"client:pipe"
        ws.send(MAGIC + struct.pack("<i", len(key)) + key + b"first|")
        ws.send(b"second")
        assert read_reply(server) == (HandshakeCode.SUCCESS, "client:pipe")
        assert recv_exact(server, 12) == b"first|second"
        assert ws.recv() == MAGIC


def test_websocket_ping_flood_from_a_peer_that_never_reads_stays_bounded(proxy: Callable[..., ProxyThread]) -> None:
    p = proxy()
    assert p.web_port is not None
    raw = dial(p.host, p.web_port)
    raw.sendall(
        b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    key = b"server:flood"
    raw.sendall(
        b"".join(encode_frame(Opcode.BINARY, part, mask=True) for part in (MAGIC, struct.pack("<i", len(key)), key))
    )
    wait_until(lambda: waiting_keys(p) == ["server:flood"], what="the WebSocket server waiting")
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    ping = encode_frame(Opcode.PING, b"x" * 125, mask=True)
    for _ in range(200):  # 200 x 100 pings, never reading a pong
        raw.sendall(ping * 100)
    queued = p.call(lambda: max(peer.ep.out_bytes for peer in p.server._peers))
    assert queued <= (64 << 10) + 256
    assert waiting_keys(p) == ["server:flood"]


def test_tracker_mode_refuses_giant_key_names(proxy: Callable[..., ProxyThread], tracker: TrackerThread) -> None:
    p = proxy(tracker=(tracker.host, tracker.port), tracker_period=0.1)
    big = connect(p, "server:" + "k" * 1000)
    assert read_reply(big) == (HandshakeCode.MISMATCH, None)
    fine = connect(p, "server:fine")
    wait_until(lambda: _free(tracker, "fine") == 1, what="a normal server still offered")
    fine.close()


def test_http_answers_are_complete_and_oversized_heads_get_431(
    proxy: Callable[..., ProxyThread], tmp_path: Path
) -> None:
    page = tmp_path / "index.html"
    page.write_bytes(b"<html>" + b"x" * (8 << 20) + b"</html>")
    p = proxy(index_page=page)
    raw = dial(p.host, p.web_port)
    raw.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    data = b""
    while chunk := raw.recv(1 << 20):
        data += chunk
    assert data.startswith(b"HTTP/1.1 200") and data.endswith(b"x</html>")
    assert len(data.split(b"\r\n\r\n", 1)[1]) == page.stat().st_size
    huge = dial(p.host, p.web_port)
    huge.sendall(b"GET /ws HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"p" * 20000 + b"\r\n\r\n")
    reply = huge.recv(1024)
    assert reply.startswith(b"HTTP/1.1 431")
