"""Auto-tuning an ONNX model through the pool: TVM's own path against ``tether tune``, in one run.

    python bench/tune_bench.py [--model convnet|mlp] [--trials 64] [--per-iter 8] [--rounds 1] [--json out.json]

The same model (imported with Relax's ``from_onnx`` and lowered to fused TIR the same way), target
(``{"kind": "llvm", "num-cores": 1}``), trial count, candidates per batch, evaluator settings (number 3,
repeat 1, min_repeat_ms 0), cost model (xgb when xgboost is installed, else random) and seed, two device
servers per stack:

(a) meta_schedule as a TVM user writes it today (``tvmc`` is gone): TVM's tracker (``python -m
    tvm.exec.rpc_tracker``), two ``python -m tvm.exec.rpc_server``, ``tune_relax`` with
    ``LocalBuilder(max_workers=2, timeout_sec=60, initializer=<import tvm.s_tir.tensor_intrin>)`` (the fix
    from docs/tvm-tuning-notes.md: without it builds time out on 2 cores) and ``RPCRunner(max_workers=2)``,
    then ``compile_relax`` and ``export_library``;
(b) ``tether.tune.tune()`` (what ``tether tune`` runs, without its final measurement) with tether's tracker
    and two tether servers (``python -m tether server``): warm build workers, TetherRunner, the same
    compile and export.

Each stack gets a fresh work dir per round; with ``--rounds 2`` the order is a, b, b, a (drift of the
machine hits both alike). Timed: the whole tuning call, import to exported library (trackers and servers are
started before, and idle). Then the tuned libraries of the last round are measured on one tether server, in
one session, with the same settings (tether bench: number 10, repeat 20), both checked against onnxruntime:
the tuned latency must be as good for the wall-time ratio to mean anything.

Prints a table and writes every number to bench/results/tune-<timestamp>.json.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchlib import machine_info, timed_run, write_report
from tuner_bench import (
    HOST,
    start_all,
    tether_server_argv,
    tether_tracker_argv,
    tvm_server_argv,
    tvm_tracker_argv,
)

TARGET = {"kind": "llvm", "num-cores": 1}
SERVERS = 2


def make_model(kind: str, path: Path) -> Path:
    """``convnet``: two 3x3 convolutions (3->16->16 channels, 32x32), relu, global pooling, a dense layer;
    ``mlp``: [16,256] @ [256,256] + b -> relu -> @ [256,10]."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)

    def weight(name: str, *shape: int) -> Any:
        return numpy_helper.from_array((rng.standard_normal(shape) * 0.1).astype("float32"), name)

    if kind == "convnet":
        inits = [
            weight("w1", 16, 3, 3, 3),
            weight("b1", 16),
            weight("w2", 16, 16, 3, 3),
            weight("b2", 16),
            weight("wd", 16, 10),
        ]
        nodes = [
            helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
            helper.make_node("Relu", ["c1"], ["r1"]),
            helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1]),
            helper.make_node("Relu", ["c2"], ["r2"]),
            helper.make_node("GlobalAveragePool", ["r2"], ["p"]),
            helper.make_node("Flatten", ["p"], ["f"]),
            helper.make_node("MatMul", ["f", "wd"], ["y"]),
        ]
        x, y = [1, 3, 32, 32], [1, 10]
    else:
        inits = [weight("w1", 256, 256), weight("b1", 256), weight("w2", 256, 10)]
        nodes = [
            helper.make_node("MatMul", ["x", "w1"], ["h"]),
            helper.make_node("Add", ["h", "b1"], ["hb"]),
            helper.make_node("Relu", ["hb"], ["r"]),
            helper.make_node("MatMul", ["r", "w2"], ["y"]),
        ]
        x, y = [16, 256], [16, 10]
    graph = helper.make_graph(
        nodes,
        kind,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, x)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, y)],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def _preload() -> None:
    import tvm.s_tir.tensor_intrin  # noqa: F401


def tune_tvm(model: Path, port: int, key: str, work: Path, args: argparse.Namespace) -> dict[str, Any]:
    """(a): meta_schedule's tune_relax with LocalBuilder and RPCRunner through TVM's tracker."""
    import tvm
    from tvm.s_tir import meta_schedule as ms

    from tether.tune.core import _cost_model, load_and_lower

    started = time.perf_counter()
    target = tvm.target.Target(TARGET)
    _, lowered = load_and_lower(model, target)
    builder = ms.builder.LocalBuilder(max_workers=2, timeout_sec=60, initializer=_preload)
    runner = ms.runner.RPCRunner(
        ms.runner.RPCConfig(
            tracker_host=HOST, tracker_port=port, tracker_key=key, session_priority=1, session_timeout_sec=60
        ),
        ms.runner.EvaluatorConfig(number=3, repeat=1, min_repeat_ms=0, enable_cpu_cache_flush=False),
        max_workers=SERVERS,
    )
    db = ms.relax_integration.tune_relax(
        lowered,
        {},
        target,
        str(work),
        max_trials_global=args.trials,
        num_trials_per_iter=args.per_iter,
        builder=builder,
        runner=runner,
        cost_model=_cost_model("auto"),
        seed=0,
    )
    with target:
        lib = ms.relax_integration.compile_relax(db, lowered, target, params=None)
    out = work / "tuned.so"
    lib.export_library(str(out))
    return {"wall_s": time.perf_counter() - started, "library": str(out), "records": len(db.get_all_tuning_records())}


def tune_tether(model: Path, port: int, key: str, work: Path, args: argparse.Namespace) -> dict[str, Any]:
    """(b): tether.tune.tune(), its final measurement left out (timed apart below, for both)."""
    from tether.tune import TuneOptions, tune

    started = time.perf_counter()
    opts = TuneOptions(
        model,
        (HOST, port),
        key,
        TARGET,
        trials=args.trials,
        work_dir=work,
        output=work / "tuned.so",
        trials_per_iter=args.per_iter,
        builders=2,
        measure=False,
    )
    report = tune(opts)
    return {
        "wall_s": time.perf_counter() - started,
        "library": report.output,
        "records": report.trials_run,
        "stages_s": report.stages_s,
        "failures": report.progress.get("failures"),
    }


def final_latency(model: Path, libs: dict[str, str], port: int, key: str) -> dict[str, Any]:
    """Every tuned library on one tether server, one session, the same settings; checked vs onnxruntime."""
    from tether.tune import TuneOptions
    from tether.tune.core import _measure_tether

    opts = TuneOptions(model, (HOST, port), key, TARGET, trials=0, work_dir=".", final_number=10, final_repeat=20)
    names = list(libs)
    records = _measure_tether(opts, [Path(libs[n]) for n in names], model)
    return dict(zip(names, records, strict=True))


def run(args: argparse.Namespace) -> dict[str, Any]:
    import logging

    import tvm

    import tether

    logging.getLogger("tvm.s_tir.meta_schedule").setLevel(logging.WARNING)  # its tables: in the work dirs' logs

    keys = {"a": "tune-a", "b": "tune-b"}
    report: dict[str, Any] = {
        "machine": machine_info(tvm=tvm.__version__, tether=tether.__version__),
        "settings": {
            "model": args.model,
            "trials": args.trials,
            "per_iter": args.per_iter,
            "target": TARGET,
            "rounds": args.rounds,
        },
        "runs": {"a": [], "b": []},
    }
    order = ["a", "b"] if args.rounds == 1 else (["a", "b", "b", "a"] * args.rounds)[: 2 * args.rounds]
    with contextlib.ExitStack() as exits, tempfile.TemporaryDirectory(prefix="tune-bench-") as tmp:
        root = Path(tmp)
        model = make_model(args.model, root / f"{args.model}.onnx")
        trackers = start_all(exits, [("TVM tracker", tvm_tracker_argv()), ("tether tracker", tether_tracker_argv())])
        ports = {"a": trackers[0].port, "b": trackers[1].port}
        named = [(f"TVM server {i}", tvm_server_argv(ports["a"], keys["a"])) for i in range(SERVERS)]
        named += [(f"tether server {i}", tether_server_argv(ports["b"], keys["b"])) for i in range(SERVERS)]
        start_all(exits, named)
        last: dict[str, str] = {}
        for n, stack in enumerate(order):
            work = root / f"{stack}{n}"
            work.mkdir()
            print(f"round {n + 1}/{len(order)}: ({stack}) ...", file=sys.stderr, flush=True)
            result = (tune_tvm if stack == "a" else tune_tether)(model, ports[stack], keys[stack], work, args)
            print(f"  ({stack}) {result['wall_s']:.1f} s", file=sys.stderr, flush=True)
            report["runs"][stack].append(result)
            last[stack] = result["library"]
        report["latency"] = final_latency(model, last, ports["b"], keys["b"])
    walls = {s: statistics.median(r["wall_s"] for r in report["runs"][s]) for s in ("a", "b")}
    report["wall_s"] = walls
    report["speedup"] = walls["a"] / walls["b"]
    return report


def print_table(report: dict[str, Any]) -> None:
    s = report["settings"]
    print(f"\n{s['model']}: {s['trials']} trials, {s['per_iter']} per batch, target {s['target']}, two servers each")
    print(f"{'stack':<64} {'wall s (median)':>16} {'tuned median ms':>16} {'checked':>8}")
    names = {
        "a": "(a) TVM tracker + rpc_server x2 + LocalBuilder + RPCRunner",
        "b": "(b) tether tune: tether tracker + tether server x2",
    }
    for stack in ("a", "b"):
        lat = report["latency"][stack]
        median = lat["stats"]["median"] * 1e3 if lat.get("stats") else float("nan")
        walls = ", ".join(f"{r['wall_s']:.1f}" for r in report["runs"][stack])
        print(
            f"{names[stack]:<64} {report['wall_s'][stack]:>16.1f} {median:>16.4f} {lat['checked']!s:>8}"
            f"   (rounds: {walls})"
        )
    a, b = report["latency"]["a"].get("stats"), report["latency"]["b"].get("stats")
    ratio = f"{a['median'] / b['median']:.2f}" if a and b else "-"
    print(f"(b) is x{report['speedup']:.2f} faster in wall time; tuned latency (a)/(b) = {ratio}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["convnet", "mlp"], default="convnet")
    parser.add_argument("--trials", type=int, default=64, help="trials in all (default 64)")
    parser.add_argument("--per-iter", type=int, default=8, help="candidates per batch (default 8)")
    parser.add_argument("--rounds", type=int, default=1, help="runs per stack (default 1; 2: a, b, b, a)")
    parser.add_argument("--json", type=Path, default=None, help="where to write the results (default bench/results/)")
    args = parser.parse_args(argv)
    if args.trials < 1 or args.per_iter < 1 or args.rounds < 1:
        parser.error("--trials, --per-iter and --rounds must be at least 1")
    report = timed_run(run, args)
    print_table(report)
    write_report(report, args.json, "tune")
    return 0


if __name__ == "__main__":
    sys.exit(main())
