"""Architecture rules that code review would miss: import directions and the stdlib-only core."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import tether

SRC = Path(tether.__file__).parent
FORBIDDEN_IN_PROTOCOL = {"socket", "asyncio", "subprocess", "selectors", "ssl", "threading"}


def imports_of(path: Path, top_level_only: bool = False) -> set[str]:
    """Top-level package names imported by a file (only at module level when asked: optional
    dependencies are imported inside the functions that need them)."""
    tree = ast.parse(path.read_text())
    names: set[str] = set()
    for node in tree.body if top_level_only else ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_protocol_is_sans_io() -> None:
    for path in sorted((SRC / "protocol").glob("*.py")):
        bad = imports_of(path) & FORBIDDEN_IN_PROTOCOL
        assert not bad, f"{path.name} imports {bad}: the protocol layer must stay sans-I/O"


#: The rooms built on a framework (subclasses of meta_schedule's classes): only these import one at module level.
#: In ``tune/``, the target translation, the package's door and what a build worker imports first stay stdlib.
FRAMEWORK_ROOMS = ("integrations", "tune")
STDLIB_IN_FRAMEWORK_ROOMS = {"tune/targets.py", "tune/__init__.py", "tune/_worker.py"}


def test_core_uses_the_standard_library_only() -> None:
    """At module level, only ``tether.integrations`` and ``tether.tune`` may import a third-party package;
    and nothing outside them imports ``tether.integrations``."""
    stdlib = set(sys.stdlib_module_names)
    for path in sorted(SRC.rglob("*.py")):
        room = path.relative_to(SRC).parts[0]
        name = path.relative_to(SRC).as_posix()
        if room in FRAMEWORK_ROOMS and name not in STDLIB_IN_FRAMEWORK_ROOMS:
            continue
        third_party = {
            name for name in imports_of(path, top_level_only=True) if name not in stdlib and name != "tether"
        }
        assert not third_party, f"{path.relative_to(SRC)} imports {third_party} at module level"
        if room not in FRAMEWORK_ROOMS:
            assert not _imports_integrations(path), f"{path.relative_to(SRC)} imports tether.integrations"


def _imports_integrations(path: Path) -> bool:
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if "integrations" in (node.module or "").split(".") or any(a.name == "integrations" for a in node.names):
                return True
        elif isinstance(node, ast.Import) and any("integrations" in a.name.split(".") for a in node.names):
            return True
    return False


def test_tracker_and_query_run_with_no_site_packages(tmp_path: Path) -> None:
    """``python -S -I``: no site-packages at all, only tether's source on the path."""
    code = "import sys; sys.path.insert(0, sys.argv[1]); from tether.cli import main; sys.exit(main(['--version']))"
    done = subprocess.run(
        [sys.executable, "-S", "-I", "-c", code, str(SRC.parent)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("tether ")
