"""Fidelity: does ``tether bench`` on loopback report what the runtime measures in-process?

For one model of a few milliseconds (SqueezeNet from ``tether.models``, and the same model compiled by TVM
for llvm), the median of ``tether bench`` (tracker + server + worker processes on loopback, inputs generated
on the device) against the median measured in this process with the same runtime and settings: the same
``number``/``repeat``/``warmup``, the same threads (onnxruntime ``intra_op_num_threads``; ``TVM_NUM_THREADS``
for the server's workers and this process alike). In-process, onnxruntime is timed by the same loop TVM's
``time_evaluator`` runs (``number`` runs between two ``perf_counter`` reads) calling ``session.run`` directly;
TVM by its own ``time_evaluator`` (C++). The two sides alternate ``--rounds`` times so that drift in the
machine's state falls on both; each side's median is over all its samples. Prints both medians, the ratio
and the difference in %, and the conditions the tether side recorded; writes every number as JSON.

    python bench/fidelity_bench.py [--number 20 --repeat 30 --rounds 3 --threads 1] [--no-tvm]
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


def _compare(
    name: str, tracker_port: int, model: Path, *, options: dict[str, Any], local: Any, args: argparse.Namespace
) -> dict[str, Any]:
    remote_samples: list[float] = []
    local_samples: list[float] = []
    conditions = None
    warnings: list[str] = []
    for _ in range(args.rounds):  # alternate: drift falls on both sides
        side = _tether_side(tracker_port, model, args, options)
        remote_samples += side["samples"]
        conditions, warnings = side["conditions"], side["warnings"]
        local_samples += local()
    remote, here = statistics.median(remote_samples), statistics.median(local_samples)
    row = {
        "runtime": name,
        "tether_median_ms": remote * 1e3,
        "inprocess_median_ms": here * 1e3,
        "ratio": remote / here,
        "diff_pct": 100 * (remote - here) / here,
        "tether_samples_s": remote_samples,
        "inprocess_samples_s": local_samples,
        "conditions": conditions,
        "warnings": warnings,
    }
    print(
        f"{name:12s} tether {row['tether_median_ms']:8.3f} ms   in-process {row['inprocess_median_ms']:8.3f} ms   "
        f"ratio {row['ratio']:.4f}   diff {row['diff_pct']:+.2f} %"
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
        "settings": {k: getattr(args, k) for k in ("model", "number", "repeat", "warmup", "rounds", "threads")},
        "rows": [],
    }
    with tempfile.TemporaryDirectory(prefix="tether-fidelity-") as tmp:
        work = Path(tmp)
        onnx_path = work / f"{args.model}.onnx"
        proto = light_model(args.model)
        onnx.save(proto, str(onnx_path))
        dims = proto.graph.input[0].type.tensor_type.shape.dim
        shape = tuple(int(d.dim_value) for d in dims)
        lib_path = None
        if not args.no_tvm:
            import tvm

            report["machine"]["tvm"] = tvm.__version__
            lib_path = _compile_tvm(onnx_path, work / f"{args.model}.so")
        tracker_argv = [sys.executable, "-m", "tether", "tracker", "--host", HOST, "--port", "0", "--silent"]
        with benchlib.running("tether tracker", tracker_argv) as tracker:
            server_argv = [sys.executable, "-m", "tether", "server", "--host", HOST, "--port", "0"]
            server_argv += ["--key", "fidelity", "--tracker", f"{HOST}:{tracker.port}", "--preload", "auto"]
            with benchlib.running("tether server", server_argv):
                wait_free(tracker.port, "fidelity")
                print(
                    f"{args.model}: {args.number} runs x {args.repeat} samples, warmup {args.warmup}, "
                    f"{args.threads} thread(s), {args.rounds} alternating rounds per side"
                )
                opts = {"intra_op_num_threads": args.threads}
                report["rows"].append(
                    _compare(
                        "onnxruntime",
                        tracker.port,
                        onnx_path,
                        options=opts,
                        local=_ort_local(onnx_path, args),
                        args=args,
                    )
                )
                if lib_path is not None:
                    local = _tvm_local(lib_path, shape, args)
                    report["rows"].append(
                        _compare("tvm (llvm)", tracker.port, lib_path, options={}, local=local, args=args)
                    )
    for row in report["rows"]:
        print(f"  {row['runtime']}: {conditions_line(row['conditions'])}")
    return report


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="squeezenet", help="a light model of tether.models")
    p.add_argument("--number", type=int, default=20)
    p.add_argument("--repeat", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="intra-op threads / TVM_NUM_THREADS on both sides")
    p.add_argument("--no-tvm", action="store_true")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    report = benchlib.timed_run(run, args)
    benchlib.write_report(report, args.out, "fidelity")


if __name__ == "__main__":
    main()
