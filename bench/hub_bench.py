"""The pool as a service, measured (issue 13): tether's tracker with its journal and web side on against off,
taking turns in one run, under the same load; and how fast the API, the page's data and /metrics answer then.

    python bench/hub_bench.py [--seconds 8] [--rounds 3] [--servers 5000] [--clients 64] [--modes off,on,metrics]
                              [--view-interval 1] [--latency-seconds 10] [--poll-interval 0.02] [--json out.json]

Each mode runs its own tracker process, all at once; the modes take turns, ``--rounds`` times, so that a
machine that gets busier or quieter meanwhile shifts all alike; each number is the median over the rounds.

- ``off``: ``python -m tether tracker`` as it is.
- ``on``: ``python -m tether tracker --db DIR/journal.db --web-port P``: the SQLite journal and the web side
  (page, JSON API, ``/metrics``) (needs the tracker's ``--db`` and ``--web-port``: left out, with a note,
  where the CLI has neither).
- ``metrics``: a tracker with :class:`tether.hub.metrics.TrackerMetrics` attached and ``/metrics`` served by
  :func:`~tether.hub.metrics.serve_metrics` on its loop (this file's ``--serve-metrics-tracker``): the cost of
  the metrics alone.

The load (``bench/loadgen.py``, in processes of their own): ``--servers`` servers registered with each tracker
for the whole run (key ``pool``, idle: what the page, the API and the metrics must list and count), and in
each turn ``--clients`` clients requesting in a loop from as many servers that offer themselves again at once
(key ``loop``; each frame in one send).

1. Grants: each mode's turn measures grants per second, grant latency p50/p99 and the tracker's CPU per
   grant (its whole process: a journal's writer thread included). A mode with a web side has a viewer
   meanwhile: every ``--view-interval`` seconds, ``GET /api/v1/servers?limit=100``, ``GET /api/v1/summary``
   and ``GET /metrics`` (a page left open that refreshes once a second, and a scrape as often). The ratio
   on/off is of these medians; target: within 10 %.
2. Latency: then, for each mode with a web side, the same grant loop for ``--latency-seconds`` while a poller
   asks those endpoints one after the other, ``--poll-interval`` seconds apart, over kept-alive connections
   (far more often than anyone would: enough samples for a p99): p50/p99 per endpoint; target: p99 under
   200 ms.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from benchlib import Proc, machine_info, pct, running, timed_run, write_report  # noqa: E402
from tracker_bench import LOADGEN, UNBOUNDED_PER_PEER, loadgen  # noqa: E402

#: What a page, a dashboard and a scraper ask for, in turn.
ENDPOINTS = ("/api/v1/servers?limit=100", "/api/v1/summary", "/metrics")
GRANTS_TARGET = 0.10  # on within 10 % of off
P99_TARGET_MS = 200.0


def cli_has_hub_flags() -> bool:
    """Whether ``tether tracker`` takes ``--db`` and ``--web-port`` (the journal's and the web side's)."""
    out = subprocess.run(
        [sys.executable, "-m", "tether", "tracker", "--help"], capture_output=True, text=True, timeout=60
    )
    return "--web-port" in out.stdout and "--db" in out.stdout


def free_port() -> int:
    """A port free now on 127.0.0.1 (the tracker binds it a moment later: fine on a bench machine)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Mode:
    name: str
    proc: Proc
    web: str | None  # "host:port" of the HTTP side, None without one
    endpoints: tuple[str, ...]
    pool: subprocess.Popen[str] | None = None
    rounds: list[dict[str, Any]] = field(default_factory=list)
    latency: dict[str, Any] | None = None


@contextlib.contextmanager
def tracker(mode: str, directory: Path) -> Iterator[Mode]:
    """The tracker of ``mode`` (see the module's docstring), stopped after the block."""
    base = [sys.executable, "-m", "tether", "tracker", "--port", "0", "--silent", *UNBOUNDED_PER_PEER]
    if mode == "off":
        with running("tracker (off)", base) as proc:
            yield Mode(mode, proc, None, ())
    elif mode == "on":
        web = free_port()
        argv = [*base, "--db", str(directory / "journal.db"), "--web-port", str(web)]
        with running("tracker (on)", argv) as proc:
            yield Mode(mode, proc, f"127.0.0.1:{web}", ENDPOINTS)
    elif mode == "metrics":
        web = free_port()
        argv = [sys.executable, str(Path(__file__).resolve()), "--serve-metrics-tracker", str(web)]
        with running("tracker (metrics)", argv) as proc:
            yield Mode(mode, proc, f"127.0.0.1:{web}", ("/metrics",))
    else:
        raise SystemExit(f"unknown mode {mode!r}")


def register_pool(mode: Mode, servers: int) -> float:
    """``servers`` idle servers of key ``pool``, registered for the whole run; returns the seconds it took."""
    proc = subprocess.Popen(
        [sys.executable, str(LOADGEN), "register", "127.0.0.1", str(mode.proc.port), "pool", str(servers), "32"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        raise RuntimeError(f"registering {servers} servers with the {mode.name} tracker failed: {proc.wait()}")
    mode.pool = proc
    return float(json.loads(line)["register_s"])


def release_pool(mode: Mode) -> None:
    proc = mode.pool
    if proc is None:
        return
    with contextlib.suppress(OSError):
        assert proc.stdin is not None
        proc.stdin.write("close\n")
        proc.stdin.flush()
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


class Poller(threading.Thread):
    """Asks the mode's endpoints in turn over kept-alive connections until stopped; latencies in ms."""

    def __init__(self, address: str, endpoints: tuple[str, ...], interval_s: float) -> None:
        super().__init__(name="hub-bench-poller", daemon=True)
        host, port = address.rsplit(":", 1)
        self.host, self.port, self.endpoints, self.interval_s = host, int(port), endpoints, interval_s
        self.samples: dict[str, list[float]] = {e: [] for e in endpoints}
        self.errors: dict[str, list[str]] = {e: [] for e in endpoints}
        self.sizes: dict[str, int] = {}
        self._halt = threading.Event()

    def run(self) -> None:
        conns: dict[str, http.client.HTTPConnection] = {}
        try:
            while not self._halt.is_set():
                for path in self.endpoints:
                    conn = conns.get(path)
                    if conn is None:
                        conn = conns[path] = http.client.HTTPConnection(self.host, self.port, timeout=30)
                    start = time.perf_counter()
                    try:
                        conn.request("GET", path)
                        reply = conn.getresponse()
                        body = reply.read()
                    except (OSError, http.client.HTTPException) as exc:
                        self.errors[path].append(f"{type(exc).__name__}: {exc}")
                        conn.close()
                        conns.pop(path, None)
                        continue
                    took = (time.perf_counter() - start) * 1e3
                    if reply.status == 200:
                        self.samples[path].append(took)
                        self.sizes[path] = len(body)
                    else:
                        self.errors[path].append(f"HTTP {reply.status}")
                    if self._halt.wait(self.interval_s):
                        break
        finally:
            for conn in conns.values():
                conn.close()

    def stop(self) -> None:
        self._halt.set()
        self.join(60)


def one_turn(mode: Mode, args: argparse.Namespace, seconds: float, interval_s: float) -> dict[str, Any]:
    """The grant loop for ``seconds``; where there is a web side, a poller asks its endpoints meanwhile,
    ``interval_s`` apart."""
    poller = None
    if mode.web is not None:
        poller = Poller(mode.web, mode.endpoints, interval_s)
        poller.start()
    try:
        res = loadgen(
            "--one-send",
            "grants",
            "127.0.0.1",
            mode.proc.port,
            "loop",
            args.clients,
            args.clients,
            seconds,
            mode.proc.pid,
        )
    finally:
        if poller is not None:
            poller.stop()
    turn: dict[str, Any] = {"grants": res}
    line = (
        f"  {mode.name:8s} {res['grants_per_s']:9.0f} grants/s  p50 {res['p50_ms']:.3f} ms  p99 {res['p99_ms']:.3f} ms"
        f"  tracker CPU {res['tracker_cpu_us_per_grant']:.1f} us/grant"
    )
    if poller is not None:
        turn["http"] = {
            path: {"samples": poller.samples[path], "errors": poller.errors[path][:5], "bytes": poller.sizes.get(path)}
            for path in poller.endpoints
        }
        for path in poller.endpoints:
            got = poller.samples[path]
            if got:
                line += f"\n             GET {path}: p50 {pct(got, 50):.1f} ms  p99 {pct(got, 99):.1f} ms  ({len(got)})"
            if poller.errors[path]:
                line += f"\n             GET {path}: {len(poller.errors[path])} failed, e.g. {poller.errors[path][0]}"
    print(line, flush=True)
    return turn


def summarize(mode: Mode) -> dict[str, Any]:
    """Medians of the grant turns; the latency phase's percentiles per endpoint."""
    out: dict[str, Any] = {
        k: statistics.median(r["grants"][k] for r in mode.rounds)
        for k in ("grants_per_s", "p50_ms", "p99_ms", "tracker_cpu_us_per_grant")
    }
    if mode.latency is not None:
        http_out: dict[str, Any] = {}
        for path in mode.endpoints:
            got = mode.latency["http"][path]
            samples, errors, size = got["samples"], len(got["errors"]), got["bytes"]
            http_out[path] = {
                "requests": len(samples),
                "errors": errors,
                "p50_ms": pct(samples, 50) if samples else None,
                "p99_ms": pct(samples, 99) if samples else None,
                "max_ms": max(samples) if samples else None,
                "bytes": size,
            }
        out["http"] = http_out
        out["latency_phase_grants_per_s"] = mode.latency["grants"]["grants_per_s"]
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    wanted = [m for m in args.modes.split(",") if m]
    notes = []
    if "on" in wanted and not cli_has_hub_flags():
        wanted.remove("on")
        notes.append(
            "`tether tracker` has no --db/--web-port yet (the journal's and the web side's): mode 'on' left out"
        )
        if "metrics" not in wanted:
            wanted.append("metrics")
    for note in notes:
        print(f"note: {note}", flush=True)
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    report: dict[str, Any] = {"machine": machine_info(), "args": settings, "notes": notes, "modes": {}}
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        modes = [stack.enter_context(tracker(name, Path(tmp))) for name in wanted]
        for mode in modes:
            stack.callback(release_pool, mode)
            took = register_pool(mode, args.servers)
            print(f"  {mode.name:8s} {args.servers} servers registered in {took:.1f} s", flush=True)
            report["modes"].setdefault(mode.name, {})["register_s"] = took
        for r in range(args.rounds):
            print(f"grants, round {r + 1} of {args.rounds} (a viewer every {args.view_interval:g} s)", flush=True)
            for mode in modes:
                mode.rounds.append(one_turn(mode, args, args.seconds, args.view_interval))
        for mode in modes:
            if mode.web is not None:
                print(f"latency under load, {mode.name} (requests {args.poll_interval:g} s apart)", flush=True)
                mode.latency = one_turn(mode, args, args.latency_seconds, args.poll_interval)
        for mode in modes:
            report["modes"][mode.name].update(summarize(mode))
            report["modes"][mode.name]["rounds"] = mode.rounds
            report["modes"][mode.name]["latency_phase"] = mode.latency
        db = Path(tmp) / "journal.db"
        if db.exists():
            report["journal_bytes"] = sum(p.stat().st_size for p in Path(tmp).glob("journal.db*"))
    print(f"\nmedians of {args.rounds} rounds, {args.servers} servers registered, {args.clients} clients requesting:")
    results = report["modes"]
    base = results.get("off")
    for name, res in results.items():
        line = (
            f"  {name:8s} {res['grants_per_s']:9.0f} grants/s  p50 {res['p50_ms']:.3f} ms  p99 {res['p99_ms']:.3f} ms"
        )
        line += f"  {res['tracker_cpu_us_per_grant']:.1f} us CPU/grant"
        if base is not None and name != "off":
            ratio = res["grants_per_s"] / base["grants_per_s"]
            report.setdefault("ratios", {})[name] = ratio
            verdict = "within" if abs(1 - ratio) <= GRANTS_TARGET else "NOT within"
            line += f"  x{ratio:.3f} of off ({verdict} {GRANTS_TARGET:.0%})"
        print(line)
        if "http" in res:
            print(f"           latency phase ({res['latency_phase_grants_per_s']:.0f} grants/s meanwhile):")
        for path, h in res.get("http", {}).items():
            if h["p99_ms"] is None:
                print(f"           GET {path}: no answer ({h['errors']} failed)")
                continue
            verdict = "under" if h["p99_ms"] < P99_TARGET_MS else "NOT under"
            print(
                f"           GET {path}: p50 {h['p50_ms']:.1f} ms  p99 {h['p99_ms']:.1f} ms  max {h['max_ms']:.1f} ms"
                f"  ({h['requests']} requests, {h['errors']} failed, {h['bytes']} bytes; p99 {verdict} {P99_TARGET_MS:.0f} ms)"
            )
    if "journal_bytes" in report:
        print(f"  journal: {report['journal_bytes'] / 1e6:.1f} MB after the run")
    return report


# -- the tracker of mode "metrics" (a process of its own) ----------------------------------------


def serve_metrics_tracker(web_port: int) -> None:
    """A tracker on 127.0.0.1, any port, with :class:`TrackerMetrics` attached and ``/metrics`` on
    ``web_port``; bounds per peer off as for the other modes (every peer of the bench is on loopback)."""
    import asyncio
    import signal

    from tether.hub.metrics import TrackerMetrics, serve_metrics
    from tether.tracker import TrackerConfig, TrackerServer

    async def main() -> None:
        config = TrackerConfig(
            host="127.0.0.1", port=0, max_connections_per_peer=0, max_slots_per_peer=0, max_waiters_per_peer=0
        )
        server = TrackerServer(config)
        await server.start()
        metrics = TrackerMetrics(server.core)
        metrics.attach()
        metrics.start()
        web = await serve_metrics(metrics, "127.0.0.1", web_port)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, server.stop)
        print(f"listening on {server.address}", flush=True)
        print(f"metrics on http://127.0.0.1:{web.port}/metrics", flush=True)
        try:
            await server.serve_until_stopped()
        finally:
            metrics.close()
            await web.close()

    asyncio.run(main())


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--serve-metrics-tracker"]:
        serve_metrics_tracker(int(argv[1]))
        return 0
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=8.0, help="measured seconds of each turn")
    parser.add_argument("--rounds", type=int, default=3, help="turns each mode takes")
    parser.add_argument("--servers", type=int, default=5000, help="idle servers registered with each tracker")
    parser.add_argument("--clients", type=int, default=64, help="clients requesting in a loop (and their servers)")
    parser.add_argument("--modes", default="off,on,metrics", help="comma-separated: off, on, metrics")
    parser.add_argument(
        "--view-interval", type=float, default=1.0, help="seconds between a viewer's requests in the grant turns"
    )
    parser.add_argument("--latency-seconds", type=float, default=10.0, help="seconds of the latency phase per mode")
    parser.add_argument(
        "--poll-interval", type=float, default=0.02, help="seconds between the poller's requests (latency phase)"
    )
    parser.add_argument("--json", type=Path, default=None, help="write every number here")
    args = parser.parse_args(argv)
    # the trackers run as `python -m tether`: this checkout's tether, whatever else is installed
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE.parent / "src"), os.environ.get("PYTHONPATH")]))
    write_report(timed_run(run, args), args.json, "hub_bench")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
