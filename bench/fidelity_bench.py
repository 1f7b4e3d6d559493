"""Fidelity: does ``tether bench`` on loopback report what the runtime measures in-process?

For models of a few milliseconds (SqueezeNet from ``tether.models`` under onnxruntime; a small convnet built
with ``onnx.helper`` and compiled by TVM for llvm, untuned SqueezeNet taking ~150 ms), the median of ``tether
bench`` (tracker + server + worker processes on loopback, inputs generated on the device) against the median
measured in this process with the same runtime and settings: the same ``number``/``repeat``/``warmup``, the
same threads (onnxruntime ``intra_op_num_threads``; ``TVM_NUM_THREADS`` for the server's workers and this
process alike). In-process, onnxruntime is timed by the same loop TVM's ``time_evaluator`` runs (``number``
runs between two ``perf_counter`` reads) calling ``session.run`` directly; TVM by its own ``time_evaluator``
(C++).

A shared machine drifts by more than 2 % from one second to the next, so one median per side says little: the
sides alternate ``--rounds`` times in ABBA order and the figure is the paired one ``tether compare`` uses, the
Hodges-Lehmann estimate of tether's time relative to in-process over the rounds with its Wilcoxon signed-rank
95 % interval: many short rounds pair better than a few long ones, the noise being bursty. A control
compares in-process with in-process by the same design: how far two measurements of the same thing in the
same place differ on this machine, the floor under any fidelity figure (``--no-control`` skips it). Prints
medians, the ratio with its interval and the conditions the tether side recorded; writes every number as JSON.

    python bench/fidelity_bench.py [--number 10 --repeat 5 --rounds 40 --threads 1] [--no-tvm] [--no-control]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import benchlib
from session_bench import wait_free

HOST = "127.0.0.1"


def _tether_side(tracker_port: int, model: Path, args: argparse.Namespace, options: dict[str, Any]) -> dict[str, Any]:
    from tether.client.bench import BenchSettings, bench

    settings = BenchSettings(number=args.number, repeat=args.repeat, warmup=args.warmup, options=options, profile=False)
    (record,) = bench(HOST, tracker_port, "fidelity", [model], settings, timeout=120)
    if record.error:
        raise RuntimeError(f"tether bench failed: {record.error}")
    return {"samples": record.samples, "conditions": record.conditions, "warnings": record.warnings}


def _ort_local(model: Path, args: argparse.Namespace) -> Any:
    import numpy as np
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = args.threads
    sess = ort.InferenceSession(str(model), sess_options=so, providers=["CPUExecutionProvider"])
    inp = sess.get_inputs()[0]
    feed = {inp.name: np.random.default_rng(0).random(tuple(inp.shape), dtype=np.float32)}

    def measure() -> list[float]:
        for _ in range(args.warmup):
            sess.run(None, feed)
        samples = []
        for _ in range(args.repeat):
            start = time.perf_counter()
            for _ in range(args.number):
                sess.run(None, feed)
            samples.append((time.perf_counter() - start) / args.number)
        return samples

    return measure


def _tvm_local(lib_path: Path, shape: tuple[int, ...], args: argparse.Namespace) -> Any:
    import numpy as np
    import tvm
    import tvm.runtime.vm

    dev = tvm.cpu()
    vm = tvm.runtime.vm.VirtualMachine(tvm.runtime.load_module(str(lib_path)), dev)
    x = tvm.runtime.tensor(np.random.default_rng(0).random(shape, dtype=np.float32), dev)
    vm.set_input("main", x)

    def measure() -> list[float]:
        for _ in range(args.warmup):
            vm["main"](x)
        timer = vm.time_evaluator("invoke_stateful", dev, number=args.number, repeat=args.repeat)
        return [float(r) for r in timer("main").results]

    return measure


def _compile_tvm(onnx_path: Path, out: Path) -> Path:
    import onnx
    import tvm
    from tvm.relax.frontend.onnx import from_onnx

    executable = tvm.compile(from_onnx(onnx.load(str(onnx_path))), target=tvm.target.Target({"kind": "llvm"}))
    executable.export_library(str(out))
    return out


def small_convnet(size: int = 56, channels: int = 16) -> Any:
    """Three 3x3 convolutions (one strided), ReLUs, a global pool and a dense layer: a few milliseconds once
    TVM compiles it for llvm without tuning (SqueezeNet takes ~150 ms that way)."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    c = channels
    shapes = {"w1": (c, 3, 3, 3), "b1": (c,), "w2": (2 * c, c, 3, 3), "b2": (2 * c,)}
    shapes |= {"w3": (2 * c, 2 * c, 3, 3), "b3": (2 * c,), "fc": (2 * c, 10), "fcb": (10,)}
    weights = [
        numpy_helper.from_array((rng.standard_normal(shape) * 0.1).astype(np.float32), name)
        for name, shape in shapes.items()
    ]
    conv = {"pads": [1, 1, 1, 1]}
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], **conv),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], strides=[2, 2], **conv),
        helper.make_node("Relu", ["c2"], ["r2"]),
        helper.make_node("Conv", ["r2", "w3", "b3"], ["c3"], **conv),
        helper.make_node("Relu", ["c3"], ["r3"]),
        helper.make_node("GlobalAveragePool", ["r3"], ["g"]),
        helper.make_node("Flatten", ["g"], ["f"]),
        helper.make_node("Gemm", ["f", "fc", "fcb"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "small_convnet",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, size, size])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 10])],
        weights,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    onnx.checker.check_model(model)
    return model


def _paired(local_blocks: list[list[float]], other_blocks: list[list[float]]) -> dict[str, Any]:
    from tether.client.stats import ratio_ci

    ratio, (low, high) = ratio_ci([(local_blocks, other_blocks, True)])
    return {"ratio": ratio, "ci": [low, high], "diff_pct": 100 * (ratio - 1)}


def _compare(
    name: str,
    tracker_port: int,
    model: Path,
    *,
    options: dict[str, Any],
    local: Any,
    args: argparse.Namespace,
    control: Any = None,
) -> dict[str, Any]:
    remote_blocks: list[list[float]] = []
    local_blocks: list[list[float]] = []
    control_blocks: list[list[float]] = []
    conditions = None
    warnings: list[str] = []

    def remote() -> None:
        nonlocal conditions, warnings
        side = _tether_side(tracker_port, model, args, options)
        remote_blocks.append(side["samples"])
        conditions, warnings = side["conditions"], side["warnings"]

    def abba(first: Any, second: Any) -> None:
        for i in range(args.rounds):  # ABBA: a drift in the machine's state falls on both sides alike
            for step in (first, second) if i % 2 == 0 else (second, first):
                step()

    abba(remote, lambda: local_blocks.append(local()))
    if control is not None:  # the same design with in-process on both sides
        control_local: list[list[float]] = []
        abba(lambda: control_blocks.append(control()), lambda: control_local.append(local()))
    remote_all = [s for blk in remote_blocks for s in blk]
    local_all = [s for blk in local_blocks for s in blk]
    paired = _paired(local_blocks, remote_blocks)
    row: dict[str, Any] = {
        "runtime": name,
        "tether_median_ms": statistics.median(remote_all) * 1e3,
        "inprocess_median_ms": statistics.median(local_all) * 1e3,
        "ratio_of_medians": statistics.median(remote_all) / statistics.median(local_all),
        "paired": paired,
        "tether_blocks_s": remote_blocks,
        "inprocess_blocks_s": local_blocks,
        "conditions": conditions,
        "warnings": warnings,
    }
    low, high = paired["ci"]
    print(
        f"{name:12s} tether {row['tether_median_ms']:8.3f} ms   in-process {row['inprocess_median_ms']:8.3f} ms   "
        f"tether/in-process {paired['ratio']:.4f} ({low:.4f}-{high:.4f})   {paired['diff_pct']:+.2f} %"
    )
    if control is not None:
        row["control"] = _paired(control_local, control_blocks)
        row["control_blocks_s"] = [control_local, control_blocks]
        c = row["control"]
        print(
            f"{'':12s} control: in-process again / in-process {c['ratio']:.4f} ({c['ci'][0]:.4f}-{c['ci'][1]:.4f})"
            f"   {c['diff_pct']:+.2f} %"
        )
    return row


def run(args: argparse.Namespace) -> dict[str, Any]:
    import onnx
    import onnxruntime as ort

    from tether.cli.bench import conditions_line
    from tether.models import light_model

    os.environ["TVM_NUM_THREADS"] = str(args.threads)  # the server's workers inherit it; so does this process
    report: dict[str, Any] = {
        "machine": benchlib.machine_info(onnxruntime=ort.__version__),
        "settings": {
            k: getattr(args, k) for k in ("model", "tvm_model", "number", "repeat", "warmup", "rounds", "threads")
        },
        "rows": [],
    }
    with tempfile.TemporaryDirectory(prefix="tether-fidelity-") as tmp:
        work = Path(tmp)
        onnx_path = work / f"{args.model}.onnx"
        proto = light_model(args.model)
        onnx.save(proto, str(onnx_path))
        lib_path = None
        shape: tuple[int, ...] = ()
        if not args.no_tvm:
            import tvm

            report["machine"]["tvm"] = tvm.__version__
            tvm_proto = small_convnet() if args.tvm_model == "small_convnet" else light_model(args.tvm_model)
            tvm_onnx = work / f"tvm-{args.tvm_model}.onnx"
            onnx.save(tvm_proto, str(tvm_onnx))
            shape = tuple(int(d.dim_value) for d in tvm_proto.graph.input[0].type.tensor_type.shape.dim)
            lib_path = _compile_tvm(tvm_onnx, work / f"{args.tvm_model}.so")
        tracker_argv = [sys.executable, "-m", "tether", "tracker", "--host", HOST, "--port", "0", "--silent"]
        with benchlib.running("tether tracker", tracker_argv) as tracker:
            server_argv = [sys.executable, "-m", "tether", "server", "--host", HOST, "--port", "0"]
            server_argv += ["--key", "fidelity", "--tracker", f"{HOST}:{tracker.port}", "--preload", "auto"]
            with benchlib.running("tether server", server_argv):
                wait_free(tracker.port, "fidelity")
                print(
                    f"onnxruntime: {args.model}, tvm: {args.tvm_model}; {args.number} runs x {args.repeat} samples, "
                    f"warmup {args.warmup}, {args.threads} thread(s), {args.rounds} rounds per side (ABBA)"
                )
                opts = {"intra_op_num_threads": args.threads}
                local = _ort_local(onnx_path, args)
                control = local if args.control else None
                row = _compare(
                    "onnxruntime", tracker.port, onnx_path, options=opts, local=local, args=args, control=control
                )
                report["rows"].append(row)
                if lib_path is not None:
                    local = _tvm_local(lib_path, shape, args)
                    control = local if args.control else None
                    row = _compare(
                        "tvm (llvm)", tracker.port, lib_path, options={}, local=local, args=args, control=control
                    )
                    report["rows"].append(row)
    for row in report["rows"]:
        print(f"  {row['runtime']}: {conditions_line(row['conditions'])}")
    return report


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="squeezenet", help="onnxruntime's model: a light model of tether.models")
    p.add_argument(
        "--tvm-model", default="small_convnet", help="TVM's: small_convnet (a few ms) or a light model of tether.models"
    )
    p.add_argument("--number", type=int, default=10)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--rounds", type=int, default=40, help="paired rounds; 6 at least for a 95 %% interval")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads / TVM_NUM_THREADS on both sides")
    p.add_argument("--no-tvm", action="store_true")
    p.add_argument("--no-control", dest="control", action="store_false", help="skip in-process against in-process")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    report = benchlib.timed_run(run, args)
    benchlib.write_report(report, args.out, "fidelity")


if __name__ == "__main__":
    main()
