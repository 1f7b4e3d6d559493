"""What a board needs to run models, packed on the host: ``tether pack --platform aarch64 --with onnxruntime``.

The seeds' way is to cross-compile TVM's runtime on the host, copy it, set ``PYTHONPATH`` on the device,
``pip install`` what the device can and fake numpy where it cannot. A bundle replaces that: tether's server
(the zipapp of :mod:`tether.cli.pack`) beside ``site/``, the runtime wheels for the board's platform and
Python unpacked, so the device needs its own ``python3`` and nothing else: no pip, no compiler, no network.

- wheels come from the package index through the host's ``pip download --platform ... --only-binary``,
  once: they are kept in a cache (``~/.cache/tether/wheels``) and a second pack fetches nothing;
- versions follow the host's where it has the package (a library compiled here must meet the runtime it
  was compiled with there), else the newest the index has (TVM: 0.27, with apache-tvm-ffi below 0.1.15);
- only what a runtime needs goes in: from TVM, its runtime libraries (``libtvm_runtime.so``, and
  ``libtvm_runtime_extra.so``: sort, top-k) and its Python package, not the compiler (250 MiB) nor the
  CUDA runtime; from onnxruntime, no tools, transformers or quantization; no package's tests;
- ``MANIFEST.json`` says what went in: the platform, the Python it is for, every wheel with its sha256.

The server inside puts ``site/`` first on its path and, when TVM's compiler is absent, loads TVM
runtime-only (``TVM_USE_RUNTIME_LIB=1``); its facts then list the backends the bundle brought.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipapp
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError, TetherError

__all__ = [
    "PLATFORMS",
    "RUNTIMES",
    "Bundle",
    "BundleError",
    "build_bundle",
    "build_zipapp",
    "default_cache_dir",
    "requirements",
]


class BundleError(TetherError):
    """A bundle could not be made (a wheel the index does not have for the platform, pip missing)."""


#: ``--platform`` -> the manylinux tags pip may take for it, newest first (glibc 2.28 and older).
PLATFORMS: dict[str, tuple[str, ...]] = {
    arch: (*(f"manylinux_2_{v}_{arch}" for v in (28, 27, 26, 24, 17)), f"manylinux2014_{arch}")
    for arch in ("aarch64", "x86_64")
}

#: ``--with`` -> the distributions it brings (numpy for both: their Python APIs are numpy's).
RUNTIMES: dict[str, tuple[str, ...]] = {
    "onnxruntime": ("onnxruntime", "numpy"),
    "tvm-runtime": ("apache-tvm", "apache-tvm-ffi", "numpy", "typing_extensions"),
}

#: Where a distribution's version is not the host's, what to ask the index for.
_DEFAULT_SPECS = {
    "apache-tvm": "apache-tvm==0.27.*",
    "apache-tvm-ffi": "apache-tvm-ffi>=0.1.14.post0,<0.1.15",
}

#: Paths (relative to ``site/``) never packed: what no runtime on the device uses.
_DROP = (
    re.compile(r"^tvm/lib/libtvm_compiler\.so$"),
    re.compile(r"^tvm/lib/libtvm_runtime_cuda\.so$"),
    re.compile(r"^tvm/(3rdparty|src|include|web|cmake|lib64)/"),
    re.compile(r"^tvm_ffi/(include|cmake|cython)/"),
    re.compile(r"^onnxruntime/(tools|transformers|quantization|datasets)/"),
    re.compile(r"^numpy/(.+/)?tests/"),
    re.compile(r"\.(pyi|pxd|pyx|h|hpp|cc|cpp)$"),
)


@dataclass
class Bundle:
    """A bundle written to ``path`` (a directory, or a ``.tar.gz`` of one)."""

    path: Path
    platform: str
    python: str
    wheels: list[dict[str, Any]] = field(default_factory=list)
    fetched: int = 0  # wheels downloaded this time (0: all came from the cache)
    size: int = 0

    def summary(self) -> str:
        names = ", ".join(f"{w['name']} {w['version']}" for w in self.wheels) or "no runtime"
        cached = "all from the cache" if self.fetched == 0 else f"{self.fetched} fetched"
        return (
            f"wrote {self.path} ({self.size / 2**20:.1f} MiB): tether's server for {self.platform}, "
            f"Python {self.python}, with {names} ({cached})"
        )


def default_cache_dir() -> Path:
    """``$TETHER_CACHE_DIR/wheels``, else ``$XDG_CACHE_HOME/tether/wheels``, else ``~/.cache/tether/wheels``."""
    if os.environ.get("TETHER_CACHE_DIR"):
        return Path(os.environ["TETHER_CACHE_DIR"]) / "wheels"
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "tether" / "wheels"


def _host_version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def requirements(runtimes: Sequence[str]) -> list[str]:
    """The requirement specifiers for ``runtimes`` (names of :data:`RUNTIMES`), the host's versions pinned."""
    unknown = [r for r in runtimes if r not in RUNTIMES]
    if unknown:
        raise ConfigError(f"unknown runtime {unknown[0]!r}; known: {', '.join(RUNTIMES)}")
    names: list[str] = []
    for runtime in runtimes:
        names.extend(n for n in RUNTIMES[runtime] if n not in names)
    specs = []
    for name in names:
        version = _host_version(name)
        specs.append(f"{name}=={version}" if version else _DEFAULT_SPECS.get(name, name))
    return specs


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def _cached_wheel(cache: Path, spec: str, platform: str, python: str) -> Path | None:
    """A wheel in ``cache`` that satisfies ``spec`` for the platform and Python (exact pins and bare names only:
    a range is resolved by pip, offline, against the cache)."""
    name, _, version = spec.partition("==")
    if not version or "*" in version:
        return None
    tag = "cp" + python.replace(".", "")
    for wheel in sorted(cache.glob(f"{_normal(name)}-{version}-*.whl")):
        tags = wheel.name[: -len(".whl")].split("-")[-3:]
        if (tags[0] in ("py3", tag) or tags[0].startswith("py3")) and (
            tags[2] == "any" or any(p in tags[2].split(".") for p in PLATFORMS[platform])
        ):
            return wheel
    return None


_SAVED = re.compile(r"^(?:Saved|File was already downloaded) (?P<path>.+\.whl)\s*$", re.M)


def _pip_download(spec: str, cache: Path, platform: str, python: str, offline: bool) -> Path:
    """Download (or find, ``offline``) the one wheel for ``spec`` into ``cache``; its path."""
    argv = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--dest", str(cache)]
    argv += ["--python-version", python, "--implementation", "cp", "--disable-pip-version-check"]
    for tag in PLATFORMS[platform]:
        argv += ["--platform", tag]
    if offline:
        argv += ["--no-index", "--find-links", str(cache)]
    proc = subprocess.run([*argv, spec], capture_output=True, text=True, timeout=600, check=False)
    saved = _SAVED.search(proc.stdout)
    if proc.returncode != 0 or saved is None:
        if "No module named pip" in proc.stderr:
            raise BundleError(f"packing runtimes needs pip in this Python ({sys.executable})")
        reason = next((ln for ln in proc.stderr.splitlines() if ln.startswith("ERROR")), proc.stderr.strip()[-300:])
        raise BundleError(f"no wheel of {spec} for {platform}, Python {python}: {reason}")
    path = Path(saved["path"])
    return path if path.is_absolute() else cache / path.name


def _fetch(spec: str, cache: Path, platform: str, python: str) -> tuple[Path, bool]:
    """The wheel for ``spec``: from the cache when it has one (``False``), else fetched (``True``)."""
    wheel = _cached_wheel(cache, spec, platform, python)
    if wheel is not None:
        return wheel, False
    try:
        return _pip_download(spec, cache, platform, python, offline=True), False
    except BundleError:
        pass
    return _pip_download(spec, cache, platform, python, offline=False), True


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _unpack(wheel: Path, site: Path) -> int:
    """Unzip ``wheel`` into ``site`` without what :data:`_DROP` names; the bytes written."""
    written = 0
    with zipfile.ZipFile(wheel) as zf:
        for info in zf.infolist():
            name = info.filename
            if info.is_dir() or any(p.search(name) for p in _DROP):
                continue
            target = (site / name).resolve()
            if not target.is_relative_to(site.resolve()):
                raise BundleError(f"{wheel.name}: {name!r} would be written outside the bundle")
            target.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(info) as src, target.open("wb") as dst:
                shutil.copyfileobj(src, dst)
            mode = (info.external_attr >> 16) & 0o777
            if mode & 0o111 or name.endswith(".so") or ".so." in name:
                target.chmod(0o755)
            written += info.file_size
    return written


def _tree_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def build_bundle(
    output: Path,
    platform: str,
    *,
    runtimes: Sequence[str] = (),
    python: str | None = None,
    cache_dir: Path | None = None,
    interpreter: str = "/usr/bin/env python3",
    on_line: Callable[[str], None] | None = None,
) -> Bundle:
    """Write the bundle for ``platform`` with ``runtimes`` to ``output`` (``.tar.gz``: an archive of the
    directory ``output`` names without it, else that directory)."""
    if platform not in PLATFORMS:
        raise ConfigError(f"unknown platform {platform!r}; known: {', '.join(PLATFORMS)}")
    python = python or f"{sys.version_info.major}.{sys.version_info.minor}"
    if not re.fullmatch(r"3\.\d+", python):
        raise ConfigError(f"--python-version takes MAJOR.MINOR, e.g. 3.11, not {python!r}")
    specs = requirements(runtimes)
    cache = cache_dir or default_cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    say = on_line or (lambda line: None)
    archive = output.name.endswith((".tar.gz", ".tgz"))
    name = re.sub(r"\.(tar\.gz|tgz)$", "", output.name) if archive else output.name
    bundle = Bundle(output, platform, python)
    with tempfile.TemporaryDirectory(prefix="tether-bundle-") as tmp:
        root = Path(tmp) / name
        site = root / "site"
        site.mkdir(parents=True)
        for spec in specs:
            wheel, fetched = _fetch(spec, cache, platform, python)
            bundle.fetched += fetched
            say(f"{'fetched' if fetched else 'cached '} {wheel.name}")
            written = _unpack(wheel, site)
            dist, version = wheel.name.split("-")[:2]
            bundle.wheels.append(
                {"name": dist, "version": version, "wheel": wheel.name, "sha256": _sha256(wheel), "bytes": written}
            )
        build_zipapp(root / "tether-server.pyz", interpreter)
        manifest = {"platform": platform, "python": python, "runtimes": list(runtimes), "wheels": bundle.wheels}
        (root / "MANIFEST.json").write_text(json.dumps(manifest, indent=2) + "\n")
        launcher = root / "tether-server"
        launcher.write_text(_LAUNCHER)
        launcher.chmod(0o755)
        if archive:
            output.parent.mkdir(parents=True, exist_ok=True)
            with tarfile.open(output, "w:gz") as tar:
                tar.add(root, arcname=name)
            bundle.size = output.stat().st_size
        else:
            if output.exists():
                shutil.rmtree(output)
            output.parent.mkdir(parents=True, exist_ok=True)
            shutil.copytree(root, output, symlinks=True)
            bundle.size = _tree_size(output)
    return bundle


_MAIN = """\
import os, sys
site = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "site")
if os.path.isdir(site):  # a bundle's runtimes (tether pack --platform), before anything installed
    sys.path.insert(1, site)
    if not os.path.exists(os.path.join(site, "tvm", "lib", "libtvm_compiler.so")):
        os.environ.setdefault("TVM_USE_RUNTIME_LIB", "1")
from tether.cli import main
argv = sys.argv[1:]
commands = ("server", "query", "tracker", "--version", "--help", "-h")
sys.exit(main(argv if argv[:1] and argv[0] in commands else ["server", *argv]))
"""


def build_zipapp(output: Path, interpreter: str | None = "/usr/bin/env python3") -> Path:
    """Copy tether's sources (no caches, no tests) into a zipapp whose entry point is ``tether server``."""
    package = Path(__file__).resolve().parent  # the tether package
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        shutil.copytree(package, root / "tether", ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.so"))
        (root / "__main__.py").write_text(_MAIN)
        output.parent.mkdir(parents=True, exist_ok=True)
        zipapp.create_archive(root, output, interpreter=interpreter, compressed=True)
    return output


#: The bundle's launcher: the device's python3 (``PYTHON`` to pick another) running the server beside it.
_LAUNCHER = """\
#!/bin/sh
# tether's device server with the runtimes packed beside it: ./tether-server --tracker HOST:9190 --key KEY
here=$(cd "$(dirname "$0")" && pwd)
exec "${PYTHON:-python3}" "$here/tether-server.pyz" "$@"
"""
