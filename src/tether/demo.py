"""The main job, end to end on loopback: tether's tracker, tether's device server, a real model.

1. start tether's tracker on 127.0.0.1 (port chosen by the OS);
2. start ``tether server`` as a separate process that registers with it (its sessions run in worker
   processes of their own);
3. take a real ONNX model (default: the SqueezeNet architecture that the ``onnx`` package ships, given
   seeded random weights: see :mod:`tether.models`) and compile it with TVM for llvm;
4. request the server through the tracker with tether's client, upload both, run the ONNX model with the
   onnxruntime backend and the TVM library with the tvm backend, time both on the device;
5. check both outputs against a local onnxruntime run, read the tracker's state while the session is held;
6. the same ONNX model on a second server that nothing can reach: it connects out to tether's proxy, which
   offers it to the tracker (tracker mode); the client requests it like any other and is relayed;
7. shut everything down, by pid.

Needs the ``tvm`` and ``onnx`` extras (apache-tvm, onnx, onnxruntime, numpy); imported here only.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from .client.api import connect_tracker
from .client.query import TrackerStatus, query_tracker
from .client.tracker import TrackerClient
from .errors import TetherError
from .models import light_model
from .proxy import ProxyConfig, ProxyThread
from .tracker import TrackerConfig, TrackerThread

__all__ = ["DemoResult", "run_demo"]

logger = logging.getLogger(__name__)

DEMO_KEY = "demo-cpu"
DEMO_NAT_KEY = "demo-behind-nat"


@dataclass
class DemoResult:
    """What the demo measured. Times in seconds unless the name says otherwise."""

    model: str
    input_name: str
    input_shape: list[int]
    output_shape: list[int]
    max_abs_diff: float
    max_abs_diff_tvm: float
    max_abs_diff_proxy: float
    top5: list[tuple[int, float]]
    timings: dict[str, float] = field(default_factory=dict)
    status: TrackerStatus | None = None

    @property
    def ok(self) -> bool:
        return max(self.max_abs_diff, self.max_abs_diff_tvm, self.max_abs_diff_proxy) <= 1e-4


@contextlib.contextmanager
def _device_server(tracker_port: int, key: str, proxy_port: int | None = None) -> Iterator[subprocess.Popen[bytes]]:
    """``tether server`` registered with the tracker (or reaching out to the proxy on ``proxy_port``), in its
    own process group (stopped by pid)."""
    where = ["--port", str(proxy_port), "--through-proxy"] if proxy_port else ["--port", "0", "--tracker"]
    cmd = [
        sys.executable,
        "-m",
        "tether",
        "--log-level",
        "WARNING",
        "server",
        "--host",
        "127.0.0.1",
        *where,
        *([] if proxy_port else [f"127.0.0.1:{tracker_port}"]),
        "--key",
        key,
        "--label",
        "demo=1",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, start_new_session=True)
    try:
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def _wait_for_free(port: int, key: str, timeout: float, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + timeout
    with TrackerClient.connect("127.0.0.1", port) as client:
        while client.summary()["queue_info"].get(key, {}).get("free", 0) < 1:
            if proc.poll() is not None:
                raise TetherError(f"the device server exited with code {proc.returncode} before registering")
            if time.monotonic() > deadline:
                raise TetherError(f"no server registered key {key!r} within {timeout} s")
            time.sleep(0.05)  # polling the tracker with a deadline


def run_demo(model_path: Path | None = None, progress: Callable[[str], None] = print, repeat: int = 10) -> DemoResult:
    """Run the whole round trip; raise :class:`TetherError` when a step fails."""
    import numpy as np
    import onnx
    import onnxruntime as ort
    import tvm
    from tvm.relax.frontend.onnx import from_onnx

    timings: dict[str, float] = {}
    with (
        TrackerThread(TrackerConfig(host="127.0.0.1", port=0)) as tracker,
        ProxyThread(ProxyConfig(port=0, web_port=None, tracker=(tracker.host, tracker.port))) as proxy,
    ):
        progress(f"tracker: tether {tracker.host}:{tracker.port}; proxy: tether {proxy.host}:{proxy.port}")
        with (
            _device_server(tracker.port, DEMO_KEY) as server_proc,
            _device_server(tracker.port, DEMO_NAT_KEY, proxy.port) as hidden_proc,
            tempfile.TemporaryDirectory() as tmp,
        ):
            t0 = time.perf_counter()
            if model_path is None:
                path = Path(tmp) / "squeezenet.onnx"
                onnx.save(light_model("squeezenet", seed=0), str(path))
            else:
                path = model_path
            local = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            spec = local.get_inputs()[0]
            shape = [d if isinstance(d, int) else 1 for d in spec.shape]
            x = np.random.default_rng(0).standard_normal(shape).astype("float32")
            executable = tvm.compile(from_onnx(onnx.load(str(path))), target=tvm.target.Target({"kind": "llvm"}))
            lib_path = Path(tmp) / "model.so"
            executable.export_library(str(lib_path))
            timings["compile_s"] = time.perf_counter() - t0
            progress(f"model: {path.name}, also compiled by TVM for llvm in {timings['compile_s']:.2f} s")

            _wait_for_free(tracker.port, DEMO_KEY, 60.0, server_proc)
            progress(f"server: tether server registered as {DEMO_KEY!r} (pid {server_proc.pid})")

            with connect_tracker("127.0.0.1", tracker.port) as pool:
                t0 = time.perf_counter()
                with pool.request(DEMO_KEY, priority=1, session_timeout=300, timeout=60) as sess:
                    timings["request_ms"] = (time.perf_counter() - t0) * 1e3
                    t0 = time.perf_counter()
                    sess.upload(path, "model.onnx")
                    sess.upload(lib_path, "model.so")
                    timings["upload_ms"] = (time.perf_counter() - t0) * 1e3
                    onnx_model = sess.load_model("model.onnx")
                    tvm_model = sess.load_model("model.so", backend="tvm")
                    t0 = time.perf_counter()
                    y = next(iter(onnx_model.run({spec.name: x}).values()))
                    timings["first_run_ms"] = (time.perf_counter() - t0) * 1e3
                    y_tvm = next(iter(tvm_model.run({tvm_model.input_names[0]: x}).values()))
                    timings["remote_run_ms"] = onnx_model.benchmark(number=repeat, repeat=3).median * 1e3
                    timings["remote_tvm_run_ms"] = tvm_model.benchmark(number=repeat, repeat=3).median * 1e3
                    status = query_tracker("127.0.0.1", tracker.port)  # while the session is held

                _wait_for_free(tracker.port, DEMO_NAT_KEY, 60.0, hidden_proc)
                progress(f"server: a second one, {DEMO_NAT_KEY!r}, reachable only through the proxy")
                t0 = time.perf_counter()
                with pool.request(DEMO_NAT_KEY, priority=1, session_timeout=300, timeout=60) as sess:
                    timings["proxy_request_ms"] = (time.perf_counter() - t0) * 1e3
                    sess.upload(path, "model.onnx")
                    relayed = sess.load_model("model.onnx")
                    y_proxy = next(iter(relayed.run({spec.name: x}).values()))
                    timings["proxy_run_ms"] = relayed.benchmark(number=repeat, repeat=3).median * 1e3

            ref = local.run(None, {spec.name: x})[0]
            samples = []
            for _ in range(repeat):
                t0 = time.perf_counter()
                local.run(None, {spec.name: x})
                samples.append(time.perf_counter() - t0)
            timings["local_ort_run_ms"] = float(np.median(samples)) * 1e3

    flat = y.reshape(-1)
    top = np.argsort(flat)[::-1][:5]
    return DemoResult(
        model=path.name,
        input_name=spec.name,
        input_shape=list(x.shape),
        output_shape=list(y.shape),
        max_abs_diff=float(np.max(np.abs(y.astype("float64") - ref.astype("float64")))),
        max_abs_diff_tvm=float(np.max(np.abs(y_tvm.astype("float64") - ref.astype("float64")))),
        max_abs_diff_proxy=float(np.max(np.abs(y_proxy.astype("float64") - ref.astype("float64")))),
        top5=[(int(i), float(flat[i])) for i in top],
        timings=timings,
        status=status,
    )
