"""TVM's tracker against tether's, side by side, with the same load, in one run.

    python bench/tracker_bench.py [--seconds 3] [--servers 5000] [--json out.json]

Both trackers run as their own processes (TVM's: ``tvm.rpc.tracker.Tracker``, whose serving process is
a PopenWorker child; tether's: ``python -m tether tracker``). The load comes from ``bench/loadgen.py``
in another process, framing like TVM's Python peers (length and body in two sends, no TCP_NODELAY);
two more scenarios send each frame in one write, as tether's own client does.

Measured: grants/s and grant latency (p50/p99) at 1 client x 1 server, 16x16, 64x64 and 64 clients on 16
servers; tracker CPU per grant; a stock TVM client's request-to-first-call through each tracker (and a
direct session as the floor); 1,000 connects with 100 in flight; 5,000 registered servers (time to
register, tracker RSS, SUMMARY latency, teardown: one registration at a time for both, since TVM's
listen backlog of 1 turns concurrent connects into SYN retries; and 32 at a time for tether); a large
pool of 10,000 servers and 10,000 waiting requests (SUMMARY latency and size; tether's detailed one too);
tracker RSS before and after all the grants.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
LOADGEN = HERE / "loadgen.py"
SCENARIOS = [
    ("1 client x 1 server", 1, 1),
    ("16 x 16", 16, 16),
    ("64 x 64", 64, 64),
    ("64 clients x 16 servers", 64, 16),
]
#: Every peer of the bench is on loopback: 10,000 servers and 10,000 waiters from one address are more than
#: tether's tracker takes from one peer by default (TVM's has no such limits).
UNBOUNDED_PER_PEER = ["--max-connections-per-peer", "0", "--max-slots-per-peer", "0", "--max-waiters-per-peer", "0"]
#: The same load with every frame in one send (tether's own client, and what a tuned peer does).
ONE_SEND = [("64 x 64, one send per frame", 64, 64), ("1 x 1, one send per frame", 1, 1)]


@dataclass
class TrackerProc:
    name: str
    proc: subprocess.Popen[str]
    port: int
    serving_pid: int

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.serving_pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def cpu_s(self) -> float:
        fields = Path(f"/proc/{self.serving_pid}/stat").read_text().rsplit(")", 1)[1].split()
        import os

        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _read_port(proc: subprocess.Popen[str]) -> int:
    assert proc.stdout is not None
    for line in proc.stdout:
        if "listening on " in line:
            return int(line.rsplit(":", 1)[1])
    raise RuntimeError(f"tracker exited with {proc.wait()} before listening")


@contextlib.contextmanager
def tether_tracker() -> Iterator[TrackerProc]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "tether", "tracker", "--port", "0", "--silent", *UNBOUNDED_PER_PEER],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        port = _read_port(proc)
        yield TrackerProc("tether", proc, port, proc.pid)
    finally:
        proc.terminate()
        proc.wait(10)


@contextlib.contextmanager
def tvm_tracker() -> Iterator[TrackerProc]:
    import psutil

    base = random.randint(20000, 50000)
    code = (
        "from tvm.rpc.tracker import Tracker\n"
        f"t = Tracker('127.0.0.1', port={base}, port_end={base + 500}, silent=True)\n"
        "print('listening on 127.0.0.1:%d' % t.port, flush=True)\n"
        "import sys; sys.stdin.readline(); t.terminate()\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stdin=subprocess.PIPE, text=True)
    try:
        port = _read_port(proc)
        (child,) = psutil.Process(proc.pid).children()
        yield TrackerProc("tvm", proc, port, child.pid)
    finally:
        with contextlib.suppress(BrokenPipeError):
            assert proc.stdin is not None
            proc.stdin.write("\n")
            proc.stdin.flush()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def loadgen(*args: Any, timeout: float = 600) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, str(LOADGEN), *map(str, args)], capture_output=True, text=True, timeout=timeout
    )
    if out.returncode != 0:
        raise RuntimeError(f"loadgen {args} failed: {out.stderr[-2000:]}")
    return json.loads(out.stdout.splitlines()[-1])  # type: ignore[no-any-return]


def bench_grants(tracker: TrackerProc, seconds: float) -> dict[str, dict[str, Any]]:
    results = {}
    for label, clients, servers in SCENARIOS + ONE_SEND:
        key = f"bench-{clients}x{servers}-{random.random():.6f}"
        mode = ["--one-send"] if "one send" in label else []
        res = loadgen(*mode, "grants", "127.0.0.1", tracker.port, key, clients, servers, seconds, tracker.serving_pid)
        res["cpu_us_per_grant"] = res["tracker_cpu_us_per_grant"]
        results[label] = res
        print(
            f"  {tracker.name:6s} {label:24s} {res['grants_per_s']:10.0f} grants/s  p50 {res['p50_ms']:.3f} ms  p99 {res['p99_ms']:.3f} ms",
            flush=True,
        )
    return results


def bench_first_call(tracker: TrackerProc, runs: int) -> dict[str, float]:
    """A stock TVM client: connect_tracker -> request -> first remote call, against a real TVM server."""
    from tvm import rpc

    base = random.randint(20000, 50000)
    key = f"rtfc{random.randint(0, 10**6)}"
    server = rpc.Server(
        host="127.0.0.1", port=base, port_end=base + 500, tracker_addr=("127.0.0.1", tracker.port), key=key, silent=True
    )
    try:
        request_ms, total_ms = [], []
        for _ in range(runs + 1):
            _wait_free(tracker.port, key)
            gc.collect()
            t0 = time.perf_counter()
            client = rpc.connect_tracker("127.0.0.1", tracker.port)
            sess = client.request(key)
            t1 = time.perf_counter()
            assert sess.get_function("rpc.test.addone")(1) == 2
            t2 = time.perf_counter()
            request_ms.append((t1 - t0) * 1e3)
            total_ms.append((t2 - t0) * 1e3)
            del sess
            client.close()
            gc.collect()
        # the first run pays one-time costs (imports in the server's worker); report the rest
        return {"request_ms": statistics.median(request_ms[1:]), "first_call_ms": statistics.median(total_ms[1:])}
    finally:
        server.terminate()


def bench_direct_session(runs: int) -> float:
    from tvm import rpc

    base = random.randint(20000, 50000)
    server = rpc.Server(host="127.0.0.1", port=base, port_end=base + 500, key="", silent=True)
    try:
        times = []
        for _ in range(runs + 1):
            t0 = time.perf_counter()
            sess = rpc.connect("127.0.0.1", server.port)
            assert sess.get_function("rpc.test.addone")(1) == 2
            times.append((time.perf_counter() - t0) * 1e3)
            del sess
            gc.collect()
            time.sleep(0.05)  # the TVM server serves one session at a time; let it return to accept()
        return statistics.median(times[1:])
    finally:
        server.terminate()


def _wait_free(port: int, key: str, timeout: float = 30) -> None:
    from tether.client.tracker import TrackerClient

    deadline = time.monotonic() + timeout
    with TrackerClient.connect("127.0.0.1", port) as client:
        while client.summary()["queue_info"].get(key, {}).get("free", 0) < 1:
            if time.monotonic() > deadline:
                raise RuntimeError(f"server for {key} not free within {timeout} s")
            time.sleep(0.005)


def bench_servers(tracker: TrackerProc, nservers: int, in_flight: int) -> dict[str, float]:
    from tether.client.tracker import TrackerClient

    key = f"many{random.randint(0, 10**6)}"
    rss0 = tracker.rss_mb()
    proc = subprocess.Popen(
        [sys.executable, str(LOADGEN), "register", "127.0.0.1", str(tracker.port), key, str(nservers), str(in_flight)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None and proc.stdin is not None
    registered = json.loads(proc.stdout.readline())
    rss1 = tracker.rss_mb()
    with TrackerClient.connect("127.0.0.1", tracker.port) as client:
        assert client.summary()["queue_info"][key]["free"] == nservers
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            client.summary()
            times.append((time.perf_counter() - t0) * 1e3)
        t0 = time.perf_counter()
        proc.stdin.write("close\n")
        proc.stdin.flush()
        while client.summary()["queue_info"].get(key, {}).get("free", 0) > 0:
            time.sleep(0.01)
        teardown = time.perf_counter() - t0
    proc.wait(60)
    return {
        "register_s": registered["register_s"],
        "rss_mb": rss1,
        "rss_growth_mb": rss1 - rss0,
        "summary_ms": statistics.median(times),
        "teardown_s": teardown,
    }


def bench_large_pool(tracker: TrackerProc, nservers: int, nwaiters: int) -> dict[str, float]:
    """``nservers`` registered servers and ``nwaiters`` waiting requests at once; SUMMARY's latency (plain,
    and tether's detailed one) and reply size, as a client sees them (median of 5)."""
    from tether.client.tracker import TrackerClient

    key = f"pool{random.randint(0, 10**6)}"
    cmd = [sys.executable, str(LOADGEN)]
    in_flight = "32" if tracker.name == "tether" else "1"  # TVM's listen backlog of 1: one at a time
    servers = subprocess.Popen(
        [*cmd, "register", "127.0.0.1", str(tracker.port), key, str(nservers), in_flight],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    waiting = subprocess.Popen(
        [*cmd, "waiters", "127.0.0.1", str(tracker.port), key + "-nobody", str(nwaiters), "100"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    out: dict[str, float] = {}
    try:
        for proc in (servers, waiting):
            assert proc.stdout is not None
            json.loads(proc.stdout.readline())
        with TrackerClient.connect("127.0.0.1", tracker.port, timeout=60) as client:
            deadline = time.monotonic() + 120
            while client.summary(timeout=60)["queue_info"].get(key + "-nobody", {}).get("pending", 0) < nwaiters:
                if time.monotonic() > deadline:
                    raise RuntimeError("the waiting requests did not all arrive")
                time.sleep(0.05)
            for detail in (False, True) if tracker.name == "tether" else (False,):
                times, size = [], 0
                for _ in range(5):
                    t0 = time.perf_counter()
                    reply = client.summary(detail=detail, timeout=60)
                    times.append((time.perf_counter() - t0) * 1e3)
                    if not size:
                        size = len(json.dumps(reply))
                    time.sleep(0.3)  # past tether's reuse window: every SUMMARY is computed afresh
                name = "detail" if detail else "plain"
                out[f"summary_{name}_ms"] = statistics.median(times)
                out[f"summary_{name}_mb"] = size / 1e6
    finally:
        for proc in (servers, waiting):
            if proc.stdin is not None:
                with contextlib.suppress(OSError):
                    proc.stdin.write("close\n")
                    proc.stdin.flush()
            proc.wait(60)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=3.0, help="measured seconds per grant scenario")
    parser.add_argument("--servers", type=int, default=5000, help="servers registered at once")
    parser.add_argument("--runs", type=int, default=10, help="request-to-first-call repetitions")
    parser.add_argument("--pool", type=int, default=10_000, help="servers and waiting requests of the large pool")
    parser.add_argument("--json", type=Path, default=None, help="write all numbers here")
    args = parser.parse_args(argv)

    report: dict[str, dict[str, Any]] = {}
    for name, factory in (("tvm", tvm_tracker), ("tether", tether_tracker)):
        print(f"== {name} tracker", flush=True)
        with factory() as tracker:
            r: dict[str, Any] = {}
            r["rss_start_mb"] = tracker.rss_mb()
            r["grants"] = bench_grants(tracker, args.seconds)
            r["rss_after_grants_mb"] = tracker.rss_mb()
            r["first_call"] = bench_first_call(tracker, args.runs)
            print(f"  {name:6s} request-to-first-call {r['first_call']['first_call_ms']:.1f} ms", flush=True)
            r["burst"] = loadgen("burst", "127.0.0.1", tracker.port, 1000, 100)
            print(f"  {name:6s} burst: {r['burst']['failed']} of 1000 connects failed", flush=True)
            r["servers"] = bench_servers(tracker, args.servers, 1)
            print(f"  {name:6s} {args.servers} servers, one at a time: {r['servers']}", flush=True)
            if name == "tether":  # TVM's listen backlog of 1 turns concurrent connects into SYN retries
                r["servers_concurrent"] = bench_servers(tracker, args.servers, 32)
                print(f"  {name:6s} {args.servers} servers, 32 at a time: {r['servers_concurrent']}", flush=True)
            r["pool"] = bench_large_pool(tracker, args.pool, args.pool)
            print(f"  {name:6s} {args.pool} servers + {args.pool} waiters: {r['pool']}", flush=True)
            report[name] = r
    report["direct"] = {"session_ms": bench_direct_session(args.runs)}

    tvm, tether = report["tvm"], report["tether"]
    rows: list[tuple[str, float, float, str]] = []
    for label, _, _ in SCENARIOS + ONE_SEND:
        a, b = tvm["grants"][label], tether["grants"][label]
        rows.append((f"grants/s, {label}", a["grants_per_s"], b["grants_per_s"], "higher"))
        rows.append((f"  p50 ms, {label}", a["p50_ms"], b["p50_ms"], "lower"))
        rows.append((f"  p99 ms, {label}", a["p99_ms"], b["p99_ms"], "lower"))
        rows.append((f"  tracker CPU us/grant, {label}", a["cpu_us_per_grant"], b["cpu_us_per_grant"], "lower"))
    rows.append(("TVM client request ms", tvm["first_call"]["request_ms"], tether["first_call"]["request_ms"], "lower"))
    rows.append(
        (
            "TVM client request-to-first-call ms",
            tvm["first_call"]["first_call_ms"],
            tether["first_call"]["first_call_ms"],
            "lower",
        )
    )
    rows.append(("burst: failed of 1000 connects", tvm["burst"]["failed"], tether["burst"]["failed"], "lower"))
    rows.append(("burst: seconds for 1000", tvm["burst"]["seconds"], tether["burst"]["seconds"], "lower"))
    for field, better in (
        ("register_s", "lower"),
        ("rss_mb", "lower"),
        ("rss_growth_mb", "lower"),
        ("summary_ms", "lower"),
        ("teardown_s", "lower"),
    ):
        rows.append(
            (f"{args.servers} servers (1 at a time): {field}", tvm["servers"][field], tether["servers"][field], better)
        )
    for field in ("summary_plain_ms", "summary_plain_mb"):
        rows.append(
            (f"{args.pool} servers + {args.pool} waiters: {field}", tvm["pool"][field], tether["pool"][field], "lower")
        )
    rows.append(("RSS MB before grants", tvm["rss_start_mb"], tether["rss_start_mb"], "lower"))
    rows.append(("RSS MB after all grants", tvm["rss_after_grants_mb"], tether["rss_after_grants_mb"], "lower"))

    print()
    print(f"{'metric':48s} {'TVM 0.27':>12s} {'tether':>12s} {'tether vs TVM':>14s}")
    for label, a, b, better in rows:
        if better == "higher":
            ratio = f"{b / a:.1f}x" if a else "inf"
        else:
            ratio = f"{a / b:.1f}x better" if b else ("same" if not a else "inf")
        print(f"{label:48s} {a:12.3f} {b:12.3f} {ratio:>14s}")
    print(f"{'direct TVM session (floor), first call ms':48s} {report['direct']['session_ms']:12.3f}")
    conc = tether["servers_concurrent"]
    print(
        f"tether, {args.servers} servers 32 at a time: registered in {conc['register_s']:.2f} s, RSS {conc['rss_mb']:.1f} MB, "
        f"SUMMARY {conc['summary_ms']:.1f} ms, teardown {conc['teardown_s']:.2f} s"
    )
    pool = tether["pool"]
    print(
        f"tether, {args.pool} servers + {args.pool} waiters: detailed SUMMARY (what tether query reads) "
        f"{pool['summary_detail_ms']:.1f} ms, {pool['summary_detail_mb']:.1f} MB"
    )
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
