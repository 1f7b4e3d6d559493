"""Authentication and roles: the exchange alone, then the tracker, device server and proxy over real sockets.

The attacks of issue 12 are repeated with authentication on: a fake server registering a real key (at the
tracker and at the proxy), an impostor device that a client would have trusted, a priority of 1e300,
a stalled exchange holding the only slot. Honest peers that got something wrong get a clear error.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import struct
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import tether
from tether.client.tracker import TrackerClient
from tether.errors import AuthFailed, ConfigError, PermissionDenied, SessionRefused
from tether.protocol.auth import Initiator, Keyring, Responder, Role, Token, address_in, parse_networks, parse_token
from tether.protocol.constants import RPC_MAGIC, HandshakeCode
from tether.proxy import ProxyConfig, ProxyThread
from tether.runtime.reference import write_reference_model
from tether.tracker import TrackerConfig, TrackerThread

from .conftest import RawPeer, wait_until

pytestmark = pytest.mark.timeout(60)

SECRETS = {
    "root": "admin-secret-0123456789abcdef",
    "alice": "alice-secret-0123456789abcdef",
    "bob": "bob-secret-0123456789abcdefgh",
    "dev1": "device-secret-0123456789abcdef",
}
KEYRING = f"""# test keyring
root admin {SECRETS["root"]}
alice user {SECRETS["alice"]} max_priority=5
bob user {SECRETS["bob"]}
dev1 server {SECRETS["dev1"]}
"""


def token(name: str) -> str:
    return f"{name}:{SECRETS[name]}"


@pytest.fixture(autouse=True)
def _no_env_token(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TETHER_TOKEN", raising=False)


@pytest.fixture
def auth_file(tmp_path: Path) -> Path:
    path = tmp_path / "keyring"
    path.write_text(KEYRING)
    return path


@pytest.fixture
def auth_tracker(auth_file: Path) -> Iterator[Callable[..., TrackerThread]]:
    threads: list[TrackerThread] = []

    def start(**kwargs: Any) -> TrackerThread:
        t = TrackerThread(TrackerConfig(port=0, auth_file=str(auth_file), **kwargs))
        threads.append(t)
        t.__enter__()
        return t

    yield start
    for t in threads:
        t.__exit__(None, None, None)


def add_model(tmp_path: Path) -> Path:
    """y = x + 2: an honest device answers 3 for x = 1."""
    spec = {"name": "x", "dtype": "float32", "shape": [1]}
    path = tmp_path / "add.json"
    write_reference_model(
        path,
        [spec],
        [{**spec, "name": "y"}],
        [{"op": "affine", "input": "x", "output": "y", "scale": 1.0, "bias": 2.0}],
    )
    return path


def run_add(sess: tether.Session, model: Path) -> float:
    sess.upload(model, "add.json")
    return float(sess.load_model("add.json").run({"x": np.ones(1, dtype="float32")})["y"][0])


# -- the exchange, sans I/O -----------------------------------------------------------------------------


def exchange(keyring: Keyring, tok: Token, context: str = "tracker") -> tuple[Any, Role]:
    init, resp = Initiator(tok, context), Responder(keyring, context)
    challenge = resp.challenge(init.hello())
    cred, verdict = resp.verify(init.answer(challenge))
    return cred, init.finish(verdict)


def test_exchange_proves_both_sides_and_never_sends_the_secret() -> None:
    keyring = Keyring.parse(KEYRING)
    init, resp = Initiator(parse_token(token("alice")), "tracker"), Responder(keyring, "tracker")
    steps = [init.hello()]
    steps.append(resp.challenge(steps[-1]))
    steps.append(init.answer(steps[-1]))
    cred, verdict = resp.verify(steps[-1])
    steps.append(verdict)
    assert init.finish(verdict) is Role.USER and cred.name == "alice" and cred.max_priority == 5
    assert all(SECRETS["alice"] not in repr(s) for s in steps)
    assert SECRETS["alice"] not in repr(cred) and SECRETS["alice"] not in repr(parse_token(token("alice")))


def test_wrong_secret_unknown_name_and_replay_are_refused_alike() -> None:
    keyring = Keyring.parse(KEYRING)
    with pytest.raises(AuthFailed, match="unknown here or its secret is wrong") as wrong:
        exchange(keyring, Token("alice", "not-alices-secret-at-all"))
    with pytest.raises(AuthFailed, match="unknown here or its secret is wrong") as unknown:
        exchange(keyring, Token("mallory", "whatever-secret-she-likes"))
    assert str(wrong.value).replace("alice", "X") == str(unknown.value).replace("mallory", "X")
    # a recorded proof is worth nothing against a fresh challenge
    init = Initiator(parse_token(token("bob")), "tracker")
    first = Responder(keyring, "tracker")
    recorded = init.answer(first.challenge(init.hello()))
    again = Responder(keyring, "tracker")
    again.challenge(init.hello())
    with pytest.raises(AuthFailed):
        again.verify(recorded)
    # a proof for the tracker is no proof for a device server
    init = Initiator(parse_token(token("bob")), "server")
    resp = Responder(keyring, "tracker")
    with pytest.raises(AuthFailed):
        resp.verify(init.answer(resp.challenge(init.hello())))


def test_an_impostor_that_does_not_know_the_secret_is_caught_by_the_client() -> None:
    fake = Keyring.parse("alice user a-guess-at-alices-secret-000")  # cannot verify alice, nor prove itself
    init = Initiator(parse_token(token("alice")), "server")
    resp = Responder(fake, "server")
    with pytest.raises(AuthFailed):
        resp.verify(init.answer(resp.challenge(init.hello())))
    # a responder that skips verification and makes up a proof is caught by finish()
    init = Initiator(parse_token(token("alice")), "server")
    init.answer({"nonce": "ab" * 32})
    with pytest.raises(AuthFailed, match="could not prove it knows token 'alice'"):
        init.finish({"ok": True, "proof": "00" * 32, "role": "user"})
    with pytest.raises(AuthFailed, match="reflection"):
        fresh = Initiator(parse_token(token("alice")), "server")
        fresh.answer({"nonce": fresh.hello()["nonce"]})


def test_keyring_errors_name_the_line_never_the_secret(tmp_path: Path) -> None:
    for text, match in [
        ("alice user short", "at least 16"),
        ("alice wizard 0123456789abcdef0123", "role must be"),
        ("alice user 0123456789abcdef0123\nalice admin 0123456789abcdef9999", "twice"),
        ("al ice", "expected"),
        ("alice user 0123456789abcdef0123 colour=red", "unknown option"),
        ("# nothing\n", "no credentials"),
    ]:
        with pytest.raises(ConfigError, match=match) as info:
            Keyring.parse(text)
        assert "0123456789abcdef" not in str(info.value)
    with pytest.raises(ConfigError, match="line 2"):
        Keyring.parse("bob user 0123456789abcdef0123\nalice user short\n")
    with pytest.raises(ConfigError, match="NAME:SECRET"):
        parse_token("no-colon-here")
    nets = parse_networks(["10.0.0.0/8,127.0.0.1", "::1"])
    assert address_in("10.2.3.4", nets) and address_in("127.0.0.1", nets) and address_in("::ffff:10.0.0.1", nets)
    assert not address_in("192.168.1.1", nets) and not address_in("not-an-ip", nets)
    with pytest.raises(ConfigError, match="not an address"):
        parse_networks(["10.0.0.0/33"])


# -- the tracker ----------------------------------------------------------------------------------------


def test_tracker_refuses_unauthenticated_peers_with_a_clear_reply(
    auth_tracker: Callable[..., TrackerThread], caplog: pytest.LogCaptureFixture
) -> None:
    t = auth_tracker()
    raw = RawPeer(t.host, t.port)
    assert raw.call([1]) == 0  # PING is always answered
    reply = raw.call([3, "phone", [9091, "phone:fake"], None])
    assert reply[0] == -1 and reply[1]["error"] == "unauthenticated" and "TETHER_TOKEN" in reply[1]["message"]
    assert raw.closed_by_peer()
    raw.close()
    with TrackerClient.connect(t.host, t.port) as client, pytest.raises(AuthFailed, match="requires a token"):
        client.request_grant("phone", timeout=1)
    with pytest.raises(AuthFailed, match="unknown here or its secret is wrong"):
        TrackerClient.connect(t.host, t.port, token="alice:" + "x" * 20)
    assert any("refused" in r.getMessage() for r in caplog.records)


def test_roles_decide_who_registers_requests_and_stops(auth_tracker: Callable[..., TrackerThread]) -> None:
    t = auth_tracker(stop_key="the-stop-key")
    with TrackerClient.connect(t.host, t.port, token=token("alice")) as user:
        assert user.user == "alice" and user.role is Role.USER
        with pytest.raises(PermissionDenied, match="role user, and PUT needs server"):
            user.put("phone", 9091, "phone:x")
    with TrackerClient.connect(t.host, t.port, token=token("dev1")) as server:
        server.put("phone", 9091, "phone:x")
        with pytest.raises(PermissionDenied, match="REQUEST needs user"):
            server.request_grant("phone", timeout=1)
    with (
        TrackerClient.connect(t.host, t.port, token=token("bob")) as bob,
        pytest.raises(PermissionDenied, match="STOP"),
    ):
        bob.stop("the-stop-key")
    with TrackerClient.connect(t.host, t.port, token=token("root")) as admin:
        assert "phone" in admin.summary()["queue_info"]
        assert admin.stop("the-stop-key")


def test_the_verified_name_is_the_user_and_the_priority_is_capped(
    auth_tracker: Callable[..., TrackerThread],
) -> None:
    t = auth_tracker()
    alice = TrackerClient.connect(t.host, t.port, token=token("alice"))
    bob = TrackerClient.connect(t.host, t.port, token=token("bob"))
    try:
        alice.send(_request("phone", user="bob", priority=1e300, request_id="a1"))
        bob.send(_request("phone", user="bob", priority=10, request_id="b1"))
        with TrackerClient.connect(t.host, t.port, token=token("root")) as admin:

            def waiters() -> list[dict[str, Any]]:
                detail = admin.summary(detail=True)["tether"]["keys"]
                return list(detail.get("phone", {}).get("waiters", []))

            rows = wait_until(lambda: len(waiters()) == 2 and waiters(), what="both requests queued")
        by_id = {r["id"]: r for r in rows}
        assert by_id["a1"]["user"] == "alice" and by_id["a1"]["priority"] == 5  # not bob, not 1e300
        assert by_id["b1"]["user"] == "bob" and by_id["b1"]["priority"] == 10
        with TrackerClient.connect(t.host, t.port, token=token("dev1")) as server:
            server.put("phone", 9091, "phone:m1")
            grant = bob.recv(deadline=_soon())  # bob's 10 beats alice's capped 5
            assert grant[0] == 0 and grant[2]["id"] == "b1"
    finally:
        alice.close()
        bob.close()


def _request(key: str, *, user: str, priority: float, request_id: str) -> Any:
    from tether.protocol.tracker import Request, RequestOptions

    return Request(key, user, priority, RequestOptions(request_id=request_id, protocol="tvm", user=user))


def _soon(seconds: float = 10.0) -> float:
    import time

    return time.monotonic() + seconds


def test_tvm_peers_only_from_allowed_networks(auth_tracker: Callable[..., TrackerThread]) -> None:
    allowed = auth_tracker(allow_tvm=("127.0.0.0/8",))
    raw = RawPeer(allowed.host, allowed.port)
    assert raw.call([5, {"key": "server:phone", "addr": [None, 9091]}]) == 0
    assert raw.call([3, "phone", [9091, "phone:tvm"], None]) == 0
    assert raw.call([6])[0] == 0
    assert raw.call([2, allowed.server.stop_key]) == [-1, {"error": "unauthenticated", "message": _any_text()}]
    raw.close()
    other = auth_tracker(allow_tvm=("10.0.0.0/8",))
    raw = RawPeer(other.host, other.port)
    assert raw.call([6])[1]["error"] == "unauthenticated"
    raw.close()


class _any_text(str):
    def __eq__(self, other: object) -> bool:
        return isinstance(other, str)

    __hash__ = str.__hash__


def test_a_fake_server_cannot_take_users_sessions(
    auth_tracker: Callable[..., TrackerThread], device_server: Any, tmp_path: Path
) -> None:
    """The attack: a fake server registers a real key straight at the tracker and answers 42. With
    authentication on it is refused at its first PUT, and all 10 sessions reach the real device."""
    t = auth_tracker()
    fake = RawPeer(t.host, t.port)
    fake.send_json([5, {"key": "server:phone", "addr": [None, 1]}])
    assert fake.recv_json()[1]["error"] == "unauthenticated"
    fake.close()
    real = device_server(tracker=(t.host, t.port), key="phone", token=token("dev1"))
    model = add_model(tmp_path)
    with tether.connect_tracker(t.host, t.port, token=token("alice")) as pool:
        answers = []
        for _ in range(10):
            with pool.request("phone", timeout=20) as sess:
                answers.append(run_add(sess, model))
    assert answers == [3.0] * 10
    wait_until(lambda: real.sessions_served == 10, what="the real device served all 10")


def test_a_server_without_a_server_token_is_told_why(
    auth_tracker: Callable[..., TrackerThread], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from tether.device.server import DeviceServer, ServerConfig

    t = auth_tracker()
    cfg = ServerConfig(
        host="127.0.0.1",
        port=0,
        key="phone",
        tracker=(t.host, t.port),
        token=token("bob"),
        preload=[],
        work_dir=str(tmp_path / "w"),
        prestart=False,
    )
    with caplog.at_level(logging.WARNING, logger="tether.server"), DeviceServer(cfg):
        wait_until(lambda: any("needs server" in r.getMessage() for r in caplog.records), what="the refusal logged")


def test_secrets_never_reach_the_logs(
    auth_tracker: Callable[..., TrackerThread], caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    caplog.set_level(logging.DEBUG)
    t = auth_tracker()
    for tok in (token("alice"), "alice:" + "w" * 20, "eve:" + "e" * 20):
        with contextlib.suppress(AuthFailed):
            TrackerClient.connect(t.host, t.port, token=tok).close()
    bad = tmp_path / "bad"
    bad.write_text(f"alice user {SECRETS['alice']}\nbob wizard {SECRETS['bob']}\n")
    with pytest.raises(ConfigError) as info:
        Keyring.load(bad)
    text = "\n".join(r.getMessage() for r in caplog.records) + str(info.value)
    assert "authenticated as alice" in text
    for secret in [*SECRETS.values(), "w" * 20, "e" * 20]:
        assert secret not in text


def test_token_from_the_environment(
    auth_tracker: Callable[..., TrackerThread], monkeypatch: pytest.MonkeyPatch
) -> None:
    t = auth_tracker()
    monkeypatch.setenv("TETHER_TOKEN", token("bob"))
    with TrackerClient.connect(t.host, t.port) as client:
        assert client.user == "bob"
    monkeypatch.setenv("TETHER_TOKEN", "bob")
    with pytest.raises(ConfigError, match="TETHER_TOKEN: a token is NAME:SECRET"):
        TrackerClient.connect(t.host, t.port)


def test_cli_reloads_the_keyring_on_sighup(cli: Any, auth_file: Path, tmp_path: Path) -> None:
    proc = cli("tracker", "--port", "0", "--auth-file", str(auth_file), "--allow-tvm", "10.0.0.0/8")
    _, port = proc.listening()
    proc.wait_line("authentication on (1 admin, 1 server, 2 user); TVM peers allowed from: 10.0.0.0/8")
    bob = TrackerClient.connect("127.0.0.1", port, token=token("bob"))
    bob.summary()
    new = "carol user carol-secret-0123456789abc\n"
    auth_file.write_text(KEYRING.replace(f"bob user {SECRETS['bob']}\n", "") + new)
    os.kill(proc.proc.pid, signal.SIGHUP)
    proc.wait_line("auth file reloaded: 4 credential(s), 1 connection(s) closed")
    with pytest.raises((tether.ConnectionClosed, OSError)):
        bob.summary(timeout=5)
    bob.close()
    with pytest.raises(AuthFailed):
        TrackerClient.connect("127.0.0.1", port, token=token("bob"))
    with TrackerClient.connect("127.0.0.1", port, token="carol:carol-secret-0123456789abc") as carol:
        assert carol.user == "carol"


def test_tether_token_command_makes_a_line_that_loads(tmp_path: Path) -> None:
    import io

    from tether.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["token", "ci-job", "user", "--max-priority", "3"]) == 0
    lines = [line for line in out.getvalue().splitlines() if not line.startswith("#")]
    keyring = Keyring.parse(lines[0])
    cred = keyring.get("ci-job")
    assert cred is not None and cred.role is Role.USER and cred.max_priority == 3
    assert lines[1] == f"TETHER_TOKEN=ci-job:{cred.secret}"
    assert main(["token", "bad name", "user"]) == 2


# -- the device server, direct ---------------------------------------------------------------------------


def test_direct_server_with_auth_serves_authenticated_users_only(
    device_server: Any, auth_file: Path, tmp_path: Path
) -> None:
    server = device_server(key="phone", auth_file=str(auth_file))
    model = add_model(tmp_path)
    with pytest.raises(AuthFailed, match="requires a token"):
        tether.connect("127.0.0.1", server.port, key="phone", timeout=10)
    with pytest.raises(AuthFailed, match="unknown here or its secret is wrong"):
        tether.connect("127.0.0.1", server.port, key="phone", timeout=10, token="alice:" + "z" * 20)
    with pytest.raises(AuthFailed, match="this needs user"):
        tether.connect("127.0.0.1", server.port, key="phone", timeout=10, token=token("dev1"))
    with tether.connect("127.0.0.1", server.port, key="phone", timeout=10, token=token("alice")) as sess:
        assert run_add(sess, model) == 3.0
    # a plain TVM client (no -tether=1), not from an allowed network: MISMATCH
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        key = b"client:phone"
        sock.sendall(struct.pack("<ii", RPC_MAGIC, len(key)) + key)
        assert struct.unpack("<i", sock.recv(4))[0] == HandshakeCode.MISMATCH


def test_an_impostor_server_gets_no_model(device_server: Any, tmp_path: Path) -> None:
    """A device that claims to require a token but holds another secret for the name: the client sees it
    cannot prove itself and stops before sending anything (no model, no inputs)."""
    fake_ring = tmp_path / "fake"
    fake_ring.write_text("alice user somebody-elses-secret-000000\n")
    fake = device_server(key="phone", auth_file=str(fake_ring))
    with pytest.raises(AuthFailed):
        tether.connect("127.0.0.1", fake.port, key="phone", timeout=10, token=token("alice"))
    assert fake.sessions_served == 0 and fake.busy_slots() == 0


def test_stalled_exchanges_and_slow_handshakes_hold_no_slot(
    device_server: Any, auth_file: Path, tmp_path: Path
) -> None:
    """Slowloris with authentication on: 80 peers that stop after their handshake's first byte and 80 that
    stop before proving a token, all from 127.0.0.1; real users from the same address still get sessions."""
    server = device_server(key="phone", auth_file=str(auth_file), handshake_timeout_s=60)
    stalled = []
    try:
        for i in range(160):
            sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
            if i % 2:
                sock.sendall(struct.pack("<i", RPC_MAGIC)[:1])
            else:
                key = b"client:phone -tether=1"
                sock.sendall(struct.pack("<ii", RPC_MAGIC, len(key)) + key)  # then proves nothing
            stalled.append(sock)
        model = add_model(tmp_path)
        for _ in range(3):
            with tether.connect("127.0.0.1", server.port, key="phone", timeout=10, token=token("bob")) as sess:
                assert run_add(sess, model) == 3.0
    finally:
        for sock in stalled:
            sock.close()


# -- the proxy ----------------------------------------------------------------------------------------------


@pytest.fixture
def proxy() -> Iterator[Callable[..., ProxyThread]]:
    threads: list[ProxyThread] = []

    def start(**kwargs: Any) -> ProxyThread:
        kwargs.setdefault("host", "127.0.0.1")
        kwargs.setdefault("port", 0)
        kwargs.setdefault("web_port", None)
        p = ProxyThread(ProxyConfig(**kwargs))
        threads.append(p)
        p.__enter__()
        return p

    yield start
    for p in threads:
        p.__exit__(None, None, None)


def _park(port: int, key: str) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    raw = key.encode()
    sock.sendall(struct.pack("<ii", RPC_MAGIC, len(raw)) + raw)
    return sock


@pytest.mark.parametrize(
    ("key", "why"),
    [
        ("server:phone", "must prove a server token"),  # a fake server: no token
        ("server:phone -tether=1", "must prove a server token"),
    ],
)
def test_proxy_refuses_servers_without_a_token(
    proxy: Callable[..., ProxyThread],
    auth_tracker: Callable[..., TrackerThread],
    auth_file: Path,
    caplog: pytest.LogCaptureFixture,
    key: str,
    why: str,
) -> None:
    t = auth_tracker()
    p = proxy(tracker=(t.host, t.port), auth_file=str(auth_file), token=token("dev1"))
    sock = _park(p.port, key)
    assert struct.unpack("<i", sock.recv(4))[0] == HandshakeCode.MISMATCH
    sock.close()
    assert any(why in r.getMessage() for r in caplog.records)


def test_proxy_tracker_mode_with_auth_end_to_end(
    proxy: Callable[..., ProxyThread],
    auth_tracker: Callable[..., TrackerThread],
    auth_file: Path,
    device_server: Any,
    tmp_path: Path,
) -> None:
    t = auth_tracker()
    p = proxy(tracker=(t.host, t.port), auth_file=str(auth_file), token=token("dev1"))
    wait_until(lambda: p.server.registrar is not None and p.server.registrar.connected, what="the proxy registered")
    # a server whose token is a user's may not park; the real one may
    wrong = _park(p.port, "server:phone -tether=1 -token=1")
    from tether.aio.auth import prove_token

    with pytest.raises(AuthFailed, match="needs server"):
        prove_token(wrong, parse_token(token("bob")), "proxy", _soon())
    wrong.close()
    device_server(host="127.0.0.1", port=p.port, key="phone", through_proxy=True, token=token("dev1"))
    model = add_model(tmp_path)
    with tether.connect_tracker(t.host, t.port, token=token("alice")) as pool, pool.request("phone", timeout=20) as s:
        assert run_add(s, model) == 3.0


def test_proxy_plain_mode_with_auth_needs_servers_that_authenticate_clients(
    proxy: Callable[..., ProxyThread], auth_file: Path, device_server: Any, tmp_path: Path
) -> None:
    p = proxy(auth_file=str(auth_file))
    sock = _park(p.port, "server:phone -tether=1 -token=1")  # proves a token, but lets anyone in: refused
    assert struct.unpack("<i", sock.recv(4))[0] == HandshakeCode.MISMATCH
    sock.close()
    device_server(
        host="127.0.0.1", port=p.port, key="phone", through_proxy=True, token=token("dev1"), auth_file=str(auth_file)
    )
    model = add_model(tmp_path)

    def connect(tok: str | None) -> tether.Session | None:
        try:
            return tether.connect("127.0.0.1", p.port, key="phone", timeout=10, token=tok)
        except SessionRefused:
            return None  # the server is not parked (yet, or again)

    with pytest.raises(AuthFailed, match="requires a token"):
        wait_until(lambda: connect(None), timeout=15, what="a pairing")
    with wait_until(lambda: connect(token("alice")), timeout=15, what="a session through the proxy") as sess:
        assert run_add(sess, model) == 3.0


def test_a_server_proves_its_token_to_the_proxy_over_websocket(
    proxy: Callable[..., ProxyThread],
    auth_tracker: Callable[..., TrackerThread],
    auth_file: Path,
    device_server: Any,
    tmp_path: Path,
) -> None:
    """A server behind a firewall that reaches the proxy only over HTTP (``--proxy-url ws://...``) proves its
    token in WebSocket messages; a user's session through the tracker then reaches it."""
    t = auth_tracker()
    p = proxy(tracker=(t.host, t.port), auth_file=str(auth_file), token=token("dev1"), web_port=0)
    assert p.ws_url is not None
    device_server(key="ws-phone", proxy_url=p.ws_url, token=token("dev1"))
    with (
        tether.connect_tracker(t.host, t.port, token=token("alice")) as pool,
        pool.request("ws-phone", timeout=20) as s,
    ):
        assert run_add(s, add_model(tmp_path)) == 3.0
