"""tether's device server and client against TVM's, side by side, with a raw socket as the floor, in one run.

    python bench/session_bench.py [--quick] [--json out.json]

Every server runs in its own process and is stopped by pid (its descendants too, by pid): tether's
``python -m tether server``/``tracker``, TVM's ``python -m tvm.exec.rpc_server`` and
``tvm.rpc.tracker.Tracker``, and a raw Python socket server (TCP_NODELAY) that echoes small messages,
swallows or sends bulk bytes: the floor of a Python peer over loopback.

Measured:

1. empty-call round trip (p50/p90 us): tether ``sess.ping()``, TVM ``rpc.test.addone(1)`` (TVM's client
   against TVM's server, and against tether's server, which hands TVM clients to TVM's own session loop),
   a 1-byte echo as the floor.
2. request-to-first-call through a tracker (p50/p90 ms): from ``connect_tracker(...)`` to the first call
   returning, with the server free again (the tracker says so) before each run, not timed. tether
   client + tether tracker + tether server (``--preload auto``); TVM client + TVM tracker + TVM server;
   TVM client + tether tracker + tether server. tether twice: right after the server is free (as a
   client sees it back to back), and once its spare worker has finished importing (idle server).
3. upload of 64 MiB (MiB/s): tether ``sess.upload(path)`` (and bytes), TVM ``sess.upload(bytearray)``.
4. 64 MiB tensors host-to-device and device-to-host (MiB/s): tether ``sess.tensor(arr)``/``.numpy()``,
   TVM ``tvm.runtime.tensor(arr, sess.cpu())``/``.numpy()``.
5. SqueezeNet (``tether.models.light_model``): local onnxruntime run vs tether's remote ``model.run``;
   the overhead is remote - (local + transfer), transfer = bytes / the bandwidths of 4. With TVM: the same
   model compiled by TVM (default pipeline, no tuning), run locally, through TVM's server (Relax VM over
   RPC, ``time_evaluator`` for the device time) and through tether's server (its tvm backend).

Prints a table (metric | TVM 0.27 | tether | raw floor | ratio | target) and writes every number to
bench/results/session-<timestamp>.json. About 2 minutes on 2 cores; ``--quick`` about one.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import gc
import json
import os
import platform
import random
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
HOST = "127.0.0.1"
MIB = 1 << 20

#: The floor: a raw Python socket server. The first byte of a connection picks the mode: "E" echoes
#: whatever comes; "S" (sink) reads 8-byte length-prefixed blobs into one buffer and answers b"k";
#: "G" (source) reads an 8-byte length and sends that many bytes.
FLOOR_SERVER = r"""
import socket, struct, threading
srv = socket.socket()
srv.bind(("127.0.0.1", 0))
srv.listen(16)
print("listening on 127.0.0.1:%d" % srv.getsockname()[1], flush=True)

def recv_exact(conn, view):
    got = 0
    while got < len(view):
        n = conn.recv_into(view[got:])
        if not n:
            raise ConnectionError
        got += n

def serve(conn):
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    buf = bytearray(0)
    try:
        mode = conn.recv(1)
        while mode == b"E":
            data = conn.recv(65536)
            if not data:
                return
            conn.sendall(data)
        head = bytearray(8)
        while True:
            recv_exact(conn, memoryview(head))
            (size,) = struct.unpack("<Q", head)
            if len(buf) < size:
                buf = bytearray(size)
            if mode == b"S":
                recv_exact(conn, memoryview(buf)[:size])
                conn.sendall(b"k")
            else:
                conn.sendall(memoryview(buf)[:size])
    except (ConnectionError, OSError):
        pass
    finally:
        conn.close()

while True:
    conn, _ = srv.accept()
    threading.Thread(target=serve, args=(conn,), daemon=True).start()
"""

TVM_TRACKER = (
    "import sys\n"
    "from tvm.rpc.tracker import Tracker\n"
    "t = Tracker('127.0.0.1', port={port}, port_end={port_end}, silent=True)\n"
    "print('listening on 127.0.0.1:%d' % t.port, flush=True)\n"
    "sys.stdin.readline(); t.terminate()\n"
)

_LISTENING = re.compile(r"(?:listening on|bind to) \S*:(\d+)")


# -- processes -----------------------------------------------------------------------------------


@dataclass(eq=False)
class Proc:
    """One server process; ``log`` keeps its last lines of output (for errors)."""

    name: str
    proc: subprocess.Popen[str]
    port: int
    log: collections.deque[str]

    @property
    def pid(self) -> int:
        return self.proc.pid


def _drain(proc: subprocess.Popen[str], log: collections.deque[str]) -> None:
    assert proc.stdout is not None
    for line in proc.stdout:
        log.append(line.rstrip())


def _start(name: str, argv: list[str], timeout: float = 60) -> Proc:
    """Start a server; its port is read from its first ``listening on``/``bind to`` line."""
    proc = subprocess.Popen(
        argv,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.PIPE,
        text=True,
        cwd=tempfile.gettempdir(),
    )
    log: collections.deque[str] = collections.deque(maxlen=50)
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    port = None
    for line in proc.stdout:
        log.append(line.rstrip())
        match = _LISTENING.search(line)
        if match:
            port = int(match.group(1))
            break
        if time.monotonic() > deadline:
            break
    if port is None:
        _stop(proc)
        raise RuntimeError(f"{name} did not start: " + "\n".join(log))
    threading.Thread(target=_drain, args=(proc, log), daemon=True).start()
    return Proc(name, proc, port, log)


def _stop(proc: subprocess.Popen[str]) -> None:
    """Stop a server and everything it started, by pid: TVM's rpc_server leaves its PopenWorker behind."""
    import psutil

    try:
        descendants = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        descendants = []
    if proc.poll() is None:
        with contextlib.suppress(BrokenPipeError, OSError):
            assert proc.stdin is not None
            proc.stdin.write("\n")  # TVM's tracker script ends on a line; the others ignore stdin
            proc.stdin.flush()
        proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    _, alive = psutil.wait_procs(descendants, timeout=3)
    for child in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            child.kill()
    psutil.wait_procs(alive, timeout=3)


@contextlib.contextmanager
def running(name: str, argv: list[str]) -> Iterator[Proc]:
    server = _start(name, argv)
    try:
        yield server
    finally:
        _stop(server.proc)


def floor_server() -> contextlib.AbstractContextManager[Proc]:
    return running("raw floor", [sys.executable, "-c", FLOOR_SERVER])


def tether_server(key: str, tracker: int | None = None) -> contextlib.AbstractContextManager[Proc]:
    argv = [sys.executable, "-m", "tether", "server", "--host", HOST, "--port", "0", "--key", key, "--preload", "auto"]
    if tracker is not None:
        argv += ["--tracker", f"{HOST}:{tracker}"]
    return running("tether server", argv)


def tether_tracker() -> contextlib.AbstractContextManager[Proc]:
    return running(
        "tether tracker", [sys.executable, "-m", "tether", "tracker", "--host", HOST, "--port", "0", "--silent"]
    )


def tvm_server(key: str, tracker: int | None = None) -> contextlib.AbstractContextManager[Proc]:
    base = random.randint(20000, 50000)  # TVM's server cannot bind port 0
    argv = [sys.executable, "-m", "tvm.exec.rpc_server", "--host", HOST, "--port", str(base)]
    argv += ["--port-end", str(base + 500), "--key", key]
    if tracker is not None:
        argv += ["--tracker", f"{HOST}:{tracker}"]
    return running("TVM rpc_server", argv)


def tvm_tracker() -> contextlib.AbstractContextManager[Proc]:
    base = random.randint(20000, 50000)
    return running("TVM tracker", [sys.executable, "-c", TVM_TRACKER.format(port=base, port_end=base + 500)])


def wait_quiet(pid: int, quiet_s: float = 0.25, timeout: float = 60) -> float:
    """Wait until a process and its descendants stop using CPU (a spare worker done importing); seconds waited."""
    import psutil

    def cpu() -> float:
        total = 0.0
        try:
            procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            return 0.0
        for p in procs:
            with contextlib.suppress(psutil.NoSuchProcess):
                t = p.cpu_times()
                total += t.user + t.system
        return total

    start = time.monotonic()
    last, since = cpu(), start
    while time.monotonic() - start < timeout:
        time.sleep(0.05)
        now, used = time.monotonic(), cpu()
        if used - last > 0.005:
            last, since = used, now
        elif now - since >= quiet_s:
            break
    return time.monotonic() - start


def wait_free(tracker_port: int, key: str, timeout: float = 60) -> None:
    """Until the tracker (tether's or TVM's) lists a free server of ``key``."""
    from tether.client.tracker import TrackerClient

    deadline = time.monotonic() + timeout
    with TrackerClient.connect(HOST, tracker_port) as client:
        while client.summary()["queue_info"].get(key, {}).get("free", 0) < 1:
            if time.monotonic() > deadline:
                raise RuntimeError(f"no free server of {key!r} within {timeout} s")
            time.sleep(0.002)


def tvm_connect(port: int, key: str, timeout: float = 30) -> Any:
    """``rpc.connect``, retried: TVM's server logs its port before it listens."""
    from tvm import rpc

    deadline = time.monotonic() + timeout
    while True:
        try:
            return rpc.connect(HOST, port, key=key)
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


# -- statistics ----------------------------------------------------------------------------------


def pct(samples: list[float], p: float) -> float:
    ordered = sorted(samples)
    rank = (len(ordered) - 1) * p / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def latency(samples_s: list[float], unit: float) -> dict[str, float]:
    """p50/p90/p99/mean/min of seconds, in ``unit`` (1e6: microseconds, 1e3: milliseconds)."""
    xs = [s * unit for s in samples_s]
    return {
        "p50": pct(xs, 50),
        "p90": pct(xs, 90),
        "p99": pct(xs, 99),
        "mean": statistics.fmean(xs),
        "min": min(xs),
        "n": len(xs),
    }


def time_calls(call: Callable[[], Any], n: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        call()
    samples = []
    clock = time.perf_counter
    for _ in range(n):
        t0 = clock()
        call()
        samples.append(clock() - t0)
    return samples


def throughput(seconds: list[float], nbytes: int) -> dict[str, float]:
    """MiB/s from the median (and best) of repeated transfers."""
    return {
        "mib_s": nbytes / MIB / statistics.median(seconds),
        "best_mib_s": nbytes / MIB / min(seconds),
        "median_s": statistics.median(seconds),
        "runs": len(seconds),
    }


# -- 1. empty calls ------------------------------------------------------------------------------


def bench_floor(port: int, n: int, warmup: int, nbytes: int) -> dict[str, Any]:
    """Raw socket: echo round trips of 1 and 32 bytes; bulk send (sink) and receive (source)."""
    out: dict[str, Any] = {}
    with socket.create_connection((HOST, port)) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.sendall(b"E")
        for size in (1, 32):
            msg = b"x" * size

            def echo(msg: bytes = msg, size: int = size) -> None:
                sock.sendall(msg)
                got = 0
                while got < size:
                    got += len(sock.recv(65536))

            out[f"echo_{size}B_us"] = latency(time_calls(echo, n, warmup), 1e6)
    blob = bytearray(os.urandom(1 << 16)) * (nbytes >> 16)
    sink = bytearray(nbytes)
    head = nbytes.to_bytes(8, "little")
    with socket.create_connection((HOST, port)) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.sendall(b"S")

        def send_blob() -> None:
            sock.sendall(head)
            sock.sendall(blob)
            assert sock.recv(1) == b"k"

        out["send"] = throughput(time_calls(send_blob, 5, 1), nbytes)
    with socket.create_connection((HOST, port)) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.sendall(b"G")
        view = memoryview(sink)

        def recv_blob() -> None:
            sock.sendall(head)
            got = 0
            while got < nbytes:
                got += sock.recv_into(view[got:])

        out["recv"] = throughput(time_calls(recv_blob, 5, 1), nbytes)
    return out


# -- 3, 4: bulk ----------------------------------------------------------------------------------


def bench_tether_direct(port: int, key: str, args: argparse.Namespace, blob_path: Path, arr: Any) -> dict[str, Any]:
    """Empty calls, uploads and tensors on one direct tether session."""
    import numpy as np

    import tether

    out: dict[str, Any] = {}
    with tether.connect(HOST, port, key=key, session_timeout=600) as sess:
        sess.ping()
        out["ping_us"] = latency(time_calls(sess.ping, args.calls, args.calls // 5), 1e6)
        size = blob_path.stat().st_size
        out["upload_file"] = throughput(time_calls(lambda: sess.upload(blob_path, "blob.bin"), args.reps, 1), size)
        data = blob_path.read_bytes()
        out["upload_bytes"] = throughput(time_calls(lambda: sess.upload(data, "blob2.bin"), args.reps, 1), size)
        assert sess.download("blob.bin") == data
        data = b""
        h2d, d2h = [], []
        for i in range(args.reps + 1):
            t0 = time.perf_counter()
            remote = sess.tensor(arr)
            t1 = time.perf_counter()
            back = remote.numpy()
            t2 = time.perf_counter()
            if i == 0:
                assert np.array_equal(back, arr)
            else:
                h2d.append(t1 - t0)
                d2h.append(t2 - t1)
            del back
            remote.free()
        out["h2d"] = throughput(h2d, arr.nbytes)
        out["d2h"] = throughput(d2h, arr.nbytes)
    return out


def bench_tvm_direct(port: int, key: str, args: argparse.Namespace, blob_path: Path, arr: Any) -> dict[str, Any]:
    """The same on one TVM session (TVM's client, whichever server)."""
    sess = tvm_connect(port, key)
    try:
        return _tvm_direct(sess, args, blob_path, arr)
    finally:
        sess = None  # a TVM session ends when its last remote object is gone
        gc.collect()


def _tvm_direct(sess: Any, args: argparse.Namespace, blob_path: Path, arr: Any) -> dict[str, Any]:
    import numpy as np
    import tvm

    out: dict[str, Any] = {}
    addone = sess.get_function("rpc.test.addone")
    assert addone(1) == 2
    out["addone_us"] = latency(time_calls(lambda: addone(1), args.calls, args.calls // 5), 1e6)
    if not args.tvm_bulk:
        return out
    data = bytearray(blob_path.read_bytes())
    out["upload_bytes"] = throughput(time_calls(lambda: sess.upload(data, "blob.bin"), args.tvm_reps, 1), len(data))
    assert sess.download("blob.bin") == data
    dev = sess.cpu()
    h2d, d2h = [], []
    for i in range(args.tvm_reps + 1):
        t0 = time.perf_counter()
        remote = tvm.runtime.tensor(arr, dev)
        t1 = time.perf_counter()
        back = remote.numpy()
        t2 = time.perf_counter()
        if i == 0:
            assert np.array_equal(back, arr)
        else:
            h2d.append(t1 - t0)
            d2h.append(t2 - t1)
    out["h2d"] = throughput(h2d, arr.nbytes)
    out["d2h"] = throughput(d2h, arr.nbytes)
    return out


def tvm_addone_only(port: int, key: str, args: argparse.Namespace) -> dict[str, Any]:
    saved = args.tvm_bulk
    args.tvm_bulk = False
    try:
        return bench_tvm_direct(port, key, args, Path(), None)
    finally:
        args.tvm_bulk = saved


# -- 2. request to first call --------------------------------------------------------------------


def first_call_tether(tracker: Proc, server: Proc, key: str, runs: int, idle: bool) -> dict[str, Any]:
    import tether

    samples, request = [], []
    for i in range(runs + 1):
        wait_free(tracker.port, key)
        if idle:
            wait_quiet(server.pid)
        gc.collect()
        t0 = time.perf_counter()
        with tether.connect_tracker(HOST, tracker.port) as client:
            sess = client.request(key, session_timeout=60, timeout=30)
            t1 = time.perf_counter()
            sess.ping()
            t2 = time.perf_counter()
            sess.close()
        if i:  # the first run pays one-time costs (imports here and there)
            samples.append(t2 - t0)
            request.append(t1 - t0)
    return {"first_call_ms": latency(samples, 1e3), "request_ms": latency(request, 1e3)}


def first_call_tvm(tracker: Proc, key: str, runs: int) -> dict[str, Any]:
    from tvm import rpc

    samples, request = [], []
    for i in range(runs + 1):
        wait_free(tracker.port, key)
        gc.collect()
        t0 = time.perf_counter()
        client = rpc.connect_tracker(HOST, tracker.port)
        sess = client.request(key, session_timeout=60)
        t1 = time.perf_counter()
        assert sess.get_function("rpc.test.addone")(1) == 2
        t2 = time.perf_counter()
        del sess
        client.close()
        gc.collect()
        if i:
            samples.append(t2 - t0)
            request.append(t1 - t0)
    return {"first_call_ms": latency(samples, 1e3), "request_ms": latency(request, 1e3)}


# -- 5. a real model -----------------------------------------------------------------------------


def bench_model_tether(port: int, key: str, args: argparse.Namespace, bandwidth: dict[str, Any]) -> dict[str, Any]:
    import numpy as np
    import onnxruntime as ort

    import tether
    from tether.models import light_model

    proto = light_model("squeezenet")
    model_bytes = proto.SerializeToString()
    (graph_input,) = proto.graph.input
    shape = [d.dim_value for d in graph_input.type.tensor_type.shape.dim]
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    name = graph_input.name

    local = ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
    (expected,) = local.run(None, {name: x})
    local_s = time_calls(lambda: local.run(None, {name: x}), args.model_runs, 5)
    local = None

    out: dict[str, Any] = {"model": "squeezenet (light, seeded random weights)", "input": name, "shape": shape}
    with tether.connect(HOST, port, key=key, session_timeout=600) as sess:
        sess.upload(model_bytes, "squeezenet.onnx")
        model = sess.load_model("squeezenet.onnx")
        (got,) = model.run({name: x}).values()
        assert np.allclose(got, expected, rtol=1e-4, atol=1e-6), "remote output differs from local"
        device_s: list[float] = []

        def remote_run() -> None:
            model.run({name: x})
            device_s.append(model.last_run_s or 0.0)

        remote_s = time_calls(remote_run, args.model_runs, 5)
        device_s = device_s[5:]
        bench = model.benchmark({name: x}, number=1, repeat=args.model_runs, warmup=2)
        model.close()
    in_bytes, out_bytes = x.nbytes, expected.nbytes
    transfer_s = in_bytes / (bandwidth["h2d"]["mib_s"] * MIB) + out_bytes / (bandwidth["d2h"]["mib_s"] * MIB)
    local_ms = statistics.median(local_s) * 1e3
    remote_ms = statistics.median(remote_s) * 1e3
    out.update(
        {
            "input_bytes": in_bytes,
            "output_bytes": out_bytes,
            "local_ms": latency(local_s, 1e3),
            "remote_ms": latency(remote_s, 1e3),
            "device_run_ms": latency(device_s, 1e3),
            "device_benchmark_ms": latency(bench.samples, 1e3),
            "transfer_estimate_ms": transfer_s * 1e3,
            "overhead_ms": remote_ms - (local_ms + transfer_s * 1e3),
            "overhead_vs_device_ms": remote_ms - (statistics.median(device_s) * 1e3 + transfer_s * 1e3),
        }
    )
    return out


def compile_tvm_model(workdir: Path) -> tuple[Path, Any]:
    """SqueezeNet through ``from_onnx`` and ``tvm.compile`` (llvm, default pipeline): the library's path."""
    import numpy as np
    import tvm
    from tvm.relax.frontend.onnx import from_onnx

    from tether.models import light_model

    proto = light_model("squeezenet")
    (graph_input,) = proto.graph.input
    shape = [d.dim_value for d in graph_input.type.tensor_type.shape.dim]
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    executable = tvm.compile(from_onnx(proto), target=tvm.target.Target({"kind": "llvm"}))
    path = workdir / "squeezenet_tvm.so"
    executable.export_library(str(path))
    return path, x


def bench_model_tvm(
    ports: dict[str, int], key: str, args: argparse.Namespace, bandwidth: dict[str, Any], workdir: Path
) -> dict[str, Any]:
    """The TVM-compiled SqueezeNet: locally, through TVM's server (its own client) and tether's (tvm backend)."""
    import numpy as np
    import tvm
    from tvm import relax

    import tether

    t0 = time.perf_counter()
    lib_path, x = compile_tvm_model(workdir)
    out: dict[str, Any] = {"compile_s": time.perf_counter() - t0, "library_bytes": lib_path.stat().st_size}
    runs = args.tvm_model_runs

    vm = relax.VirtualMachine(tvm.runtime.load_module(str(lib_path)), tvm.cpu())
    expected = vm["main"](tvm.runtime.tensor(x)).numpy()
    local_s = time_calls(lambda: vm["main"](tvm.runtime.tensor(x)).numpy(), runs, 1)
    vm = None

    sess = tvm_connect(ports["tvm"], key)
    try:
        remote_s, device_s = _tvm_remote_model(sess, lib_path, x, expected, runs)
    finally:
        sess = None
        gc.collect()

    with tether.connect(HOST, ports["tether"], key=key, session_timeout=600) as tsess:
        tsess.upload(lib_path, lib_path.name)
        model = tsess.load_model(lib_path.name)
        (got,) = model.run({model.input_names[0]: x}).values()
        assert np.allclose(got.reshape(expected.shape), expected, rtol=1e-4, atol=1e-6)
        tether_device: list[float] = []

        def tether_run() -> None:
            model.run({model.input_names[0]: x})
            tether_device.append(model.last_run_s or 0.0)

        tether_s = time_calls(tether_run, runs, 0)
        model.close()

    def transfer_ms(bw: dict[str, Any]) -> float:
        return (x.nbytes / (bw["h2d"]["mib_s"] * MIB) + expected.nbytes / (bw["d2h"]["mib_s"] * MIB)) * 1e3

    local_ms = statistics.median(local_s) * 1e3
    for label, samples, device_samples, bw in (
        ("tvm_server", remote_s, device_s, bandwidth["tvm"]),
        ("tether_server", tether_s, tether_device, bandwidth["tether"]),
    ):
        remote_ms = statistics.median(samples) * 1e3
        out[label] = {
            "remote_ms": latency(samples, 1e3),
            "device_run_ms": latency(device_samples, 1e3),
            "transfer_estimate_ms": transfer_ms(bw),
            "overhead_ms": remote_ms - (local_ms + transfer_ms(bw)),
        }
    out["local_ms"] = latency(local_s, 1e3)
    out["note"] = "TVM's default llvm pipeline, untuned: slow kernels; the overhead, not the run time, is the point"
    return out


def _tvm_remote_model(sess: Any, lib_path: Path, x: Any, expected: Any, runs: int) -> tuple[list[float], list[float]]:
    import numpy as np
    import tvm
    from tvm import relax

    sess.upload(str(lib_path))
    dev = sess.cpu()
    rvm = relax.VirtualMachine(sess.load_module(lib_path.name), dev)

    def remote_run() -> Any:
        return rvm["main"](tvm.runtime.tensor(x, dev)).numpy()

    assert np.allclose(remote_run(), expected, rtol=1e-4, atol=1e-6)
    remote_s = time_calls(remote_run, runs, 0)
    device = rvm.time_evaluator("main", dev, number=1, repeat=runs)(tvm.runtime.tensor(x, dev))
    return remote_s, list(device.results)


# -- the run -------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> dict[str, Any]:
    import numpy as np
    import onnxruntime
    import psutil
    import tvm

    import tether

    report: dict[str, Any] = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "machine": {
            "cpus": os.cpu_count(),
            "cpus_usable": len(os.sched_getaffinity(0)),
            "memory_gib": psutil.virtual_memory().total / (1 << 30),
            "python": platform.python_version(),
            "platform": platform.platform(),
            "tvm": tvm.__version__,
            "onnxruntime": onnxruntime.__version__,
            "numpy": np.__version__,
            "tether": tether.__version__,
        },
    }
    nbytes = args.mib * MIB
    arr = np.random.default_rng(1).standard_normal(nbytes // 4, dtype=np.float32)
    key = f"bench{random.randint(0, 10**6)}"
    with tempfile.TemporaryDirectory(prefix="session-bench-") as tmp:
        workdir = Path(tmp)
        blob_path = workdir / "blob.bin"
        blob_path.write_bytes(arr.tobytes())

        print("== direct sessions: floor, tether server, TVM rpc_server", flush=True)
        with floor_server() as floor:
            report["floor"] = bench_floor(floor.port, args.calls, args.calls // 5, nbytes)
        f = report["floor"]
        print(
            f"  raw floor: echo 1 B p50 {f['echo_1B_us']['p50']:.1f} us, send {f['send']['mib_s']:.0f} MiB/s, "
            f"receive {f['recv']['mib_s']:.0f} MiB/s",
            flush=True,
        )
        with tether_server(key) as server:
            wait_quiet(server.pid)
            t = report["tether"] = bench_tether_direct(server.port, key, args, blob_path, arr)
            print(
                f"  tether: ping p50 {t['ping_us']['p50']:.1f} us, upload {t['upload_file']['mib_s']:.0f} MiB/s, "
                f"h2d {t['h2d']['mib_s']:.0f} MiB/s, d2h {t['d2h']['mib_s']:.0f} MiB/s",
                flush=True,
            )
            wait_quiet(server.pid)
            report["tvm_client_on_tether"] = tvm_addone_only(server.port, key, args)
            print(
                f"  TVM client on tether's server: addone p50 {report['tvm_client_on_tether']['addone_us']['p50']:.1f} us",
                flush=True,
            )
            wait_quiet(server.pid)
            m = report["model"] = bench_model_tether(server.port, key, args, report["tether"])
            print(
                f"  tether SqueezeNet: local {m['local_ms']['p50']:.2f} ms, remote {m['remote_ms']['p50']:.2f} ms, "
                f"device {m['device_run_ms']['p50']:.2f} ms, transfer {m['transfer_estimate_ms']:.2f} ms, "
                f"overhead {m['overhead_ms']:.2f} ms",
                flush=True,
            )
            with tvm_server(key) as tserver:
                wait_quiet(tserver.pid)
                v = report["tvm"] = bench_tvm_direct(tserver.port, key, args, blob_path, arr)
                if args.tvm_bulk:
                    print(
                        f"  TVM: addone p50 {v['addone_us']['p50']:.1f} us, upload {v['upload_bytes']['mib_s']:.0f} MiB/s, "
                        f"h2d {v['h2d']['mib_s']:.0f} MiB/s, d2h {v['d2h']['mib_s']:.0f} MiB/s",
                        flush=True,
                    )
                if args.tvm_model and args.tvm_bulk:
                    try:
                        wait_quiet(server.pid)
                        tm = report["tvm_model"] = bench_model_tvm(
                            {"tvm": tserver.port, "tether": server.port}, key, args, {"tvm": v, "tether": t}, workdir
                        )
                        print(
                            f"  TVM-compiled SqueezeNet: local {tm['local_ms']['p50']:.1f} ms, through TVM's server "
                            f"{tm['tvm_server']['remote_ms']['p50']:.1f} ms, through tether's "
                            f"{tm['tether_server']['remote_ms']['p50']:.1f} ms",
                            flush=True,
                        )
                    except Exception as exc:  # optional: a compiler or runtime hiccup must not lose the rest
                        report["tvm_model"] = {"skipped": f"{type(exc).__name__}: {exc}"}
                        print(f"  TVM-compiled SqueezeNet skipped: {exc}", flush=True)

        print("== request-to-first-call through a tracker", flush=True)
        with tether_tracker() as tracker, tether_server(key, tracker.port) as server:
            wait_free(tracker.port, key)
            wait_quiet(server.pid)
            fc: dict[str, Any] = {}
            fc["tether_back_to_back"] = first_call_tether(tracker, server, key, args.runs, idle=False)
            fc["tether_idle"] = first_call_tether(tracker, server, key, args.runs, idle=True)
            wait_quiet(server.pid)
            fc["tvm_client_tether_stack"] = first_call_tvm(tracker, key, args.runs)
        with tvm_tracker() as tracker, tvm_server(key, tracker.port):
            fc["tvm_stack"] = first_call_tvm(tracker, key, args.runs)
        report["first_call"] = fc
        for label, r in fc.items():
            print(
                f"  {label:26s} p50 {r['first_call_ms']['p50']:8.2f} ms  p90 {r['first_call_ms']['p90']:8.2f} ms",
                flush=True,
            )
    return report


# -- the table -----------------------------------------------------------------------------------


@dataclass
class Row:
    metric: str
    tvm: float | None
    tether: float | None
    floor: float | None = None
    ratio: str = ""
    target: str = ""


def _x(a: float | None, b: float | None, what: str) -> str:
    return f"{a / b:.2f}x {what}" if a is not None and b else ""


def _target(ok: bool, text: str) -> str:
    return f"{text}: {'met' if ok else 'MISSED'}"


def rows(report: dict[str, Any], args: argparse.Namespace) -> list[Row]:
    fl, te, tv = report["floor"], report["tether"], report.get("tvm", {})
    out: list[Row] = []
    for p in ("p50", "p90"):
        ratio = te["ping_us"][p] / fl["echo_1B_us"][p]
        out.append(
            Row(
                f"1. empty call {p} us (ping / addone / 1 B echo)",
                tv["addone_us"][p],
                te["ping_us"][p],
                fl["echo_1B_us"][p],
                _x(te["ping_us"][p], fl["echo_1B_us"][p], "raw"),
                _target(ratio <= 1.3, "<= 1.3x raw") if p == "p50" else "",
            )
        )
    tc = report["tvm_client_on_tether"]["addone_us"]
    out.append(
        Row(
            "   TVM client addone p50 us: TVM's server | tether's",
            tv["addone_us"]["p50"],
            tc["p50"],
            fl["echo_1B_us"]["p50"],
            _x(tc["p50"], tv["addone_us"]["p50"], "TVM"),
        )
    )
    fc = report["first_call"]
    for p in ("p50", "p90"):
        b2b = fc["tether_back_to_back"]["first_call_ms"][p]
        out.append(
            Row(
                f"2. request-to-first-call {p} ms (tether: back to back)",
                fc["tvm_stack"]["first_call_ms"][p],
                b2b,
                None,
                _x(b2b, fc["tvm_stack"]["first_call_ms"][p], "TVM"),
                _target(b2b < 20, "< 20 ms") if p == "p50" else "",
            )
        )
    idle = fc["tether_idle"]["first_call_ms"]["p50"]
    out.append(
        Row(
            "   request-to-first-call p50 ms (tether: idle server)",
            fc["tvm_stack"]["first_call_ms"]["p50"],
            idle,
            None,
            _x(idle, fc["tvm_stack"]["first_call_ms"]["p50"], "TVM"),
            _target(idle < 20, "< 20 ms"),
        )
    )
    mixed = fc["tvm_client_tether_stack"]["first_call_ms"]["p50"]
    out.append(
        Row(
            "   TVM client p50 ms: TVM tracker+server | tether's",
            fc["tvm_stack"]["first_call_ms"]["p50"],
            mixed,
            None,
            _x(mixed, fc["tvm_stack"]["first_call_ms"]["p50"], "TVM"),
        )
    )
    mib = args.mib
    up = te["upload_file"]["mib_s"]
    out.append(
        Row(
            f"3. upload {mib} MiB, MiB/s (tether: a file)",
            tv.get("upload_bytes", {}).get("mib_s"),
            up,
            fl["send"]["mib_s"],
            _x(up, fl["send"]["mib_s"], "raw"),
            _target(up >= 1024, ">= 1024 MiB/s"),
        )
    )
    out.append(
        Row(
            "   upload from bytes, MiB/s",
            tv.get("upload_bytes", {}).get("mib_s"),
            te["upload_bytes"]["mib_s"],
            fl["send"]["mib_s"],
            _x(te["upload_bytes"]["mib_s"], fl["send"]["mib_s"], "raw"),
        )
    )
    for direction, floor_key, label in (("h2d", "send", "host-to-device"), ("d2h", "recv", "device-to-host")):
        out.append(
            Row(
                f"4. {label} tensor {mib} MiB, MiB/s",
                tv.get(direction, {}).get("mib_s"),
                te[direction]["mib_s"],
                fl[floor_key]["mib_s"],
                _x(te[direction]["mib_s"], fl[floor_key]["mib_s"], "raw"),
            )
        )
    m = report["model"]
    tm = report.get("tvm_model", {})
    has_tvm = "local_ms" in tm
    out.append(
        Row(
            "5. SqueezeNet local run p50 ms (TVM-compiled | ORT)",
            tm["local_ms"]["p50"] if has_tvm else None,
            m["local_ms"]["p50"],
        )
    )
    out.append(
        Row(
            "   remote round trip p50 ms",
            tm["tvm_server"]["remote_ms"]["p50"] if has_tvm else None,
            m["remote_ms"]["p50"],
        )
    )
    out.append(
        Row(
            "   device run p50 ms (time_evaluator | last_run_s)",
            tm["tvm_server"]["device_run_ms"]["p50"] if has_tvm else None,
            m["device_run_ms"]["p50"],
        )
    )
    out.append(
        Row(
            "   transfer estimate ms (bytes / bandwidth of 4.)",
            tm["tvm_server"]["transfer_estimate_ms"] if has_tvm else None,
            m["transfer_estimate_ms"],
        )
    )
    out.append(
        Row(
            "   overhead ms = remote - (local + transfer)",
            tm["tvm_server"]["overhead_ms"] if has_tvm else None,
            m["overhead_ms"],
            None,
            "",
            _target(abs(m["overhead_ms"]) <= 0.5, "within 0.5 ms"),
        )
    )
    if has_tvm:
        ts = tm["tether_server"]
        out.append(
            Row(
                "   TVM-compiled on tether's server: remote p50 ms",
                tm["tvm_server"]["remote_ms"]["p50"],
                ts["remote_ms"]["p50"],
                None,
                _x(ts["remote_ms"]["p50"], tm["tvm_server"]["remote_ms"]["p50"], "TVM"),
            )
        )
        out.append(
            Row("   TVM-compiled on tether's server: overhead ms", tm["tvm_server"]["overhead_ms"], ts["overhead_ms"])
        )
    return out


def print_table(table: list[Row]) -> None:
    def cell(v: float | None) -> str:
        if v is None:
            return "-"
        return f"{v:.1f}" if abs(v) >= 100 else f"{v:.2f}"

    print()
    print(f"{'metric':56s} {'TVM 0.27':>10s} {'tether':>10s} {'raw floor':>10s} {'ratio':>14s}  target")
    for r in table:
        print(
            f"{r.metric:56s} {cell(r.tvm):>10s} {cell(r.tether):>10s} {cell(r.floor):>10s} {r.ratio:>14s}  {r.target}"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer iterations everywhere (about a minute)")
    parser.add_argument("--calls", type=int, default=5000, help="timed empty calls per client (default 5000)")
    parser.add_argument("--runs", type=int, default=20, help="request-to-first-call runs per stack (default 20)")
    parser.add_argument("--reps", type=int, default=5, help="timed 64 MiB transfers, tether (default 5)")
    parser.add_argument("--tvm-reps", type=int, default=3, help="timed 64 MiB transfers, TVM: slow (default 3)")
    parser.add_argument("--mib", type=int, default=64, help="size of uploads and tensors in MiB (default 64)")
    parser.add_argument("--model-runs", type=int, default=100, help="timed SqueezeNet runs, local and remote")
    parser.add_argument("--tvm-model-runs", type=int, default=3, help="timed runs of the TVM-compiled model")
    parser.add_argument("--no-tvm-model", dest="tvm_model", action="store_false", help="skip the TVM-compiled model")
    parser.add_argument(
        "--no-tvm-bulk", dest="tvm_bulk", action="store_false", help="skip TVM's uploads and tensors (slow)"
    )
    parser.add_argument("--json", type=Path, default=None, help="where to write the results (default bench/results/)")
    args = parser.parse_args(argv)
    if args.quick:
        args.calls, args.runs, args.reps, args.tvm_reps = 1000, 5, 2, 1
        args.model_runs, args.tvm_model_runs = 30, 2
    started = time.perf_counter()
    report = run(args)
    report["total_s"] = time.perf_counter() - started
    table = rows(report, args)
    report["table"] = [vars(r) for r in table]
    print_table(table)
    path = args.json or RESULTS / f"session-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2))
    print(f"\nwrote {path} ({report['total_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
