"""tether's proxy against the real apache-tvm 0.27: TVM's servers behind it (``rpc_server --through-proxy``
and ``websocket_proxy_server``), TVM's clients through it, TVM's and tether's query of a tracker it
registers with.

Every TVM piece runs in its own process group (``start_new_session``) and is stopped with ``killpg`` by
pid: TVM's server forks a PopenWorker and a process per session. (TVM's own ``rpc_proxy`` carrying a
tether session is in test_server_tvm.py.)
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tether.client.query import query_tracker
from tether.tracker import TrackerThread

from .conftest import CliProcess, wait_until
from .test_tvm_interop import addone_lib  # noqa: F401 - fixture

tvm = pytest.importorskip("tvm")
np = pytest.importorskip("numpy")
from tvm import rpc  # noqa: E402

pytestmark = pytest.mark.tvm

KEY = "pk"


class Child:
    """A child process in its own session, its output in a log file (read back for failure messages)."""

    def __init__(self, args: list[str], log: Path) -> None:
        self.log = log
        self._out = log.open("w")
        self.proc = subprocess.Popen(
            [sys.executable, *args], stdout=self._out, stderr=subprocess.STDOUT, start_new_session=True
        )

    def output(self) -> str:
        self._out.flush()
        return self.log.read_text(errors="replace")

    def exited(self) -> bool:
        return self.proc.poll() is not None

    def stop(self) -> None:
        """SIGTERM to the process group by the child's pid, SIGKILL if it is not gone in 10 s."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGTERM)  # the child and what it forked
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        self._out.close()


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Callable[..., Child]]:
    children: list[Child] = []

    def start(*args: str, name: str = "child") -> Child:
        child = Child(list(args), tmp_path / f"{name}{len(children)}.log")
        children.append(child)
        return child

    yield start
    for child in children:
        child.stop()


class Proxy:
    """``tether proxy`` as a child process, its state read from ``/status`` on its web port.

    Not an in-process :class:`~tether.proxy.ProxyThread`: TVM's client frees a remote object (a temporary
    like ``mod["addone"]`` going out of scope) with a round trip on its session socket while it holds the
    GIL, so a proxy thread in the same process can never relay that round trip: a deadlock.
    """

    def __init__(self, child: CliProcess) -> None:
        self.child = child
        self.host, self.port = child.listening()
        self.ws_url = child.wait_line("websocket on ").split("websocket on ", 1)[1].strip()
        self.web = self.ws_url.removeprefix("ws://").removesuffix("/ws")

    def status(self) -> dict[str, Any]:
        with urllib.request.urlopen(f"http://{self.web}/status", timeout=5) as reply:
            return dict(json.loads(reply.read()))


@pytest.fixture
def proxy(cli: Callable[..., CliProcess]) -> Callable[..., Proxy]:
    def start(*args: str) -> Proxy:
        return Proxy(cli("proxy", "--host", "127.0.0.1", "--port", "0", "--web-port", "0", *args))

    return start


def tracked_proxy(proxy: Callable[..., Proxy], tracker: TrackerThread) -> Proxy:
    return proxy("--tracker", f"{tracker.host}:{tracker.port}")


def tvm_server_behind(spawn: Callable[..., Child], p: Proxy, key: str = KEY) -> Child:
    return spawn(
        "-m", "tvm.exec.rpc_server", "--host", p.host, "--port", str(p.port), "--through-proxy", "--key", key,
        name="rpc_server",
    )  # fmt: skip


def free(tracker: TrackerThread, key: str = KEY) -> int:
    info = tracker.call(tracker.core.summary)["queue_info"].get(key)
    return int(info["free"]) if info else 0


def wait_free(tracker: TrackerThread, n: int, servers: list[Child], what: str, timeout: float = 30) -> None:
    def ready() -> bool:
        for s in servers:
            assert not s.exited(), f"a TVM server exited:\n{s.output()}"
        return free(tracker) == n

    wait_until(ready, timeout=timeout, interval=0.05, what=what)


def relays(p: Proxy) -> int:
    return len(p.status()["relays"])


def load_addone(sess: Any, lib: Path, name: str) -> Any:
    sess.upload(bytearray(lib.read_bytes()), name)  # TVM's upload(path) leaks an open file
    return sess.load_module(name)


def addone(mod: Any, sess: Any, values: np.ndarray) -> np.ndarray:
    dev = sess.cpu()
    a = tvm.runtime.tensor(values, dev)
    b = tvm.runtime.tensor(np.zeros_like(values), dev)
    mod["addone"](a, b)
    return b.numpy()


@pytest.mark.timeout(60)
def test_two_concurrent_tvm_sessions_on_proxied_tvm_servers(
    tracker: TrackerThread,
    proxy: Callable[..., Proxy],
    spawn: Callable[..., Child],
    addone_lib: Path,  # noqa: F811
) -> None:
    """TVM's own test (wire protocol §5.6): through a proxy in tracker mode, two concurrent sessions on two
    proxied servers of one key; the servers come back to the pool once the sessions are closed."""
    p = tracked_proxy(proxy, tracker)
    servers = [tvm_server_behind(spawn, p) for _ in range(2)]
    wait_free(tracker, 2, servers, "both proxied TVM servers offered")

    client = rpc.connect_tracker(tracker.host, tracker.port)
    first = client.request(KEY, session_timeout=60)
    second = client.request(KEY, session_timeout=60)
    assert relays(p) == 2
    assert free(tracker) == 0
    mods = [load_addone(first, addone_lib, "one.so"), load_addone(second, addone_lib, "two.so")]
    x = np.arange(16, dtype="float32")
    for round_ in range(2):  # interleaved: both sessions alive and in use at once
        np.testing.assert_array_equal(addone(mods[0], first, x + round_), x + round_ + 1)
        np.testing.assert_array_equal(addone(mods[1], second, x * 2), x * 2 + 1)
    assert first.get_function("rpc.test.addone")(41) == 42
    assert second.get_function("rpc.test.strcat")("a", 1) == "a:1"
    status = p.status()
    assert len(status["relays"]) == 2
    assert all(r["bytes"][0] > 0 and r["bytes"][1] > 0 for r in status["relays"])

    del mods, first, second  # TVM closes a session only when every remote object is gone
    gc.collect()
    wait_until(lambda: relays(p) == 0, timeout=10, what="both relays over")
    wait_free(tracker, 2, servers, "both servers offered again", timeout=15)
    assert p.status()["stats"]["paired"] == 2
    # and the pool works again: a third session on a server that came back
    again = client.request(KEY, session_timeout=60)
    assert again.get_function("rpc.test.addone")(1) == 2
    del again
    gc.collect()
    wait_free(tracker, 2, servers, "the server offered again after the third session", timeout=15)
    client.close()


@pytest.mark.timeout(60)
def test_session_timeout_through_the_proxy_is_rpc_session_timeout_error(
    tracker: TrackerThread,
    proxy: Callable[..., Proxy],
    spawn: Callable[..., Child],
    addone_lib: Path,  # noqa: F811
) -> None:
    """``session_timeout`` travels in the client's key (`` -timeout=2``) through the proxy to the server,
    which ends a remote call that runs past it: the client gets ``RPCSessionTimeoutError``."""
    p = tracked_proxy(proxy, tracker)
    servers = [tvm_server_behind(spawn, p)]
    wait_free(tracker, 1, servers, "the proxied TVM server offered")

    client = rpc.connect_tracker(tracker.host, tracker.port)
    held = [client.request(KEY, session_timeout=2)]  # a list: the session must be dropped at the end
    mod = load_addone(held[0], addone_lib, "addone.so")
    dev = held[0].cpu()
    a = tvm.runtime.tensor(np.arange(8, dtype="float32"), dev)
    b = tvm.runtime.tensor(np.zeros(8, dtype="float32"), dev)
    np.testing.assert_array_equal(addone(mod, held[0], np.arange(8, dtype="float32")), np.arange(8) + 1)
    # a remote call of at least 60 s: the server's 2 s are over long before it could finish
    slow = mod.time_evaluator("addone", dev, number=1, repeat=1, min_repeat_ms=60_000)
    started = time.monotonic()
    with pytest.raises(tvm.error.RPCSessionTimeoutError, match="session has expired"):
        slow(a, b)
    assert time.monotonic() - started < 10  # ended by the session's 2 s, not by the call
    del slow, a, b, mod, dev
    held.clear()
    gc.collect()
    wait_until(lambda: relays(p) == 0, timeout=10, what="the relay over")
    wait_free(tracker, 1, servers, "the server offered again after the timeout", timeout=15)
    client.close()


@pytest.mark.timeout(60)
def test_tvm_and_tether_query_count_proxied_tvm_servers(
    tracker: TrackerThread,
    proxy: Callable[..., Proxy],
    spawn: Callable[..., Child],
) -> None:
    """TVM's ``query_rpc_tracker`` reads tether's tracker with proxied servers registered; tether's query
    counts the proxied key's servers (free and in a session) right."""
    p = tracked_proxy(proxy, tracker)
    servers = [tvm_server_behind(spawn, p) for _ in range(2)]
    wait_free(tracker, 2, servers, "both proxied TVM servers offered")

    def tvm_query() -> str:
        done = subprocess.run(
            [sys.executable, "-m", "tvm.exec.query_rpc_tracker", "--host", tracker.host, "--port", str(tracker.port)],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout

    text = tvm_query()
    assert f"server:proxy[{KEY}]" in text
    (row,) = [k for k in query_tracker(tracker.host, tracker.port).keys if k.key == KEY]
    assert (row.total, row.free, row.pending) == (2, 2, 0)

    client = rpc.connect_tracker(tracker.host, tracker.port)
    held = [client.request(KEY, session_timeout=60)]
    assert held[0].get_function("rpc.test.addone")(1) == 2
    status = query_tracker(tracker.host, tracker.port)
    (row,) = [k for k in status.keys if k.key == KEY]
    assert (row.total, row.free, row.busy) == (2, 1, 1)
    assert tvm_query()  # and TVM's query still reads it while a proxied server is in a session
    held.clear()
    gc.collect()
    wait_free(tracker, 2, servers, "the server offered again", timeout=15)
    (row,) = [k for k in query_tracker(tracker.host, tracker.port).keys if k.key == KEY]
    assert (row.total, row.free) == (2, 2)
    client.close()


@pytest.mark.timeout(60)
def test_tvm_websocket_server_behind_proxy_serves_a_tvm_tcp_client(
    proxy: Callable[..., Proxy],
    spawn: Callable[..., Child],
    addone_lib: Path,  # noqa: F811
) -> None:
    """TVM's ``websocket_proxy_server`` on the proxy's ``/ws`` (plain mode), TVM's TCP client with the same
    key: a compiled module uploaded, loaded and run across the WebSocket/TCP bridge; closing the session
    ends the WebSocket server (it serves one session)."""
    p = proxy()
    code = f"from tvm.rpc.proxy import websocket_proxy_server; websocket_proxy_server({p.ws_url!r}, 'wskey')"
    ws_server = spawn("-c", code, name="ws_server")

    def waiting() -> bool:
        assert not ws_server.exited(), f"websocket_proxy_server exited:\n{ws_server.output()}"
        return any(w["key"] == "server:wskey" for w in p.status()["waiting"])

    wait_until(waiting, timeout=30, interval=0.05, what="the WebSocket server waiting at the proxy")
    held = [rpc.connect(p.host, p.port, key="wskey")]
    assert relays(p) == 1
    assert held[0].get_function("rpc.test.addone")(9) == 10
    mod = load_addone(held[0], addone_lib, "addone.so")
    x = np.arange(32, dtype="float32")
    np.testing.assert_array_equal(addone(mod, held[0], x), x + 1)
    del mod
    held.clear()
    gc.collect()
    wait_until(lambda: relays(p) == 0, timeout=10, what="the relay over")
    wait_until(ws_server.exited, timeout=10, what="the WebSocket server done with its one session")
    assert ws_server.proc.returncode == 0, ws_server.output()
