"""``tether compile``: an ONNX model compiled by TVM for a device, cross-linked when the device is another
architecture: the host half of the seeds' cross-compile flow as one command.

``tether compile model.onnx --target '{"kind": "llvm", "mtriple": "aarch64-linux-gnu"}' --cc
aarch64-linux-gnu-g++ -o model.so`` writes a library a board's TVM runtime loads (``tether pack
--with tvm-runtime``); ``--tuned DIR`` applies the schedules a ``tether tune --work-dir DIR`` found.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ._args import existing_file, output_file

__all__ = ["add_parser", "run"]


def add_parser(sub: Any) -> None:
    p = sub.add_parser("compile", help="compile an ONNX model with TVM for a device (cross-linked with --cc)")
    p.add_argument("model", type=existing_file, help="the ONNX model")
    p.add_argument(
        "--target",
        required=True,
        help='JSON (\'{"kind": "llvm", "mtriple": "aarch64-linux-gnu"}\') or an old CLI string '
        '("llvm -mtriple=aarch64-linux-gnu")',
    )
    p.add_argument("--target-host", default=None, help="the host target, in either form")
    p.add_argument("--cc", default=None, help="compiler to link the library with (e.g. aarch64-linux-gnu-g++)")
    p.add_argument("--tuned", type=Path, default=None, metavar="DIR", help="a tether tune work dir to apply")
    p.add_argument("-o", "--output", type=output_file, required=True, metavar="FILE", help="the library (.so)")
    p.add_argument("--json", action="store_true", help="print what was done as JSON")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..tune import TuneError, compile_model

    try:
        done = compile_model(
            args.model, args.target, args.output, target_host=args.target_host, cc=args.cc, tuned=args.tuned
        )
    except (TuneError, ConfigError) as exc:
        print(f"tether compile: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, ConfigError) else 1
    if args.json:
        print(json.dumps(done))
    else:
        print(
            f"wrote {done['output']} ({done['bytes']} bytes) for {json.dumps(done['target'])} "
            f"in {done['seconds']:.1f} s"
        )
    return 0
