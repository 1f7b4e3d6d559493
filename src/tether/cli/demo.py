"""``tether demo``: the main job on a fresh machine (tracker, device server, real model, on loopback)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from ..errors import TetherError
from ._args import existing_file, positive
from ._report import fail
from .query import render

__all__ = ["add_parser", "run"]


def add_parser(sub: Any) -> None:
    p = sub.add_parser("demo", help="run a real model through a tracker and a device server on this machine")
    p.add_argument(
        "--model", type=existing_file, default=None, help="ONNX model (default: SqueezeNet from the onnx package)"
    )
    p.add_argument("--repeat", type=positive, default=10, help="timed runs per measurement (default 10)")
    p.add_argument("-v", "--verbose", action="store_true", help="a device's error in full, with its traceback")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..client.inputs import local_input_specs
    from ..demo import run_demo  # the demo module itself needs only the standard library to import

    if args.model is not None:
        local_input_specs(args.model, "onnxruntime")  # not ONNX: ConfigError now, not once all is started
    try:
        result = run_demo(args.model, repeat=args.repeat)
    except ImportError as exc:
        print(f"tether demo needs the tvm and onnx extras: pip install 'tether[tvm,onnx]' ({exc})", file=sys.stderr)
        return 2
    except TetherError as exc:
        return fail("tether demo failed", exc, verbose=args.verbose)
    print()
    if result.status is not None:
        print("While the session was held, tether query showed:\n")
        print(render(result.status))
    print(f"input  {result.input_name}: {result.input_shape} float32 (seeded random)")
    print(f"output: {result.output_shape}, top-5 classes {[(i, round(p, 4)) for i, p in result.top5]}")
    print(f"remote onnxruntime vs local onnxruntime: max |diff| = {result.max_abs_diff:.3g}")
    print(f"remote TVM library vs local onnxruntime: max |diff| = {result.max_abs_diff_tvm:.3g}")
    print(f"through the proxy, onnxruntime vs local: max |diff| = {result.max_abs_diff_proxy:.3g}")
    print(f"-> {'OK' if result.ok else 'MISMATCH'}")
    t = result.timings
    print(
        "timings: "
        f"compile {t['compile_s']:.2f} s, request {t['request_ms']:.1f} ms, upload {t['upload_ms']:.1f} ms, "
        f"first remote run {t['first_run_ms']:.1f} ms (round trip); on the device (median): "
        f"onnxruntime {t['remote_run_ms']:.2f} ms, TVM {t['remote_tvm_run_ms']:.2f} ms; "
        f"local onnxruntime {t['local_ort_run_ms']:.2f} ms; through the proxy: request "
        f"{t['proxy_request_ms']:.1f} ms, onnxruntime on the device {t['proxy_run_ms']:.2f} ms"
    )
    return 0 if result.ok else 1
