"""TLS: a throwaway CA with server and client certificates (``openssl``), a tracker, device servers and
a proxy with TLS on loopback, and real sessions through them; and every way TLS can be misconfigured
failing fast with a :class:`~tether.errors.TLSError` that says what to fix (never a hang)."""

from __future__ import annotations

import hashlib
import os
import socket
import struct
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import tether
from tether.aio.tls import PLAIN_PEER_ALERT, TLSConfig, looks_like_tls
from tether.client.query import query_tracker
from tether.client.tracker import TrackerClient
from tether.errors import ConfigError, SessionTimeout, TLSError
from tether.protocol import RPC_TRACKER_MAGIC
from tether.protocol.constants import RPC_MAGIC, HandshakeCode
from tether.proxy import ProxyConfig, ProxyThread
from tether.runtime.reference import write_reference_model
from tether.tracker import TrackerConfig, TrackerThread

from .conftest import wait_until
from .tls_pki import Pki, have_openssl, make_pki

pytestmark = [
    pytest.mark.timeout(90),
    pytest.mark.skipif(not have_openssl(), reason="needs the openssl command to make throwaway certificates"),
]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def server_tls(pki: Pki, *, clients: bool = True) -> TLSConfig:
    """A role's settings: its certificate, and the CA its peers' certificates (and the tracker's) carry."""
    return TLSConfig(ca=str(pki.ca) if clients else None, cert=str(pki.server_cert), key=str(pki.server_key))


def client_tls(pki: Pki, *, cert: bool = True, **kwargs: Any) -> TLSConfig:
    if cert:
        kwargs.setdefault("cert", str(pki.client_cert))
        kwargs.setdefault("key", str(pki.client_key))
    return TLSConfig(ca=str(pki.ca), **kwargs)


@pytest.fixture
def tls_tracker(pki: Pki) -> Iterator[TrackerThread]:
    with TrackerThread(TrackerConfig(host="127.0.0.1", port=0, tls=server_tls(pki), plain_port=0)) as t:
        yield t


@pytest.fixture
def proxy() -> Iterator[Callable[..., ProxyThread]]:
    started: list[ProxyThread] = []

    def start(**kwargs: Any) -> ProxyThread:
        kwargs.setdefault("host", "127.0.0.1")
        kwargs.setdefault("port", 0)
        kwargs.setdefault("web_port", None)
        p = ProxyThread(ProxyConfig(**kwargs))
        started.append(p)
        return p

    yield start
    for p in started:
        p.stop()


def round_trip(sess: tether.Session, tmp_path: Path, payload: int = 1 << 20) -> None:
    """A model uploaded, loaded and run; ``payload`` random bytes up and back down, unchanged."""
    spec = {"name": "x", "dtype": "float32", "shape": [2, 3]}
    write_reference_model(
        tmp_path / "m.json",
        [spec],
        [{**spec, "name": "y"}],
        [{"op": "affine", "input": "x", "output": "y", "scale": 2.0, "bias": 1.0}],
    )
    sess.upload(tmp_path / "m.json", "m.json")
    x = np.arange(6, dtype="float32").reshape(2, 3)
    np.testing.assert_array_equal(sess.load_model("m.json").run({"x": x})["y"], x * 2 + 1)
    blob = os.urandom(payload)
    sess.upload(blob, "blob.bin")
    assert hashlib.sha256(sess.download("blob.bin")).digest() == hashlib.sha256(blob).digest()


def raises_fast(exc: type[BaseException], match: str, call: Callable[[], Any], within: float = 10.0) -> None:
    start = time.monotonic()
    with pytest.raises(exc, match=match):
        call()
    assert time.monotonic() - start < within, f"took {time.monotonic() - start:.1f} s: a hang, not an answer"


# -- a whole deployment over TLS ----------------------------------------------------------------------


def test_session_through_a_tls_tracker_with_client_certificates(
    pki: Pki, tls_tracker: TrackerThread, device_server: Any, tmp_path: Path
) -> None:
    server = device_server(key="secure", tracker=(tls_tracker.host, tls_tracker.port), tls=server_tls(pki))
    assert server.protocols == ["tether"]  # TVM's clients cannot speak TLS: not offered to them
    tls = client_tls(pki)
    status = query_tracker(tls_tracker.host, tls_tracker.port, tls=tls)
    assert next(k for k in status.keys if k.key == "secure").free == 1
    with tether.connect_tracker(tls_tracker.host, tls_tracker.port, tls=tls) as tracker:
        for _ in range(2):  # and again, on the slot's next worker
            with tracker.request("secure", timeout=10, unservable_after=5) as sess:
                round_trip(sess, tmp_path, payload=8 << 20)
            wait_until(lambda: server.busy_slots() == 0, timeout=10, what="the session over")
    # the plain port serves the same tracker, for TVM's peers
    assert tls_tracker.server.plain_port is not None
    plain = query_tracker(tls_tracker.host, tls_tracker.server.plain_port)
    assert next(k for k in plain.keys if k.key == "secure").total == 1


def test_session_timeout_reaches_the_client_through_tls(pki: Pki, device_server: Any, tmp_path: Path) -> None:
    """The server's last word on a session (here: its timeout) travels through the TLS relay."""
    server = device_server(key="slow", tls=server_tls(pki, clients=False))
    spec = {"name": "x", "dtype": "float32", "shape": [1]}
    write_reference_model(tmp_path / "s.json", [spec], [spec], [{"op": "sleep", "seconds": 30}])
    with tether.connect("127.0.0.1", server.port, key="slow", session_timeout=1, tls=client_tls(pki, cert=False)) as s:
        s.upload(tmp_path / "s.json", "s.json")
        with pytest.raises(SessionTimeout):
            s.load_model("s.json").run({"x": np.zeros(1, "float32")})


# -- a tracker's TLS port -----------------------------------------------------------------------------


def test_plain_client_to_a_tls_tracker_is_told_at_once(tls_tracker: TrackerThread) -> None:
    host, port = tls_tracker.host, tls_tracker.port
    raises_fast(TLSError, "is a TLS port", lambda: TrackerClient.connect(host, port, timeout=30))
    raises_fast(TLSError, "is a TLS port", lambda: tether.connect_tracker(host, port, timeout=30))
    # a TVM-style peer gets a TLS alert where the magic would be, and the end of the connection
    with socket.create_connection((host, port), timeout=10) as sock:
        sock.sendall(struct.pack("<i", RPC_TRACKER_MAGIC))
        answer = b""
        while chunk := sock.recv(64):
            answer += chunk
    assert answer == PLAIN_PEER_ALERT and looks_like_tls(answer)


def test_tls_client_to_a_plain_tracker_is_told_at_once(pki: Pki, tracker: TrackerThread) -> None:
    call = lambda: TrackerClient.connect(tracker.host, tracker.port, timeout=30, tls=client_tls(pki))  # noqa: E731
    raises_fast(TLSError, "closed the connection during the TLS handshake", call)


def test_wrong_ca_and_wrong_name_are_certificate_errors(pki: Pki, tls_tracker: TrackerThread) -> None:
    host, port = tls_tracker.host, tls_tracker.port
    wrong_ca = TLSConfig(ca=str(pki.other_ca), cert=str(pki.client_cert), key=str(pki.client_key))
    raises_fast(
        TLSError, "cannot verify its TLS certificate.*--tls-ca", lambda: TrackerClient.connect(host, port, 30, wrong_ca)
    )
    raises_fast(TLSError, "cannot verify", lambda: tether.connect_tracker(host, port, timeout=30, tls=wrong_ca))
    wrong_name = client_tls(pki, server_name="device.example")
    raises_fast(
        TLSError,
        "not for the name checked.*--tls-server-name",
        lambda: TrackerClient.connect(host, port, 30, wrong_name),
    )
    with TrackerClient.connect(host, port, 30, client_tls(pki, server_name="localhost")) as client:
        assert client.tether_version is not None


def test_client_certificate_required(pki: Pki, tls_tracker: TrackerThread) -> None:
    host, port = tls_tracker.host, tls_tracker.port
    none = client_tls(pki, cert=False)
    raises_fast(
        TLSError, "requires a client certificate.*--tls-cert", lambda: TrackerClient.connect(host, port, 30, none)
    )
    stranger = TLSConfig(ca=str(pki.ca), cert=str(pki.other_cert), key=str(pki.other_key))
    raises_fast(
        TLSError, "refused this side.s client certificate", lambda: TrackerClient.connect(host, port, 30, stranger)
    )


# -- a device server's TLS sessions -----------------------------------------------------------------------


@pytest.fixture
def tls_server(pki: Pki, device_server: Any) -> Any:
    return device_server(key="dev", tls=server_tls(pki))


def test_direct_session_misconfigurations(pki: Pki, tls_server: Any, device_server: Any) -> None:
    port = tls_server.port
    raises_fast(TLSError, "requires TLS.*--tls-ca", lambda: tether.connect("127.0.0.1", port, key="dev", timeout=30))
    no_cert = client_tls(pki, cert=False)
    raises_fast(TLSError, "refused this side's certificate|requires a client certificate",
                lambda: tether.connect("127.0.0.1", port, key="dev", timeout=30, tls=no_cert))  # fmt: skip
    wrong_ca = TLSConfig(ca=str(pki.other_ca))
    raises_fast(TLSError, "cannot verify its TLS certificate",
                lambda: tether.connect("127.0.0.1", port, key="dev", timeout=30, tls=wrong_ca))  # fmt: skip
    plain = device_server(key="plain")
    raises_fast(TLSError, "does not speak TLS",
                lambda: tether.connect("127.0.0.1", plain.port, key="plain", timeout=30, tls=client_tls(pki)))  # fmt: skip
    wait_until(lambda: tls_server.busy_slots() == 0 and plain.busy_slots() == 0, what="slots free again")
    with tether.connect("127.0.0.1", port, key="dev", timeout=30, tls=client_tls(pki)) as sess:
        assert sess.info()["key"] == "dev"


def test_tvm_client_gets_mismatch_from_a_tls_server(tls_server: Any) -> None:
    key = b"client:dev"
    with socket.create_connection(("127.0.0.1", tls_server.port), timeout=10) as sock:
        sock.sendall(struct.pack("<ii", RPC_MAGIC, len(key)) + key)
        assert struct.unpack("<i", sock.recv(4))[0] == HandshakeCode.MISMATCH


def test_bad_tls_files_are_config_errors(pki: Pki, tmp_path: Path) -> None:
    (tmp_path / "junk.pem").write_text("not a certificate\n")
    with pytest.raises(ConfigError, match="do not load"):
        TrackerThread(TrackerConfig(port=0, tls=TLSConfig(cert=str(tmp_path / "junk.pem"))))
    with pytest.raises(ConfigError, match="cannot read"):
        tether.connect_tracker("127.0.0.1", 1, tls=TLSConfig(ca=str(tmp_path / "absent.pem")))
    with pytest.raises(ConfigError, match="needs its certificate"):
        TrackerThread(TrackerConfig(port=0, tls=TLSConfig(ca=str(pki.ca))))


# -- through a proxy: TLS end to end ------------------------------------------------------------------------


def test_relayed_session_is_tls_end_to_end(
    pki: Pki, proxy: Callable[..., ProxyThread], device_server: Any, tmp_path: Path
) -> None:
    p = proxy()
    server = device_server(key="far", host=p.host, port=p.port, through_proxy=True, tls=server_tls(pki))
    wait_until(lambda: p.status()["waiting"], what="the server waiting at the proxy")
    assert "-tls=1" in p.status()["waiting"][0]["key"]
    with tether.connect(p.host, p.port, key="far", timeout=30, tls=client_tls(pki)) as sess:
        round_trip(sess, tmp_path, payload=4 << 20)
        (relay,) = p.status()["relays"]
        assert min(relay["bytes"]) > 4 << 20 or max(relay["bytes"]) > 4 << 20  # the proxy carried it all...
    wait_until(lambda: server.busy_slots() == 0, timeout=10, what="the session over")


def test_proxy_in_tracker_mode_with_a_tls_tracker(
    pki: Pki, tls_tracker: TrackerThread, proxy: Callable[..., ProxyThread], device_server: Any, tmp_path: Path
) -> None:
    """The proxy registers with the TLS tracker (its own certificate); a client granted a proxied server
    runs TLS through the proxy with the device."""
    p = proxy(tracker=(tls_tracker.host, tls_tracker.port), tracker_period=0.2, tls=server_tls(pki))
    device_server(key="npu", host=p.host, port=p.port, through_proxy=True, tls=server_tls(pki))
    tls = client_tls(pki)

    def free() -> int:
        row = next((k for k in query_tracker(tls_tracker.host, tls_tracker.port, tls=tls).keys if k.key == "npu"), None)
        return 0 if row is None else row.free

    wait_until(lambda: free() == 1, timeout=15, what="the proxied server offered through the TLS tracker")
    with (
        tether.connect_tracker(tls_tracker.host, tls_tracker.port, tls=tls) as tracker,
        tracker.request("npu", timeout=10) as sess,
    ):
        round_trip(sess, tmp_path)


# -- the command line ------------------------------------------------------------------------------------


def test_cli_tracker_and_query_with_tls(pki: Pki, cli: Callable[..., Any]) -> None:
    tr = cli(
        "tracker", "--port", "0", "--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key),
        "--tls-ca", str(pki.ca), "--plain-port", "0",
    )  # fmt: skip
    host, port = tr.listening()
    tr.wait_line("TLS on that port (client certificates required); in the clear on")
    ok = cli(
        "query", "--host", host, "--port", str(port), "--json",
        "--tls-ca", str(pki.ca), "--tls-cert", str(pki.client_cert), "--tls-key", str(pki.client_key),
    )  # fmt: skip
    ok.wait_eof(30)
    assert ok.proc.wait(10) == 0, ok.seen
    plain = cli("query", "--host", host, "--port", str(port))
    plain.wait_eof(30)
    assert plain.proc.wait(10) == 2
    assert any("is a TLS port" in line and "--tls-ca" in line for line in plain.seen), plain.seen


def test_proxy_web_port_serves_wss(
    pki: Pki, proxy: Callable[..., ProxyThread], device_server: Any, tmp_path: Path
) -> None:
    """With a certificate the proxy's web port is ``wss://``: a server and a client reach it over TLS (the
    session inside is TLS end to end as well)."""
    p = proxy(web_port=0, tls=server_tls(pki, clients=False))
    assert p.ws_url is not None and p.ws_url.startswith("wss://")
    device_server(key="web", proxy_url=p.ws_url, tls=server_tls(pki))
    wait_until(lambda: p.status()["waiting"], what="the server waiting at the proxy")
    with tether.connect(p.ws_url, key="web", timeout=30, tls=client_tls(pki)) as sess:
        round_trip(sess, tmp_path)
    plain_url = p.ws_url.replace("wss://", "ws://")
    raises_fast(tether.ProtocolError, "speaks TLS: use wss:", lambda: tether.connect(plain_url, key="web", timeout=30))


def test_cli_run_and_bench_over_tls(
    pki: Pki, tls_tracker: TrackerThread, device_server: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from tether.cli import main

    device_server(key="cli", tracker=(tls_tracker.host, tls_tracker.port), tls=server_tls(pki))
    spec = {"name": "x", "dtype": "float32", "shape": [2, 3]}
    model = tmp_path / "m.json"
    write_reference_model(model, [spec], [{**spec, "name": "y"}], [{"op": "affine", "input": "x", "output": "y"}])
    where = ["--tracker", f"{tls_tracker.host}:{tls_tracker.port}", "--key", "cli", "--timeout", "30"]
    tls = ["--tls-ca", str(pki.ca), "--tls-cert", str(pki.client_cert), "--tls-key", str(pki.client_key)]
    assert main(["run", str(model), *where, *tls, "--repeat", "2"]) == 0, capsys.readouterr().err
    assert "device timing" in capsys.readouterr().out
    assert main(["bench", str(model), *where, *tls, "--repeat", "2", "--quiet"]) == 0, capsys.readouterr().err
    capsys.readouterr()
    assert main(["run", str(model), *where, "--tls-ca", str(pki.ca)]) == 2  # no client certificate
    err = capsys.readouterr().err
    assert "requires a client certificate" in err and "--tls-cert" in err, err


def test_batch_measures_over_tls(pki: Pki, tls_tracker: TrackerThread, device_server: Any, tmp_path: Path) -> None:
    from tether.client.batch import Candidate, MeasureSettings, measure_candidates

    device_server(key="batch", tracker=(tls_tracker.host, tls_tracker.port), tls=server_tls(pki))
    spec = {"name": "x", "dtype": "float32", "shape": [2, 3]}
    model = tmp_path / "m.json"
    write_reference_model(model, [spec], [{**spec, "name": "y"}], [{"op": "affine", "input": "x", "output": "y"}])
    where = (tls_tracker.host, tls_tracker.port)
    settings = MeasureSettings(number=1, repeat=2, timeout=30, queue_timeout=30)
    results = measure_candidates(where, "batch", [Candidate(str(model))] * 2, settings, tls=client_tls(pki))
    assert all(r.ok for r in results), [r.error for r in results]
    wrong = measure_candidates(where, "batch", [Candidate(str(model))], settings, tls=client_tls(pki, cert=False))
    assert wrong[0].error is not None and "client certificate" in wrong[0].error.message


def test_cli_server_and_proxy_with_tls(pki: Pki, cli: Callable[..., Any], tmp_path: Path) -> None:
    certs = ["--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key)]
    server = cli("server", "--host", "127.0.0.1", "--port", "0", "--key", "c", "--preload", "none",
                 "--work-dir", str(tmp_path / "w"), *certs, "--tls-ca", str(pki.ca))  # fmt: skip
    _, port = server.listening()
    server.wait_line("sessions are TLS (client certificates required); tether clients only")
    with tether.connect("127.0.0.1", port, key="c", timeout=30, tls=client_tls(pki)) as sess:
        assert sess.info()["key"] == "c"
    proxy = cli("proxy", "--host", "127.0.0.1", "--port", "0", "--web-port", "0", *certs)
    proxy.listening()
    assert proxy.wait_line("websocket on ").split("websocket on ")[1].startswith("wss://127.0.0.1:")


# -- with authentication on too ---------------------------------------------------------------------------

AUTH = {"alice": "alice-secret-0123456789abcdef", "dev": "device-secret-0123456789abcdef"}


@pytest.fixture
def auth_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.delenv("TETHER_TOKEN", raising=False)
    path = tmp_path / "keyring"
    path.write_text(f"alice user {AUTH['alice']}\ndev server {AUTH['dev']}\n")
    return path


def test_authentication_inside_tls_tracker_server_and_proxy(
    pki: Pki, proxy: Callable[..., ProxyThread], device_server: Any, auth_file: Path, tmp_path: Path
) -> None:
    """Auth and TLS together: tokens are proven inside TLS, at the tracker, at a direct server, and end to
    end through a proxy; a client without its token is refused inside TLS too."""
    alice, dev = f"alice:{AUTH['alice']}", f"dev:{AUTH['dev']}"
    tls = client_tls(pki)
    direct = device_server(key="d", tls=server_tls(pki), auth_file=str(auth_file))
    with tether.connect("127.0.0.1", direct.port, key="d", tls=tls, token=alice, timeout=30) as sess:
        round_trip(sess, tmp_path, payload=1 << 16)
    with pytest.raises(tether.AuthFailed, match="requires a token"):
        tether.connect("127.0.0.1", direct.port, key="d", tls=tls, timeout=30)
    cfg = TrackerConfig(host="127.0.0.1", port=0, tls=server_tls(pki), auth_file=str(auth_file))
    with TrackerThread(cfg) as t:
        p = proxy(
            tracker=(t.host, t.port), tracker_period=0.2, tls=server_tls(pki), auth_file=str(auth_file), token=dev
        )
        device_server(
            key="far",
            host=p.host,
            port=p.port,
            through_proxy=True,
            tls=server_tls(pki),
            token=dev,
            auth_file=str(auth_file),
        )
        with TrackerClient.connect(t.host, t.port, tls=tls, token=alice) as client:
            assert client.user == "alice"
        with tether.connect_tracker(t.host, t.port, tls=tls, token=alice) as pool, pool.request("far", timeout=20) as s:
            round_trip(s, tmp_path, payload=1 << 16)
        with (
            pytest.raises(tether.AuthFailed, match="requires a token"),
            TrackerClient.connect(t.host, t.port, tls=tls) as c,
        ):
            c.request_grant("far", timeout=5)
