"""``tether run MODEL``: request a device, run a model once (and time it), print what came back.

What can be checked here is checked before a device is taken: the files, the tracker's address, and
the model's inputs against the ``--input`` names and ``--shape`` flags when the model file can be read
here (a reference ``.json``; an ``.onnx`` with the onnx package), else as soon as the model is loaded.

While the request waits, its place in the key's queue is shown on stderr (as ``tether bench`` does); a
request that no registered server could serve fails after a short grace with the tracker's reason (no
server of the key, none speaking tether's protocol, none with the labels), unless ``--wait-for-servers``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

from ..errors import TetherError
from ._args import (
    add_model_flags,
    check_inputs,
    check_locally,
    existing_file,
    model_options,
    output_file,
    positive,
    seconds,
    unservable_after,
)
from ._report import fail
from ._tls import tls_from_args

__all__ = ["add_parser", "describe_array", "run"]


def add_parser(sub: Any) -> None:
    p = sub.add_parser("run", help="run a model on a device from the pool and print its outputs and timing")
    p.add_argument("model", type=existing_file, help="model file (.onnx, a TVM library .so/.tar, a reference .json)")
    add_model_flags(p)
    p.add_argument("--output", type=output_file, default=None, metavar="Y.NPZ", help="write the outputs to this .npz")
    p.add_argument("--priority", type=float, default=1, help="queue priority: higher goes first")
    p.add_argument(
        "--session-timeout", type=seconds, default=0, metavar="S", help="seconds the session may last (0: no limit)"
    )
    p.add_argument("--top", type=positive, default=5, metavar="K", help="classes shown for a classifier's output")
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
    from ..client.api import connect_tracker
    from ..client.bench import QueueWatch
    from ..client.inputs import shapes_for
    from ..runtime import TensorSpec
    from .bench import Progress

    host, port, given = check_locally(args, [args.model])
    inputs = given or {}
    device = None
    timed = {"number": args.number, "min_repeat_ms": args.min_repeat_ms, "cooldown_ms": args.cooldown_ms}
    feed: dict[str, Any] = {"fill": args.fill, "seed": 0, "timeout": args.run_timeout or None}
    try:
        with connect_tracker(host, port, tls=tls_from_args(args)) as tracker:
            t0 = time.perf_counter()
            request_id = f"run-{os.getpid()}"
            progress = Progress(sys.stderr, tty=sys.stderr.isatty())
            watch = QueueWatch(host, port, args.key, progress, poll_s=1.0, tls=tracker.tls)
            watch.start([request_id])
            try:
                sess = tracker.request(
                    args.key,
                    args.priority,
                    args.session_timeout,
                    args.timeout or None,
                    labels=dict(args.label),
                    request_id=request_id,
                    unservable_after=unservable_after(args),
                )
            finally:
                watch.stop()
                progress.close()
            with sess:
                device = sess.address
                t1 = time.perf_counter()
                remote = sess.upload(args.model)
                t2 = time.perf_counter()
                model = sess.load_model(remote, args.backend, timeout=feed["timeout"], **model_options(args))
                specs = [TensorSpec.from_wire(s) for s in model.inputs]
                check_inputs([(args.model.name, specs)], inputs, args)  # what only the device could tell
                feed["shapes"] = shapes = shapes_for(specs, dict(args.shape))
                kept = {name: sess.tensor(arr) for name, arr in inputs.items()}  # sent once
                print(f"device {sess.address} ({model.backend}), model {args.model.name}")
                print("inputs:")
                for spec in specs:
                    if spec.name in inputs:
                        arr = kept[spec.name]
                        print(f"  {spec.name}: {list(arr.shape)} {arr.dtype} (from {args.input.name})")
                    else:
                        made = f"{args.fill} on the device" + (", --shape" if spec.name in shapes else "")
                        shown = list(shapes[spec.name]) if spec.name in shapes else spec.shape_text
                        print(f"  {spec.name}: {shown} {spec.dtype} ({made})")
                t3 = time.perf_counter()
                outputs = model.run(kept, **feed)
                t4 = time.perf_counter()
                print("outputs:")
                for name, arr in outputs.items():
                    print(describe_array(name, arr, args.top))
                _warn_not_finite(np, outputs)
                print(
                    f"timing: request {(t1 - t0) * 1e3:.1f} ms, upload {(t2 - t1) * 1e3:.1f} ms, "
                    f"load {model.load_s * 1e3:.1f} ms, first run {(t4 - t3) * 1e3:.2f} ms round trip "
                    f"({(model.last_run_s or 0) * 1e3:.2f} ms on the device)"
                )
                if args.repeat > 0:
                    result = model.benchmark(kept, repeat=args.repeat, warmup=args.warmup, **timed, **feed)
                    print(f"device timing: {result}")
                if args.output is not None:
                    np.savez(args.output, **outputs)
                    print(f"outputs written to {args.output}")
    except TetherError as exc:
        return fail("tether run", exc, verbose=args.verbose, device=device)
    return 0


def _warn_not_finite(np: Any, outputs: dict[str, Any]) -> None:
    """One line on stderr naming the outputs that hold NaN or Inf (a broken model, or broken weights)."""
    counts = {name: int(arr.size - np.isfinite(arr).sum()) for name, arr in outputs.items() if arr.dtype.kind in "fc"}
    bad = [f"{name} ({n} of {outputs[name].size})" for name, n in counts.items() if n]
    if bad:
        print(f"tether run: warning: NaN or Inf in outputs {', '.join(bad)}", file=sys.stderr)
