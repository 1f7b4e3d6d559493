"""Issue 12's attacks, repeated with authentication on: each is prevented, and the honest peer that got
something wrong gets a clear error. (The fake server at the tracker and at the proxy, the impostor device,
the priority of 1e300 and the stalled exchanges are in ``test_auth.py``; the same attacks with
authentication off in ``test_tracker_bounds.py``, ``test_server_bounds.py`` and ``test_proxy_bounds.py``.)
"""

from __future__ import annotations

import json
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import tether
from tether.aio.auth import prove_token, recv_step
from tether.client.query import query_tracker
from tether.client.tracker import TrackerClient
from tether.errors import RequestRejected, SessionTimeout
from tether.protocol.auth import parse_token
from tether.protocol.constants import RPC_MAGIC, HandshakeCode
from tether.protocol.tracker import Request, RequestOptions
from tether.proxy import ProxyConfig, ProxyThread
from tether.tracker import TrackerConfig, TrackerThread

from .conftest import wait_until
from .test_server_bounds import _answer, _exact, _put, _request, _rss, reference_model
from .test_tracker_bounds import _LimitedTracker

pytestmark = pytest.mark.timeout(90)

SECRETS = {"alice": "alice-secret-0123456789abcdef", "dev": "device-secret-0123456789abcdef"}


def token(name: str) -> str:
    return f"{name}:{SECRETS[name]}"


@pytest.fixture(autouse=True)
def _no_env_token(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TETHER_TOKEN", raising=False)


@pytest.fixture
def auth_file(tmp_path: Path) -> Path:
    path = tmp_path / "keyring"
    path.write_text(f"alice user {SECRETS['alice']}\ndev server {SECRETS['dev']}\n")
    return path


def _tracker(auth_file: Path, **config: Any) -> TrackerThread:
    return TrackerThread(TrackerConfig(host="127.0.0.1", port=0, auth_file=str(auth_file), **config))


def test_silent_sockets_cannot_use_up_an_authenticating_tracker(auth_file: Path) -> None:
    """1,100 silent sockets used up a tracker limited to 1,024 descriptors: here 300 at 256, with
    authentication on. An authenticated server and user are still served."""
    child = _LimitedTracker("--handshake-timeout", "0", "--idle-timeout", "0", "--auth-file", str(auth_file))
    silent: list[socket.socket] = []
    try:
        port = int(child.wait_line("listening on ").rsplit(":", 1)[1])
        server = TrackerClient.connect("127.0.0.1", port, token=token("dev"))
        server.update_info({"key": "server:k", "addr": [None, 9000]})
        server.put("k", 9000, "k:1")
        for _ in range(300):
            silent.append(socket.create_connection(("127.0.0.1", port), timeout=10))
        with TrackerClient.connect("127.0.0.1", port, timeout=30, token=token("alice")) as user:
            grant = user.request_grant("k", timeout=30)
            assert (grant.port, grant.matchkey) == (9000, "k:1")
        server.close()
    finally:
        for s in silent:
            s.close()
        child.stop()


def test_a_flood_of_requests_is_bounded_by_the_verified_user(auth_file: Path) -> None:
    """200,000 queued requests grew the tracker to 192 MB. With authentication on the per-user limit counts
    the verified name: claiming other users' names on other connections does not get around it."""
    with _tracker(auth_file, max_waiters_per_user=5) as t:
        conns = [TrackerClient.connect(t.host, t.port, token=token("alice")) for _ in range(6)]
        try:
            for i, conn in enumerate(conns):
                opts = RequestOptions(request_id=f"r{i}", protocol="tvm", user=f"someone-else-{i}")
                conn.send(Request("nobody", f"someone-else-{i}", 1, opts))
            wait_until(lambda: _pending(t, "nobody") == 5, what="five requests waiting, the sixth rejected")
            with pytest.raises(RequestRejected, match="too many waiting requests of user 'alice'"):
                conns[5].request_grant("nobody", timeout=5, request_id="again")
        finally:
            for conn in conns:
                conn.close()


def _pending(t: TrackerThread, key: str) -> int:
    row = next((k for k in query_tracker(t.host, t.port, token=token("alice")).keys if k.key == key), None)
    return 0 if row is None else row.pending


def test_fake_slots_need_a_server_token_and_are_bounded(auth_file: Path) -> None:
    """100,000 fake slots were accepted: without a server token none is, with one at most
    ``max_slots_per_connection``."""
    with _tracker(auth_file, max_slots_per_connection=8) as t:
        with (
            TrackerClient.connect(t.host, t.port, token=token("alice")) as user,
            pytest.raises(tether.PermissionDenied, match="PUT needs server"),
        ):
            user.put("k", 9000, "k:0")
        with TrackerClient.connect(t.host, t.port, token=token("dev")) as server:
            replies = []
            for i in range(9):
                server.send(_put_msg(i))
                replies.append(server.recv(time.monotonic() + 10))
            assert replies == [0] * 8 + [-1]


def _put_msg(i: int) -> Any:
    from tether.protocol.tracker import Put

    return Put("k", 9000, f"k:{i}")


def _authed_raw_session(port: int, deadline_s: float = 10.0) -> socket.socket:
    """A native session on a plain socket with authentication: handshake, proof, the server's last word."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    key = b"client:dev -tether=1"
    sock.sendall(struct.pack("<ii", RPC_MAGIC, len(key)) + key)
    code, n = struct.unpack("<ii", _exact(sock, 8))
    assert code == HandshakeCode.SUCCESS
    assert b"-auth=1" in _exact(sock, n)
    prove_token(sock, parse_token(token("alice")), "server", time.monotonic() + deadline_s)
    assert recv_step(sock, time.monotonic() + deadline_s) == {"ready": True}
    sock.settimeout(10)
    return sock


def test_an_announced_tensor_is_refused_before_allocation_with_auth_on(device_server: Any, auth_file: Path) -> None:
    server = device_server(key="dev", auth_file=str(auth_file))
    with _authed_raw_session(server.port) as sock:
        sock.sendall(_request(1, {"op": "info"}))
        pid = _answer(sock)[2]["pid"]
        before = _rss(pid)
        sock.sendall(_put(2, 2 << 30))
        kind, frame_id, header = _answer(sock)
        assert (kind, frame_id, header["type"]) == (3, 2, "QuotaExceeded")
        assert _rss(pid) < before + (64 << 20)


def test_session_time_and_a_vanished_client_with_auth_on(device_server: Any, auth_file: Path, tmp_path: Path) -> None:
    """A session that asked for no time limit ends at --max-session-time; a client killed mid-run frees the
    device at once. Both with an authenticated user."""
    server = device_server(key="dev", auth_file=str(auth_file), max_session_s=2)
    model = reference_model(tmp_path / "sleep.json", {"op": "sleep", "seconds": 30})
    with tether.connect("127.0.0.1", server.port, key="dev", token=token("alice"), timeout=10) as sess:
        sess.upload(model, "sleep.json")
        with pytest.raises(SessionTimeout):
            sess.load_model("sleep.json").run({"x": np.zeros((2, 3), "float32")})
    wait_until(lambda: server.busy_slots() == 0, timeout=10, what="the slot free after the timeout")
    code = (
        "import sys, numpy as np, tether\n"
        f"s = tether.connect('127.0.0.1', {server.port}, key='dev', token={token('alice')!r}, timeout=10)\n"
        f"s.upload({str(model)!r}, 'sleep.json')\n"
        "m = s.load_model('sleep.json')\n"
        "print('running', flush=True)\n"
        "m.run({'x': np.zeros((2, 3), 'float32')})\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "running"
        wait_until(lambda: server.busy_slots() == 1, what="the session running")
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        wait_until(lambda: server.busy_slots() == 0, timeout=5, what="the device free after its client vanished")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        if proc.stdout is not None:
            proc.stdout.close()


def test_parked_servers_at_a_proxy_with_auth_on(auth_file: Path) -> None:
    """300 fake servers parked at a proxy stayed forever: with authentication on a server without a token is
    refused at once, and servers with one are bounded per address."""
    cfg = ProxyConfig(host="127.0.0.1", port=0, web_port=None, max_parked_per_peer=5, auth_file=str(auth_file))
    with ProxyThread(cfg) as p:
        socks = []
        try:
            fake = _park(p.port, "server:phone -tether=1 -auth=1")
            assert struct.unpack("<i", fake.recv(4))[0] == HandshakeCode.MISMATCH
            fake.close()
            codes = []
            for i in range(7):  # plain mode: one server per key, as at TVM's proxy
                sock = _park(p.port, f"server:phone{i} -tether=1 -auth=1 -token=1")
                socks.append(sock)
                prove_token(sock, parse_token(token("dev")), "proxy", time.monotonic() + 10)
                sock.settimeout(0.5)
                try:
                    codes.append(struct.unpack("<i", sock.recv(4))[0])
                except TimeoutError:
                    codes.append(None)  # parked: waits for a client
            assert codes == [None] * 5 + [HandshakeCode.MISMATCH] * 2
        finally:
            for sock in socks:
                sock.close()


def _park(port: int, key: str) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    raw = key.encode()
    sock.sendall(struct.pack("<ii", RPC_MAGIC, len(raw)) + raw)
    return sock


def test_request_reply_json_is_unchanged_for_tvm_peers_with_auth_off() -> None:
    """With authentication off nothing changes on the wire: TVM's REQUEST gets TVM's exact reply."""
    with TrackerThread(TrackerConfig(host="127.0.0.1", port=0)) as t:
        from .conftest import RawPeer

        server, client = RawPeer(t.host, t.port), RawPeer(t.host, t.port)
        assert server.call([3, "k", [9000, "k:1"], None]) == 0
        client.send_json([4, "k", "", 1])
        assert json.dumps(client.recv_json()) == '[0, ["127.0.0.1", 9000, "k:1"]]'
        server.close()
        client.close()
