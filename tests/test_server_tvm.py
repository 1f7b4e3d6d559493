"""TVM's own client (apache-tvm 0.27) against tether's server: the session runs in TVM's C++ loop
inside a tether worker, with tether's workspace rules and typed timeouts; and a tether client that
reaches a plain TVM server is told so."""

from __future__ import annotations

import gc
import os
import signal
from pathlib import Path
from typing import Any

import pytest

import tether
from tether.tracker import TrackerThread

from .conftest import wait_until
from .test_tvm_interop import addone_lib, run_addone, tvm_server, tvm_tracker  # noqa: F401 - fixtures

tvm = pytest.importorskip("tvm")
np = pytest.importorskip("numpy")
from tvm import rpc  # noqa: E402

pytestmark = [pytest.mark.tvm, pytest.mark.timeout(90)]


def test_tvm_connect_uploads_loads_runs_and_times(device_server: Any, addone_lib: Path) -> None:  # noqa: F811
    server = device_server(key="dev", preload=["tvm"])
    sess = rpc.connect("127.0.0.1", server.port, key="dev")
    np.testing.assert_array_equal(run_addone(sess, addone_lib), np.arange(8, dtype="float32") + 1)
    assert sess.get_function("rpc.test.addone")(41) == 42
    assert addone_lib.name in sess.listdir(".").split(",")  # TVM's own Python server lacks listdir
    assert bytes(sess.download(addone_lib.name)) == addone_lib.read_bytes()
    sess.remove(addone_lib.name)
    assert addone_lib.name not in sess.listdir(".")
    with pytest.raises(Exception, match="leaves the workspace"):
        sess.upload(bytearray(b"x"), "../escape.txt")
    del sess
    gc.collect()  # TVM closes a session only when every remote object is gone
    wait_until(lambda: server.busy_slots() == 0, timeout=5, what="session over")


def test_tvm_connect_tracker_request(
    device_server: Any,
    tracker: TrackerThread,
    addone_lib: Path,  # noqa: F811
) -> None:
    device_server(key="dev", tracker=(tracker.host, tracker.port), preload=["tvm"])
    client = rpc.connect_tracker(tracker.host, tracker.port)
    sess = client.request("dev", priority=1, session_timeout=30)
    np.testing.assert_array_equal(run_addone(sess, addone_lib), np.arange(8, dtype="float32") + 1)
    del sess
    gc.collect()
    wait_until(lambda: client.summary()["queue_info"]["dev"]["free"] == 1, timeout=5, what="slot free again")
    client.close()


def test_tvm_session_timeout_is_rpc_session_timeout_error(device_server: Any, tracker: TrackerThread) -> None:
    server = device_server(key="dev", tracker=(tracker.host, tracker.port), preload=["tvm"])
    client = rpc.connect_tracker(tracker.host, tracker.port)
    calls_until_the_timeout(client.request("dev", session_timeout=2), server)
    client.close()


def calls_until_the_timeout(sess: Any, server: Any) -> None:
    """Call ``sess`` every 20 ms until it raises RPCSessionTimeoutError (and nothing else), then drop it and
    wait for the slot. At that rate a call is often in flight at the deadline, which is what made the
    guard's close a reset that dropped the unsent error ("Connection reset by peer", 4 runs in 21)."""
    held = [sess]  # a list: the session must be dropped at the end
    funcs: list[Any] = []
    del sess

    def expired() -> bool:  # calls work until the session's time is over, then fail typed
        try:
            if not funcs:
                funcs.append(held[0].get_function("rpc.test.addone"))
            assert funcs[0](1) == 2
        except tvm.error.RPCSessionTimeoutError:
            return True
        return False

    wait_until(expired, timeout=20, interval=0.02, what="RPCSessionTimeoutError")
    funcs.clear()
    held.clear()
    gc.collect()
    wait_until(lambda: server.busy_slots() == 0, timeout=5, what="slot free after the timeout")


def test_tether_client_reaching_a_plain_tvm_server_is_told_so(
    tracker: TrackerThread,
    tvm_server: Any,  # noqa: F811
) -> None:
    server = tvm_server(tracker.port, "plain")
    wait_until(
        lambda: tracker.call(lambda: tracker.core.summary()["queue_info"].get("plain", {}).get("free")) == 1,
        timeout=20,
    )
    with tether.TrackerClient.connect(tracker.host, tracker.port) as client:
        grant = client.request_grant("plain", timeout=10)  # TVM's protocol: the only one it serves
    with pytest.raises(tether.NotTetherServer, match="plain TVM server"):
        tether.Session.connect(grant.host, grant.port, grant.matchkey)
    # tether's request never gets it
    with tether.connect_tracker(tracker.host, tracker.port) as pool, pytest.raises(tether.RequestTimeout):
        pool.request("plain", timeout=0.5)
    assert server is not None


def test_without_tvm_plain_tvm_clients_get_mismatch(device_server: Any) -> None:
    server = device_server(key="dev", serve_tvm=False)
    assert server.protocols == ["tether"]
    with pytest.raises(Exception, match=r"mismatch|MISMATCH|key"):
        rpc.connect("127.0.0.1", server.port, key="dev")
    with tether.connect("127.0.0.1", server.port, key="dev") as sess:
        sess.ping()


def test_tether_session_through_tvms_own_proxy(device_server: Any, tmp_path: Path) -> None:
    """``tether server --through-proxy`` behind TVM's ``rpc_proxy``: the proxy carries tether's native
    session without knowing it; the server reconnects for the next client (and would wait forever)."""
    import random
    import subprocess
    import sys

    port = random.randint(20000, 50000)
    proxy = subprocess.Popen(
        [sys.executable, "-m", "tvm.exec.rpc_proxy", "--host", "127.0.0.1", "--port", str(port),
         "--port-end", str(port + 300), "--web-port", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )  # fmt: skip
    try:
        assert proxy.stdout is not None
        bound = None
        while bound is None:  # bounded by the test's timeout
            line = proxy.stdout.readline()
            assert line, "TVM's proxy exited"
            if "RPCProxy: client port bind to" in line:
                bound = int(line.rsplit(":", 1)[1])
        server = device_server(key="behind", host="127.0.0.1", port=bound, through_proxy=True)
        for _ in range(2):  # a second session: the server went back to the proxy after the first
            session = wait_until(
                lambda: _try_connect("127.0.0.1", bound, "behind"), timeout=15, what="a session through the proxy"
            )
            with session as sess:
                assert sess.upload(b"through", "a.txt") == "a.txt"
                assert sess.download("a.txt") == b"through"
            wait_until(lambda: server.busy_slots() == 0, timeout=5, what="the session over")
    finally:
        os.killpg(proxy.pid, signal.SIGTERM)  # the proxy and the PopenWorker it starts, by process group
        proxy.wait(10)
        if proxy.stdout is not None:
            proxy.stdout.close()


def _try_connect(host: str, port: int, key: str) -> tether.Session | None:
    try:
        return tether.connect(host, port, key=key, timeout=5)
    except (tether.SessionRefused, tether.TransportError):
        return None  # the server has not reached the proxy yet: TVM's proxy answers MISMATCH then


def test_tether_server_with_tvms_tracker(device_server: Any, tvm_tracker: Any, addone_lib: Path) -> None:  # noqa: F811
    """TVM's own tracker queues a tether server like any TVM server: both kinds of client get sessions."""
    device_server(key="mixed", tracker=("127.0.0.1", tvm_tracker.port), preload=["tvm"])
    client = rpc.connect_tracker("127.0.0.1", tvm_tracker.port)
    wait_until(lambda: client.summary()["queue_info"].get("mixed", {}).get("free") == 1, timeout=20)
    with tether.connect_tracker("127.0.0.1", tvm_tracker.port) as pool, pool.request("mixed", timeout=20) as sess:
        sess.upload(b"from tether", "a.txt")
        assert sess.listdir() == ["a.txt"]
    wait_until(lambda: client.summary()["queue_info"]["mixed"]["free"] == 1, timeout=20, what="offered again")
    tvm_sess = client.request("mixed", session_timeout=30)
    np.testing.assert_array_equal(run_addone(tvm_sess, addone_lib), np.arange(8, dtype="float32") + 1)
    del tvm_sess
    gc.collect()
    client.close()


def test_tvm_connect_without_key_and_its_session_timeout(device_server: Any) -> None:
    """``tvm.rpc.connect(host, port)`` sends ``client:`` (TVM's default server key is ""); with
    ``session_timeout`` it sends ``client: -timeout=N``, and that limit is enforced."""
    server = device_server(key="", preload=["tvm"])
    sess = rpc.connect("127.0.0.1", server.port)
    assert sess.get_function("rpc.test.addone")(41) == 42
    del sess
    gc.collect()
    calls_until_the_timeout(rpc.connect("127.0.0.1", server.port, session_timeout=2), server)


def test_back_to_back_tvm_connects_wait_for_the_slot(device_server: Any) -> None:
    """Each ``tvm.rpc.connect`` right after the previous session closed finds the slot still being freed
    (its worker reaped): it waits for it, as in TVM's listen backlog, instead of MISMATCH (5 of 5 before)."""
    server = device_server(key="dev", preload=["tvm"])
    for i in range(5):
        sess = rpc.connect("127.0.0.1", server.port, key="dev")
        assert sess.get_function("rpc.test.addone")(i) == i + 1
        del sess
        gc.collect()  # closes the session; the next connect follows at once
    wait_until(lambda: server.busy_slots() == 0, timeout=5, what="slot free")
    assert server.sessions_served == 5


def test_direct_server_with_auth_serves_tvm_clients_only_from_allowed_networks(
    device_server: Any,
    tmp_path: Path,
    addone_lib: Path,  # noqa: F811
) -> None:
    keyring = tmp_path / "keyring"
    keyring.write_text("alice user alice-secret-0123456789abcdef\n")
    allowed = device_server(key="dev", preload=["tvm"], auth_file=str(keyring), allow_tvm=("127.0.0.0/8",))
    sess = rpc.connect("127.0.0.1", allowed.port, key="dev")
    np.testing.assert_array_equal(run_addone(sess, addone_lib), np.arange(8, dtype="float32") + 1)
    del sess
    gc.collect()
    wait_until(lambda: allowed.busy_slots() == 0, timeout=5, what="session over")
    closed = device_server(key="dev", preload=["tvm"], auth_file=str(keyring), allow_tvm=("10.0.0.0/8",))
    with pytest.raises(tvm.error.InternalError, match="cannot find server that matches"):  # TVM's MISMATCH
        rpc.connect("127.0.0.1", closed.port, key="dev")
    assert closed.sessions_served == 0
