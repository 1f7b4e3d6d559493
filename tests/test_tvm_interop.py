"""tether's tracker against the real apache-tvm 0.27: its servers, clients, tracker and query tool.

Each TVM server runs in its own process (``tvm.rpc.Server`` starts a PopenWorker) and is stopped by pid.
TVM's server cannot bind port 0 (it treats a bound port of 0 as failure), so it gets a random range.
"""

from __future__ import annotations

import gc
import random
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tether.client.query import query_tracker
from tether.client.tracker import TrackerClient
from tether.errors import RequestTimeout
from tether.tracker import TrackerThread

from .conftest import wait_until

tvm = pytest.importorskip("tvm")
np = pytest.importorskip("numpy")
from tvm import rpc, te  # noqa: E402
from tvm.rpc.tracker import Tracker as TVMTracker  # noqa: E402

pytestmark = pytest.mark.tvm


@pytest.fixture(scope="module")
def addone_lib(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real library compiled by TVM for llvm: ``addone(A, B)`` with ``B = A + 1``."""
    n = te.var("n")
    a = te.placeholder((n,), name="A", dtype="float32")
    b = te.compute(a.shape, lambda i: a[i] + 1.0, name="B")
    mod = tvm.IRModule({"addone": te.create_prim_func([a, b]).with_attr("global_symbol", "addone")})
    lib = tvm.compile(mod, target={"kind": "llvm"})
    path = tmp_path_factory.mktemp("lib") / "addone.so"
    lib.export_library(str(path))
    return path


def _port_range() -> tuple[int, int]:
    start = random.randint(20000, 55000)
    return start, start + 200


@pytest.fixture
def tvm_server() -> Iterator[Callable[..., Any]]:
    servers: list[Any] = []

    def start(tracker_port: int, key: str, custom_addr: str | None = None) -> Any:
        port, port_end = _port_range()
        server = rpc.Server(
            host="127.0.0.1",
            port=port,
            port_end=port_end,
            tracker_addr=("127.0.0.1", tracker_port),
            key=key,
            custom_addr=custom_addr,
            silent=True,
        )
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.terminate()


@pytest.fixture
def tvm_tracker() -> Iterator[Any]:
    port, port_end = _port_range()
    tracker = TVMTracker(host="127.0.0.1", port=port, port_end=port_end, silent=True)
    yield tracker
    tracker.terminate()


def free_of(tracker_port: int, key: str) -> int:
    client = rpc.connect_tracker("127.0.0.1", tracker_port)
    try:
        return int(client.summary()["queue_info"].get(key, {}).get("free", 0))
    finally:
        client.close()


def normalized(summary: dict[str, Any], ports: dict[int, str]) -> dict[str, Any]:
    infos = sorted(
        (
            {"key": i["key"], "addr": [i["addr"][0], ports.get(i["addr"][1], i["addr"][1])]}
            for i in summary["server_info"]
        ),
        key=lambda i: (i["key"], i["addr"][0], str(i["addr"][1])),
    )
    return {"queue_info": summary["queue_info"], "server_info": infos}


def run_addone(sess: Any, lib: Path) -> np.ndarray:
    sess.upload(bytearray(lib.read_bytes()), lib.name)  # TVM's upload(path) leaks an open file
    mod = sess.load_module(lib.name)
    dev = sess.cpu()
    a = tvm.runtime.tensor(np.arange(8, dtype="float32"), dev)
    b = tvm.runtime.tensor(np.zeros(8, dtype="float32"), dev)
    mod["addone"](a, b)
    result = b.numpy()
    timer = mod.time_evaluator("addone", dev, number=5, repeat=2)
    assert len(timer(a, b).results) == 2
    return result


def test_tvm_servers_register_as_with_tvms_tracker(
    tracker: TrackerThread, tvm_tracker: Any, tvm_server: Callable[..., Any]
) -> None:
    results = []
    for port in (tvm_tracker.port, tracker.port):
        plain = tvm_server(port, "foo")
        custom = tvm_server(port, "foo", custom_addr="localhost")
        wait_until(lambda p=port: free_of(p, "foo") == 2, timeout=20, what="two TVM servers registered")
        client = rpc.connect_tracker("127.0.0.1", port)
        summary = client.summary()
        client.close()
        for info in summary["server_info"]:
            assert isinstance(info["addr"][1], int)
        results.append(normalized(summary, {plain.port: "PLAIN", custom.port: "CUSTOM"}))
        plain.terminate()
        custom.terminate()
    tvm_view, tether_view = results
    assert tether_view == tvm_view
    assert tether_view["queue_info"] == {"foo": {"free": 2, "pending": 0}}
    assert tether_view["server_info"] == [
        {"key": "server:foo", "addr": ["127.0.0.1", "PLAIN"]},
        {"key": "server:foo", "addr": ["localhost", "CUSTOM"]},
    ]


def test_request_returns_a_working_session(
    tracker: TrackerThread, tvm_server: Callable[..., Any], addone_lib: Path
) -> None:
    tvm_server(tracker.port, "cpu")
    wait_until(lambda: free_of(tracker.port, "cpu") == 1, timeout=20, what="server registered")

    def session() -> np.ndarray:
        client = rpc.connect_tracker("127.0.0.1", tracker.port)
        sess = client.request("cpu", priority=1)
        assert free_of(tracker.port, "cpu") == 0
        out = run_addone(sess, addone_lib)
        client.close()
        return out

    np.testing.assert_allclose(session(), np.arange(8, dtype="float32") + 1)
    gc.collect()  # the session ends when its last remote object is gone
    wait_until(lambda: free_of(tracker.port, "cpu") == 1, timeout=2.0, what="slot free again after the session")


def test_killed_server_leaves_within_a_second(tracker: TrackerThread, tvm_server: Callable[..., Any]) -> None:
    keep = tvm_server(tracker.port, "k")
    doomed = tvm_server(tracker.port, "k")
    wait_until(lambda: free_of(tracker.port, "k") == 2, timeout=20, what="two servers")
    doomed.terminate()  # kills its process: the tracker sees the connection close
    wait_until(lambda: free_of(tracker.port, "k") == 1, timeout=1.0, what="killed server gone")
    client = rpc.connect_tracker("127.0.0.1", tracker.port)
    infos = client.summary()["server_info"]
    client.close()
    assert [i["addr"][1] for i in infos] == [keep.port]


def test_one_server_two_requesters(tracker: TrackerThread, tvm_server: Callable[..., Any]) -> None:
    tvm_server(tracker.port, "one")
    wait_until(lambda: free_of(tracker.port, "one") == 1, timeout=20, what="server registered")
    first_client = rpc.connect_tracker("127.0.0.1", tracker.port)
    holder = [first_client.request("one")]
    served = threading.Event()
    errors: list[BaseException] = []

    def second() -> None:
        try:
            client = rpc.connect_tracker("127.0.0.1", tracker.port)
            sess = client.request("one")
            assert sess.get_function("rpc.test.addone")(1) == 2
            served.set()
        except BaseException as exc:  # reported to the test thread
            errors.append(exc)

    thread = threading.Thread(target=second, daemon=True)
    thread.start()

    def queue() -> dict[str, int]:
        client = rpc.connect_tracker("127.0.0.1", tracker.port)
        try:
            return client.summary()["queue_info"]["one"]  # type: ignore[no-any-return]
        finally:
            client.close()

    wait_until(lambda: queue() == {"free": 0, "pending": 1}, what="second requester waiting")
    holder.clear()
    first_client.close()
    gc.collect()  # the first session ends
    assert served.wait(5.0), errors
    thread.join(5)
    assert not errors


def test_keys_with_colons_work_end_to_end(tracker: TrackerThread, tvm_server: Callable[..., Any]) -> None:
    key = "127.0.0.1:5555"
    tvm_server(tracker.port, key)
    wait_until(lambda: free_of(tracker.port, key) == 1, timeout=20, what="server registered")
    client = rpc.connect_tracker("127.0.0.1", tracker.port)
    sess = client.request(key)
    assert sess.get_function("rpc.test.addone")(41) == 42
    status = query_tracker("127.0.0.1", tracker.port)
    (row,) = [k for k in status.keys if k.key == key]
    assert (row.total, row.free, row.pending) == (1, 0, 0)
    client.close()


def test_session_timeout_is_a_typed_error(tracker: TrackerThread, tvm_server: Callable[..., Any]) -> None:
    tvm_server(tracker.port, "t")
    wait_until(lambda: free_of(tracker.port, "t") == 1, timeout=20, what="server registered")
    client = rpc.connect_tracker("127.0.0.1", tracker.port)
    sess = client.request("t", session_timeout=1)
    addone = sess.get_function("rpc.test.addone")
    assert addone(1) == 2

    errors: list[str] = []

    def expired() -> bool:
        try:
            addone(1)
        except tvm.error.RPCSessionTimeoutError:
            return True
        except tvm.error.TVMError as exc:  # say what came instead (TVM's server, apache/tvm#15151)
            errors.append(f"{type(exc).__name__}: {str(exc)[:300]}")
            return True
        return False

    try:
        wait_until(expired, timeout=15, interval=0.1, what="RPCSessionTimeoutError")
        assert not errors, f"TVM's server ended the session without RPCSessionTimeoutError: {errors}"
    finally:
        addone = sess = None  # free the dead session's objects here, not in a later test's garbage collection
        client.close()


def test_tvm_query_tool_prints_tethers_table(tracker: TrackerThread, tvm_server: Callable[..., Any]) -> None:
    tvm_server(tracker.port, "rasp")
    wait_until(lambda: free_of(tracker.port, "rasp") == 1, timeout=20, what="server registered")
    done = subprocess.run(
        [sys.executable, "-m", "tvm.exec.query_rpc_tracker", "--host", "127.0.0.1", "--port", str(tracker.port)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert "server:rasp" in done.stdout
    (row,) = [line.split() for line in done.stdout.splitlines() if line.startswith("rasp ")]
    assert row == ["rasp", "1", "1", "0"]


def test_tether_client_and_query_read_tvms_tracker(tvm_tracker: Any, tvm_server: Callable[..., Any]) -> None:
    server = tvm_server(tvm_tracker.port, "x:y")
    wait_until(lambda: free_of(tvm_tracker.port, "x:y") == 1, timeout=20, what="server registered")
    with TrackerClient.connect("127.0.0.1", tvm_tracker.port) as client:
        assert client.tether_version is None
        grant = client.request_grant("x:y", timeout=10)
        assert grant.port == server.port and grant.matchkey.startswith("x:y:")
    with TrackerClient.connect("127.0.0.1", tvm_tracker.port) as client, pytest.raises(RequestTimeout):
        client.request_grant("absent", timeout=0.3)  # enforced on this side: TVM's tracker has no timeout
    status = query_tracker("127.0.0.1", tvm_tracker.port)
    assert status.tether_version is None
    assert [(s.key, s.state) for s in status.servers] == [("server:x:y", "?")]
    (row,) = [k for k in status.keys if k.key == "x:y"]
    assert row.total == 1  # TVM's own query prints 0 for this key


def test_tvm_peers_with_auth_on_only_from_allowed_networks(
    tmp_path: Path, tvm_server: Callable[..., Any], addone_lib: Path
) -> None:
    """With an auth file, TVM's server, client and query tool work from an ``--allow-tvm`` network exactly as
    without one; from elsewhere they are refused (the server never gets into the pool)."""
    from tether.tracker import TrackerConfig

    keyring = tmp_path / "keyring"
    keyring.write_text("root admin root-secret-0123456789abcdef\n")
    with TrackerThread(TrackerConfig(port=0, auth_file=str(keyring), allow_tvm=("127.0.0.0/8",))) as allowed:
        tvm_server(allowed.port, "cpu")
        wait_until(lambda: free_of(allowed.port, "cpu") == 1, timeout=20, what="TVM's server registered")
        client = rpc.connect_tracker("127.0.0.1", allowed.port)
        sess = client.request("cpu", priority=1)
        np.testing.assert_allclose(run_addone(sess, addone_lib), np.arange(8, dtype="float32") + 1)
        client.close()
        del sess
        gc.collect()
        done = subprocess.run(
            [sys.executable, "-m", "tvm.exec.query_rpc_tracker", "--host", "127.0.0.1", "--port", str(allowed.port)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0 and "server:cpu" in done.stdout, done.stderr
    with TrackerThread(TrackerConfig(port=0, auth_file=str(keyring), allow_tvm=("10.0.0.0/8",))) as closed:
        tvm_server(closed.port, "cpu")
        with pytest.raises(RuntimeError, match="requires a token"):  # TVM prints the reply: the reason shows
            rpc.connect_tracker("127.0.0.1", closed.port).summary()
        with TrackerClient.connect(closed.host, closed.port, token="root:root-secret-0123456789abcdef") as admin:
            assert admin.summary()["queue_info"] == {}  # TVM's server was refused at its first message
