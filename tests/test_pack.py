"""``tether pack --platform``: a board's bundle from the wheel cache (the index is asked only for what the cache
lacks), trimmed to what runs, with a manifest; the server inside finds the bundled packages by itself.
The whole flow on an emulated aarch64 board, with the real wheels, is tests/test_board.py."""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

from tether.bundle import build_bundle, requirements
from tether.cli import main

pytestmark = pytest.mark.timeout(60)


def fake_wheel(cache: Path, name: str, files: dict[str, str]) -> Path:
    """A wheel of ``name`` at this host's version, tagged for aarch64, holding ``files``."""
    version = importlib.metadata.version(name)
    dist = name.replace("-", "_")
    path = cache / f"{dist}-{version}-cp311-cp311-manylinux_2_28_aarch64.whl"
    with zipfile.ZipFile(path, "w") as zf:
        for member, text in files.items():
            zf.writestr(member, text)
        zf.writestr(
            f"{dist}-{version}.dist-info/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
        )
    return path


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    cache = tmp_path / "cache"
    cache.mkdir()
    fake_wheel(
        cache,
        "onnxruntime",
        {
            "onnxruntime/__init__.py": "BUNDLED = True\n",
            "onnxruntime/capi/_pybind_state.py": "",
            "onnxruntime/tools/convert.py": "",
            "onnxruntime/transformers/big.py": "",
        },
    )
    fake_wheel(cache, "numpy", {"numpy/__init__.py": "", "numpy/_core/tests/test_x.py": "", "numpy/x.pyi": ""})
    return cache


def test_requirements_pin_the_hosts_versions() -> None:
    specs = requirements(["onnxruntime", "tvm-runtime"])
    assert f"onnxruntime=={importlib.metadata.version('onnxruntime')}" in specs
    assert sum(s.startswith("numpy") for s in specs) == 1  # both need it, once
    assert any(s.startswith("apache-tvm-ffi") for s in specs) and any(s.startswith("apache-tvm==") for s in specs)


def test_a_bundle_from_the_cache_is_trimmed_and_described(cache: Path, tmp_path: Path) -> None:
    out = tmp_path / "board"
    bundle = build_bundle(out, "aarch64", runtimes=["onnxruntime"], python="3.11", cache_dir=cache)
    assert bundle.fetched == 0  # nothing asked of the index
    site = out / "site"
    assert (site / "onnxruntime" / "capi" / "_pybind_state.py").is_file()
    assert not (site / "onnxruntime" / "tools").exists() and not (site / "onnxruntime" / "transformers").exists()
    assert not (site / "numpy" / "_core" / "tests").exists() and not (site / "numpy" / "x.pyi").exists()
    manifest = json.loads((out / "MANIFEST.json").read_text())
    assert manifest["platform"] == "aarch64" and manifest["python"] == "3.11"
    for wheel in manifest["wheels"]:
        assert wheel["sha256"] == hashlib.sha256((cache / wheel["wheel"]).read_bytes()).hexdigest()
    assert {w["name"] for w in manifest["wheels"]} == {"onnxruntime", "numpy"}
    # the server inside puts site/ first: the bundled onnxruntime, not this host's, is the one imported
    probe = subprocess.run(
        [sys.executable, "-I", str(out / "tether-server.pyz"), "--version"], capture_output=True, text=True, timeout=30
    )
    assert probe.returncode == 0 and probe.stdout.startswith("tether ")
    launcher = (out / "tether-server").read_text()
    assert launcher.startswith("#!/bin/sh") and "tether-server.pyz" in launcher


def test_the_bundled_site_comes_first_in_the_server(cache: Path, tmp_path: Path) -> None:
    out = tmp_path / "board"
    build_bundle(out, "aarch64", runtimes=["onnxruntime"], python="3.11", cache_dir=cache)
    code = (
        "import runpy, sys; sys.argv = [sys.argv[1], '--version']\n"
        "try:\n    runpy.run_path(sys.argv[0], run_name='__main__')\nexcept SystemExit:\n    pass\n"
        "import onnxruntime; print(getattr(onnxruntime, 'BUNDLED', False))"
    )
    probe = subprocess.run(
        [sys.executable, "-I", "-c", code, str(out / "tether-server.pyz")], capture_output=True, text=True, timeout=30
    )
    assert probe.stdout.splitlines()[-1] == "True", probe.stderr


def test_the_cli_writes_an_archive(cache: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    archive = tmp_path / "tether-aarch64.tar.gz"
    argv = ["pack", "--platform", "aarch64", "--with", "onnxruntime", "--python-version", "3.11"]
    assert main([*argv, "--cache-dir", str(cache), "-o", str(archive)]) == 0
    out = capsys.readouterr().out
    assert "all from the cache" in out and "tar xzf tether-aarch64.tar.gz && ./tether-aarch64/tether-server" in out
    with tarfile.open(archive) as tar:
        names = set(tar.getnames())
    assert {"tether-aarch64/tether-server.pyz", "tether-aarch64/MANIFEST.json", "tether-aarch64/tether-server"} <= names


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["pack", "--with", "onnxruntime"], "need --platform"),
        (["pack", "--platform", "aarch64", "--python-version", "three"], "MAJOR.MINOR"),
        (["pack", "--platform", "riscv"], "invalid choice"),
    ],
)
def test_bad_usage_is_one_line(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
