"""``tether doctor``: each classic failure staged on loopback, and what the doctor says to fix.

Everything listens on 127.0.0.0/8, port 0; an "unreachable" address is a loopback address nothing listens
on. The "remote tracker" of ``tether server``'s warning is a name given to the decision function (and to a
server that is stopped before it sends anything): no traffic leaves the machine.
"""

from __future__ import annotations

import contextlib
import json
import random
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tether.cli import main
from tether.client.doctor import FAIL, OK, SKIP, WARN, Report, advertise_hint, check_tvm_versions, diagnose
from tether.client.tracker import TrackerClient
from tether.errors import ConfigError
from tether.proxy import ProxyConfig, ProxyThread
from tether.tracker import TrackerThread

from .conftest import CliProcess, wait_until

pytestmark = pytest.mark.timeout(60)


def by_name(report: Report, name: str) -> list[Any]:
    return [c for c in report.checks if c.name == name]


@contextlib.contextmanager
def listener(handle: Callable[[socket.socket], None]) -> Iterator[int]:
    """A loopback port whose connections go to ``handle`` (each in its own thread); yields the port."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = sock.accept()
            except OSError:
                return
            threading.Thread(target=_handle_and_close, args=(handle, conn), daemon=True).start()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield sock.getsockname()[1]
    finally:
        stop.set()
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
        sock.close()
        thread.join(5)


def _handle_and_close(handle: Callable[[socket.socket], None], conn: socket.socket) -> None:
    with conn, contextlib.suppress(OSError):
        conn.settimeout(10)
        handle(conn)


def closed_port() -> int:
    """A loopback port nothing listens on (bound and closed: connection refused)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


# -- 1. the tracker ----------------------------------------------------------------------------------


def test_nothing_listening_at_the_tracker_port(capsys: pytest.CaptureFixture[str]) -> None:
    port = closed_port()
    code = main(["doctor", "--tracker", f"127.0.0.1:{port}", "--timeout", "2"])
    out = capsys.readouterr().out
    assert code == 1
    line = next(line for line in out.splitlines() if line.startswith("FAIL") and "tracker" in line)
    assert "nothing answers at" in line and "refused" in line.lower()
    assert "fix: start a tracker there" in line
    assert "not checked: the tracker did not answer" in out  # the rest is skipped, not failed
    assert "apache-tvm" in out  # the local check runs all the same


def _talks_http(conn: socket.socket) -> None:
    conn.recv(64)
    conn.sendall(b"HTTP/1.0 400 Bad Request\r\n\r\n")


def _says_nothing(conn: socket.socket) -> None:
    conn.recv(64)
    conn.recv(64)  # until the doctor gives up and closes


@pytest.mark.parametrize("peer", [_talks_http, _says_nothing], ids=["answers something else", "silent"])
def test_a_peer_that_is_not_a_tracker(peer: Callable[[socket.socket], None]) -> None:
    with listener(peer) as port:
        start = time.monotonic()
        report = diagnose("127.0.0.1", port, timeout=1.0)
    assert time.monotonic() - start < 10  # never hangs: bounded by the timeout
    (tracker,) = by_name(report, "tracker")
    assert tracker.status == FAIL
    assert "accepts connections but is not a tracker" in tracker.detail
    assert "the port `tether tracker` prints" in (tracker.fix or "")
    assert report.exit_code == 1


# -- 2. keys -----------------------------------------------------------------------------------------


def test_key_typo_suggests_the_close_name(
    tracker: TrackerThread, device_server: Callable[..., Any], capsys: pytest.CaptureFixture[str]
) -> None:
    device_server(key="android", tracker=(tracker.host, tracker.port))
    device_server(key="android-pixel7", tracker=(tracker.host, tracker.port))
    report = diagnose(tracker.host, tracker.port, key="andriod", timeout=2)
    (key,) = by_name(report, "key")
    assert key.status == FAIL
    assert "no server is registered with key 'andriod'" in key.detail
    assert "keys with servers: android, android-pixel7" in key.detail
    assert "did you mean 'android'" in (key.fix or "")
    assert by_name(report, "session")[0].status == SKIP
    code = main(["doctor", "--tracker", f"{tracker.host}:{tracker.port}", "--key", "android-"])
    out = capsys.readouterr().out
    assert code == 1
    assert "keys match exactly, not by prefix" in out


def test_no_server_at_all(tracker: TrackerThread) -> None:
    report = diagnose(tracker.host, tracker.port, timeout=2)
    (key,) = by_name(report, "key")
    assert key.status == FAIL and key.detail == "no server is registered with this tracker"
    assert "tether server --tracker" in (key.fix or "")


# -- 3. advertised addresses -------------------------------------------------------------------------


def test_server_advertising_an_address_nobody_listens_on(
    tracker: TrackerThread, device_server: Callable[..., Any]
) -> None:
    # listens on 127.0.0.1 only, tells the tracker 127.0.0.9 (as a NAT address would be): refused
    server = device_server(key="gpu", tracker=(tracker.host, tracker.port), custom_addr="127.0.0.9")
    report = diagnose(tracker.host, tracker.port, key="gpu", timeout=2)
    (reach,) = by_name(report, "reachable")
    assert reach.status == FAIL
    assert f"gpu at 127.0.0.9:{server.port}" in reach.detail and "does not answer from here" in reach.detail
    assert "--custom-addr" in (reach.fix or "") and "--through-proxy" in (reach.fix or "")
    (session,) = by_name(report, "session")
    assert session.status == FAIL and "granted, but cannot connect" in session.detail
    assert report.exit_code == 1


# -- 5. sessions -------------------------------------------------------------------------------------


def _drops_every_handshake(conn: socket.socket) -> None:
    conn.recv(4096)  # reads the handshake, answers nothing, closes


def test_server_that_accepts_tcp_but_fails_the_session(tracker: TrackerThread) -> None:
    with listener(_drops_every_handshake) as port, TrackerClient.connect(tracker.host, tracker.port) as fake:
        fake.update_info({"key": "server:flaky", "addr": [None, port]})
        fake.put("flaky", port, "flaky:0.1")
        report = diagnose(tracker.host, tracker.port, key="flaky", timeout=2)
    (reach,) = by_name(report, "reachable")
    assert reach.status == OK and "accepts TCP, but closed the connection" in reach.detail
    (session,) = by_name(report, "session")
    assert session.status == FAIL
    assert "accepts TCP but the session failed" in session.detail
    assert "check its log" in (session.fix or "")


def test_healthy_tether_server_all_ok(
    tracker: TrackerThread, device_server: Callable[..., Any], capsys: pytest.CaptureFixture[str]
) -> None:
    server = device_server(key="android", tracker=(tracker.host, tracker.port))
    code = main(["doctor", "--tracker", f"{tracker.host}:{tracker.port}", "--key", "android", "--json"])
    data = json.loads(capsys.readouterr().out)
    assert code == 0 and data["ok"] is True
    statuses = {c["name"]: c["status"] for c in data["checks"]}
    assert statuses["tracker"] == OK and statuses["key"] == OK and statuses["reachable"] == OK
    assert statuses["proxy"] == SKIP
    assert statuses["session"] == OK and statuses["tvm"] == OK
    tracker_line = next(c for c in data["checks"] if c["name"] == "tracker")["detail"]
    assert tracker_line.startswith("tether tracker ")
    session = next(c for c in data["checks"] if c["name"] == "session")
    assert "tether session opened and closed" in session["detail"]
    # the device is back at once: the doctor held it for one ping
    wait_until(lambda: server.busy_slots() == 0, timeout=10, what="the doctor's session over")
    code = main(["doctor", "--tracker", f"{tracker.host}:{tracker.port}"])
    out = capsys.readouterr().out
    assert code == 0 and out.rstrip().endswith("all passed"), out


def test_no_session_takes_no_device(tracker: TrackerThread, device_server: Callable[..., Any]) -> None:
    device_server(key="android", tracker=(tracker.host, tracker.port))
    report = diagnose(tracker.host, tracker.port, sessions=False, timeout=2)
    assert by_name(report, "session")[0].status == SKIP
    with TrackerClient.connect(tracker.host, tracker.port) as client:
        assert client.summary(detail=True)["tether"]["grants"] == 0


# -- 4. through tether's proxy -----------------------------------------------------------------------


def test_servers_through_tethers_proxy(tracker: TrackerThread, device_server: Callable[..., Any]) -> None:
    with ProxyThread(
        ProxyConfig(host="127.0.0.1", port=0, web_port=None, tracker=(tracker.host, tracker.port), tracker_period=0.2)
    ) as proxy:
        device_server(key="npu", host=proxy.host, port=proxy.port, through_proxy=True)

        def offered() -> bool:
            with TrackerClient.connect(tracker.host, tracker.port) as c:
                return bool(c.summary()["queue_info"].get("npu", {}).get("free"))

        wait_until(offered, timeout=15, what="the proxied server offered")
        report = diagnose(tracker.host, tracker.port, key="npu", timeout=3)
    (proxy_check,) = by_name(report, "proxy")
    assert proxy_check.status == OK and f"proxy for npu at 127.0.0.1:{proxy.port}" in proxy_check.detail
    (session,) = by_name(report, "session")
    assert session.status == OK and "tether session opened and closed" in session.detail
    assert "1 of them through a proxy" in by_name(report, "key")[0].detail
    assert report.exit_code == 0


def test_a_proxy_that_is_gone(tracker: TrackerThread) -> None:
    port = closed_port()
    with TrackerClient.connect(tracker.host, tracker.port) as fake_proxy:
        fake_proxy.update_info({"key": "server:proxy[npu]", "addr": [None, port]})
        fake_proxy.put("npu", port, "npu:0.1")
        report = diagnose(tracker.host, tracker.port, key="npu", timeout=2, sessions=False)
    (proxy_check,) = by_name(report, "proxy")
    assert proxy_check.status == FAIL and "tether proxy --tracker" in (proxy_check.fix or "")


# -- 6. local TVM ------------------------------------------------------------------------------------


def test_tvm_and_ffi_versions() -> None:
    def versions(table: dict[str, str | None]) -> Callable[[str], str | None]:
        return table.get

    bad = check_tvm_versions(versions({"apache-tvm": "0.27.0", "apache-tvm-ffi": "0.1.15"}))
    assert bad.status == FAIL and "apache-tvm-ffi>=0.1.0,<0.1.15" in (bad.fix or "")
    good = check_tvm_versions(versions({"apache-tvm": "0.27.0.post1", "apache-tvm-ffi": "0.1.14.post1"}))
    assert good.status == OK
    absent = check_tvm_versions(versions({}))
    assert absent.status == OK and "not installed (only needed" in absent.detail
    no_ffi = check_tvm_versions(versions({"apache-tvm": "0.27.0"}))
    assert no_ffi.status == FAIL
    unknown = check_tvm_versions(versions({"apache-tvm": "0.30.0", "apache-tvm-ffi": "0.2.0"}))
    assert unknown.status == OK


# -- tether server's warning -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("bind", "tracker_host", "custom", "warned"),
    [
        ("0.0.0.0", "10.1.2.3", "127.0.0.1", "--custom-addr 127.0.0.1 is a loopback address"),
        ("127.0.0.1", "tracker.lab", None, "listening on 127.0.0.1 only"),
        ("::1", "10.1.2.3", "10.1.2.4", "listening on ::1 only"),
        ("0.0.0.0", "10.1.2.3", None, None),
        ("127.0.0.1", "127.0.0.1", None, None),  # all on this machine
        ("127.0.0.1", "localhost", "127.0.0.1", None),
        ("0.0.0.0", "10.1.2.3", "192.168.1.5", None),
    ],
)
def test_advertise_hint(bind: str, tracker_host: str, custom: str | None, warned: str | None) -> None:
    hint = advertise_hint(bind, tracker_host, custom)
    if warned is None:
        assert hint is None
    else:
        assert hint is not None and warned in hint and "fix:" in hint and "\n" not in hint


def test_server_cli_warns_at_start(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """The warning is printed before the server starts; the server here stops right there (no traffic)."""
    import tether.device.server

    class Stopped:
        def __init__(self, config: Any) -> None:
            raise ConfigError("stopped by the test before starting")

    monkeypatch.setattr(tether.device.server, "DeviceServer", Stopped)
    code = main(["server", "--host", "127.0.0.1", "--tracker", "tracker.lab:9190", "--key", "k"])
    err = capsys.readouterr().err
    assert code == 2
    (line,) = [line for line in err.splitlines() if "warning" in line]
    assert line.startswith("tether server: warning: listening on 127.0.0.1 only") and "fix: --host 0.0.0.0" in line


def test_server_cli_is_quiet_with_a_tracker_on_this_machine(
    tracker: TrackerThread, cli: Callable[..., CliProcess]
) -> None:
    proc = cli("server", "--host", "127.0.0.1", "--port", "0", "--tracker", f"127.0.0.1:{tracker.port}", "--key", "k")
    proc.listening()
    proc.stop()
    assert not [line for line in proc.seen + proc.wait_eof() if "warning" in line.lower()]


# -- against TVM's own tracker and server ------------------------------------------------------------


@pytest.fixture
def tvm_pair() -> Iterator[tuple[Any, Any]]:
    """TVM's real tracker and one real TVM rpc_server (key "rasp") registered with it."""
    pytest.importorskip("tvm")
    from tvm import rpc
    from tvm.rpc.tracker import Tracker as TVMTracker

    start = random.randint(20000, 55000)  # TVM cannot bind port 0
    tracker = TVMTracker(host="127.0.0.1", port=start, port_end=start + 200, silent=True)
    start = random.randint(20000, 55000)
    server = rpc.Server(
        host="127.0.0.1",
        port=start,
        port_end=start + 200,
        tracker_addr=("127.0.0.1", tracker.port),
        key="rasp",
        silent=True,
    )
    try:
        yield tracker, server
    finally:
        server.terminate()
        tracker.terminate()


@pytest.mark.tvm
def test_tvms_tracker_and_rpc_server(tvm_pair: tuple[Any, Any]) -> None:
    tracker, server = tvm_pair

    def registered() -> bool:
        with TrackerClient.connect("127.0.0.1", tracker.port) as c:
            return bool(c.summary()["queue_info"].get("rasp", {}).get("free"))

    wait_until(registered, timeout=20, what="the TVM server registered")
    report = diagnose("127.0.0.1", tracker.port, timeout=3)
    assert report.exit_code == 0, report.to_json()
    assert by_name(report, "tracker")[0].detail.startswith("TVM tracker")
    (reach,) = by_name(report, "reachable")
    assert reach.status == OK and f"rasp at 127.0.0.1:{server.port}" in reach.detail
    (session,) = by_name(report, "session")
    assert session.status == OK and "TVM server, handshake ok" in session.detail
    # the probes left the server registered as it was (a bare connect would have reset its tracker link)
    wait_until(registered, timeout=20, what="the TVM server free again")
    report = diagnose("127.0.0.1", tracker.port, key="rsap", timeout=3, sessions=False)
    (key,) = by_name(report, "key")
    assert key.status == FAIL and "did you mean 'rasp'" in (key.fix or "")
    assert WARN not in {c.status for c in report.checks}
