"""tether's device server and client against TVM's, side by side, with a raw socket as the floor, in one run.

    python bench/session_bench.py [--quick] [--json out.json]

Every server runs in its own process and is stopped by pid (its descendants too, by pid: TVM's rpc_server
leaves its PopenWorker running otherwise): tether's ``python -m tether server``/``tracker``, TVM's
``python -m tvm.exec.rpc_server`` and ``tvm.rpc.tracker.Tracker``, and a raw Python socket server
(TCP_NODELAY) that echoes small messages, swallows or sends bulk bytes: what a Python peer can do over
loopback, the floor.

Measured:

1. empty-call round trip (p50/p90 us): tether ``sess.ping()``, TVM ``rpc.test.addone(1)`` (TVM's client
   against TVM's server, and against tether's server, which hands TVM clients to TVM's own C++ loop), a
   1-byte echo as the floor. The clients take turns in shuffled rounds, so background load hits all alike;
   the best round's p50 is reported too.
2. request-to-first-call through a tracker (p50/p90 ms): ``connect_tracker(...)``, ``request(key)``, the
   first call (tether: ``ping()``; TVM: ``addone(1)``), with the tracker listing the server free again
   before each run (not timed). tether client, tether tracker and server (``--preload auto``); TVM client,
   TVM tracker and rpc_server; TVM client, tether tracker and server. tether's runs twice: back to back
   (as soon as the tracker lists the server free) and idle (its spare worker has also finished importing).
3. upload of 64 MiB (MiB/s): tether ``sess.upload(path)`` (and from bytes), TVM
   ``sess.upload(bytearray, name)``; the floor writes what it receives to a file in 1 MiB chunks.
4. 64 MiB tensors host-to-device and device-to-host (MiB/s): tether ``sess.tensor(arr)`` and
   ``.numpy()``, TVM ``tvm.runtime.tensor(arr, sess.cpu())`` and ``.numpy()``; the floor receives into
   fresh memory each time (the raw socket with reused buffers is listed too). Transfers take turns as well.
5. SqueezeNet (``tether.models.light_model``) on onnxruntime: local runs and tether's remote
   ``model.run`` alternating, same options (``--ort-threads``); overhead = remote - (local + transfer),
   transfer = input and output bytes at the bandwidths of 4. Then the same model compiled by TVM (default
   llvm pipeline, untuned), run locally, through TVM's server (Relax VM over RPC; ``time_evaluator`` for
   the device time) and through tether's server (its tvm backend); skipped with a note if it fails.

Prints a table (metric | TVM 0.27 | tether | raw floor | ratio | target) and writes every number to
bench/results/session-<timestamp>.json. About 2.5 minutes on 2 cores; ``--quick`` about 1.5.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import gc
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import benchlib
from benchlib import Proc, pct, pinned, retry, timed_run, write_report

HOST = "127.0.0.1"
MIB = 1 << 20

#: The floor: a raw Python socket server. The first byte of a connection picks the mode: "E" echoes
#: whatever comes; then 8-byte length-prefixed requests: "S" (sink) reads the bytes into one reused
#: buffer, "N" into a fresh bytearray each time (as tether's worker receives a tensor), "F" into a file
#: in 1 MiB chunks (as an upload lands: argv[1] names the file), and answers b"k"; "G" (source) sends
#: that many bytes.
FLOOR_SERVER = r"""
import socket, struct, sys, threading
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
            if mode == b"N":
                buf = bytearray(size)
            elif len(buf) < size:
                buf = bytearray(size if mode != b"F" else min(size, 1 << 20))
            if mode == b"F":
                with open(sys.argv[1], "wb") as f:
                    left = size
                    while left:
                        part = memoryview(buf)[: min(left, len(buf))]
                        recv_exact(conn, part)
                        f.write(part)
                        left -= len(part)
                conn.sendall(b"k")
            elif mode in (b"S", b"N"):
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

# -- processes -----------------------------------------------------------------------------------


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


def running(name: str, argv: list[str]) -> contextlib.AbstractContextManager[Proc]:
    """A server for the block, in this session with stdin a pipe (for ``_stop``'s line); its port read from
    its first ``listening on``/``bind to`` line."""
    return benchlib.running(name, argv, stop=_stop, new_session=False, stdin=subprocess.PIPE, log_sep="\n")


def floor_server(file: Path) -> contextlib.AbstractContextManager[Proc]:
    return running("raw floor", [sys.executable, "-c", FLOOR_SERVER, str(file)])


def tether_server(key: str, tracker: int | None = None, slots: int = 1) -> contextlib.AbstractContextManager[Proc]:
    argv = [sys.executable, "-m", "tether", "server", "--host", HOST, "--port", "0", "--key", key, "--preload", "auto"]
    argv += ["--slots", str(slots)]
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


def wait_tvm_sessions_gone(pid: int, timeout: float = 30) -> None:
    """Until TVM's server (main -> PopenWorker -> one forked process per session) has no session process
    left, so that it has removed the session's temporary directory before it is stopped."""
    import psutil

    deadline = time.monotonic() + timeout
    with contextlib.suppress(psutil.NoSuchProcess):
        for worker in psutil.Process(pid).children():
            while worker.children() and time.monotonic() < deadline:
                time.sleep(0.01)
    wait_quiet(pid, quiet_s=0.1, timeout=5)


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

    return retry(lambda: rpc.connect(HOST, port, key=key), timeout, Exception)


# -- statistics ----------------------------------------------------------------------------------


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


# -- clients -------------------------------------------------------------------------------------


class RawClient:
    """The floor's client side: one connection per mode."""

    def __init__(self, port: int, nbytes: int) -> None:
        self.port, self.nbytes = port, nbytes
        self.socks: dict[bytes, socket.socket] = {}
        self.blob = bytearray(os.urandom(1 << 16)) * max(1, nbytes >> 16)
        self.reused = bytearray(nbytes)
        self.head = nbytes.to_bytes(8, "little")

    def _sock(self, mode: bytes) -> socket.socket:
        if mode not in self.socks:
            sock = socket.create_connection((HOST, self.port))
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.sendall(mode)
            self.socks[mode] = sock
        return self.socks[mode]

    def echo(self, size: int = 1) -> Callable[[], None]:
        sock, msg = self._sock(b"E"), b"x" * size

        def call() -> None:
            sock.sendall(msg)
            got = 0
            while got < size:
                got += len(sock.recv(65536))

        return call

    def send(self, mode: bytes) -> None:
        sock = self._sock(mode)
        sock.sendall(self.head)
        sock.sendall(self.blob)
        if sock.recv(1) != b"k":
            raise RuntimeError("the floor server did not acknowledge")

    def recv(self, fresh: bool) -> None:
        import numpy as np

        sock = self._sock(b"G")
        view = memoryview(np.empty(self.nbytes, np.uint8) if fresh else self.reused)
        sock.sendall(self.head)
        got = 0
        while got < self.nbytes:
            got += sock.recv_into(view[got:])

    def close(self) -> None:
        for sock in self.socks.values():
            sock.close()


class TvmClient:
    """A TVM session and the remote objects used on it; ``close()`` drops them all (TVM ends a session when
    its last remote object is gone)."""

    def __init__(self, port: int, key: str) -> None:
        self.sess: Any = tvm_connect(port, key)
        self.addone: Any = self.sess.get_function("rpc.test.addone")
        if self.addone(1) != 2:
            raise RuntimeError("rpc.test.addone(1) != 2")
        self.dev: Any = self.sess.cpu()

    def call(self) -> None:
        self.addone(1)

    def close(self) -> None:
        self.sess = self.addone = self.dev = None
        gc.collect()


# -- 1. empty calls ------------------------------------------------------------------------------


def bench_empty_calls(calls: dict[str, Callable[[], Any]], total: int, rounds: int) -> dict[str, Any]:
    """Every client in turn, ``rounds`` times in shuffled order (background load then hits all alike)."""
    per_round = max(1, total // rounds)
    samples: dict[str, list[float]] = {name: [] for name in calls}
    round_p50: dict[str, list[float]] = {name: [] for name in calls}
    for call in calls.values():
        time_calls(call, 0, max(100, per_round // 5))
    for _ in range(rounds):
        order = list(calls)
        random.shuffle(order)
        for name in order:
            got = time_calls(calls[name], per_round, per_round // 10)
            samples[name] += got
            round_p50[name].append(statistics.median(got) * 1e6)
    return {
        name: {**latency(samples[name], 1e6), "best_round_p50": min(round_p50[name]), "round_p50": round_p50[name]}
        for name in calls
    }


def empty_calls(raw: RawClient, tsess: Any, tvm: TvmClient, tvm_on_tether: TvmClient) -> dict[str, Callable[[], Any]]:
    """The empty calls measured side by side: tether's ``ping()`` (the binary hot path where both ends
    speak it) and the same ping as a JSON request (the general path, and what an older peer gets)."""
    return {
        "raw_1B": raw.echo(1),
        "raw_32B": raw.echo(32),
        "tether_ping": tsess.ping,
        "tether_ping_json": lambda: tsess._call("ping", {}),
        "tvm_addone": tvm.call,
        "tvm_client_on_tether_addone": tvm_on_tether.call,
    }


#: A 2x3 float32 affine map on the stdlib reference backend: a run that costs next to nothing on the device.
SMALL_MODEL = {
    "format": "tether-reference/1",
    "inputs": [{"name": "x", "dtype": "float32", "shape": [2, 3]}],
    "outputs": [{"name": "y", "dtype": "float32", "shape": [2, 3]}],
    "ops": [{"op": "affine", "input": "x", "output": "y", "scale": 2.0, "bias": 1.0}],
}


def small_runs(tsess: Any) -> dict[str, Callable[[], Any]]:
    """``model.run`` of :data:`SMALL_MODEL` with a 24-byte input sent each time: over the binary hot path
    (RUN CALL), and as a JSON request (``shapes=`` keeps a run on JSON), to see what the header costs."""
    import json

    import numpy as np

    tsess.upload(json.dumps(SMALL_MODEL).encode(), "small.json")
    model = tsess.load_model("small.json")
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    return {
        "tether_run_small": lambda: model.run({"x": x}),
        "tether_run_small_json": lambda: model.run({"x": x}, shapes={"x": (2, 3)}),
    }


def print_empty(report: dict[str, Any]) -> None:
    for label, section in (("", "empty_call_us"), (", all on one CPU", "empty_call_us_one_cpu")):
        result = report[section]
        print(
            f"  empty call p50 us{label}: "
            + ", ".join(f"{name} {r['p50']:.1f} (best round {r['best_round_p50']:.1f})" for name, r in result.items()),
            flush=True,
        )
        ping, addone, raw = result["tether_ping"]["p50"], result["tvm_addone"]["p50"], result["raw_1B"]["p50"]
        print(
            f"    tether ping / TVM addone: {ping / addone:.2f}x, tether ping / raw echo: {ping / raw:.2f}x", flush=True
        )


# -- 3, 4: bulk ----------------------------------------------------------------------------------


def bench_bulk(
    raw: RawClient, tsess: Any, tvm: TvmClient | None, *, blob_path: Path, arr: Any, args: argparse.Namespace
) -> dict[str, Any]:
    """Uploads and tensors, one of each per round, the systems in turn; round 0 is the warm-up (and checks)."""
    import numpy as np
    import tvm as tvm_mod

    data = blob_path.read_bytes()
    tvm_data = bytearray(data)
    times: dict[str, list[float]] = collections.defaultdict(list)

    def timed(name: str, call: Callable[[], Any], keep: bool) -> Any:
        t0 = time.perf_counter()
        value = call()
        if keep:
            times[name].append(time.perf_counter() - t0)
        return value

    for index in range(args.reps + 1):
        keep = index > 0
        timed("floor_send", lambda: raw.send(b"S"), keep)
        timed("floor_send_fresh", lambda: raw.send(b"N"), keep)
        timed("floor_send_file", lambda: raw.send(b"F"), keep)
        timed("floor_recv", lambda: raw.recv(fresh=False), keep)
        timed("floor_recv_fresh", lambda: raw.recv(fresh=True), keep)

        timed("tether_upload_file", lambda: tsess.upload(blob_path, "blob.bin"), keep)
        timed("tether_upload_bytes", lambda: tsess.upload(data, "blob2.bin"), keep)
        remote = timed("tether_h2d", lambda: tsess.tensor(arr), keep)
        back = timed("tether_d2h", remote.numpy, keep)
        if index == 0:
            assert tsess.download("blob.bin") == data and tsess.download("blob2.bin") == data
            assert np.array_equal(back, arr)
        remote.free()
        back = remote = None

        if tvm is not None and index <= args.tvm_reps:
            timed("tvm_upload", lambda: tvm.sess.upload(tvm_data, "blob.bin"), keep)
            remote = timed("tvm_h2d", lambda: tvm_mod.runtime.tensor(arr, tvm.dev), keep)
            back = timed("tvm_d2h", remote.numpy, keep)
            if index == 0:
                assert tvm.sess.download("blob.bin") == tvm_data
                assert np.array_equal(back, arr)
            back = remote = None
    return {name: throughput(seconds, arr.nbytes) for name, seconds in times.items()}


# -- 2. request to first call --------------------------------------------------------------------


def first_call(tracker: Proc, server: Proc | None, key: str, *, runs: int, client: str, idle: bool) -> dict[str, Any]:
    """``connect_tracker`` -> ``request`` -> first call, ``runs`` times after one untimed run (one-time costs:
    imports here, the first grant there). Before each: the tracker lists the server free; with ``idle``
    the server's processes have stopped using CPU too (its spare worker is ready)."""
    import tether

    samples, request = [], []
    for i in range(runs + 1):
        wait_free(tracker.port, key)
        if idle and server is not None:
            wait_quiet(server.pid)
        gc.collect()
        if client == "tether":
            t0 = time.perf_counter()
            with tether.connect_tracker(HOST, tracker.port) as conn:
                sess = conn.request(key, session_timeout=60, timeout=30)
                t1 = time.perf_counter()
                sess.ping()
                t2 = time.perf_counter()
                sess.close()
        else:
            t0, t1, t2 = _first_call_tvm(tracker.port, key)
        if i:
            samples.append(t2 - t0)
            request.append(t1 - t0)
    return {"first_call_ms": latency(samples, 1e3), "request_ms": latency(request, 1e3), "runs": runs}


def _first_call_tvm(port: int, key: str) -> tuple[float, float, float]:
    from tvm import rpc

    t0 = time.perf_counter()
    conn = rpc.connect_tracker(HOST, port)
    sess = conn.request(key, session_timeout=60)
    t1 = time.perf_counter()
    if sess.get_function("rpc.test.addone")(1) != 2:
        raise RuntimeError("rpc.test.addone(1) != 2")
    t2 = time.perf_counter()
    sess = None
    conn.close()
    gc.collect()
    return t0, t1, t2


# -- 5. a real model -----------------------------------------------------------------------------


def _model_input(proto: Any) -> tuple[str, Any]:
    import numpy as np

    (graph_input,) = proto.graph.input
    shape = [d.dim_value for d in graph_input.type.tensor_type.shape.dim]
    return graph_input.name, np.random.default_rng(0).standard_normal(shape).astype(np.float32)


def _transfer_ms(in_bytes: int, out_bytes: int, h2d: dict[str, Any], d2h: dict[str, Any]) -> float:
    return (in_bytes / (h2d["mib_s"] * MIB) + out_bytes / (d2h["mib_s"] * MIB)) * 1e3


def bench_model_tether(tsess: Any, args: argparse.Namespace, bulk: dict[str, Any]) -> dict[str, Any]:
    """SqueezeNet: local onnxruntime and tether's remote run, alternating, the same options on both."""
    import numpy as np
    import onnxruntime as ort

    from tether.models import light_model

    proto = light_model("squeezenet")
    model_bytes = proto.SerializeToString()
    name, x = _model_input(proto)
    options = {"intra_op_num_threads": args.ort_threads} if args.ort_threads else {}
    so = ort.SessionOptions()
    for option, value in options.items():
        setattr(so, option, value)
    local = ort.InferenceSession(model_bytes, sess_options=so, providers=["CPUExecutionProvider"])
    (expected,) = local.run(None, {name: x})

    tsess.upload(model_bytes, "squeezenet.onnx")
    model = tsess.load_model("squeezenet.onnx", **options)
    (got,) = model.run({name: x}).values()
    if not np.allclose(got, expected, rtol=1e-4, atol=1e-6):
        raise AssertionError("the remote output differs from the local one")
    local_s: list[float] = []
    remote_s: list[float] = []
    device_s: list[float] = []
    for i in range(args.model_runs + 5):
        t0 = time.perf_counter()
        local.run(None, {name: x})
        t1 = time.perf_counter()
        model.run({name: x})
        t2 = time.perf_counter()
        if i >= 5:
            local_s.append(t1 - t0)
            remote_s.append(t2 - t1)
            device_s.append(model.last_run_s or 0.0)
    bench = model.benchmark({name: x}, number=1, repeat=args.model_runs, warmup=5)
    model.close()

    transfer = _transfer_ms(x.nbytes, expected.nbytes, bulk["tether_h2d"], bulk["tether_d2h"])
    local_ms, remote_ms = statistics.median(local_s) * 1e3, statistics.median(remote_s) * 1e3
    return {
        "model": "squeezenet (onnx light model, seeded random weights)",
        "ort_options": options or "onnxruntime's defaults",
        "input": name,
        "input_bytes": x.nbytes,
        "output_bytes": expected.nbytes,
        "local_ms": latency(local_s, 1e3),
        "remote_ms": latency(remote_s, 1e3),
        "device_run_ms": latency(device_s, 1e3),
        "device_benchmark_ms": latency(bench.samples, 1e3),
        "transfer_estimate_ms": transfer,
        "overhead_ms": remote_ms - (local_ms + transfer),
        "overhead_vs_device_run_ms": remote_ms - (statistics.median(device_s) * 1e3 + transfer),
    }


def compile_tvm_model(workdir: Path) -> Path:
    """SqueezeNet through ``from_onnx`` and ``tvm.compile`` (llvm, default pipeline): the library's path."""
    import tvm
    from tvm.relax.frontend.onnx import from_onnx

    from tether.models import light_model

    executable = tvm.compile(from_onnx(light_model("squeezenet")), target=tvm.target.Target({"kind": "llvm"}))
    path = workdir / "squeezenet_tvm.so"
    executable.export_library(str(path))
    return path


def bench_model_tvm(
    tvm: TvmClient, tsess: Any, args: argparse.Namespace, bulk: dict[str, Any], workdir: Path
) -> dict[str, Any]:
    """The TVM-compiled SqueezeNet: locally, through TVM's server (its client, a Relax VM over RPC) and
    through tether's (its tvm backend), alternating."""
    import numpy as np
    import tvm as tvm_mod
    from tvm import relax

    from tether.models import light_model

    t0 = time.perf_counter()
    lib_path = compile_tvm_model(workdir)
    out: dict[str, Any] = {"compile_s": time.perf_counter() - t0, "library_bytes": lib_path.stat().st_size}
    _, x = _model_input(light_model("squeezenet"))

    vm = relax.VirtualMachine(tvm_mod.runtime.load_module(str(lib_path)), tvm_mod.cpu())
    expected = vm["main"](tvm_mod.runtime.tensor(x)).numpy()

    tvm.sess.upload(str(lib_path))
    rvm = relax.VirtualMachine(tvm.sess.load_module(lib_path.name), tvm.dev)
    tsess.upload(lib_path, lib_path.name)
    model = tsess.load_model(lib_path.name)
    feed = {model.input_names[0]: x}

    runs: dict[str, Callable[[], Any]] = {
        "local": lambda: vm["main"](tvm_mod.runtime.tensor(x)).numpy(),
        "tvm_server": lambda: rvm["main"](tvm_mod.runtime.tensor(x, tvm.dev)).numpy(),
        "tether_server": lambda: next(iter(model.run(feed).values())),
    }
    samples: dict[str, list[float]] = {name: [] for name in runs}
    tether_device: list[float] = []
    for i in range(args.tvm_model_runs + 1):
        for name, run in runs.items():
            t0 = time.perf_counter()
            got = run()
            elapsed = time.perf_counter() - t0
            if i == 0:
                assert np.allclose(got.reshape(expected.shape), expected, rtol=1e-4, atol=1e-6), name
            else:
                samples[name].append(elapsed)
                if name == "tether_server":
                    tether_device.append(model.last_run_s or 0.0)
    device = rvm.time_evaluator("main", tvm.dev, number=1, repeat=args.tvm_model_runs)(
        tvm_mod.runtime.tensor(x, tvm.dev)
    )
    model.close()
    rvm = vm = None
    gc.collect()

    local_ms = statistics.median(samples["local"]) * 1e3
    out["local_ms"] = latency(samples["local"], 1e3)
    for name, device_samples, prefix in (
        ("tvm_server", list(device.results), "tvm"),
        ("tether_server", tether_device, "tether"),
    ):
        transfer = _transfer_ms(x.nbytes, expected.nbytes, bulk[f"{prefix}_h2d"], bulk[f"{prefix}_d2h"])
        out[name] = {
            "remote_ms": latency(samples[name], 1e3),
            "device_run_ms": latency(device_samples, 1e3),
            "transfer_estimate_ms": transfer,
            "overhead_ms": statistics.median(samples[name]) * 1e3 - (local_ms + transfer),
        }
    out["note"] = "TVM's default llvm pipeline, untuned: slow kernels; the overhead, not the run time, is the point"
    return out


# -- the run -------------------------------------------------------------------------------------


def machine_info() -> dict[str, Any]:
    import numpy as np
    import onnxruntime
    import tvm

    import tether

    return benchlib.machine_info(
        tvm=tvm.__version__, onnxruntime=onnxruntime.__version__, numpy=np.__version__, tether=tether.__version__
    )


def phase_direct(report: dict[str, Any], args: argparse.Namespace, workdir: Path, key: str) -> None:
    """1, 3, 4, 5: direct sessions, every server up at once, the clients measured in turn."""
    import numpy as np

    import tether

    nbytes = args.mib * MIB
    arr = np.random.default_rng(1).standard_normal(nbytes // 4, dtype=np.float32)
    blob_path = workdir / "blob.bin"
    blob_path.write_bytes(arr.tobytes())
    print("== direct sessions: raw floor, tether server, TVM rpc_server", flush=True)
    with (
        floor_server(workdir / "floor-upload.bin") as floor,
        tether_server(key, slots=2) as tserver,  # slot 2: a TVM client beside tether's own
        tvm_server(key) as vserver,
    ):
        raw = RawClient(floor.port, nbytes)
        tsess = tether.connect(HOST, tserver.port, key=key, session_timeout=3600)
        tvm = TvmClient(vserver.port, key)
        tvm_on_tether = TvmClient(tserver.port, key)
        try:
            tsess.ping()
            wait_quiet(tserver.pid)
            calls = {**empty_calls(raw, tsess, tvm, tvm_on_tether), **small_runs(tsess)}
            report["empty_call_us"] = bench_empty_calls(calls, args.calls, args.rounds)
            with pinned([os.getpid(), floor.pid, tserver.pid, vserver.pid], max(os.sched_getaffinity(0))):
                report["empty_call_us_one_cpu"] = bench_empty_calls(calls, args.calls, args.rounds)
            tvm_on_tether.close()
            print_empty(report)
            b = report["bulk_mib_s"] = bench_bulk(
                raw, tsess, tvm if args.tvm_bulk else None, blob_path=blob_path, arr=arr, args=args
            )
            print("  MiB/s: " + ", ".join(f"{name} {r['mib_s']:.0f}" for name, r in b.items()), flush=True)
            wait_quiet(tserver.pid)
            report["model"] = bench_model_tether(tsess, args, b)
            if args.ort_threads == 1:  # one intra-op thread: one CPU takes the client, the server and the model
                with pinned([os.getpid(), tserver.pid], max(os.sched_getaffinity(0))):
                    report["model_one_cpu"] = bench_model_tether(tsess, args, b)
            for label, section in (("", "model"), (", one CPU", "model_one_cpu")):
                if section in report:
                    m = report[section]
                    print(
                        f"  SqueezeNet (onnxruntime){label}: local {m['local_ms']['p50']:.2f} ms, remote "
                        f"{m['remote_ms']['p50']:.2f} ms, device {m['device_run_ms']['p50']:.2f} ms, transfer "
                        f"{m['transfer_estimate_ms']:.2f} ms, overhead {m['overhead_ms']:.2f} ms",
                        flush=True,
                    )
            if args.tvm_model and args.tvm_bulk:
                try:
                    tm = report["tvm_model"] = bench_model_tvm(tvm, tsess, args, b, workdir)
                    print(
                        f"  SqueezeNet (TVM-compiled): local {tm['local_ms']['p50']:.1f} ms, through TVM's server "
                        f"{tm['tvm_server']['remote_ms']['p50']:.1f} ms, through tether's "
                        f"{tm['tether_server']['remote_ms']['p50']:.1f} ms",
                        flush=True,
                    )
                except Exception as exc:  # optional: a compiler or runtime hiccup must not lose the rest
                    report["tvm_model"] = {"skipped": f"{type(exc).__name__}: {exc}"}
                    print(f"  SqueezeNet (TVM-compiled) skipped: {type(exc).__name__}: {exc}", flush=True)
        finally:
            tsess.close()
            tvm.close()
            tvm_on_tether.close()
            raw.close()
            wait_tvm_sessions_gone(vserver.pid)
    blob_path.unlink()


def phase_empty(report: dict[str, Any], args: argparse.Namespace, workdir: Path, key: str) -> None:
    """1 alone (``--only empty``): the empty call, every client taking turns, default scheduling and one CPU."""
    import tether

    print("== empty calls: raw floor, tether server, TVM rpc_server", flush=True)
    with (
        floor_server(workdir / "floor-upload.bin") as floor,
        tether_server(key, slots=2) as tserver,
        tvm_server(key) as vserver,
    ):
        raw = RawClient(floor.port, 1)
        tsess = tether.connect(HOST, tserver.port, key=key, session_timeout=3600)
        tvm = TvmClient(vserver.port, key)
        tvm_on_tether = TvmClient(tserver.port, key)
        try:
            tsess.ping()
            wait_quiet(tserver.pid)
            calls = {**empty_calls(raw, tsess, tvm, tvm_on_tether), **small_runs(tsess)}
            report["empty_call_us"] = bench_empty_calls(calls, args.calls, args.rounds)
            with pinned([os.getpid(), floor.pid, tserver.pid, vserver.pid], max(os.sched_getaffinity(0))):
                report["empty_call_us_one_cpu"] = bench_empty_calls(calls, args.calls, args.rounds)
            print_empty(report)
        finally:
            tsess.close()
            tvm.close()
            tvm_on_tether.close()
            raw.close()
            wait_tvm_sessions_gone(vserver.pid)


def phase_first_call(report: dict[str, Any], args: argparse.Namespace, key: str) -> None:
    print("== request-to-first-call through a tracker", flush=True)
    fc: dict[str, Any] = {}
    with tether_tracker() as tracker, tether_server(key, tracker.port) as server:
        wait_free(tracker.port, key)
        wait_quiet(server.pid)
        for client in ("tether", "tvm"):
            for idle in (False, True):
                label = f"{client}_client_tether_stack_{'idle' if idle else 'back_to_back'}"
                fc[label] = first_call(tracker, server, key, runs=args.runs, client=client, idle=idle)
    with tvm_tracker() as tracker, tvm_server(key, tracker.port) as server:
        fc["tvm_client_tvm_stack"] = first_call(tracker, None, key, runs=args.runs, client="tvm", idle=False)
        wait_tvm_sessions_gone(server.pid)
    report["first_call"] = fc
    for label, r in fc.items():
        print(
            f"  {label:42s} p50 {r['first_call_ms']['p50']:8.2f} ms  p90 {r['first_call_ms']['p90']:8.2f} ms",
            flush=True,
        )


def run(args: argparse.Namespace) -> dict[str, Any]:
    report: dict[str, Any] = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "machine": machine_info(),
        "notes": {
            "empty_call_us": "clients in shuffled rounds, default scheduling; a VM's idle-CPU wake-ups make it bimodal",
            "empty_call_us_one_cpu": "the same with the bench and every server thread pinned to one CPU: CPU cost",
            "floor_send_file": "raw socket, the server writing 1 MiB chunks to one file (as an upload lands)",
            "floor_send_fresh": "raw socket into a fresh bytearray per transfer (as tether's worker receives a tensor)",
            "floor_recv_fresh": "raw socket into a fresh numpy.empty per transfer (as tether's client receives one)",
            "model": "overhead_ms = remote p50 - (local p50 + transfer); transfer = bytes / tether_h2d and tether_d2h",
            "first_call": "back_to_back: as soon as the tracker lists the server free; idle: its processes quiet too",
        },
    }
    key = f"bench{random.randint(0, 10**6)}"
    with tempfile.TemporaryDirectory(prefix="session-bench-") as tmp:
        if args.only == "empty":
            phase_empty(report, args, Path(tmp), key)
        else:
            phase_direct(report, args, Path(tmp), key)
    if args.only != "empty":
        phase_first_call(report, args, key)
    report["machine"]["load_average_end"] = os.getloadavg()
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


def empty_rows(report: dict[str, Any]) -> list[Row]:
    out: list[Row] = []
    for where, section in (("", "empty_call_us"), (", one CPU", "empty_call_us_one_cpu")):
        e = report[section]
        raw, ping, addone = e["raw_1B"], e["tether_ping"], e["tvm_addone"]
        for p in ("p50", "p90"):
            out.append(
                Row(
                    f"{'1.' if not out else '  '} empty call {p} us{where} (addone | ping | 1 B echo)",
                    addone[p],
                    ping[p],
                    raw[p],
                    _x(ping[p], addone[p], "TVM"),
                    _target(ping[p] / addone[p] <= 1.5, "<= 1.5x TVM") if p == "p50" else "",
                )
            )
        out.append(
            Row(
                f"   best round's p50 us{where}",
                addone["best_round_p50"],
                ping["best_round_p50"],
                raw["best_round_p50"],
                _x(ping["best_round_p50"], addone["best_round_p50"], "TVM"),
            )
        )
        if "tether_ping_json" in e:
            json_ping = e["tether_ping_json"]["p50"]
            out.append(
                Row(
                    f"   ping as a JSON request p50 us{where}",
                    addone["p50"],
                    json_ping,
                    raw["p50"],
                    _x(json_ping, addone["p50"], "TVM"),
                )
            )
        out.append(Row(f"   tether ping / raw echo p50{where}", None, None, None, _x(ping["p50"], raw["p50"], "raw")))
        if "tether_run_small" in e:
            run, run_json = e["tether_run_small"]["p50"], e["tether_run_small_json"]["p50"]
            out.append(
                Row(
                    f"   run 2x3 float32 p50 us{where} (as JSON: {run_json:.2f})",
                    None,
                    run,
                    None,
                    _x(run, run_json, "JSON"),
                )
            )
        mixed = e["tvm_client_on_tether_addone"]
        out.append(
            Row(
                f"   TVM client's addone p50 us{where}: TVM server | tether's",
                addone["p50"],
                mixed["p50"],
                raw["p50"],
                _x(mixed["p50"], addone["p50"], "TVM"),
            )
        )
    return out


def rows(report: dict[str, Any], args: argparse.Namespace) -> list[Row]:
    if args.only == "empty":
        return empty_rows(report)
    b, fc = report["bulk_mib_s"], report["first_call"]
    out = empty_rows(report)
    tvm_fc = fc["tvm_client_tvm_stack"]["first_call_ms"]
    for label, key, p in (
        ("2. request-to-first-call p50 ms, back to back", "tether_client_tether_stack_back_to_back", "p50"),
        ("   request-to-first-call p90 ms, back to back", "tether_client_tether_stack_back_to_back", "p90"),
        ("   request-to-first-call p50 ms, idle server", "tether_client_tether_stack_idle", "p50"),
        ("   request-to-first-call p90 ms, idle server", "tether_client_tether_stack_idle", "p90"),
    ):
        value = fc[key]["first_call_ms"][p]
        out.append(
            Row(
                label,
                tvm_fc[p],
                value,
                None,
                _x(value, tvm_fc[p], "TVM"),
                _target(value < 20, "< 20 ms") if p == "p50" else "",
            )
        )
    for label, key in (
        ("   TVM client via tether's stack p50 ms, back to back", "tvm_client_tether_stack_back_to_back"),
        ("   TVM client via tether's stack p50 ms, idle server", "tvm_client_tether_stack_idle"),
    ):
        value = fc[key]["first_call_ms"]["p50"]
        out.append(Row(label, tvm_fc["p50"], value, None, _x(value, tvm_fc["p50"], "TVM")))

    def mib(name: str) -> float | None:
        return b[name]["mib_s"] if name in b else None

    up = b["tether_upload_file"]["mib_s"]
    out.append(
        Row(
            f"3. upload {args.mib} MiB MiB/s (raw: socket to file)",
            mib("tvm_upload"),
            up,
            mib("floor_send_file"),
            _x(up, mib("floor_send_file"), "raw"),
            _target(up >= 1024, ">= 1024 MiB/s"),
        )
    )
    value = b["tether_upload_bytes"]["mib_s"]
    out.append(
        Row(
            "   upload from bytes MiB/s",
            mib("tvm_upload"),
            value,
            mib("floor_send_file"),
            _x(value, mib("floor_send_file"), "raw"),
        )
    )
    for label, name, floor in (
        (f"4. host-to-device {args.mib} MiB MiB/s (raw: fresh memory)", "h2d", "floor_send_fresh"),
        (f"   device-to-host {args.mib} MiB MiB/s (raw: fresh memory)", "d2h", "floor_recv_fresh"),
    ):
        value = b[f"tether_{name}"]["mib_s"]
        out.append(Row(label, mib(f"tvm_{name}"), value, mib(floor), _x(value, mib(floor), "raw")))
    out.append(Row("   raw socket only (reused buffer): send MiB/s", None, None, mib("floor_send")))
    out.append(Row("   raw socket only (reused buffer): receive MiB/s", None, None, mib("floor_recv")))

    m = report["model"]
    tm = report.get("tvm_model", {})
    has_tvm = "local_ms" in tm

    def tv(*path: str) -> float | None:
        if not has_tvm:
            return None
        value: Any = tm["tvm_server"]
        for part in path:
            value = value[part]
        return float(value)

    out.append(
        Row(
            "5. SqueezeNet local p50 ms (TVM-compiled | onnxruntime)",
            tm["local_ms"]["p50"] if has_tvm else None,
            m["local_ms"]["p50"],
        )
    )
    out.append(Row("   remote round trip p50 ms", tv("remote_ms", "p50"), m["remote_ms"]["p50"]))
    out.append(
        Row("   device run p50 ms (time_evaluator | last_run_s)", tv("device_run_ms", "p50"), m["device_run_ms"]["p50"])
    )
    out.append(
        Row("   transfer estimate ms (bytes / bandwidth of 4.)", tv("transfer_estimate_ms"), m["transfer_estimate_ms"])
    )
    out.append(
        Row(
            "   overhead ms = remote - (local + transfer)",
            tv("overhead_ms"),
            m["overhead_ms"],
            None,
            "",
            _target(abs(m["overhead_ms"]) <= 0.5, "within 0.5 ms"),
        )
    )
    if "model_one_cpu" in report:
        mp = report["model_one_cpu"]
        out.append(Row("   one CPU: local p50 ms", None, mp["local_ms"]["p50"]))
        out.append(Row("   one CPU: remote round trip p50 ms", None, mp["remote_ms"]["p50"]))
        out.append(
            Row(
                "   one CPU: overhead ms = remote - (local + transfer)",
                None,
                mp["overhead_ms"],
                None,
                "",
                _target(abs(mp["overhead_ms"]) <= 0.5, "within 0.5 ms"),
            )
        )
    if has_tvm:
        ts = tm["tether_server"]
        out.append(
            Row(
                "   TVM-compiled, remote p50 ms: TVM server | tether's",
                tv("remote_ms", "p50"),
                ts["remote_ms"]["p50"],
                None,
                _x(ts["remote_ms"]["p50"], tv("remote_ms", "p50"), "TVM"),
            )
        )
        out.append(Row("   TVM-compiled, overhead ms: TVM server | tether's", tv("overhead_ms"), ts["overhead_ms"]))
    elif "skipped" in tm:
        out.append(Row(f"   TVM-compiled model skipped: {tm['skipped'][:60]}", None, None))
    return out


def print_table(table: list[Row]) -> None:
    def cell(v: float | None) -> str:
        if v is None:
            return "-"
        return f"{v:.1f}" if abs(v) >= 100 else f"{v:.2f}"

    width = max(len(r.metric) for r in table)
    print()
    print(f"{'metric':{width}s} {'TVM 0.27':>10s} {'tether':>10s} {'raw floor':>10s} {'ratio':>12s}  target")
    for r in table:
        print(
            f"{r.metric:{width}s} {cell(r.tvm):>10s} {cell(r.tether):>10s} {cell(r.floor):>10s} {r.ratio:>12s}  {r.target}"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer iterations everywhere (about a minute)")
    parser.add_argument("--calls", type=int, default=20000, help="timed empty calls per client (default 20000)")
    parser.add_argument("--rounds", type=int, default=10, help="rounds the empty calls are split into (default 10)")
    parser.add_argument("--runs", type=int, default=8, help="request-to-first-call runs per case (default 8)")
    parser.add_argument("--reps", type=int, default=5, help="timed transfers per kind, tether and floor (default 5)")
    parser.add_argument("--tvm-reps", type=int, default=1, help="timed transfers per kind, TVM: slow (default 1)")
    parser.add_argument("--mib", type=int, default=64, help="size of uploads and tensors in MiB (default 64)")
    parser.add_argument("--model-runs", type=int, default=100, help="timed SqueezeNet runs, local and remote")
    parser.add_argument(
        "--ort-threads",
        type=int,
        default=1,
        help="onnxruntime intra-op threads, local and remote alike (default 1: stable on a small, shared machine; "
        "0: onnxruntime's default, one per core)",
    )
    parser.add_argument("--tvm-model-runs", type=int, default=3, help="timed runs of the TVM-compiled model")
    parser.add_argument("--no-tvm-model", dest="tvm_model", action="store_false", help="skip the TVM-compiled model")
    parser.add_argument(
        "--no-tvm-bulk", dest="tvm_bulk", action="store_false", help="skip TVM's uploads and tensors (and its model)"
    )
    parser.add_argument(
        "--only", choices=["empty"], default=None, help="empty: measure the empty call alone (about 30 s with --quick)"
    )
    parser.add_argument("--json", type=Path, default=None, help="where to write the results (default bench/results/)")
    args = parser.parse_args(argv)
    if args.quick:
        args.calls, args.rounds, args.runs, args.reps, args.tvm_reps = 4000, 4, 4, 2, 1
        args.model_runs, args.tvm_model_runs = 30, 1
    report = timed_run(run, args)
    table = rows(report, args)
    report["table"] = [vars(r) for r in table]
    print_table(table)
    write_report(report, args.json, "session")
    return 0


if __name__ == "__main__":
    sys.exit(main())
