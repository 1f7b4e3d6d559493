"""tether's device server and native session, over real sockets, with real worker processes.

Models here use the stdlib reference backend, so these tests exercise the core (handshake, workers,
workspace, timeouts, tracker registration) without onnxruntime or tvm; test_models.py runs real models.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import select
import signal
import socket
import struct
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import tether
from tether.device.server import DeviceServer
from tether.protocol import RPC_MAGIC, HandshakeCode
from tether.tracker import TrackerConfig, TrackerThread

from .conftest import wait_until

pytestmark = pytest.mark.timeout(60)


def reference_model(path: Path, *ops: dict[str, Any], shape: tuple[int, ...] = (2, 3)) -> Path:
    spec = {"dtype": "float32", "shape": list(shape)}
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


def test_native_session_files_models_tensors(device_server: Any, tmp_path: Path) -> None:
    server = device_server(key="dev")
    with tether.connect("127.0.0.1", server.port, key="dev") as sess:
        assert sess.upload(b"hello", "dir/a.txt") == "dir/a.txt"
        assert sess.listdir() == ["dir"]
        assert sess.listdir("dir", detail=True) == [{"name": "a.txt", "type": "file", "size": 5}]
        assert sess.download("dir/a.txt") == b"hello"
        sess.remove("dir/a.txt")
        assert sess.listdir("dir") == []

        big = os.urandom(3 << 20)
        (tmp_path / "big.bin").write_bytes(big)
        sess.upload(tmp_path / "big.bin")
        assert sess.download("big.bin") == big

        sess.upload(reference_model(tmp_path / "m.json"))
        model = sess.load_model("m.json")
        assert model.backend == "reference"
        assert model.inputs == [{"name": "x", "dtype": "float32", "shape": [2, 3]}]
        x = np.arange(6, dtype="float32").reshape(2, 3)
        out = model.run({"x": x})
        np.testing.assert_array_equal(out["y"], x * 2 + 1)

        kept = sess.tensor(x)
        np.testing.assert_array_equal(kept.numpy(), x)
        y = model.run({"x": kept}, keep=True)["y"]
        assert isinstance(y, tether.RemoteTensor) and y.shape == (2, 3)
        np.testing.assert_array_equal(y.numpy(), x * 2 + 1)

        ones = sess.fill((2, 3), "float32", "ones")
        np.testing.assert_array_equal(model.run({"x": ones})["y"], np.full((2, 3), 3, "float32"))
        generated = model.run(fill="zeros")["y"]
        np.testing.assert_array_equal(generated, np.ones((2, 3), "float32"))

        result = model.benchmark(number=3, repeat=4)
        assert len(result.samples) == 4 and result.number == 3
        assert result.min <= result.median <= result.max and result.std >= 0
        grown = model.benchmark(number=1, repeat=2, min_repeat_ms=5)
        assert grown.number > 1  # TVM's rule: number grows until a repeat lasts min_repeat_ms

        info = sess.info()
        assert info["device"]["cores"] >= 1 and "reference" in info["device"]["backends"]
        workspace = Path(info["workspace"])
        assert workspace.is_dir()
    wait_until(lambda: not workspace.exists() and server.busy_slots() == 0, what="workspace removed, slot free")


def test_remote_errors_are_typed_and_the_session_goes_on(device_server: Any, tmp_path: Path) -> None:
    server = device_server(key="dev")
    with tether.connect("127.0.0.1", server.port, key="dev") as sess:
        sess.upload(b"{not json", "broken.json")
        with pytest.raises(tether.ModelLoadError, match=r"broken\.json|JSON|json"):
            sess.load_model("broken.json")
        sess.upload(reference_model(tmp_path / "raise.json", {"op": "raise", "message": "boom at run"}))
        model = sess.load_model("raise.json")
        with pytest.raises(tether.ModelRunError, match="boom at run") as info:
            model.run(fill="random")
        assert "Traceback" in info.value.remote_traceback
        with pytest.raises(tether.WorkspaceError, match="no such file"):
            sess.download("missing.bin")
        with pytest.raises(tether.RemoteError, match="unknown operation"):
            sess._call("no-such-op", {})
        sess.upload(reference_model(tmp_path / "ok.json"))
        with pytest.raises(tether.ModelRunError, match="missing"):
            sess.load_model("ok.json").run({})
        sess.ping()  # still alive after every failure


@pytest.mark.parametrize("name", ["../escape.txt", "/tmp/escape.txt", "a/../../escape.txt", "link/escape.txt"])
def test_upload_paths_that_escape_the_workspace_are_refused(device_server: Any, tmp_path: Path, name: str) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    server = device_server(key="dev")
    with tether.connect("127.0.0.1", server.port, key="dev") as sess:
        workspace = Path(sess.info()["workspace"])
        (workspace / "link").symlink_to(outside)
        with pytest.raises(tether.WorkspaceError):
            sess.upload(b"x", name)
        with pytest.raises(tether.WorkspaceError):
            sess.download(name)
        with pytest.raises(tether.WorkspaceError):
            sess.remove(name.replace("escape.txt", "") or "..")
        assert list(outside.iterdir()) == []
        assert not (tmp_path / "escape.txt").exists()
        sess.ping()


@pytest.mark.parametrize(
    ("op", "header", "kind"),
    [
        ("fill", {"shape": [2, True], "dtype": "float32"}, "ValueError"),  # was the runtime's BackendError
        ("fill", {"shape": [2, 3], "dtype": "fk:12"}, "ValueError"),
        ("fill", {"shape": [10**300], "dtype": "float32"}, "ValueError"),
        ("listdir", {"path": 10**300}, "WorkspaceError"),  # was OSError: File name too long
        ("upload", {"path": "a/" * 2100}, "WorkspaceError"),
        ("put", {"tensors": [{"name": "x", "dtype": {}, "shape": [2]}]}, "ProtocolError"),  # was TypeError
    ],
)
def test_malformed_requests_get_typed_errors_and_no_device_traceback(
    device_server: Any, op: str, header: dict[str, Any], kind: str
) -> None:
    """Found by bench/fuzz.py: each was answered with a traceback of the device's own code."""
    server = device_server(key="dev")
    with tether.connect("127.0.0.1", server.port, key="dev") as sess:
        with pytest.raises(tether.RemoteError) as info:
            sess._call(op, header)
        assert (info.value.remote_type, info.value.remote_traceback) == (kind, "")
        sess.ping()


def test_workspace_names_the_file_system_cannot_take(tmp_path: Path) -> None:
    from tether.device.workspace import Workspace

    workspace = Workspace(tmp_path)
    for name in ("\udbff", "x" * 256, "a/" * 2100):
        with pytest.raises(tether.WorkspaceError):
            workspace.resolve(name)
    assert workspace.resolve("x" * 255) == tmp_path.resolve() / ("x" * 255)


def test_session_timeout_is_typed_then_the_slot_is_free(device_server: Any, tmp_path: Path) -> None:
    server = device_server(key="dev")
    with tether.connect("127.0.0.1", server.port, key="dev", session_timeout=1) as sess:
        sess.upload(reference_model(tmp_path / "slow.json", {"op": "sleep", "seconds": 30}))
        model = sess.load_model("slow.json")
        with pytest.raises(tether.SessionTimeout, match="session timeout"):
            model.run(fill="random")
        assert sess.closed
    wait_until(lambda: server.busy_slots() == 0, timeout=3, what="slot free after the timeout")
    with tether.connect("127.0.0.1", server.port, key="dev") as again:
        again.ping()


def test_worker_killed_mid_run_clear_error_and_free_within_a_second(
    device_server: Any, tracker: TrackerThread, tmp_path: Path
) -> None:
    server = device_server(key="dev", tracker=(tracker.host, tracker.port))
    with tether.connect_tracker(tracker.host, tracker.port) as pool:
        sess = pool.request("dev", timeout=10)
        pid = sess.info()["pid"]
        sess.upload(reference_model(tmp_path / "slow.json", {"op": "sleep", "seconds": 60}))
        model = sess.load_model("slow.json")
        running = threading.Event()
        errors: list[BaseException] = []

        def run() -> None:
            running.set()
            try:
                model.run(fill="random")
            except BaseException as exc:
                errors.append(exc)

        thread = threading.Thread(target=run)
        thread.start()
        assert running.wait(5)
        wait_until(lambda: tracker.call(lambda: tracker.core.summary()["queue_info"]["dev"]["free"]) == 0)
        os.kill(pid, signal.SIGKILL)
        thread.join(10)
        assert len(errors) == 1 and isinstance(errors[0], tether.SessionLost)
        assert "SIGKILL" in str(errors[0])
        wait_until(lambda: server.busy_slots() == 0, timeout=1.0, what="slot free within 1 s")
        wait_until(
            lambda: tracker.call(lambda: tracker.core.summary()["queue_info"]["dev"]["free"]) == 1,
            timeout=1.0,
            what="back in the tracker's pool within 1 s",
        )
        with pool.request("dev", timeout=10) as again:
            again.ping()


def test_bad_handshakes_and_garbage_frames_end_only_their_connection(device_server: Any) -> None:
    server = device_server(key="dev")

    def raw() -> socket.socket:
        return socket.create_connection(("127.0.0.1", server.port), timeout=5)

    def closed(sock: socket.socket) -> bool:
        try:
            return sock.recv(16) == b""
        except ConnectionResetError:
            return True

    with raw() as sock:  # wrong magic: closed without a reply, as TVM does
        sock.sendall(struct.pack("<ii", 0x1234, 4) + b"abcd")
        assert closed(sock)
    with raw() as sock:  # a key that is not this server's
        key = b"client:other -tether=1"
        sock.sendall(struct.pack("<ii", RPC_MAGIC, len(key)) + key)
        assert struct.unpack("<i", sock.recv(4))[0] == HandshakeCode.MISMATCH
    with raw() as sock:  # a giant key length
        sock.sendall(struct.pack("<ii", RPC_MAGIC, 1 << 30))
        assert closed(sock)
    with pytest.raises(tether.SessionRefused, match="MISMATCH"):
        tether.connect("127.0.0.1", server.port, key="wrong")
    with raw() as sock:  # a good handshake, then garbage instead of a frame
        key = b"client:dev -tether=1"
        sock.sendall(struct.pack("<ii", RPC_MAGIC, len(key)) + key)
        assert struct.unpack("<i", sock.recv(4))[0] == HandshakeCode.SUCCESS
        sock.sendall(b"GET / HTTP/1.1\r\n\r\n" + b"\0" * 64)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
        assert b"not a tether session frame" in data
    wait_until(lambda: server.busy_slots() == 0, what="slot free after the garbage session")
    with raw() as sock:  # a frame header announcing more payload than the server accepts
        key = b"client:dev -tether=1"
        sock.sendall(struct.pack("<ii", RPC_MAGIC, len(key)) + key)
        assert struct.unpack("<i", sock.recv(4))[0] == HandshakeCode.SUCCESS
        sock.recv(4 + len(b"server:dev -tether=1"))
        sock.sendall(struct.pack("<2sBBIIQ", b"TQ", 1, 1, 1, 2, 1 << 62) + b"{}")
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
        assert b"outside" in data  # FrameTooLarge, before a byte of the payload is read
    wait_until(lambda: server.busy_slots() == 0, what="slot free after the garbage sessions")
    with tether.connect("127.0.0.1", server.port, key="dev") as sess:
        sess.ping()


def test_registration_reports_facts_labels_and_protocols(device_server: Any, tracker: TrackerThread) -> None:
    device_server(key="gpu", tracker=(tracker.host, tracker.port), labels={"soc": "sd8", "os": "android"}, slots=2)
    device_server(key="gpu", tracker=(tracker.host, tracker.port), labels={"soc": "sd7"})
    detail = tracker.call(lambda: tracker.core.summary(detail=True))
    assert detail["queue_info"]["gpu"]["free"] == 3
    servers = detail["tether"]["servers"]
    labelled = next(s for s in servers if s["labels"].get("soc") == "sd8")
    assert "tether" in labelled["protocols"] and len(labelled["slots"]) == 2
    assert labelled["device"]["cores"] >= 1 and labelled["device"]["arch"]
    with tether.connect_tracker(tracker.host, tracker.port) as pool:
        with pool.request("gpu", labels={"soc": "sd7"}, timeout=10) as sess:
            assert sess.info()["labels"] == {"soc": "sd7"}
        status = pool.status()
        assert any(row.key == "gpu" for row in status.keys)


def test_an_unredeemed_grant_gets_a_fresh_matchkey(device_server: Any, tracker: TrackerThread) -> None:
    server = device_server(key="dev", tracker=(tracker.host, tracker.port), grant_timeout_s=0.3, poll_s=0.1)
    with tether.TrackerClient.connect(tracker.host, tracker.port) as client:
        grant = client.request_grant("dev", protocol="tether", timeout=10)  # and never connect
    wait_until(
        lambda: tracker.call(lambda: tracker.core.summary()["queue_info"]["dev"]["free"]) == 1,
        timeout=5,
        what="the slot offered again",
    )
    with pytest.raises(tether.SessionRefused):  # the stale matchkey is not accepted any more
        tether.Session.connect(grant.host, grant.port, grant.matchkey)
    with tether.connect_tracker(tracker.host, tracker.port) as pool, pool.request("dev", timeout=10) as sess:
        sess.ping()
    assert server.sessions_served >= 0


def test_server_survives_a_tracker_restart(device_server: Any) -> None:
    first = TrackerThread(TrackerConfig(host="127.0.0.1", port=0))
    port = first.port
    server = device_server(key="dev", tracker=("127.0.0.1", port), reconnect_max_s=0.3)
    first.stop()
    wait_until(lambda: not server.registered.is_set(), what="the server noticing the tracker is gone")
    with TrackerThread(TrackerConfig(host="127.0.0.1", port=port)) as second:
        assert server.registered.wait(10), "not back in the pool"
        wait_until(lambda: second.call(lambda: second.core.summary()["queue_info"].get("dev", {}).get("free")) == 1)
        with tether.connect_tracker("127.0.0.1", port) as pool, pool.request("dev", timeout=10) as sess:
            sess.ping()


def test_request_and_run(device_server: Any, tracker: TrackerThread, tmp_path: Path) -> None:
    device_server(key="dev", tracker=(tracker.host, tracker.port))
    with tether.connect_tracker(tracker.host, tracker.port) as pool:
        x = np.ones((2, 3), "float32")
        out = pool.request_and_run("dev", reference_model(tmp_path / "m.json"), {"x": x}, timeout=10)
    np.testing.assert_array_equal(out["y"], x * 2 + 1)


def test_two_slots_serve_two_sessions_at_once(device_server: Any, tracker: TrackerThread) -> None:
    server: DeviceServer = device_server(key="dev", tracker=(tracker.host, tracker.port), slots=2)
    with (
        tether.connect_tracker(tracker.host, tracker.port) as pool,
        pool.request("dev", timeout=10) as a,
        pool.request("dev", timeout=10) as b,
    ):
        assert a.info()["pid"] != b.info()["pid"]
        assert server.busy_slots() == 2


def test_a_huge_session_timeout_is_capped_not_a_stuck_slot(device_server: Any) -> None:
    server = device_server(key="dev")
    with tether.connect("127.0.0.1", server.port, key="dev", session_timeout=1e10) as sess:
        sess.ping()
    wait_until(lambda: server.busy_slots() == 0, what="slot free")
    with tether.connect("127.0.0.1", server.port, key="dev") as again:
        again.ping()


def test_a_dead_zygote_does_not_keep_a_slot(device_server: Any, tmp_path: Path) -> None:
    server = device_server(key="dev")
    with tether.connect("127.0.0.1", server.port, key="dev") as sess:
        sess.ping()
        zygote = server.pool._zygote
        assert zygote is not None
        os.kill(zygote.pid, signal.SIGKILL)
        sess.ping()  # the running session does not need its zygote
    wait_until(lambda: server.busy_slots() == 0, timeout=5, what="slot free without the zygote's exit report")
    with tether.connect("127.0.0.1", server.port, key="dev") as again:  # a new zygote forks the next worker
        again.ping()


def test_a_granted_slot_is_not_offered_twice(device_server: Any, tracker: TrackerThread) -> None:
    device_server(key="dev", tracker=(tracker.host, tracker.port), slots=2, grant_timeout_s=60)
    with tether.TrackerClient.connect(tracker.host, tracker.port) as client:
        first = client.request_grant("dev", protocol="tether", timeout=10)
        second = client.request_grant("dev", protocol="tether", timeout=10)  # granted, never redeemed
        with tether.Session.connect(first.host, first.port, first.matchkey) as sess:
            sess.ping()
        third = client.request_grant("dev", protocol="tether", timeout=10)  # the first slot, offered again
        assert third.matchkey not in (first.matchkey, second.matchkey)
        with pytest.raises(tether.RequestTimeout):
            client.request_grant("dev", protocol="tether", timeout=0.5)


def test_a_response_too_large_for_a_header_is_an_error_not_a_crash(device_server: Any) -> None:
    server = device_server(key="dev")
    with tether.connect("127.0.0.1", server.port, key="dev") as sess:
        workspace = Path(sess.info()["workspace"])
        for i in range(5000):
            (workspace / f"{i:05d}-{'x' * 230}").touch()
        with pytest.raises(tether.RemoteError, match="header"):
            sess.listdir()
        sess.ping()


def test_a_handshake_has_a_deadline(device_server: Any) -> None:
    server = device_server(key="dev", handshake_timeout_s=0.5)
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(struct.pack("<i", RPC_MAGIC))  # and nothing more
        assert sock.recv(16) == b""  # closed after the deadline (the 10 s socket timeout would fail the test)


# -- direct mode: empty keys and clients that find every slot busy (TVM's server parity) ------------


def _handshake(port: int, key: str) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    data = key.encode()
    sock.sendall(struct.pack("<ii", RPC_MAGIC, len(data)) + data)
    return sock


def _reply(sock: socket.socket) -> tuple[int, str | None]:
    """The handshake reply: the code, and the server's key after SUCCESS."""
    head = b""
    while len(head) < 4:
        chunk = sock.recv(4 - len(head))
        if not chunk:
            raise ConnectionError("closed before the reply")
        head += chunk
    (code,) = struct.unpack("<i", head)
    if code != HandshakeCode.SUCCESS:
        return code, None
    (n,) = struct.unpack("<i", sock.recv(4))
    return code, sock.recv(n).decode()


def test_a_server_without_key_accepts_an_empty_key_as_tvms_does(device_server: Any) -> None:
    """``tvm.rpc.Server()`` has the key "": ``tvm.rpc.connect(host, port)`` sends ``client:`` and gets
    ``server:`` back; with a session timeout it sends ``client: -timeout=N``."""
    server = device_server(key="")
    with _handshake(server.port, "client: -tether=1") as sock:
        assert _reply(sock) == (HandshakeCode.SUCCESS, "server: -tether=1")
    wait_until(lambda: server.busy_slots() == 0, what="slot free")
    with tether.connect("127.0.0.1", server.port, key="", session_timeout=30) as sess:
        sess.ping()
    keyed = device_server(key="dev")  # a server with a key refuses the empty one, as TVM's does
    with _handshake(keyed.port, "client: -tether=1") as sock:
        assert _reply(sock) == (HandshakeCode.MISMATCH, None)


def test_an_empty_name_with_a_timeout_gets_its_time_limit(device_server: Any) -> None:
    """``client: -timeout=1`` is an empty name and a 1 s limit, not a name "-timeout=1" and no limit."""
    server = device_server(key="")
    with tether.connect("127.0.0.1", server.port, key="", session_timeout=1) as sess:
        sess.ping()
        with pytest.raises(tether.SessionTimeout):
            wait_until(lambda: sess.ping() is None and False, timeout=20, interval=0.05, what="the 1 s limit")


def test_a_client_that_finds_every_slot_busy_waits_for_one(device_server: Any) -> None:
    """TVM's server leaves such a client in its listen backlog and serves it when the session ends;
    tether's queues it (first come, first served) instead of answering MISMATCH."""
    server = device_server(key="dev")
    served: list[str] = []
    done = threading.Event()

    def second() -> None:
        with tether.connect("127.0.0.1", server.port, key="dev", timeout=30) as sess:
            sess.ping()
            served.append("second")
        done.set()

    with tether.connect("127.0.0.1", server.port, key="dev") as first:
        thread = threading.Thread(target=second, daemon=True)
        thread.start()
        wait_until(lambda: server.waiting_clients() == 1, what="the second client in line")
        first.ping()
        assert not served  # still waiting while the first session runs
    assert done.wait(20), "the waiting client was not served after the first session ended"
    assert served == ["second"]
    for _ in range(5):  # back to back: each reconnect finds the slot still being freed, and waits for it
        with tether.connect("127.0.0.1", server.port, key="dev") as sess:
            sess.ping()


def test_the_line_is_bounded_in_length_and_wait(device_server: Any, caplog: pytest.LogCaptureFixture) -> None:
    server = device_server(key="dev", max_queued=1, queue_wait_s=1.0)
    with tether.connect("127.0.0.1", server.port, key="dev") as holder:
        waiting = _handshake(server.port, "client:dev -tether=1")
        wait_until(lambda: server.waiting_clients() == 1, what="one client in line")
        with _handshake(server.port, "client:dev -tether=1") as extra:  # the line is full
            assert _reply(extra) == (HandshakeCode.MISMATCH, None)
        with waiting:  # past --queue-wait
            assert _reply(waiting) == (HandshakeCode.MISMATCH, None)
        assert any("no slot came free within 1 s" in r.getMessage() for r in caplog.records)
        hung_up = _handshake(server.port, "client:dev -tether=1")
        wait_until(lambda: server.waiting_clients() == 1, what="another client in line")
        hung_up.close()  # it leaves the line by itself
        wait_until(lambda: server.waiting_clients() == 0, what="the client that hung up left the line")
        holder.ping()
    with tether.connect("127.0.0.1", server.port, key="dev") as sess:
        sess.ping()


def _frame(frame_id: int, header: bytes, payload: bytes = b"") -> bytes:
    return struct.pack("<2sBBIIQ", b"TQ", 1, 1, frame_id, len(header), len(payload)) + header + payload


def _read_frame(sock: socket.socket) -> tuple[int, int, dict[str, Any]]:
    """(kind, id, JSON header) of the next frame; its payload is read and dropped."""

    def exact(n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = sock.recv(n - len(data))
            assert chunk, "the server closed the session"
            data += chunk
        return data

    _, _, kind, frame_id, header_len, payload_len = struct.unpack("<2sBBIIQ", exact(20))
    header = json.loads(exact(header_len))
    exact(payload_len)
    return kind, frame_id, header


def test_unusable_request_headers_are_answered_and_the_session_goes_on(device_server: Any) -> None:
    """A huge integer (past Python's 4,300-digit limit), nesting deeper than the recursion limit, a header
    that is not an object, an infinite time limit: each gets an error for its own id; the worker lives."""
    server = device_server(key="dev")
    with _handshake(server.port, "client:dev -tether=1") as sock:
        assert _reply(sock)[0] == HandshakeCode.SUCCESS
        bad = [
            (b'{"op":"ping","n":' + b"9" * 5000 + b"}", b""),
            (b'{"op":"ping","x":' + b"[" * 50000 + b"]" * 50000 + b"}", b""),
            (b"[1,2,3]", b"payload to skip"),
            (b'{"op":"run","model":"m","timeout":1e400}', b""),
            (b'{"op":"put","tensors":[{"name":"x","dtype":"float32","shape":[' + b"9" * 4000 + b"]}]}", b"xx"),
        ]
        for frame_id, (header, payload) in enumerate(bad, 1):
            sock.sendall(_frame(frame_id, header, payload))
            kind, got_id, detail = _read_frame(sock)
            assert (kind, got_id) == (3, frame_id), detail  # ERROR for this request alone
            assert detail["type"] in ("ProtocolError", "ValueError"), detail
        sock.sendall(_frame(99, b'{"op":"ping"}'))
        assert _read_frame(sock)[:2] == (2, 99)  # RESPONSE: the same worker still serves
    wait_until(lambda: server.busy_slots() == 0, what="slot free")


def test_an_unredeemed_grant_does_not_stay_granted(device_server: Any, tracker: TrackerThread) -> None:
    """A grant nobody redeems: the server offers the slot again under a new matchkey and withdraws the
    old one, so the tracker shows 2 free slots, not "2 free, 1 granted" until the server disconnects."""
    device_server(key="dev", tracker=(tracker.host, tracker.port), slots=2, grant_timeout_s=0.3, poll_s=0.05)

    def slot_states() -> list[str]:
        detail = tracker.call(lambda: tracker.core.summary(detail=True))["tether"]
        return sorted(s["state"] for server in detail["servers"] for s in server["slots"])

    wait_until(lambda: slot_states() == ["free", "free"], what="two free slots")
    with tether.TrackerClient.connect(tracker.host, tracker.port) as client:
        client.request_grant("dev", protocol="tether", timeout=5)  # never connects
    assert slot_states() == ["free", "granted"]
    wait_until(lambda: slot_states() == ["free", "free"], timeout=10, what="the phantom grant gone")


def test_a_server_killed_with_sigkill_is_cleaned_up_after(cli: Any, tmp_path: Path) -> None:
    """SIGKILL leaves the server's run directory behind, and its zygote alone: the zygote exits quietly
    (no BrokenPipe traceback), the session that was running goes on to its end, and the next server on the
    same work dir removes the dead one's directory once nothing of it runs; the upload cache stays."""
    work = tmp_path / "work"
    first = cli(
        "server", "--host", "127.0.0.1", "--port", "0", "--key", "dev", "--work-dir", str(work), "--preload", "none"
    )
    _, port = first.listening()
    (dead,) = work.glob("run-*")
    sess = tether.connect("127.0.0.1", port, key="dev")
    sess.upload(b"kept in the cache", "f.bin", sha256=hashlib.sha256(b"kept in the cache").hexdigest())
    first.proc.send_signal(signal.SIGKILL)
    first.proc.wait(10)
    sess.ping()  # the running session outlives its server

    second = cli(
        "server", "--host", "127.0.0.1", "--port", "0", "--key", "dev", "--work-dir", str(work), "--preload", "none"
    )
    _, port2 = second.listening()
    assert dead.exists(), "removed while a session of the dead server still ran"
    sess.close()
    first.wait_eof(30)  # every process of the first server is gone (the zygote, the worker)
    assert not any("Traceback" in line or "BrokenPipe" in line for line in first.seen), first.seen
    with tether.connect("127.0.0.1", port2, key="dev") as again:  # its end triggers another check
        again.ping()
    wait_until(lambda: not dead.exists(), timeout=10, what="the dead server's directory removed")
    assert len(list(work.glob("run-*"))) == 1
    assert len(list((work / "cache").iterdir())) == 1  # the upload cache is shared and kept


def test_a_default_work_dir_of_a_killed_server_is_removed_by_the_next(cli: Any, tmp_path: Path) -> None:
    env = {"TMPDIR": str(tmp_path)}
    first = cli("server", "--host", "127.0.0.1", "--port", "0", "--key", "dev", "--preload", "none", env=env)
    first.listening()
    (dead,) = tmp_path.glob("tether-server-*")
    first.proc.send_signal(signal.SIGKILL)
    first.proc.wait(10)
    first.wait_eof(30)
    second = cli("server", "--host", "127.0.0.1", "--port", "0", "--key", "dev", "--preload", "none", env=env)
    second.listening()
    assert not dead.exists()
    assert len(list(tmp_path.glob("tether-server-*"))) == 1
    assert not any("Traceback" in line for line in first.seen), first.seen


def test_tensors_made_on_the_device_are_bounded_like_the_ones_sent(device_server: Any) -> None:
    """A fill of a huge shape is refused with the limit, not allocated until the worker is killed."""
    server = device_server(key="dev", max_payload=1 << 20)
    with tether.connect("127.0.0.1", server.port, key="dev") as sess:
        with pytest.raises(tether.RemoteError, match="at most 1048576"):
            sess.fill((1 << 40,), "float32", "random")
        small = sess.fill((16,), "float32", "zeros")
        assert small.numpy().sum() == 0
        sess.ping()


def test_a_client_that_stops_reading_cannot_keep_its_slot(device_server: Any) -> None:
    """A client that waited in line, then floods requests and never reads an answer: its session times out,
    its worker is killed, and the slot is free again (the server's last word must not block on it)."""
    server = device_server(key="dev")
    with tether.connect("127.0.0.1", server.port, key="dev") as first:
        greedy = socket.socket()
        greedy.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)  # a small window: the server's sends stall
        greedy.connect(("127.0.0.1", server.port))
        key = b"client:dev -tether=1 -timeout=2"
        greedy.sendall(struct.pack("<ii", RPC_MAGIC, len(key)) + key)
        wait_until(lambda: server.waiting_clients() == 1, what="in line")
        first.ping()
    assert _reply(greedy)[0] == HandshakeCode.SUCCESS
    greedy.setblocking(False)
    pings = _frame(1, b'{"op":"ping"}') * 64
    with contextlib.suppress(ConnectionError):
        for _ in range(100_000):  # until the server stops reading (its answers fill every buffer on the way)
            if not select.select([], [greedy], [], 0.5)[1]:
                break
            with contextlib.suppress(BlockingIOError):
                greedy.send(pings)
    wait_until(lambda: server.busy_slots() == 0, timeout=20, what="the slot free after the session timeout")
    with tether.connect("127.0.0.1", server.port, key="dev") as again:
        again.ping()
    greedy.close()


def test_a_run_directory_without_a_lock_is_never_removed(device_server: Any, tmp_path: Path) -> None:
    """An older server's directory (no lock file) may belong to a server that still runs: left alone."""
    work = tmp_path / "shared"
    old = work / "run-older"
    (old / "session-x").mkdir(parents=True)
    os.utime(old, (0, 0))  # long untouched, too
    device_server(key="dev", work_dir=str(work))
    assert old.is_dir()


# -- the hot path: binary CALL frames, and peers that do not speak them -----------------------------


def test_ping_over_the_hot_path_and_as_json_alike(device_server: Any) -> None:
    from tether.protocol.session import FrameKind, encode_call

    server = device_server(key="dev")
    with tether.connect("127.0.0.1", server.port, key="dev") as sess:
        assert sess.binary, sess.server_key  # the server answered -bin=1
        sess.ping()
        assert sess._call("ping", {}) == ({}, [])  # the JSON twin, in the same session
        channel = sess._channel
        assert channel is not None
        # an op this server does not know: a typed error, and the session goes on
        channel.send_bytes(encode_call(200, 5))
        head, reply = channel.recv_head()
        assert (head.kind, head.id, reply["type"]) == (FrameKind.ERROR, 5, "UnknownOp")
        # a ping with fields and payload it does not take: a ProtocolError for it alone (payload skipped)
        channel.send_bytes(encode_call(1, 6, b"xx", payload_len=3) + b"abc")
        head, reply = channel.recv_head()
        assert (head.kind, head.id, reply["type"]) == (FrameKind.ERROR, 6, "ProtocolError")
        sess.ping()
        with pytest.raises(tether.RemoteError, match="unknown operation"):
            sess._call("no-such-op", {})
        sess.ping()


def test_a_hot_call_over_the_payload_limit_is_refused_from_its_header(device_server: Any) -> None:
    from tether.protocol.session import encode_call

    server = device_server(key="dev", max_upload_bytes=1 << 20)
    with tether.connect("127.0.0.1", server.port, key="dev") as sess:
        channel = sess._channel
        assert channel is not None
        channel.send_bytes(encode_call(1, 9, payload_len=1 << 30))  # announces 1 GiB, sends none of it
        head, reply = channel.recv_head()
        assert (head.id, reply["type"]) == (9, "QuotaExceeded")
        channel.sock.shutdown(socket.SHUT_WR)  # the worker is skipping a payload that never comes


def test_a_session_lost_during_a_hot_ping_is_typed(device_server: Any) -> None:
    server = device_server(key="dev")
    sess = tether.connect("127.0.0.1", server.port, key="dev")
    sess.interrupt()
    with pytest.raises(tether.SessionLost):
        sess.ping()
    assert sess.closed
    with pytest.raises(tether.ConnectionClosed):
        sess.ping()


def test_old_peers_get_json_requests(device_server: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A client that does not offer -bin=1 (an older one) gets no -bin=1 back and speaks JSON; a server
    that does not answer it (an older one) gets JSON requests from this client."""
    from tether.aio.channel import Channel
    from tether.device import server as server_mod
    from tether.protocol.session import FrameKind, encode_frame_head

    server = device_server(key="dev")
    sock = _handshake(server.port, "client:dev -tether=1")
    code, key = _reply(sock)
    assert code == HandshakeCode.SUCCESS and key is not None
    assert "-bin" not in key and "-tether=1" in key
    sock.sendall(encode_frame_head(FrameKind.REQUEST, 1, {"op": "ping"}))
    head, reply = Channel(sock).recv_head()
    assert (head.kind, head.id, reply) == (FrameKind.RESPONSE, 1, {})
    sock.close()

    monkeypatch.setattr(server_mod, "_binary_option", lambda client: {})
    with tether.connect("127.0.0.1", server.port, key="dev") as sess:
        assert not sess.binary
        sess.ping()
        assert sess.info()["pid"] > 0


def test_run_over_the_hot_path_matches_json_and_keeps_its_typed_errors(device_server: Any, tmp_path: Path) -> None:
    from tether.protocol.session import FrameKind, HotOp, encode_call

    server = device_server(key="dev")
    with tether.connect("127.0.0.1", server.port, key="dev") as sess:
        assert sess.binary
        sess.upload(reference_model(tmp_path / "m.json"))
        model = sess.load_model("m.json")
        x = np.arange(6, dtype=np.float32).reshape(2, 3)
        hot = model.run({model.input_names[0]: x})
        sess.binary = False  # the same session, every request as JSON
        cold = model.run({model.input_names[0]: x})
        sess.binary = True
        assert list(hot) == list(cold)
        for name in hot:
            np.testing.assert_array_equal(hot[name], cold[name])
            assert hot[name].dtype == cold[name].dtype
        kept = model.run({model.input_names[0]: sess.tensor(x)}, keep=True)
        for name, tensor in kept.items():
            np.testing.assert_array_equal(tensor.numpy(), hot[name])
        filled = model.run(fill="zeros")
        assert list(filled) == list(hot)
        # the typed errors of the JSON path, and the session goes on
        errors = []
        for binary in (True, False):
            sess.binary = binary
            gone = tether.RemoteModel(sess, "m404", model.backend, model.inputs, model.outputs, 0.0)
            with pytest.raises(tether.ModelRunError, match="no model") as info:
                gone.run(fill="random")
            errors.append((type(info.value), info.value.remote_type))
            with pytest.raises(tether.ModelRunError, match="missing"):
                model.run({})
        assert errors[0] == errors[1]
        sess.binary = True
        # a RUN whose fields are garbage: a ProtocolError for it alone, its payload skipped
        channel = sess._channel
        assert channel is not None
        channel.send_bytes(encode_call(HotOp.RUN, 11, b"\x00\x01", payload_len=4) + b"abcd")
        head, reply = channel.recv_head()
        assert (head.kind, head.id, reply["type"]) == (FrameKind.ERROR, 11, "ProtocolError")
        assert model.run({model.input_names[0]: x}).keys() == hot.keys()
