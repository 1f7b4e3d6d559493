"""``tether pack``: the device server as one file (a zipapp) for a bare device Python, or, with
``--platform``, a bundle with the runtimes a board needs (:mod:`tether.bundle`).

The seeds' troubleshooting tells people to fake numpy on devices that cannot install it; tether's
server needs none of it. Copy ``tether-server.pyz`` to the device and run
``python3 tether-server.pyz --tracker HOST:9190 --key android`` (flags of ``tether server``).
``tether pack --platform aarch64 --with onnxruntime --with tvm-runtime`` writes
``tether-aarch64.tar.gz``: unpack it on the board and run ``./tether-aarch64/tether-server --tracker ...``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from ..bundle import PLATFORMS, RUNTIMES, build_bundle, build_zipapp
from ..errors import ConfigError
from ._report import fail

__all__ = ["add_parser", "build_zipapp", "run"]  # build_zipapp: from tether.bundle


def add_parser(sub: Any) -> None:
    p = sub.add_parser("pack", help="write the device server as a single-file zipapp for a bare device Python")
    p.add_argument(
        "-o", "--output", type=Path, default=None,
        help="default tether-server.pyz; with --platform tether-PLATFORM.tar.gz (a name without .tar.gz: a directory)",
    )  # fmt: skip
    p.add_argument("--python", default="/usr/bin/env python3", help="interpreter line (default /usr/bin/env python3)")
    p.add_argument(
        "--platform", choices=sorted(PLATFORMS), default=None,
        help="write a bundle for a board of this architecture (Linux, glibc 2.28+): the server and --with runtimes",
    )  # fmt: skip
    p.add_argument(
        "--with", dest="runtimes", action="append", default=[], choices=sorted(RUNTIMES),
        help="a runtime to bundle (repeat): its wheels for --platform, fetched once and cached",
    )  # fmt: skip
    p.add_argument("--python-version", default=None, help="the board's Python, MAJOR.MINOR (default: this host's)")
    p.add_argument(
        "--cache-dir", type=Path, default=None, help="where fetched wheels are kept (~/.cache/tether/wheels)"
    )
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if args.platform is None:
        if args.runtimes or args.python_version:
            return fail("tether pack", ConfigError("--with and --python-version need --platform"))
        return _run_zipapp(args.output or Path("tether-server.pyz"), args.python)
    output = args.output or Path(f"tether-{args.platform}.tar.gz")
    bundle = build_bundle(
        output,
        args.platform,
        runtimes=args.runtimes,
        python=args.python_version,
        cache_dir=args.cache_dir,
        interpreter=args.python,
        on_line=lambda line: print(line, file=sys.stderr),
    )
    print(bundle.summary())
    name = output.name.removesuffix(".tar.gz").removesuffix(".tgz")
    start = f"tar xzf {output.name} && ./{name}/tether-server" if name != output.name else f"./{name}/tether-server"
    print(f"on the board: {start} --tracker HOST:9190 --key KEY")
    return 0


def _run_zipapp(output: Path, interpreter: str) -> int:
    path = build_zipapp(output, interpreter)
    size = path.stat().st_size
    print(f"wrote {path} ({size / 1024:.0f} KiB): python3 {path} --tracker HOST:9190 --key KEY", file=sys.stdout)
    return 0
