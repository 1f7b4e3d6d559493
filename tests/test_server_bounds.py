"""Bounds on the device server, each against the attack it stops, over real sockets and worker processes:
slow handshakes from one host, sessions without an end, clients that leave mid-benchmark, announced sizes
and workspace quotas, and a worker's memory."""

from __future__ import annotations

import contextlib
import gc
import json
import socket
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import tether
from tether.protocol import RPC_MAGIC

from .conftest import wait_until

pytestmark = pytest.mark.timeout(90)


# -- 1. slow handshakes ------------------------------------------------------------------------------


@contextlib.contextmanager
def _slow_handshakes(port: int, count: int) -> Iterator[list[socket.socket]]:
    """``count`` connections that send one byte of TVM's handshake magic and then nothing (slowloris)."""
    socks: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.create_connection(("127.0.0.1", port), timeout=10)
            socks.append(sock)
            sock.sendall(struct.pack("<i", RPC_MAGIC)[:1])
        yield socks
    finally:
        for sock in socks:
            sock.close()


def test_slow_handshakes_from_one_host_do_not_lock_out_its_real_clients(device_server: Any) -> None:
    """80 one-byte handshakes from 127.0.0.1 held 64 handshake threads for 10 s each (the rest closed at
    accept, real clients too): 0 of 12 sessions got through. Each host now has 8 handshakes in flight at
    most; a ninth sheds that host's oldest, so the real clients (from the same address) all get in."""
    server = device_server(key="dev")
    with _slow_handshakes(server.port, 80):
        wait_until(lambda: server.handshakes_shed >= 80 - 8, timeout=20, what="the oldest slow handshakes shed")
        for _ in range(12):
            with tether.connect("127.0.0.1", server.port, key="dev", timeout=20) as sess:
                sess.ping()
    assert server.sessions_served >= 11  # the last may still be ending


@pytest.mark.tvm
def test_slow_handshakes_do_not_lock_out_tvms_client(device_server: Any) -> None:
    pytest.importorskip("tvm")
    from tvm import rpc

    server = device_server(key="dev", preload=["tvm"])
    with _slow_handshakes(server.port, 80):
        wait_until(lambda: server.handshakes_shed >= 80 - 8, timeout=20, what="the oldest slow handshakes shed")
        sess = rpc.connect("127.0.0.1", server.port, key="dev")
        assert sess.get_function("rpc.test.addone")(41) == 42
        del sess


# -- 2. the longest session ----------------------------------------------------------------------------


def reference_model(path: Path, *ops: dict[str, Any]) -> Path:
    spec = {"dtype": "float32", "shape": [2, 3]}
    path.write_text(
        json.dumps(
            {
                "format": "tether-reference/1",
                "inputs": [{"name": "x", **spec}],
                "outputs": [{"name": "y", **spec}],
                "ops": [*ops, {"op": "affine", "input": "x", "output": "y", "scale": 2.0, "bias": 1.0}],
            }
        )
    )
    return path


@pytest.mark.parametrize("asked", [None, 60.0])
def test_max_session_time_ends_sessions_that_asked_for_none_or_more(
    device_server: Any, tmp_path: Path, asked: float | None
) -> None:
    server = device_server(key="dev", max_session_s=1.5)
    with tether.connect("127.0.0.1", server.port, key="dev", session_timeout=asked) as sess:
        sess.upload(reference_model(tmp_path / "slow.json", {"op": "sleep", "seconds": 60}))
        model = sess.load_model("slow.json")
        with pytest.raises(tether.SessionTimeout, match=r"1\.5 s limit on a session expired \(--max-session-time"):
            model.run(fill="random")
        assert sess.closed
    wait_until(lambda: server.busy_slots() == 0, timeout=10, what="slot free after the server's limit")
    slow = reference_model(tmp_path / "slow.json", {"op": "sleep", "seconds": 60})
    with tether.connect("127.0.0.1", server.port, key="dev", session_timeout=0.5) as short:  # a shorter one stays
        model = short.load_model(short.upload(slow))
        with pytest.raises(tether.SessionTimeout, match=r"the 0\.5 s session timeout expired"):
            model.run(fill="random")


@pytest.mark.tvm
def test_max_session_time_ends_a_tvm_session_that_asked_for_none(device_server: Any) -> None:
    tvm = pytest.importorskip("tvm")
    from tvm import rpc

    server = device_server(key="dev", preload=["tvm"], max_session_s=2)
    sess = rpc.connect("127.0.0.1", server.port, key="dev")  # no session_timeout
    funcs = [sess.get_function("rpc.test.addone")]
    assert funcs[0](1) == 2
    with pytest.raises(tvm.error.RPCSessionTimeoutError, match="max-session-time"):
        wait_until(lambda: funcs[0](1) != 2, timeout=30, interval=0.05, what="the server's 2 s limit")
    funcs.clear()
    del sess
    gc.collect()
    wait_until(lambda: server.busy_slots() == 0, timeout=10, what="slot free after the server's limit")
