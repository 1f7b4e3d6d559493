"""``tether run MODEL``: request a device, run a model once (and time it), print what came back."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from ..errors import TetherError
from ._args import label

__all__ = ["add_parser", "describe_array", "run"]


def add_parser(sub: Any) -> None:
    p = sub.add_parser("run", help="run a model on a device from the pool and print its outputs and timing")
    p.add_argument("model", type=Path, help="model file (.onnx, a TVM library .so/.tar, a reference .json)")
    p.add_argument("--tracker", default=None, help="HOST:PORT (default: TVM_TRACKER_HOST/PORT, else 127.0.0.1:9190)")
    p.add_argument("--key", required=True, help="device key to request")
    p.add_argument("--label", action="append", type=label, default=[], metavar="K=V", help="required label")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--input", type=Path, default=None, help=".npz of inputs by name")
    source.add_argument(
        "--fill",
        choices=["random", "zeros", "ones"],
        default=None,
        help="generate inputs on the device (default random)",
    )
    p.add_argument("--output", type=Path, default=None, help="write the outputs to this .npz")
    p.add_argument("--backend", default=None, help="onnxruntime, tvm, reference (default: from the file type)")
    p.add_argument("--provider", action="append", default=[], help="onnxruntime execution provider (repeatable)")
    p.add_argument("--function", default=None, help="tvm: entry function (default main)")
    p.add_argument("--repeat", type=int, default=10, help="timed runs on the device (default 10; 0: none)")
    p.add_argument("--number", type=int, default=1, help="runs per timed repeat (default 1)")
    p.add_argument("--priority", type=float, default=1)
    p.add_argument("--timeout", type=float, default=None, help="seconds to wait in the queue (default: forever)")
    p.add_argument("--session-timeout", type=float, default=0, help="seconds the session may last (default: no limit)")
    p.add_argument("--top", type=int, default=5, help="classes shown for a classifier's output (default 5)")
    p.set_defaults(run=run)


def describe_array(name: str, arr: Any, top: int = 5) -> str:
    """One line per tensor: shape, dtype, a preview, and top-k for a classifier-like output."""
    import numpy as np

    flat = arr.reshape(-1)
    preview = np.array2string(flat[:6], precision=4, separator=", ", max_line_width=1000)
    text = f"  {name}: {list(arr.shape)} {arr.dtype} {preview}{' ...' if flat.size > 6 else ''}"
    scores = arr.squeeze()
    if scores.ndim == 1 and scores.size >= 10 and arr.dtype.kind == "f":  # one row of class scores
        best = np.argsort(scores)[::-1][:top]
        text += f"\n    top-{top}: " + ", ".join(f"{int(i)} ({scores[i]:.4g})" for i in best)
    return text


def run(args: argparse.Namespace) -> int:
    try:
        import numpy as np
    except ImportError:
        print("tether run needs numpy on the host: pip install 'tether[onnx]'", file=sys.stderr)
        return 2
    from ..aio.net import parse_hostport
    from ..client.api import connect_tracker

    inputs = None
    if args.input is not None:
        with np.load(args.input) as data:
            inputs = {name: data[name] for name in data.files}
    fill = None if inputs is not None else (args.fill or "random")
    options: dict[str, Any] = {}
    if args.provider:
        options["providers"] = args.provider
    if args.function:
        options["function"] = args.function
    host, port = parse_hostport(args.tracker, 9190) if args.tracker else (None, None)
    try:
        with connect_tracker(host, port) as tracker:
            t0 = time.perf_counter()
            with tracker.request(
                args.key, args.priority, args.session_timeout, args.timeout, labels=dict(args.label)
            ) as sess:
                t1 = time.perf_counter()
                remote = sess.upload(args.model)
                t2 = time.perf_counter()
                model = sess.load_model(remote, args.backend, **options)
                print(f"device {sess.address} ({model.backend}), model {args.model.name}")
                print("inputs:")
                for spec in model.inputs:
                    given = inputs.get(spec["name"]) if inputs else None
                    where = f"from {args.input.name}" if given is not None else f"{fill} on the device"
                    print(f"  {spec['name']}: {spec['shape']} {spec['dtype']} ({where})")
                t3 = time.perf_counter()
                outputs = model.run(inputs, fill=fill, seed=0)
                t4 = time.perf_counter()
                print("outputs:")
                for name, arr in outputs.items():
                    print(describe_array(name, arr, args.top))
                print(
                    f"timing: request {(t1 - t0) * 1e3:.1f} ms, upload {(t2 - t1) * 1e3:.1f} ms, "
                    f"load {model.load_s * 1e3:.1f} ms, first run {(t4 - t3) * 1e3:.2f} ms round trip "
                    f"({(model.last_run_s or 0) * 1e3:.2f} ms on the device)"
                )
                if args.repeat > 0:
                    result = model.benchmark(inputs, number=args.number, repeat=args.repeat, fill=fill, seed=0)
                    print(f"device timing: {result}")
                if args.output is not None:
                    np.savez(args.output, **outputs)
                    print(f"outputs written to {args.output}")
    except TetherError as exc:
        print(f"tether run: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"tether run: {exc}", file=sys.stderr)
        return 2
    return 0
