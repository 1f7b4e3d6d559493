"""Bounds on the device server, each against the attack it stops, over real sockets and worker processes:
slow handshakes from one host, sessions without an end, clients that leave mid-benchmark, announced sizes
and workspace quotas, and a worker's memory."""

from __future__ import annotations

import contextlib
import fcntl
import gc
import json
import socket
import struct
import subprocess
import sys
import termios
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import tether
from tether.protocol import RPC_MAGIC, HandshakeCode

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
    slow = reference_model(tmp_path / "slow.json", {"op": "sleep", "seconds": 60})
    with tether.connect("127.0.0.1", server.port, key="dev", session_timeout=asked) as sess:
        with pytest.raises(tether.SessionTimeout, match=r"1\.5 s limit on a session expired \(--max-session-time"):
            sess.load_model(sess.upload(slow)).run(fill="random")  # whichever call the limit meets
        assert sess.closed
    wait_until(lambda: server.busy_slots() == 0, timeout=10, what="slot free after the server's limit")
    short = tether.connect("127.0.0.1", server.port, key="dev", session_timeout=0.5)  # a shorter one stays
    with short, pytest.raises(tether.SessionTimeout, match=r"the 0\.5 s session timeout expired"):
        short.load_model(short.upload(slow)).run(fill="random")


@pytest.mark.tvm
def test_max_session_time_ends_a_tvm_session_that_asked_for_none(device_server: Any) -> None:
    tvm = pytest.importorskip("tvm")
    from tvm import rpc

    server = device_server(key="dev", preload=["tvm"], max_session_s=2)
    held = [rpc.connect("127.0.0.1", server.port, key="dev")]  # no session_timeout; a list: dropped below
    funcs: list[Any] = []

    def call() -> bool:
        if not funcs:
            funcs.append(held[0].get_function("rpc.test.addone"))
        assert funcs[0](1) == 2
        return False

    with pytest.raises(tvm.error.RPCSessionTimeoutError, match="max-session-time"):  # whichever call meets it
        wait_until(call, timeout=30, interval=0.05, what="the server's 2 s limit")
    funcs.clear()
    held.clear()
    gc.collect()
    wait_until(lambda: server.busy_slots() == 0, timeout=10, what="slot free after the server's limit")


# -- 3. a client that leaves -----------------------------------------------------------------------------

_CLIENT = """
import sys, tether
sess = tether.connect("127.0.0.1", int(sys.argv[1]), key="dev")
model = sess.load_model(sess.upload(sys.argv[2]))
print(sess.info()["pid"], flush=True)
send = sess._channel.send_frame
def send_and_tell(*args, **kwargs):
    send(*args, **kwargs)
    print("sent", flush=True)
sess._channel.send_frame = send_and_tell
model.benchmark(number=1, repeat=250, warmup=0)  # 50 s of 0.2 s runs
"""


def _unread(sock: socket.socket) -> int:
    """Bytes in the socket's receive queue that nobody (here: the session's worker) has read yet."""
    return struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0\0\0\0"))[0]


def _running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.parametrize("how", ["shutdown", "sigkill"])
def test_a_client_that_leaves_mid_benchmark_frees_the_slot(
    device_server: Any, tmp_path: Path, how: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A client that disconnected during a 25 s benchmark kept the device busy for 37 s; its session now
    ends (the worker killed, the slot free) as soon as the server sees the connection go."""
    server = device_server(key="dev")
    slow = reference_model(tmp_path / "slow.json", {"op": "sleep", "seconds": 0.2})
    if how == "sigkill":  # the client's process dies: its kernel closes the connection
        client = subprocess.Popen(
            [sys.executable, "-c", _CLIENT, str(server.port), str(slow)], stdout=subprocess.PIPE, text=True
        )
        try:
            assert client.stdout is not None
            pid = int(client.stdout.readline())
            assert client.stdout.readline() == "sent\n"
            conn = server._slots[0].session.conn
            wait_until(lambda: _unread(conn) == 0, what="the worker reading its benchmark request")
            assert _running(pid)
            left = time.monotonic()
            client.kill()
            wait_until(lambda: server.busy_slots() == 0 and not _running(pid), timeout=5, what="the slot freed")
            took = time.monotonic() - left
        finally:
            client.kill()
            client.wait()
            if client.stdout is not None:
                client.stdout.close()
    else:  # the client shuts its socket down (Session.interrupt) while it waits for the benchmark
        sess = tether.connect("127.0.0.1", server.port, key="dev")
        model = sess.load_model(sess.upload(slow))
        pid = sess.info()["pid"]
        sent = threading.Event()
        channel = sess._channel
        assert channel is not None
        send = channel.send_frame

        def send_and_tell(*args: Any, **kwargs: Any) -> None:
            send(*args, **kwargs)
            sent.set()

        channel.send_frame = send_and_tell  # type: ignore[method-assign]
        errors: list[BaseException] = []

        def bench() -> None:
            try:
                model.benchmark(number=1, repeat=250, warmup=0)  # 50 s of 0.2 s runs
            except BaseException as exc:
                errors.append(exc)

        thread = threading.Thread(target=bench)
        thread.start()
        try:
            conn = server._slots[0].session.conn
            wait_until(lambda: sent.is_set() and _unread(conn) == 0, what="the worker reading its benchmark request")
            left = time.monotonic()
            sess.interrupt()
            wait_until(lambda: server.busy_slots() == 0 and not _running(pid), timeout=5, what="the slot freed")
            took = time.monotonic() - left
        finally:
            sess.interrupt()
            thread.join(10)
            sess.close()
        assert len(errors) == 1 and isinstance(errors[0], tether.SessionLost)
    with capsys.disabled():
        print(f"\n[{how}] client gone -> worker killed and slot free: {took * 1000:.1f} ms")
    with tether.connect("127.0.0.1", server.port, key="dev") as again:
        again.ping()


# -- 4. announced sizes and the workspace quota ---------------------------------------------------------


def _raw_session(port: int) -> socket.socket:
    """A native session over a plain socket: the handshake done, its reply read."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    try:
        key = b"client:dev -tether=1"
        sock.sendall(struct.pack("<ii", RPC_MAGIC, len(key)) + key)
        code, n = struct.unpack("<ii", _exact(sock, 8))
        assert code == HandshakeCode.SUCCESS, f"handshake answered {code}"
        _exact(sock, n)
    except BaseException:
        sock.close()
        raise
    return sock


def _exact(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        assert chunk, "the server closed the session"
        data += chunk
    return data


def _request(frame_id: int, header: dict[str, Any], payload_len: int = 0) -> bytes:
    body = json.dumps(header).encode()
    return struct.pack("<2sBBIIQ", b"TQ", 1, 1, frame_id, len(body), payload_len) + body


def _answer(sock: socket.socket) -> tuple[int, int, dict[str, Any]]:
    """(kind, id, JSON header) of the next frame; its payload is read and dropped."""
    _, _, kind, frame_id, header_len, payload_len = struct.unpack("<2sBBIIQ", _exact(sock, 20))
    header = json.loads(_exact(sock, header_len))
    _exact(sock, payload_len)
    return kind, frame_id, header


def _rss(pid: int) -> int:
    """The process's resident memory in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def _put(frame_id: int, nbytes: int) -> bytes:
    desc = {"name": "", "dtype": "uint8", "shape": [nbytes], "nbytes": nbytes}
    return _request(frame_id, {"op": "put", "tensors": [desc]}, nbytes)


def test_an_announced_payload_is_checked_before_anything_is_allocated(
    device_server: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """A 66-byte request announcing a 1 GiB tensor grew a worker from 97 MB to 1.15 GB before any of it
    arrived. Over --max-upload-mb (default 1 GiB) it is refused from its header at once; within it, the
    tensor's memory is committed only as its bytes arrive."""
    server = device_server(key="dev")
    with _raw_session(server.port) as sock:
        sock.sendall(_request(1, {"op": "info"}))
        pid = _answer(sock)[2]["pid"]
        before = _rss(pid)
        sock.sendall(_put(2, 2 << 30))  # and not a byte of it
        kind, frame_id, header = _answer(sock)
        assert (kind, frame_id, header["type"]) == (3, 2, "QuotaExceeded")
        assert "at most 1073741824" in header["message"] and "--max-upload-mb" in header["message"]
        assert _rss(pid) < before + (64 << 20)
    wait_until(lambda: server.busy_slots() == 0, timeout=10, what="the slot free after the client left")
    with _raw_session(server.port) as sock:
        sock.sendall(_request(1, {"op": "info"}))
        pid = _answer(sock)[2]["pid"]
        before = _rss(pid)
        sock.sendall(_put(2, 1 << 30) + b"\0" * (1 << 20))  # at the limit: 1 GiB announced, 1 MiB sent
        conn = server._slots[0].session.conn
        wait_until(lambda: _unread(conn) == 0, what="the worker reading what was sent")
        grown = _rss(pid) - before
        with capsys.disabled():
            print(
                f"\n1 GiB tensor announced, 1 MiB sent: worker RSS {before >> 20} MiB, grew {grown / (1 << 20):.1f} MiB"
            )
        assert grown < 64 << 20


def test_uploads_and_tensors_over_the_limit_are_refused_and_the_session_goes_on(device_server: Any) -> None:
    np = pytest.importorskip("numpy")
    server = device_server(key="dev", max_upload_bytes=1 << 20)
    with tether.connect("127.0.0.1", server.port, key="dev") as sess:
        assert sess.info()["max_payload"] == 1 << 20  # what batch clients check before they send
        with pytest.raises(tether.QuotaExceeded, match=r"2097152 bytes .* at most 1048576 \(1 MiB, --max-upload-mb\)"):
            sess.upload(b"x" * (2 << 20), "big.bin")
        with pytest.raises(tether.QuotaExceeded, match="--max-upload-mb"):
            sess.tensor(np.zeros(1 << 19, "float32"))
        assert sess.listdir() == []
        sess.upload(b"x" * (1 << 20), "ok.bin")  # at the limit
        assert sess.listdir() == ["ok.bin"]
        np.testing.assert_array_equal(sess.tensor(np.arange(4, dtype="int32")).numpy(), np.arange(4))
        sess.ping()


def test_the_workspace_quota_refuses_the_upload_that_would_pass_it(device_server: Any) -> None:
    """Two 1 GiB uploads were both accepted; with --workspace-quota-mb the second that does not fit is
    refused before a byte is written, and what an upload replaces is counted out."""
    server = device_server(key="dev", workspace_quota_bytes=3 << 20)
    cached = b"c" * (2 << 20)
    with tether.connect("127.0.0.1", server.port, key="dev") as sess:
        sess.upload(cached, "c.bin", sha256=tether.client.session.file_digest(cached))  # kept in the cache
    with tether.connect("127.0.0.1", server.port, key="dev") as sess:
        sess.upload(b"a" * (2 << 20), "a.bin")
        with pytest.raises(tether.QuotaExceeded, match=r"3145728 \(3 MiB, --workspace-quota-mb\)"):
            sess.upload(b"b" * (2 << 20), "b.bin")
        assert sess.listdir() == ["a.bin"]
        with pytest.raises(tether.QuotaExceeded, match="--workspace-quota-mb"):  # from the cache: the same
            sess.upload_cached(cached, "c.bin")
        assert sess.listdir() == ["a.bin"]
        sess.upload(b"A" * (2 << 20), "a.bin")  # a replacement fits
        sess.remove("a.bin")
        sess.upload(b"b" * (3 << 20), "b.bin")  # the whole quota
        assert sess.download("b.bin") == b"b" * (3 << 20)


# -- 5. a worker's memory ------------------------------------------------------------------------------


def test_a_worker_past_its_memory_limit_fails_typed_and_the_server_goes_on(device_server: Any, tmp_path: Path) -> None:
    np = pytest.importorskip("numpy")
    server = device_server(key="dev", preload=["numpy"], worker_memory_bytes=256 << 20)
    with tether.connect("127.0.0.1", server.port, key="dev") as sess:
        assert sess.info()["worker_memory"] == 256 << 20
        with pytest.raises(
            tether.WorkerMemoryExceeded, match=r"'fill' ran out of memory .*256 MiB .*--worker-memory-mb"
        ):
            sess.fill((1 << 28,), "float32", "zeros")  # 1 GiB made on the device
        with pytest.raises(tether.WorkerMemoryExceeded, match=r"'put' ran out of memory"):
            sess.tensor(np.zeros(384 << 20, "uint8"))  # 384 MiB sent (and skipped)
        np.testing.assert_array_equal(sess.fill((16,), "float32", "ones").numpy(), np.ones(16, "float32"))
        model = sess.load_model(sess.upload(reference_model(tmp_path / "m.json")))
        np.testing.assert_array_equal(model.run(fill="zeros")["y"], np.ones((2, 3), "float32"))
    with tether.connect("127.0.0.1", server.port, key="dev") as again:  # the next session, its own limit
        assert again.fill((1 << 20,), "float32", "zeros").shape == (1 << 20,)
        again.ping()


@pytest.mark.tvm
def test_a_tvm_session_past_its_memory_limit_gets_an_error_and_goes_on(device_server: Any) -> None:
    """In a TVM session the limit counts from after TVM's own imports; a remote allocation past it is
    TVM's error for that call (std::bad_alloc), and the session, and the server, go on."""
    tvm = pytest.importorskip("tvm")
    np = pytest.importorskip("numpy")
    from tvm import rpc

    server = device_server(key="dev", preload=["numpy", "tvm"], worker_memory_bytes=256 << 20)
    sess = rpc.connect("127.0.0.1", server.port, key="dev")
    dev = sess.cpu()
    with pytest.raises(tvm.error.RPCError, match="bad_alloc"):
        tvm.runtime.empty((1 << 28,), "float32", dev)  # 1 GiB
    np.testing.assert_array_equal(tvm.runtime.tensor(np.arange(8, dtype="float32"), dev).numpy(), np.arange(8))
    assert sess.get_function("rpc.test.addone")(1) == 2
    del dev, sess
    gc.collect()
    wait_until(lambda: server.busy_slots() == 0, timeout=10, what="the session over")
    again = rpc.connect("127.0.0.1", server.port, key="dev")
    assert again.get_function("rpc.test.addone")(41) == 42
    del again
    gc.collect()


@pytest.mark.tvm
def test_tvm_uploads_are_bounded_by_the_same_quotas(device_server: Any) -> None:
    """TVM's loop receives an upload whole before any function sees it: its size and the workspace quota
    are checked before it is written (the bytes were already received: the worker's memory limit bounds that)."""
    tvm = pytest.importorskip("tvm")
    from tvm import rpc

    server = device_server(key="dev", preload=["tvm"], max_upload_bytes=2 << 20, workspace_quota_bytes=3 << 20)
    sess = rpc.connect("127.0.0.1", server.port, key="dev")
    with pytest.raises(tvm.error.RPCError, match=r"QuotaExceeded.*--max-upload-mb"):
        sess.upload(bytearray(3 << 20), "big.bin")
    sess.upload(bytearray(2 << 20), "a.bin")
    with pytest.raises(tvm.error.RPCError, match=r"QuotaExceeded.*--workspace-quota-mb"):
        sess.upload(bytearray(2 << 20), "b.bin")
    assert sess.listdir(".").split(",") == ["a.bin"]
    sess.upload(bytearray(2 << 20), "a.bin")  # a replacement fits
    assert len(sess.download("a.bin")) == 2 << 20
    with pytest.raises(tvm.error.RPCError, match="leaves the workspace"):
        sess.upload(bytearray(b"x"), "../escape.txt")
    del sess
    gc.collect()
    wait_until(lambda: server.busy_slots() == 0, timeout=10, what="the session over")
