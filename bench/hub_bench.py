"""The pool as a service, measured (issue 13): tether's tracker with its journal and web side on against off,
taking turns in one run, under the same load; and how fast the API, the page's data and /metrics answer then.

    python bench/hub_bench.py [--seconds 6] [--rounds 3] [--servers 5000] [--clients 64] [--modes off,on,metrics]
                              [--view-interval 1] [--latency-seconds 10] [--poll-interval 0.02]
                              [--attribution 10000] [--json out.json]

Each mode runs its own tracker process, all at once; the modes take turns, ``--rounds`` times, so that a
machine that gets busier or quieter meanwhile shifts all alike; each number is the median over the rounds.

- ``off``: ``python -m tether tracker`` as it is.
- ``on``: ``python -m tether tracker --db DIR/journal.db --web-port P``: the SQLite journal and the web side
  (page, JSON API, ``/metrics``) (needs the tracker's ``--db`` and ``--web-port``: left out, with a note,
  where the CLI has neither).
- ``web``: ``--web-port P`` alone (page, API, ``/metrics``); ``journal``: ``--db DIR/journal.db`` alone: which
  of the two costs what.
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
3. Attribution (``--attribution N``): N grant cycles through the core alone, in this process, no sockets,
   with nothing subscribed to its events, a subscriber that does nothing (the events' own cost), the
   metrics, the hub's history and event streams, the journal (its writer thread's CPU included): where the
   CPU of a grant goes, steadier than the runs above on a shared machine.

The ratio on/off is each round's ratio (the modes ran side by side), then their median; the tracker's CPU
per grant is compared the same way.
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

import psutil

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "src"))  # this checkout's tether (the attribution runs it in this process)

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
    elif mode == "web":
        web = free_port()
        with running("tracker (web)", [*base, "--web-port", str(web)]) as proc:
            yield Mode(mode, proc, f"127.0.0.1:{web}", ENDPOINTS)
    elif mode == "journal":
        with running("tracker (journal)", [*base, "--db", str(directory / "journal.db")]) as proc:
            yield Mode(mode, proc, None, ())
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
    helpers_before = _helpers_cpu_s(mode.proc.pid)
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
    res["helpers_cpu_us_per_grant"] = (_helpers_cpu_s(mode.proc.pid) - helpers_before) / max(res["grants"], 1) * 1e6
    turn: dict[str, Any] = {"grants": res}
    line = (
        f"  {mode.name:8s} {res['grants_per_s']:9.0f} grants/s  p50 {res['p50_ms']:.3f} ms  p99 {res['p99_ms']:.3f} ms"
        f"  tracker CPU {res['tracker_cpu_us_per_grant']:.1f} us/grant"
    )
    if res["helpers_cpu_us_per_grant"]:
        line += f" (+ {res['helpers_cpu_us_per_grant']:.1f} in its journal's writer process)"
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


def _helpers_cpu_s(pid: int) -> float:
    """CPU seconds (user + system) of the tracker's child processes (its journal's writer) so far."""
    total = 0.0
    with contextlib.suppress(psutil.Error):
        for child in psutil.Process(pid).children(recursive=True):
            with contextlib.suppress(psutil.Error):
                times = child.cpu_times()
                total += times.user + times.system
    return total


def summarize(mode: Mode) -> dict[str, Any]:
    """Medians of the grant turns; the latency phase's percentiles per endpoint."""
    out: dict[str, Any] = {
        k: statistics.median(r["grants"][k] for r in mode.rounds)
        for k in ("grants_per_s", "p50_ms", "p99_ms", "tracker_cpu_us_per_grant", "helpers_cpu_us_per_grant")
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
        if res["helpers_cpu_us_per_grant"]:
            line += f" (+ {res['helpers_cpu_us_per_grant']:.1f} us in the journal's writer process)"
        if base is not None and name != "off":
            # each round's ratio against off in that round (they ran side by side), then the median
            pairs = [
                (on["grants"]["grants_per_s"] / off["grants"]["grants_per_s"],
                 on["grants"]["tracker_cpu_us_per_grant"] / off["grants"]["tracker_cpu_us_per_grant"])
                for on, off in zip(res["rounds"], base["rounds"], strict=True)
            ]  # fmt: skip
            ratio = statistics.median(p[0] for p in pairs)
            cpu = statistics.median(p[1] for p in pairs)
            report.setdefault("ratios", {})[name] = {"grants_per_s": ratio, "cpu_per_grant": cpu, "rounds": pairs}
            verdict = "within" if 1 - ratio <= GRANTS_TARGET else "NOT within"
            spread = f"{min(p[0] for p in pairs):.2f}..{max(p[0] for p in pairs):.2f}"
            line += f"\n           x{ratio:.3f} the grants/s of off (rounds {spread}; {verdict} {GRANTS_TARGET:.0%}),"
            line += f" x{cpu:.2f} its CPU per grant"
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
    if args.attribution:
        report["attribution"] = attribution(args.attribution, 3)
    return report


# -- where the CPU goes, in this process -------------------------------------------------------


class _Link:
    __slots__ = ("last",)

    def __init__(self) -> None:
        self.last = b""

    def send(self, data: bytes) -> None:
        self.last = data

    def close(self) -> None:
        pass


def _room(core: Any, room: str, directory: Path) -> Any:
    """Subscribe ``room`` to ``core.events``; returns what must be flushed and closed after (a journal)."""
    if room == "events":  # a subscriber that does nothing: what building the events costs the core
        core.events.subscribe(lambda event: None)
    elif room == "metrics":
        from tether.hub.metrics import TrackerMetrics

        TrackerMetrics(core).attach()
    elif room == "hub":
        from tether.hub.history import History
        from tether.hub.stream import EventStreams

        history, streams = History(1000), EventStreams(64, 256)
        core.events.subscribe(history.on_event)
        core.events.subscribe(streams.on_event)
    elif room == "journal":
        from tether.journal.writer import Journal

        journal = Journal(directory / f"attribution-{time.monotonic_ns()}.db")
        journal.attach(core.events)
        return journal
    return None


def _cycle_cost(room: str, n: int, directory: Path) -> float:
    """CPU microseconds (this process, every thread) per grant cycle: a REQUEST granted at once, then the
    server's PUT of a fresh slot (its session over), through the core alone (no sockets), 64 servers."""
    from tether.protocol.tracker import Put, Request, UpdateInfo
    from tether.tracker import TrackerConfig, TrackerCore

    core = TrackerCore(TrackerConfig(max_slots_per_peer=0, max_waiters_per_peer=0, max_connections_per_peer=0))
    closing = _room(core, room, directory)
    servers = {}
    for i in range(64):
        conn = core.connect(_Link(), "127.0.0.1", 10000 + i)
        core.receive(conn, UpdateInfo({"key": "server:loop", "addr": [None, 9000 + i]}))
        core.receive(conn, Put("loop", 9000 + i, f"m{i}-0"))
        servers[9000 + i] = conn
    client = core.connect(_Link(), "127.0.0.1", 2)
    link = client.link
    assert isinstance(link, _Link)
    start = time.process_time()
    for k in range(n):
        core.receive(client, Request("loop", "u", 1, None))
        port = json.loads(link.last[4:])[1][1]
        core.receive(servers[port], Put("loop", port, f"m{port}-{k + 1}"))
    if closing is not None:
        closing.flush(120)  # what the journal's thread still had to write counts too
    took = (time.process_time() - start) / n * 1e6
    if closing is not None:
        closing.close()
    return took


def attribution(n: int, reps: int) -> dict[str, float]:
    """Per grant cycle, the core's CPU alone and with each room beside it (minimum of ``reps`` runs of
    ``n`` cycles, the rooms taking turns): the noise of a shared machine mostly adds, so the minimum is the
    cost. Rooms whose modules are missing (the hub's, the journal's, before they are merged) are left out."""
    rooms = ["none", "events", "metrics", "hub", "journal"]
    runs: dict[str, list[float]] = {room: [] for room in rooms}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(reps):
            for room in list(runs):
                try:
                    runs[room].append(_cycle_cost(room, n, Path(tmp)))
                except ImportError as exc:
                    print(f"  attribution: {room} left out ({exc})", flush=True)
                    del runs[room]
    cost = {room: min(v) for room, v in runs.items()}
    base = cost["none"]
    print(f"\nCPU per grant cycle in one process, no sockets (min of {reps} x {n}):")
    for room, us in cost.items():
        extra = "" if room == "none" else f"  ({us - base:+.1f} us, x{us / base:.2f})"
        print(f"  {room:8s} {us:7.1f} us{extra}")
    return cost


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
    parser.add_argument("--seconds", type=float, default=6.0, help="measured seconds of each turn")
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
    parser.add_argument(
        "--attribution",
        type=int,
        default=10000,
        metavar="N",
        help="then N grant cycles through the core alone with each room subscribed (0: skip)",
    )
    parser.add_argument("--json", type=Path, default=None, help="write every number here")
    args = parser.parse_args(argv)
    # the trackers run as `python -m tether`: this checkout's tether, whatever else is installed
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE.parent / "src"), os.environ.get("PYTHONPATH")]))
    write_report(timed_run(run, args), args.json, "hub_bench")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
