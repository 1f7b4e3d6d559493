"""The batch measurement API for tuners (``tether.client.batch``): leases, content-addressed uploads,
typed outcomes for every candidate, retries of transport failures only. Real tracker, real servers,
real worker processes, over loopback."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tether.client.batch import Candidate, Measurement, MeasureSettings, measure_candidates
from tether.client.session import file_digest
from tether.runtime.reference import write_reference_model
from tether.tracker import TrackerThread

from .conftest import CliProcess, wait_until

pytestmark = pytest.mark.timeout(120)

SPEC = {"name": "x", "dtype": "float32", "shape": [2, 2]}


def _ref(path: Path, *ops: dict[str, Any]) -> Path:
    """A reference-backend model: y = 2x + 1, after ``ops`` (sleep, raise)."""
    affine = {"op": "affine", "input": "x", "output": "y", "scale": 2.0, "bias": 1.0}
    write_reference_model(path, [SPEC], [{**SPEC, "name": "y"}], [*ops, affine])
    return path


def _onnx_add(path: Path) -> Path:
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 2])
    graph = helper.make_graph([helper.make_node("Add", ["x", "x"], ["y"])], "add", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 9
    onnx.save(model, path)
    return path


def test_error_taxonomy_every_candidate_ends_typed(tracker: TrackerThread, device_server: Any, tmp_path: Path) -> None:
    for soc in ("a", "b"):
        device_server(key="tune", tracker=(tracker.host, tracker.port), labels={"soc": soc})
    x = np.arange(4, dtype="float32").reshape(2, 2)
    good = _ref(tmp_path / "good.json")
    candidates = [
        Candidate(good, "good", inputs={"x": x}, expected={"y": 2 * x + 1}),
        Candidate(tmp_path / "broken.json", "broken"),  # written below: not a model
        Candidate(_ref(tmp_path / "raises.json", {"op": "raise", "message": "boom"}), "raises"),
        Candidate(_ref(tmp_path / "slow.json", {"op": "sleep", "seconds": 30}), "slow"),
        Candidate(good, "wrong", inputs={"x": x}, expected={"y": 2 * x}),
        Candidate(good.read_bytes(), "same-bytes", suffix=".json"),
        Candidate(_onnx_add(tmp_path / "add.onnx"), "onnx", expected=None),
        Candidate(_ref(tmp_path / "crashes.json", {"op": "exit", "code": 3}), "crashes"),
    ]
    (tmp_path / "broken.json").write_text('{"format": "tether-reference/1", "inputs": [')
    seen: list[Measurement] = []
    results = measure_candidates(
        (tracker.host, tracker.port),
        "tune",
        candidates,
        MeasureSettings(number=2, repeat=3, timeout=3, queue_timeout=20, retries=1),
        devices=2,
        on_result=seen.append,
    )
    by_name = {r.name: r for r in results}
    assert [r.name for r in results] == [c.name for c in candidates]
    assert sorted(r.index for r in seen) == list(range(len(candidates)))  # each ended exactly once
    for name in ("good", "same-bytes", "onnx"):
        r = by_name[name]
        assert r.ok, r.error
        assert len(r.samples) == 3 and all(s > 0 for s in r.samples) and r.number == 2 and r.load_s is not None
    assert by_name["broken"].error is not None and by_name["broken"].error.kind == "load"
    assert by_name["broken"].error.type == "ModelLoadError"
    assert by_name["raises"].error is not None and by_name["raises"].error.kind == "run"
    assert "boom" in by_name["raises"].error.message
    slow = by_name["slow"].error
    assert slow is not None and slow.kind == "timeout" and slow.type == "RunTimeout", slow
    assert "outlived its 3 s time limit" in slow.message  # said by the device, not guessed by the client
    wrong = by_name["wrong"].error
    assert wrong is not None and wrong.kind == "wrong_answer" and "max |diff|" in wrong.message
    # a worker that dies under its candidate is a lost session: retried once (retries=1), then "lost"
    crashed = by_name["crashes"]
    assert crashed.error is not None and crashed.error.kind == "lost" and crashed.attempts == 2, crashed
    assert "exit" in crashed.error.message or "code 3" in crashed.error.message, crashed.error
    # none of the others was retried: only transport failures are
    assert all(r.attempts == 1 for r in results if r.name != "crashes")
    # the same bytes are sent once per device at most: "good", "wrong" and "same-bytes" share a file
    sent = [r.sent_bytes for r in results if r.name in ("good", "wrong", "same-bytes")]
    assert sent.count(0) >= 1 and all(b in (0, good.stat().st_size) for b in sent)


def test_no_device_and_cache_across_sessions(tracker: TrackerThread, device_server: Any, tmp_path: Path) -> None:
    models = [_ref(tmp_path / f"m{i}.json", {"op": "sleep", "seconds": 0.001 * i}) for i in range(4)]
    cands = [Candidate(m) for m in models]
    # nobody serves the key: every candidate ends no_device once the queue timeout passes
    results = measure_candidates(
        (tracker.host, tracker.port), "nobody", cands, MeasureSettings(queue_timeout=0.5), devices=2
    )
    assert [r.error.kind if r.error else None for r in results] == ["no_device"] * 4
    assert all(r.error is not None and r.error.type == "RequestTimeout" for r in results)
    # a server: the first batch sends every file, the second (new sessions) finds them in its cache
    server = device_server(key="cached", tracker=(tracker.host, tracker.port))
    settings = MeasureSettings(number=1, repeat=1, queue_timeout=20)
    first = measure_candidates((tracker.host, tracker.port), "cached", cands, settings)
    assert all(r.ok for r in first) and all(r.sent_bytes > 0 for r in first)
    cache = Path(server.run_dir.cache_dir)
    assert sorted(p.name for p in cache.iterdir()) == sorted(file_digest(m) for m in models)
    second = measure_candidates((tracker.host, tracker.port), "cached", cands, settings)
    assert all(r.ok for r in second) and [r.sent_bytes for r in second] == [0, 0, 0, 0]


@pytest.mark.parametrize("fault", ["killed", "frozen"])
def test_a_server_dying_midway_loses_no_candidate(cli: Any, tracker: TrackerThread, tmp_path: Path, fault: str) -> None:
    """``killed``: the server and everything it started get SIGKILL (a device that loses power). ``frozen``:
    its session workers get SIGSTOP (a device that hangs: the server still heartbeats, the session never
    answers again); ``io_timeout`` turns that into a lost session."""
    psutil = pytest.importorskip("psutil")
    servers: dict[int, CliProcess] = {}
    for soc in ("a", "b"):
        proc: CliProcess = cli(
            "server", "--host", "127.0.0.1", "--port", "0", "--tracker", f"127.0.0.1:{tracker.port}",
            "--key", "flaky", "--label", f"soc={soc}", "--preload", "none",
        )  # fmt: skip
        _, port = proc.listening()
        servers[port] = proc
    wait_until(
        lambda: tracker.call(lambda: tracker.core.summary()["queue_info"].get("flaky", {}).get("free")) == 2,
        timeout=15,
        what="two free servers",
    )
    models = [_ref(tmp_path / f"c{i}.json", {"op": "sleep", "seconds": 0.02 + 0.001 * i}) for i in range(12)]
    killed: list[int] = []
    stopped: list[int] = []
    lock = threading.Lock()

    def kill_after_first(result: Measurement) -> None:
        """The first result's server dies with everything it started, before its thread takes the next."""
        with lock:
            if killed or not result.ok:
                return
            port = int(result.device.split(" ")[0].rpartition(":")[2])
            victim = servers[port].proc
            killed.append(port)
        family = [c.pid for c in psutil.Process(victim.pid).children(recursive=True)]
        if fault == "killed":
            family.append(victim.pid)
        stopped.extend(family)
        for pid in family:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL if fault == "killed" else signal.SIGSTOP)

    results = measure_candidates(
        (tracker.host, tracker.port),
        "flaky",
        [Candidate(m) for m in models],
        MeasureSettings(number=2, repeat=2, timeout=20, queue_timeout=10, retries=2, io_timeout=2),
        devices=2,
        on_result=kill_after_first,
    )
    for pid in stopped:  # what the frozen server started dies here; the server itself by the fixture
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    assert killed
    assert len(results) == 12
    for r in results:
        assert r.ok or (r.error is not None and r.error.kind in ("lost", "no_device")), r
    assert all(r.ok for r in results), [str(r.error) for r in results if not r.ok]
    # the candidate the dead server's thread took next was retried on the other server
    retried = [r for r in results if r.attempts > 1]
    assert retried and all(str(killed[0]) not in r.device for r in retried)
    survivors = {r.device for r in results[1:] if r.ok}
    assert any(str(killed[0]) not in d for d in survivors)


def test_request_time_limit_checked_uploads_and_cache_flush(device_server: Any, tmp_path: Path) -> None:
    """The session-level pieces under the batch: ``timeout=`` on a request, uploads checked against their
    sha256 and kept for the next session, a benchmark that flushes the CPU caches between repeats."""
    import tether
    from tether.errors import RunTimeout, WorkspaceError

    server = device_server(key="direct")
    slow = _ref(tmp_path / "slow.json", {"op": "sleep", "seconds": 30})
    with tether.connect("127.0.0.1", server.port, key="direct") as sess:
        model = sess.load_model(sess.upload(slow))
        with pytest.raises(RunTimeout, match=r"outlived its 0\.5 s"):
            model.run(fill="zeros", timeout=0.5)
        assert sess.closed  # the worker could not be interrupted: it ended, and the session with it
    wait_until(lambda: server.busy_slots() == 0, timeout=10, what="the slot freed")
    good = _ref(tmp_path / "good.json")
    with tether.connect("127.0.0.1", server.port, key="direct") as sess:
        with pytest.raises(WorkspaceError, match="hashes to"):
            sess.upload(good.read_bytes(), "x.json", sha256="0" * 64)
        assert "x.json" not in sess.listdir()  # a mismatch keeps nothing
        assert sess.upload_cached(good, "a.json") is True
        model = sess.load_model("a.json")
        result = model.benchmark(number=1, repeat=2, flush_cache=True, timeout=30)
        assert len(result.samples) == 2
    wait_until(lambda: server.busy_slots() == 0, timeout=10, what="the slot freed")
    with tether.connect("127.0.0.1", server.port, key="direct") as sess:  # a new session, a new workspace
        assert sess.upload_cached(good, "b/again.json") is False  # from the server's cache
        assert sess.download("b/again.json") == good.read_bytes()


def test_content_cache_keeps_the_most_recently_used(tmp_path: Path) -> None:
    import hashlib
    import time as clock

    from tether.device.cache import ContentCache

    cache = ContentCache(tmp_path / "cache", max_bytes=250)
    files = []
    for i in range(3):
        path = tmp_path / f"f{i}"
        path.write_bytes(bytes([i]) * 100)
        files.append((hashlib.sha256(path.read_bytes()).hexdigest(), path))
    for n, (digest, path) in enumerate(files[:2]):
        cache.store(digest, path)
        os.utime(cache.root / digest, (clock.time() - 100 + n, clock.time() - 100 + n))
    assert cache.materialize(files[0][0], tmp_path / "ws" / "used")  # f0 used: f1 is now the oldest
    cache.store(*files[2])  # 300 bytes > 250: the least recently used goes
    assert cache.has(files[0][0]) and cache.has(files[2][0]) and not cache.has(files[1][0])
    assert (tmp_path / "ws" / "used").read_bytes() == bytes([0]) * 100
    with pytest.raises(ValueError):
        cache.has("../../etc/passwd")


def test_an_artifact_over_the_servers_payload_limit_is_a_load_error(
    tracker: TrackerThread, device_server: Any, tmp_path: Path
) -> None:
    """A deterministic refusal, not a transport failure: not retried, and no worker is killed for it."""
    device_server(key="small", tracker=(tracker.host, tracker.port), max_payload=16 << 10)
    big = tmp_path / "big.json"
    _ref(big)
    big.write_text(big.read_text() + " " * (64 << 10))  # valid JSON, 64 KiB of trailing whitespace
    results = measure_candidates(
        (tracker.host, tracker.port),
        "small",
        [Candidate(big), Candidate(_ref(tmp_path / "ok.json"))],
        MeasureSettings(number=1, repeat=1, timeout=None, queue_timeout=20),
    )
    assert results[0].error is not None and results[0].error.kind == "load", results[0]
    assert results[0].error.type == "PayloadTooLarge" and results[0].attempts == 1
    assert results[1].ok and results[1].device == results[0].device  # the same lease went on
