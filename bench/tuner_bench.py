"""An auto-tuner's real throughput (candidates measured per second) through three stacks, in one run.

    python bench/tuner_bench.py [--quick] [--candidates 6] [--rounds 5] [--json out.json]

The same prebuilt candidates (a 128x128 float32 matmul ``main``, tiled a few ways with
``tvm.s_tir.Schedule``, compiled for llvm and exported once, before any stack starts) are measured with the
same evaluator settings, on two device servers per stack:

(a) TVM's tracker (``python -m tvm.exec.rpc_tracker``) + two ``python -m tvm.exec.rpc_server`` +
    meta_schedule's ``RPCRunner(max_workers=2)``: the reference;
(b) tether's tracker + the same two kinds of TVM servers + ``RPCRunner(max_workers=2)``;
(c) tether's tracker + two tether servers (``python -m tether server``, workers preloading the runtimes)
    + tether's ``TetherRunner(max_workers=2)``.

All three stacks run for the whole bench (distinct trackers and keys; idle servers cost nothing). Per
evaluator settings, each stack gets a fresh runner and one warm-up ``run()`` of every candidate (reported
as "cold"), then ``--rounds`` timed rounds, ``[f.result() for f in runner.run(inputs)]`` each, the stacks
taking turns (a, b, c, then c, b, a, ...) so that drift of the machine hits all alike. Before every round
the stack's tracker must list both of its servers free and the servers (with their descendants) must be
quiet for 0.1 s: rounds never overlap, and neither do one stack's leftovers (a TVM session process exiting,
a tether worker started ahead) and another's round. The waits are recorded, not timed.

Evaluator settings: ``--number 2 --repeat 3 --min-repeat-ms 0`` (``--cache-flush`` to flush), then, unless
``--quick``, meta_schedule's defaults ``EvaluatorConfig()`` (number 3, repeat 1, min_repeat_ms 100).

Reported per stack and settings: the cold round, every round, the median round, candidates/s (N / median
round), errors (the first message printed); throughput of (b) and (c) relative to (a); and what measuring
itself takes: "floor s", per candidate its median ``run_secs`` t, ``repeat x max(number x t, min_repeat_ms)
+ t`` (the +t is time_evaluator's warm-up call; growing ``number`` to reach ``min_repeat_ms`` costs more, so
this is a lower bound), summed over the candidates and halved for the two devices; and "measuring alone",
after the rounds: each library timed in this process as RPCRunner's ``run_evaluator_common`` does, the
calls' wall time summed and halved. Then where (a)'s time goes, and (b)'s for comparison (the same servers and client, tether's
tracker): RPCRunner's own worker function run in this process, one candidate at a time, under
meta_schedule's ``Profiler`` (connect to the tracker, request a server, upload and load, allocate arguments,
evaluate, clean up).

``--fresh-artifacts`` gives every round byte-distinct copies of the libraries (a few random bytes appended,
which the loader ignores), as a tuner's candidates always are; by default the same files are measured every
round, so a content-addressed cache on the device (tether's server has one) can skip uploads after the cold
round.

Prints a table and writes every number to bench/results/tuner-<timestamp>.json. About 1.5 minutes on 2
cores; ``--quick`` (3 rounds, first settings only) well under a minute.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import benchlib
from benchlib import Proc, machine_info, timed_run, write_report

HOST = "127.0.0.1"
N = 128
#: Distinct tilings of i and j (None: the plain loop nest); --candidates beyond these repeats the list.
TILES: list[tuple[int, int] | None] = [
    None,
    (8, 8),
    (16, 16),
    (32, 32),
    (8, 32),
    (32, 8),
    (4, 32),
    (16, 64),
    (64, 16),
    (4, 8),
    (2, 16),
    (64, 64),
]
STACKS = {
    "a": "(a) TVM tracker + TVM servers + RPCRunner",
    "b": "(b) tether tracker + TVM servers + RPCRunner",
    "c": "(c) tether tracker + tether servers + TetherRunner",
}
SERVERS = 2
WORKERS = 2


# -- candidates ----------------------------------------------------------------------------------


@dataclass
class Candidates:
    names: list[str]
    paths: list[Path]
    args_info: list[Any]

    def inputs(self, paths: list[Path] | None = None) -> list[Any]:
        from tvm.s_tir.meta_schedule.runner import RunnerInput

        return [RunnerInput(str(p), "cpu", self.args_info) for p in paths or self.paths]

    def fresh_copies(self, folder: Path) -> list[Path]:
        """Byte-distinct copies (same names, random bytes appended): no content cache can know them."""
        folder.mkdir(parents=True)
        out = []
        for path in self.paths:
            copy = folder / path.name
            shutil.copyfile(path, copy)
            with copy.open("ab") as f:
                f.write(os.urandom(16))
            out.append(copy)
        return out


def build_candidates(count: int, folder: Path) -> Candidates:
    """``count`` variants of ``main`` (C = A @ B, 128x128 float32) for llvm, each an exported library."""
    import tvm
    from tvm import te
    from tvm.s_tir import Schedule
    from tvm.s_tir.meta_schedule.arg_info import ArgInfo

    a = te.placeholder((N, N), name="A", dtype="float32")
    b = te.placeholder((N, N), name="B", dtype="float32")
    k = te.reduce_axis((0, N), name="k")
    c = te.compute((N, N), lambda i, j: te.sum(a[i, k] * b[k, j], axis=k), name="C")
    func = te.create_prim_func([a, b, c])
    args_info = list(ArgInfo.from_prim_func(func))
    built: dict[tuple[int, int] | None, Path] = {}
    names, paths = [], []
    for index in range(count):
        tile = TILES[index % len(TILES)]
        name = "plain" if tile is None else f"{tile[0]}x{tile[1]}"
        if tile not in built:
            sch = Schedule(tvm.IRModule({"main": func}))
            if tile is not None:
                i, j, kk = sch.get_loops(sch.get_sblock("C"))
                io, ii = sch.split(i, [None, tile[0]])
                jo, ji = sch.split(j, [None, tile[1]])
                sch.reorder(io, jo, kk, ii, ji)
                sch.vectorize(ji)
            lib = tvm.compile(sch.mod, target={"kind": "llvm"})
            built[tile] = folder / f"matmul_{name}.so"
            lib.export_library(str(built[tile]))
        names.append(name)
        paths.append(built[tile])
    return Candidates(names, paths, args_info)


# -- the stacks ----------------------------------------------------------------------------------


@dataclass
class Stack:
    name: str
    tracker: Proc
    servers: list[Proc]
    key: str

    @property
    def pids(self) -> list[int]:
        return [self.tracker.pid, *(s.pid for s in self.servers)]


def tvm_ports() -> list[str]:
    """A port range for a TVM tracker or server, which cannot bind port 0: it tries each until one binds."""
    base = random.randint(20000, 30000)
    return ["--port", str(base), "--port-end", str(base + 500)]


def tvm_tracker_argv() -> list[str]:
    return [sys.executable, "-m", "tvm.exec.rpc_tracker", "--host", HOST, *tvm_ports()]


def tether_tracker_argv() -> list[str]:
    return [sys.executable, "-m", "tether", "tracker", "--host", HOST, "--port", "0", "--silent"]


def tvm_server_argv(tracker: int, key: str) -> list[str]:
    argv = [sys.executable, "-m", "tvm.exec.rpc_server", "--host", HOST, *tvm_ports()]
    return [*argv, "--tracker", f"{HOST}:{tracker}", "--key", key]


def tether_server_argv(tracker: int, key: str) -> list[str]:
    argv = [sys.executable, "-m", "tether", "server", "--host", HOST, "--port", "0"]
    return [*argv, "--tracker", f"{HOST}:{tracker}", "--key", key]


def start_all(exits: contextlib.ExitStack, named: list[tuple[str, list[str]]]) -> list[Proc]:
    """Start the servers at once (each imports its runtime for seconds); every one that started is stopped by
    ``exits``, also when another failed."""
    with ThreadPoolExecutor(len(named)) as pool:
        futures = [pool.submit(benchlib.start_server, name, argv, 120) for name, argv in named]
    procs, errors = [], []
    for future in futures:
        try:
            proc = future.result()
        except RuntimeError as exc:
            errors.append(exc)
            continue
        exits.callback(benchlib.stop_group, proc.proc)
        procs.append(proc)
    if errors:
        raise errors[0]
    return procs


def start_stacks(exits: contextlib.ExitStack) -> dict[str, Stack]:
    suffix = f"{os.getpid()}"
    keys = {s: f"tuner-{s}-{suffix}" for s in STACKS}
    named = [("TVM tracker", tvm_tracker_argv())]
    named += [(f"tether tracker {s}", tether_tracker_argv()) for s in ("b", "c")]
    trackers = start_all(exits, named)
    ports = {s: t.port for s, t in zip(STACKS, trackers, strict=True)}
    named = []
    for s in STACKS:
        argv = tether_server_argv if s == "c" else tvm_server_argv
        named += [(f"server {s}{i}", argv(ports[s], keys[s])) for i in range(SERVERS)]
    servers = start_all(exits, named)
    stacks = {}
    for index, s in enumerate(STACKS):
        stacks[s] = Stack(s, trackers[index], servers[index * SERVERS : (index + 1) * SERVERS], keys[s])
    return stacks


def wait_free(stack: Stack, timeout: float = 60) -> float:
    """Until the stack's tracker lists both servers free, read with TVM's client (both trackers answer its
    summary); seconds waited, which include the summaries' own latency (TVM's tracker: about 90 ms each)."""
    from tvm import rpc

    start = time.monotonic()
    tracker = rpc.connect_tracker(HOST, stack.tracker.port)
    try:
        while tracker.summary()["queue_info"].get(stack.key, {}).get("free", 0) < SERVERS:
            if time.monotonic() - start > timeout:
                raise RuntimeError(f"{stack.name}: {SERVERS} servers not free within {timeout} s")
            time.sleep(0.005)
    finally:
        tracker.close()
    return time.monotonic() - start


def cpu_seconds(pids: list[int]) -> float:
    import psutil

    total = 0.0
    for pid in pids:
        with contextlib.suppress(psutil.NoSuchProcess):
            root = psutil.Process(pid)
            for proc in [root, *root.children(recursive=True)]:
                with contextlib.suppress(psutil.NoSuchProcess):
                    times = proc.cpu_times()
                    total += times.user + times.system
    return total


def wait_quiet(pids: list[int], quiet_s: float = 0.1, timeout: float = 10) -> float:
    """Until these processes and their descendants use no CPU for ``quiet_s``; seconds waited."""
    start = time.monotonic()
    last, since = cpu_seconds(pids), start
    while time.monotonic() - start < timeout:
        time.sleep(0.02)
        now, used = time.monotonic(), cpu_seconds(pids)
        if used - last > 0.003:
            last, since = used, now
        elif now - since >= quiet_s:
            break
    return time.monotonic() - start


def settle(stack: Stack, all_pids: list[int]) -> dict[str, float]:
    free_s = wait_free(stack)
    return {"free_s": free_s, "quiet_s": wait_quiet(all_pids)}


# -- runners -------------------------------------------------------------------------------------


def tether_runner_class() -> Any:
    from tether.integrations.meta_schedule import TetherRunner

    return TetherRunner


def make_runner(stack: Stack, evaluator: Any) -> Any:
    from tvm.s_tir.meta_schedule.runner import RPCConfig, RPCRunner

    config = RPCConfig(
        tracker_host=HOST,
        tracker_port=stack.tracker.port,
        tracker_key=stack.key,
        session_priority=1,
        session_timeout_sec=60,
    )
    cls = tether_runner_class() if stack.name == "c" else RPCRunner
    return cls(config, evaluator, max_workers=WORKERS)


def close_runner(runner: Any) -> None:
    pool = getattr(runner, "pool", None)
    if pool is not None:
        pool.shutdown(wait=True)


@dataclass
class Outcome:
    seconds: float
    started: float
    errors: int
    first_error: str | None
    run_secs: list[list[float]]


def measure(runner: Any, inputs: list[Any], t0: float) -> Outcome:
    started = time.perf_counter()
    results = [f.result() for f in runner.run(inputs)]
    seconds = time.perf_counter() - started
    errors = [r.error_msg for r in results if r.error_msg is not None]
    run_secs = [[float(s) for s in r.run_secs] if r.error_msg is None else [] for r in results]
    return Outcome(seconds, started - t0, len(errors), errors[0] if errors else None, run_secs)


@dataclass
class StackResult:
    cold: Outcome | None = None
    rounds: list[Outcome] = field(default_factory=list)
    waits: list[dict[str, float]] = field(default_factory=list)


def floor_seconds(run_secs: list[list[list[float]]], ec: Any) -> float:
    """Per candidate: repeat x max(number x t, min_repeat_ms) + t (time_evaluator's warm-up), t its median
    run time over every round; summed, and spread over the servers."""
    total = 0.0
    for index in range(len(run_secs[0])):
        samples = [s for rnd in run_secs for s in rnd[index]]
        if not samples:
            continue
        t = statistics.median(samples)
        total += ec.repeat * max(ec.number * t, ec.min_repeat_ms / 1000) + t
    return total / SERVERS


def summarize(result: StackResult, count: int, ec: Any) -> dict[str, Any]:
    rounds = [r.seconds for r in result.rounds]
    median = statistics.median(rounds)
    errors = sum(r.errors for r in result.rounds) + (result.cold.errors if result.cold else 0)
    first = next((r.first_error for r in [result.cold, *result.rounds] if r and r.first_error), None)
    return {
        "cold_s": result.cold.seconds if result.cold else None,
        "rounds_s": rounds,
        "rounds_started_s": [r.started for r in result.rounds],
        "median_s": median,
        "min_s": min(rounds),
        "candidates_per_s": count / median,
        "errors": errors,
        "first_error": first,
        "floor_s": floor_seconds([r.run_secs for r in result.rounds], ec),
        "median_run_secs": [
            statistics.median([s for r in result.rounds for s in r.run_secs[i]] or [float("nan")]) for i in range(count)
        ],
        "waits": result.waits,
    }


def run_settings(
    stacks: dict[str, Stack], cands: Candidates, evaluator: Any, args: argparse.Namespace, *, t0: float, work: Path
) -> dict[str, Any]:
    """Cold run per stack, then the timed rounds, the stacks taking turns."""
    from tvm.s_tir.meta_schedule.runner import EvaluatorConfig

    ec = EvaluatorConfig._normalized(evaluator)
    all_pids = [pid for s in stacks.values() for pid in s.pids]
    results = {s: StackResult() for s in stacks}
    runners: dict[str, Any] = {}
    counter = itertools.count()

    def inputs() -> list[Any]:
        if not args.fresh_artifacts:
            return cands.inputs()
        return cands.inputs(cands.fresh_copies(work / f"fresh{next(counter)}"))

    try:
        for s, stack in stacks.items():
            runners[s] = make_runner(stack, evaluator)
            settle(stack, all_pids)
            results[s].cold = measure(runners[s], inputs(), t0)
            print(f"  {s}: cold {results[s].cold.seconds:.2f} s", flush=True)
            report_error(s, results[s].cold)
        for index in range(args.rounds):
            order = list(stacks) if index % 2 == 0 else list(reversed(stacks))
            for s in order:
                wait = settle(stacks[s], all_pids)
                outcome = measure(runners[s], inputs(), t0)
                results[s].rounds.append(outcome)
                results[s].waits.append(wait)
                report_error(s, outcome)
            print(
                f"  round {index + 1}: " + "  ".join(f"{s} {results[s].rounds[-1].seconds:.2f} s" for s in stacks),
                flush=True,
            )
        for stack in stacks.values():
            wait_free(stack)
    finally:
        for runner in runners.values():
            close_runner(runner)
    count = len(cands.paths)
    out: dict[str, Any] = {
        "local": local_floor(cands, evaluator),
        "evaluator": {
            "number": ec.number,
            "repeat": ec.repeat,
            "min_repeat_ms": ec.min_repeat_ms,
            "enable_cpu_cache_flush": bool(ec.enable_cpu_cache_flush),
        },
        "stacks": {s: summarize(results[s], count, ec) for s in stacks},
    }
    base = out["stacks"]["a"]["candidates_per_s"]
    out["ratios"] = {f"{s}/a": out["stacks"][s]["candidates_per_s"] / base for s in ("b", "c")}
    return out


def report_error(stack: str, outcome: Outcome) -> None:
    if outcome.first_error:
        print(f"  {stack}: {outcome.errors} error(s); first: {outcome.first_error}", flush=True)


def local_floor(cands: Candidates, evaluator: Any) -> dict[str, Any]:
    """What measuring alone takes here: each library loaded in this process and timed as RPCRunner's
    ``run_evaluator_common`` does (``time_evaluator`` on ``main``, random inputs), the calls' wall seconds
    summed and spread over the servers (one candidate per core at a time)."""
    import numpy as np
    import tvm
    from tvm.s_tir.meta_schedule.runner import EvaluatorConfig

    ec = EvaluatorConfig._normalized(evaluator)
    dev = tvm.cpu(0)
    rng = np.random.default_rng(0)
    walls = []
    for index, path in enumerate(cands.paths):
        mod = tvm.runtime.load_module(str(path))
        args = [tvm.runtime.tensor(rng.random((N, N), dtype=np.float32), dev) for _ in range(3)]
        timer = mod.time_evaluator(
            mod.entry_name,
            dev,
            number=ec.number,
            repeat=ec.repeat,
            min_repeat_ms=ec.min_repeat_ms,
            f_preproc="cache_flush_cpu_non_first_arg" if ec.enable_cpu_cache_flush else "",
        )
        if index == 0:  # the runtime's first call in this process sets up its thread pool: not measuring
            mod.time_evaluator(mod.entry_name, dev, number=1, repeat=1)(*args)
        started = time.perf_counter()
        timer(*args)
        walls.append(time.perf_counter() - started)
    return {"walls_s": walls, "floor_s": sum(walls) / SERVERS}


# -- where (a)'s time goes -----------------------------------------------------------------------


def breakdown(stack: Stack, cands: Candidates, evaluator: Any) -> dict[str, Any]:
    """RPCRunner's worker function in this process, one candidate at a time, under meta_schedule's Profiler;
    the session's creation split into connecting to the tracker and the request (to a free server)."""
    from tvm.s_tir.meta_schedule import Profiler
    from tvm.s_tir.meta_schedule.runner import EvaluatorConfig, RPCConfig
    from tvm.s_tir.meta_schedule.runner import rpc_runner as rr

    config = RPCConfig._normalized(
        RPCConfig(
            tracker_host=HOST,
            tracker_port=stack.tracker.port,
            tracker_key=stack.key,
            session_priority=1,
            session_timeout_sec=60,
        )
    )
    ec = EvaluatorConfig._normalized(evaluator)

    def create_session(rpc_config: Any) -> Any:
        with Profiler.timeit("connect_tracker"):
            tracker = rpc_config.connect_tracker()
        with Profiler.timeit("request"):
            return tracker.request(
                key=rpc_config.tracker_key,
                priority=rpc_config.session_priority,
                session_timeout=rpc_config.session_timeout_sec,
            )

    walls = []
    with Profiler() as profiler:
        for inp in cands.inputs():
            started = time.perf_counter()
            rr._worker_func(
                create_session,
                None,
                None,
                None,
                None,
                config,
                ec,
                1,
                str(inp.artifact_path),
                str(inp.device_type),
                tuple(info.as_json() for info in inp.args_info),
            )
            walls.append(time.perf_counter() - started)
    count = len(walls)
    steps = {name: float(seconds) * 1000 / count for name, seconds in profiler.get().items()}
    return {"per_candidate_ms": steps, "wall_per_candidate_ms": 1000 * statistics.fmean(walls), "candidates": count}


# -- the run -------------------------------------------------------------------------------------


def evaluator_settings(args: argparse.Namespace) -> list[tuple[str, Any]]:
    from tvm.s_tir.meta_schedule.runner import EvaluatorConfig

    first = EvaluatorConfig(
        number=args.number,
        repeat=args.repeat,
        min_repeat_ms=args.min_repeat_ms,
        enable_cpu_cache_flush=args.cache_flush,
    )
    out = [("flags", first)]
    if not args.quick:
        out.append(("meta_schedule defaults", EvaluatorConfig()))
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    import tvm

    import tether

    t0 = time.perf_counter()
    report: dict[str, Any] = {
        "machine": machine_info(tvm=str(tvm.__version__), tether=str(getattr(tether, "__version__", "?"))),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "stacks": STACKS,
        "servers_per_stack": SERVERS,
        "max_workers": WORKERS,
    }
    with tempfile.TemporaryDirectory(prefix="tuner-bench-") as tmp, contextlib.ExitStack() as exits:
        work = Path(tmp)
        started = time.perf_counter()
        cands = build_candidates(args.candidates, work)
        report["candidates"] = cands.names
        report["build_s"] = time.perf_counter() - started
        print(f"built {len(cands.names)} candidates in {report['build_s']:.1f} s: {' '.join(cands.names)}", flush=True)
        started = time.perf_counter()
        stacks = start_stacks(exits)
        for stack in stacks.values():
            wait_free(stack)
        all_pids = [pid for s in stacks.values() for pid in s.pids]
        report["start_s"] = time.perf_counter() - started
        report["start_quiet_s"] = wait_quiet(all_pids, quiet_s=0.5, timeout=60)
        print(f"stacks up in {report['start_s']:.1f} s (quiet after {report['start_quiet_s']:.1f} s more)", flush=True)
        report["settings"] = {}
        for name, evaluator in evaluator_settings(args):
            print(f"== {name}: {describe(evaluator)}", flush=True)
            report["settings"][name] = run_settings(stacks, cands, evaluator, args, t0=t0, work=work)
            if name == "flags" and args.breakdown:
                report["breakdown"] = {}
                for s in ("a", "b"):
                    settle(stacks[s], all_pids)
                    report["breakdown"][s] = breakdown(stacks[s], cands, evaluator)
                    wait_free(stacks[s])
    return report


def describe(evaluator: Any) -> str:
    from tvm.s_tir.meta_schedule.runner import EvaluatorConfig

    ec = EvaluatorConfig._normalized(evaluator)
    flush = ", cache flush" if ec.enable_cpu_cache_flush else ""
    return f"number {ec.number}, repeat {ec.repeat}, min_repeat_ms {ec.min_repeat_ms}{flush}"


def print_table(report: dict[str, Any], args: argparse.Namespace) -> None:
    count = len(report["candidates"])
    width = max(len(v) for v in STACKS.values())
    for name, settings in report["settings"].items():
        ev = settings["evaluator"]
        flush = ", cache flush" if ev["enable_cpu_cache_flush"] else ""
        print(
            f"\n{name}: number {ev['number']}, repeat {ev['repeat']}, min_repeat_ms {ev['min_repeat_ms']}{flush}; "
            f"{count} candidates, {SERVERS} servers, max_workers {WORKERS}, {len(settings['stacks']['a']['rounds_s'])} rounds"
            + (", fresh artifacts" if args.fresh_artifacts else "")
        )
        print(
            f"{'stack':{width}s} {'cold s':>7s} {'median s':>8s} {'cand/s':>7s} {'vs (a)':>6s} {'floor s':>7s} "
            f"{'errors':>6s}  rounds s"
        )
        base = settings["stacks"]["a"]["candidates_per_s"]
        local = settings["local"]["floor_s"]
        print(
            f"{'measuring alone (time_evaluator here, summed / 2)':{width}s} {'':>7s} {local:8.3f} {count / local:7.1f}"
        )
        for s, label in STACKS.items():
            r = settings["stacks"][s]
            cold = f"{r['cold_s']:.2f}" if r["cold_s"] is not None else "-"
            rounds = " ".join(f"{x:.2f}" for x in r["rounds_s"])
            print(
                f"{label:{width}s} {cold:>7s} {r['median_s']:8.3f} {r['candidates_per_s']:7.1f} "
                f"{r['candidates_per_s'] / base:5.2f}x {r['floor_s']:7.3f} {r['errors']:6d}  {rounds}"
            )
    if "breakdown" in report:
        print(
            "\nRPCRunner's worker function in this process, one candidate at a time, under meta_schedule's Profiler "
            "(ms per candidate; request: until the tracker's grant and the server's session):"
        )
        count_b = {s: b["candidates"] for s, b in report["breakdown"].items()}
        names = list(report["breakdown"]["a"]["per_candidate_ms"])
        for s, b in report["breakdown"].items():
            med = report["settings"]["flags"]["stacks"][s]["median_s"]
            steps = "  ".join(
                f"{k.split('/')[-1]} {b['per_candidate_ms'].get(k, 0.0):.1f}" for k in names if k != "Total"
            )
            print(
                f"  ({s}) wall {b['wall_per_candidate_ms']:.1f} ({count_b[s]} candidates; in the pool of {WORKERS}: "
                f"{1000 * med * WORKERS / count:.1f} per worker): {steps}"
            )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="3 rounds, the first evaluator settings only")
    parser.add_argument(
        "--candidates", type=int, default=6, help=f"candidates per round (default 6; {len(TILES)} distinct)"
    )
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds per stack and settings (default 5)")
    parser.add_argument("--number", type=int, default=2, help="EvaluatorConfig.number (default 2)")
    parser.add_argument("--repeat", type=int, default=3, help="EvaluatorConfig.repeat (default 3)")
    parser.add_argument("--min-repeat-ms", type=int, default=0, help="EvaluatorConfig.min_repeat_ms (default 0)")
    parser.add_argument("--cache-flush", action="store_true", help="EvaluatorConfig.enable_cpu_cache_flush")
    parser.add_argument(
        "--fresh-artifacts", action="store_true", help="byte-distinct copies of the libraries every round"
    )
    parser.add_argument(
        "--no-breakdown", dest="breakdown", action="store_false", help="skip the breakdown of (a) and (b)"
    )
    parser.add_argument("--json", type=Path, default=None, help="where to write the results (default bench/results/)")
    args = parser.parse_args(argv)
    if args.candidates < 1:
        parser.error("--candidates must be at least 1")
    if args.rounds is None:
        args.rounds = 3 if args.quick else 5
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    report = timed_run(run, args)
    print_table(report, args)
    write_report(report, args.json, "tuner")
    return 0


if __name__ == "__main__":
    sys.exit(main())
