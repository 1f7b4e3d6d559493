"""Backend plug-ins (``tether.backends`` entry points) and ``--load-library``.

A made-up NPU vendor package, ``tether-fakenpu``, is written, built and installed into a directory of its
own (never the shared environment); a device server started with that directory on its ``PYTHONPATH``
finds it through ``importlib.metadata``. Its runtime library, ``libfakenpu.so``, is compiled here: its
constructor writes the loading process's pid into ``$FAKENPU_MARKER`` and it exports ``fakenpu_gain()``,
which the plug-in finds through ``ctypes.CDLL(None)`` (so only where ``--load-library`` loaded it
RTLD_GLOBAL). A ``.npu`` model is a reference-interpreter program whose ``affine`` scales the NPU
multiplies by that gain.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import re
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import tether
from tether.device.server import ServerConfig
from tether.errors import ConfigError, ModelLoadError, SessionLost, Unservable
from tether.protocol.tracker import LABEL_ANY, labels_match
from tether.runtime.plugins import GROUP, discover
from tether.runtime.reference import write_reference_model
from tether.tracker import TrackerConfig, TrackerThread

from .conftest import CliProcess, wait_until

GAIN = 3  # what libfakenpu's fakenpu_gain() returns

FAKENPU_MODULE = '''
"""fakenpu: a made-up NPU runtime as a tether backend plug-in."""
import ctypes
import json
import os

from tether.runtime.base import BackendError


class Backend:
    name = "fakenpu"
    suffixes = (".npu", ".json")  # .json is the reference backend's: dropped, with a log line

    def version(self):
        return "7.1"

    def load(self, path, options):
        from tether.runtime.reference import FORMAT, ReferenceBackend

        if options:
            raise BackendError(f"fakenpu takes no options, got {sorted(options)}")
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
        if doc.get("format") != "fakenpu/1":
            raise BackendError(f"{os.path.basename(path)} is not a fakenpu program")
        try:
            gain = ctypes.CDLL(None).fakenpu_gain  # the vendor runtime, loaded by --load-library
        except AttributeError:
            raise BackendError("the fakenpu runtime is not loaded: start the server with --load-library libfakenpu.so") from None
        gain.restype = ctypes.c_int
        ops = [dict(op, scale=op.get("scale", 1) * gain()) if op.get("op") == "affine" else op for op in doc["ops"]]
        program = path + ".ref.json"
        with open(program, "w", encoding="utf-8") as f:
            json.dump({"format": FORMAT, "inputs": doc["inputs"], "outputs": doc["outputs"], "ops": ops}, f)
        model = ReferenceBackend().load(program, {})
        model.backend = self.name
        return model
'''

BROKEN_MODULE = """
raise ImportError("libbrokennpu_sdk.so: cannot open shared object file: No such file or directory")
"""

LIBFAKENPU_C = r"""
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

__attribute__((constructor)) static void fakenpu_init(void) {
    const char *marker = getenv("FAKENPU_MARKER");
    if (marker) {
        FILE *f = fopen(marker, "a");
        if (f) {
            fprintf(f, "%d\n", (int)getpid());
            fclose(f);
        }
    }
}

int fakenpu_gain(void) { return 3; }
"""


def _pyproject(name: str, module: str, entry_points: dict[str, str]) -> str:
    eps = "\n".join(f'{k} = "{v}"' for k, v in entry_points.items())
    return (
        textwrap.dedent(f"""\
        [build-system]
        requires = ["setuptools>=61"]
        build-backend = "setuptools.build_meta"

        [project]
        name = "{name}"
        version = "0.3.0"

        [tool.setuptools]
        py-modules = ["{module}"]

        [project.entry-points."tether.backends"]
        """)
        + eps
        + "\n"
    )


PIP_INSTALL = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index", "--quiet"]
SETUPTOOLS_INSTALL = [
    *(sys.executable, "-c", "from setuptools import setup; setup()"),
    *("--quiet", "install", "--single-version-externally-managed"),
]


def _install(project: Path, target: Path) -> None:
    """Build and install ``project`` into ``target`` (not the shared environment), offline: pip when it can
    build a wheel here, else setuptools' own install (an older setuptools without the ``wheel`` package
    cannot build one); either way ``target`` gets the module and its metadata with the entry points."""
    pip = subprocess.run(
        [*PIP_INSTALL, "--target", str(target), str(project)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    if pip.returncode == 0:
        return
    record = project / "installed.txt"
    done = subprocess.run(
        [*SETUPTOOLS_INSTALL, "--record", str(record), "--install-lib", str(target)],
        cwd=project,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, f"pip: {pip.stderr}\nsetuptools: {done.stderr}"


@pytest.fixture(scope="module")
def plugin_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory holding the installed ``tether-fakenpu`` and ``tether-brokennpu`` distributions."""
    root = tmp_path_factory.mktemp("plugins")
    site = root / "site"
    fake = root / "src" / "fakenpu"
    fake.mkdir(parents=True)
    (fake / "tether_fakenpu.py").write_text(FAKENPU_MODULE)
    (fake / "pyproject.toml").write_text(
        _pyproject("tether-fakenpu", "tether_fakenpu", {"fakenpu": "tether_fakenpu:Backend"})
    )
    broken = root / "src" / "brokennpu"
    broken.mkdir(parents=True)
    (broken / "tether_brokennpu.py").write_text(BROKEN_MODULE)
    shadow = {"brokennpu": "tether_brokennpu:Backend", "reference": "tether_brokennpu:Backend"}
    (broken / "pyproject.toml").write_text(_pyproject("tether-brokennpu", "tether_brokennpu", shadow))
    _install(fake, site)
    _install(broken, site)
    return site


@pytest.fixture(scope="module")
def libfakenpu(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler")
    root = tmp_path_factory.mktemp("libfakenpu")
    (root / "fakenpu.c").write_text(LIBFAKENPU_C)
    lib = root / "libfakenpu.so"
    subprocess.run([cc, "-shared", "-fPIC", "-o", str(lib), str(root / "fakenpu.c")], check=True, timeout=60)
    return lib


def _npu_model(path: Path) -> Path:
    spec = {"name": "x", "dtype": "float32", "shape": [2, 3]}
    out = {"name": "y", "dtype": "float32", "shape": [2, 3]}
    write_reference_model(
        path, [spec], [out], [{"op": "affine", "input": "x", "output": "y", "scale": 2.0, "bias": 1.0}]
    )
    doc = path.read_text().replace('"tether-reference/1"', '"fakenpu/1"')
    path.write_text(doc)
    return path


def _server_with(tracker: TrackerThread, pred: Callable[[dict[str, Any]], bool]) -> dict[str, Any] | None:
    detail = tracker.call(lambda: tracker.core.summary(detail=True))
    return next((s for s in detail["tether"]["servers"] if pred(s)), None)


# -- discovery, in this process (entry points made by hand) ------------------------------------


PLUGS = """
from tether.runtime.reference import ReferenceBackend

class AsClass(ReferenceBackend):
    name = "asclass"
    suffixes = (".cls", ".json")

def as_factory():
    backend = ReferenceBackend()
    backend.name = "asfactory"
    backend.suffixes = [".cls", ".fac"]
    return backend

class Bare:  # no name, no version(), no suffixes: the entry point's name and the dist's version
    def load(self, path, options):
        return ReferenceBackend().load(path, options)

as_instance = Bare()

class Misnamed(ReferenceBackend):
    name = "other"

class NotABackend:
    pass
"""


@pytest.mark.timeout(30)
def test_discover_loads_every_form_and_refuses_what_it_must(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "tether_test_plugs.py").write_text(PLUGS)
    (tmp_path / "tether_test_broken.py").write_text(BROKEN_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))

    def ep(name: str, value: str) -> importlib.metadata.EntryPoint:
        return importlib.metadata.EntryPoint(name, value, GROUP)

    eps = [
        ep("asclass", "tether_test_plugs:AsClass"),
        ep("asfactory", "tether_test_plugs:as_factory"),
        ep("asinstance", "tether_test_plugs:as_instance"),
        ep("tvm", "tether_test_plugs:AsClass"),
        ep("asclass", "tether_test_plugs:as_factory"),
        ep("misnamed", "tether_test_plugs:Misnamed"),
        ep("nothing", "tether_test_plugs:NotABackend"),
        ep("broken", "tether_test_broken:Backend"),
        ep("bad name", "tether_test_plugs:AsClass"),
    ]
    with caplog.at_level(logging.WARNING, logger="tether.runtime"):
        found = discover({"tvm", "reference"}, {".json": "reference"}, eps)
    ok = {name: p for name, p in found.items() if p.backend is not None}
    assert set(ok) == {"asclass", "asfactory", "asinstance"}
    assert ok["asclass"].suffixes == (".cls",)  # .json is the reference backend's
    assert ok["asfactory"].suffixes == (".fac",)  # .cls was asclass's first
    assert ok["asinstance"].suffixes == () and ok["asinstance"].version() is None  # no dist here
    assert ok["asclass"].backend is not None and ok["asclass"].backend.name == "asclass"
    assert ok["asclass"].version() == tether.__version__  # its own version()
    errors = {name: p.error for name, p in found.items() if p.error}
    assert "built-in backend" in errors["tvm"]
    assert any("already the backend plug-in tether_test_plugs:AsClass" in e for e in errors.values())
    assert "calls itself 'other', but its entry point is 'misnamed'" in errors["misnamed"]
    assert "has no load(path, options)" in errors["nothing"]
    assert errors["broken"].startswith("ImportError: libbrokennpu_sdk.so")
    assert "not a backend name" in errors["bad name"]
    logged = caplog.text
    assert "'tvm' is a built-in backend" in logged and "failed to load" in logged
    assert ".json already belongs to 'reference'" in logged


def test_a_requested_label_star_matches_any_value_the_server_has() -> None:
    have = {"backend.fakenpu": "7.1", "soc": "sd8"}
    assert labels_match(have, {"backend.fakenpu": LABEL_ANY})
    assert labels_match(have, {"backend.fakenpu": "7.1", "soc": "sd8"})
    assert not labels_match(have, {"backend.fakenpu": "7.2"})
    assert not labels_match(have, {"backend.othernpu": LABEL_ANY})
    assert labels_match({"odd": "*"}, {"odd": "*"}) and not labels_match({"odd": "x"}, {"odd": "y"})


# -- a real server with the plug-in installed --------------------------------------------------


@pytest.fixture
def fresh_tracker() -> Any:
    """A tracker that calls a request unservable at once (no grace for servers still registering)."""
    with TrackerThread(TrackerConfig(host="127.0.0.1", port=0, registration_grace_s=0)) as tracker:
        yield tracker


@pytest.mark.timeout(120)
def test_a_plugin_backend_is_reported_requested_by_label_and_runs_models(
    fresh_tracker: TrackerThread,
    device_server: Any,
    cli: Callable[..., CliProcess],
    plugin_site: Path,
    libfakenpu: Path,
    tmp_path: Path,
) -> None:
    tracker = fresh_tracker
    marker = tmp_path / "loaded.txt"
    where = f"{tracker.host}:{tracker.port}"
    env = {
        "PYTHONPATH": os.pathsep.join(p for p in (str(plugin_site), os.environ.get("PYTHONPATH", "")) if p),
        "FAKENPU_MARKER": str(marker),
    }
    server = cli(
        "server", "--host", "127.0.0.1", "--port", "0", "--tracker", where, "--key", "npu", "--label", "soc=fake1",
        "--load-library", str(libfakenpu), "--preload", "none", "--work-dir", str(tmp_path / "npu-server"),
        env=env,
    )  # fmt: skip
    device_server(key="npu", tracker=(tracker.host, tracker.port), labels={"soc": "plain"})  # no plug-ins here
    device_server(key="plain", tracker=(tracker.host, tracker.port))
    npu = wait_until(
        lambda: _server_with(tracker, lambda s: "fakenpu" in s["device"].get("plugins", {})),
        timeout=60,
        what="the plug-in server registered",
    )
    server.wait_line("failed to load", timeout=10)  # the broken plug-in, logged; the server serves on
    assert not marker.exists()  # the server process itself never loads the libraries

    # facts: the plug-in with its distribution, the broken one with its error, the shadow refused
    plugins = npu["device"]["plugins"]
    assert plugins["fakenpu"] == {
        "entry_point": "tether_fakenpu:Backend",
        "dist": "tether-fakenpu",
        "dist_version": "0.3.0",
        "version": "7.1",
        "suffixes": [".npu"],
        "error": None,
    }
    assert plugins["brokennpu"]["error"].startswith("ImportError: libbrokennpu_sdk.so")
    assert plugins["brokennpu"]["dist"] == "tether-brokennpu"
    assert "built-in backend" in plugins["reference"]["error"]
    assert npu["device"]["backends"]["fakenpu"] == "7.1" and "brokennpu" not in npu["device"]["backends"]
    assert npu["device"]["backends"]["reference"] == tether.__version__  # the built-in, not shadowed
    assert npu["labels"] == {"backend.fakenpu": "7.1", "soc": "fake1"}

    model = _npu_model(tmp_path / "double.npu")
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    with tether.connect_tracker(tracker.host, tracker.port) as client:
        for wanted in ({"backend.fakenpu": "*"}, {"backend.fakenpu": "7.1", "soc": "fake1"}):
            with client.request("npu", labels=wanted, timeout=30, session_timeout=60) as sess:
                info = sess.info()
                assert info["labels"]["backend.fakenpu"] == "7.1"
                # --load-library: loaded by this session's worker (not the server) before its first request
                pids = [int(line) for line in marker.read_text().split()]
                assert pids[-1] == info["pid"] and info["pid"] != server.proc.pid
                remote = sess.upload(model)
                loaded = sess.load_model(remote)  # the suffix names the plug-in
                assert loaded.backend == "fakenpu"
                out = loaded.run({"x": x})["y"]
                np.testing.assert_array_equal(out, x * 2.0 * GAIN + 1.0)
                with pytest.raises(ModelLoadError, match=r"brokennpu'.* did not load: ImportError: libbrokennpu_sdk"):
                    sess.load_model(remote, "brokennpu")
        with pytest.raises(Unservable, match=r"has labels backend\.fakenpu=9\.9"):
            client.request("npu", labels={"backend.fakenpu": "9.9"}, timeout=30, unservable_after=0.2)
        with pytest.raises(Unservable, match=r"no server of key 'plain' has labels backend\.fakenpu=\*"):
            client.request("plain", labels={"backend.fakenpu": "*"}, timeout=30, unservable_after=0.2)
        with client.request("plain", timeout=30) as sess:  # the same server, without the label
            assert "fakenpu" not in sess.info()["device"]["backends"]
    assert server.proc.poll() is None


@pytest.mark.timeout(60)
def test_load_library_is_loaded_in_each_sessions_worker_whatever_the_backend(
    device_server: Any, libfakenpu: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    marker = tmp_path / "loaded.txt"
    monkeypatch.setenv("FAKENPU_MARKER", str(marker))
    server = device_server(load_library=[str(libfakenpu)])
    assert not marker.exists()
    model = write_reference_model(
        tmp_path / "m.json",
        [{"name": "x", "dtype": "float32", "shape": [3]}],
        [{"name": "y", "dtype": "float32", "shape": [3]}],
        [{"op": "affine", "input": "x", "output": "y", "scale": 2.0}],
    )
    workers = []
    for _ in range(2):
        with tether.connect("127.0.0.1", server.port, session_timeout=30) as sess:
            workers.append(sess.info()["pid"])
            assert [int(p) for p in marker.read_text().split()] == workers  # one load per session, before it
            out = sess.load_model(sess.upload(model)).run({"x": np.ones(3, dtype=np.float32)})["y"]
            np.testing.assert_array_equal(out, np.full(3, 2.0, dtype=np.float32))
    assert os.getpid() not in workers and workers[0] != workers[1]


@pytest.mark.timeout(60)
def test_a_library_that_does_not_load_is_a_clear_error(device_server: Any, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"--load-library .*nope\.so: no such file"):
        ServerConfig(load_library=[str(tmp_path / "nope.so")])
    not_elf = tmp_path / "libnotelf.so"
    not_elf.write_text("not a shared library")
    for lib, why in (("libtether_not_there.so", "cannot open shared object file"), (str(not_elf), "")):
        server = device_server(load_library=[lib])
        for _ in range(2):  # every session says so; the server goes on
            with (
                pytest.raises(SessionLost, match=f"LibraryLoadError: --load-library {re.escape(lib)}: .*{why}"),
                tether.connect("127.0.0.1", server.port, session_timeout=30) as sess,
            ):
                sess.ping()
        wait_until(lambda s=server: s.busy_slots() == 0, timeout=10, what="the slot free again")
