"""``tether pack``: the device server as one file (a zipapp) for a bare device Python.

The seeds' troubleshooting tells people to fake numpy on devices that cannot install it; tether's
server needs none of it. Copy ``tether-server.pyz`` to the device and run
``python3 tether-server.pyz --tracker HOST:9190 --key android`` (flags of ``tether server``).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import zipapp
from pathlib import Path
from typing import Any

__all__ = ["add_parser", "build_zipapp", "run"]

_MAIN = """\
import sys
from tether.cli import main
argv = sys.argv[1:]
commands = ("server", "query", "tracker", "--version", "--help", "-h")
sys.exit(main(argv if argv[:1] and argv[0] in commands else ["server", *argv]))
"""


def add_parser(sub: Any) -> None:
    p = sub.add_parser("pack", help="write the device server as a single-file zipapp for a bare device Python")
    p.add_argument("-o", "--output", type=Path, default=Path("tether-server.pyz"), help="default tether-server.pyz")
    p.add_argument("--python", default="/usr/bin/env python3", help="interpreter line (default /usr/bin/env python3)")
    p.set_defaults(run=run)


def build_zipapp(output: Path, interpreter: str | None = "/usr/bin/env python3") -> Path:
    """Copy tether's sources (no caches, no tests) into a zipapp whose entry point is ``tether server``."""
    package = Path(__file__).resolve().parent.parent
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        shutil.copytree(package, root / "tether", ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.so"))
        (root / "__main__.py").write_text(_MAIN)
        output.parent.mkdir(parents=True, exist_ok=True)
        zipapp.create_archive(root, output, interpreter=interpreter, compressed=True)
    return output


def run(args: argparse.Namespace) -> int:
    path = build_zipapp(args.output, args.python)
    size = path.stat().st_size
    print(f"wrote {path} ({size / 1024:.0f} KiB): python3 {path} --tracker HOST:9190 --key KEY", file=sys.stdout)
    return 0
