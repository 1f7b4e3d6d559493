"""The seeds' cross-compile, pack and deploy flow, end to end, on an emulated aarch64 board (tests/board.py):
an ONNX model compiled here for ``{"kind": "llvm", "mtriple": "aarch64-linux-gnu"}`` and linked by the cross
compiler, ``tether pack --platform aarch64 --with onnxruntime --with tvm-runtime``, the bundle's server on a
board that has Python and nothing else, requested through tether's tracker (and once through tether's
proxy), the model run there with TVM's runtime and with onnxruntime, both matching onnxruntime here.

Needs root, ``mmdebstrap``, ``qemu-user-static`` and ``g++-aarch64-linux-gnu`` (``.ci/run`` installs them),
and the package index once (the board's wheels, then cached); skips with the reason otherwise."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tether.client import connect_tracker
from tether.client.query import query_tracker
from tether.proxy import ProxyConfig, ProxyThread
from tether.tracker import TrackerConfig, TrackerThread

from . import board
from .conftest import wait_until

pytestmark = [pytest.mark.slow, pytest.mark.tvm, pytest.mark.timeout(600)]

CROSS_CC = "aarch64-linux-gnu-g++"
AARCH64 = {"kind": "llvm", "mtriple": "aarch64-linux-gnu"}
KEY, NAT_KEY = "rk3588", "rk3588-behind-nat"


@pytest.fixture(scope="module")
def rootfs() -> Path:
    reason = board.missing()
    if reason is None and subprocess.run(["which", CROSS_CC], capture_output=True, check=False).returncode != 0:
        reason = f"no {CROSS_CC}: apt-get install -y g++-aarch64-linux-gnu"
    if reason:
        pytest.skip(reason)
    return board.build()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("board-flow")


@pytest.fixture(scope="module")
def bundle(rootfs: Path, workdir: Path) -> Path:
    """The bundle, packed by the CLI as a user does, unpacked as on the board."""
    from tether.cli import main

    archive = workdir / "tether-aarch64.tar.gz"
    argv = ["pack", "--platform", "aarch64", "--with", "onnxruntime", "--with", "tvm-runtime", "-o", str(archive)]
    assert main(argv) == 0
    with tarfile.open(archive) as tar:
        tar.extractall(workdir, filter="data")
    root = workdir / "tether-aarch64"
    site = root / "site"
    assert (site / "tvm" / "lib" / "libtvm_runtime.so").is_file()
    assert not (site / "tvm" / "lib" / "libtvm_compiler.so").exists(), "the compiler is not the runtime"
    assert (site / "onnxruntime" / "capi").is_dir() and not (site / "onnxruntime" / "transformers").exists()
    return root


@pytest.fixture(scope="module")
def model(workdir: Path) -> dict[str, Any]:
    """squeezenet (onnx's light model, weights restored), compiled here for aarch64, and its answer here."""
    import numpy as np
    import onnx
    import onnxruntime as ort

    from tether.cli import main
    from tether.models import light_model

    onnx_path = workdir / "squeezenet.onnx"
    onnx.save(light_model("squeezenet", seed=0), str(onnx_path))
    lib = workdir / "squeezenet-aarch64.so"
    target = '{"kind": "llvm", "mtriple": "aarch64-linux-gnu"}'
    assert main(["compile", str(onnx_path), "--target", target, "--cc", CROSS_CC, "-o", str(lib)]) == 0
    header = lib.read_bytes()[:20]
    assert header[:4] == b"\x7fELF" and int.from_bytes(header[18:20], "little") == 183  # EM_AARCH64
    local = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    spec = local.get_inputs()[0]
    x = np.random.default_rng(0).standard_normal([d if isinstance(d, int) else 1 for d in spec.shape])
    x = x.astype("float32")
    return {"onnx": onnx_path, "lib": lib, "input": spec.name, "x": x, "expected": local.run(None, {spec.name: x})[0]}


@contextlib.contextmanager
def board_server(rootfs: Path, bundle: Path, tmp: Path, args: list[str]) -> Iterator[subprocess.Popen[bytes]]:
    """The bundle's server on the board, ``python3.11 /opt/tether/tether-server.pyz ARGS``, stopped by pid."""
    tmp.mkdir(parents=True, exist_ok=True)
    argv = [board.PYTHON, "/opt/tether/tether-server.pyz", "--log-level", "WARNING", *args]
    log = (tmp / "server.log").open("wb")
    proc = subprocess.Popen(
        board.command(rootfs, argv, {"/opt/tether": bundle}, tmp=tmp),
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)
        log.close()


def registered(tracker: TrackerThread, key: str, proc: subprocess.Popen[bytes], log: Path) -> Any:
    """The tracker's row of ``key`` once a server of it is free (its server's row when it lists one)."""

    def row() -> Any:
        if proc.poll() is not None:
            pytest.fail(f"the board's server exited ({proc.returncode}): {log.read_text()[-2000:]}")
        status = query_tracker(tracker.host, tracker.port)
        if not any(k.key == key and k.free > 0 for k in status.keys):
            return None
        return next((s for s in status.servers if s.key == f"server:{key}"), True)

    return wait_until(row, timeout=240, interval=0.5, what=f"the board's server under {key!r}")


def test_the_board_has_python_and_nothing_else(rootfs: Path, tmp_path: Path) -> None:
    probe = "import importlib.util as u, platform; print(platform.machine(), [m for m in ('pip', 'numpy') if u.find_spec(m)])"
    out = subprocess.run(
        board.command(rootfs, [board.PYTHON, "-c", probe], {}, tmp=tmp_path),
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    assert out.split() == ["aarch64", "[]"]


def test_cross_compiled_model_runs_on_the_board_through_tracker_and_proxy(
    rootfs: Path, bundle: Path, model: dict[str, Any], workdir: Path
) -> None:
    import numpy as np

    with (
        TrackerThread(TrackerConfig(host="127.0.0.1", port=0)) as tracker,
        ProxyThread(
            ProxyConfig(host="127.0.0.1", port=0, web_port=None, tracker=(tracker.host, tracker.port))
        ) as proxy,
    ):
        direct = ["--host", "127.0.0.1", "--port", "0", "--tracker", f"127.0.0.1:{tracker.port}", "--key", KEY]
        nat = ["--host", "127.0.0.1", "--port", str(proxy.port), "--through-proxy", "--key", NAT_KEY]
        with (
            board_server(rootfs, bundle, workdir / "tmp-direct", direct) as server,
            board_server(rootfs, bundle, workdir / "tmp-nat", nat) as hidden,
        ):
            row = registered(tracker, KEY, server, workdir / "tmp-direct" / "server.log")
            assert row.device["arch"] == "aarch64"
            assert {"onnxruntime", "tvm"} <= set(row.device["backends"]), row.device["backends"]
            with connect_tracker(tracker.host, tracker.port) as pool:
                with pool.request(KEY, session_timeout=600, timeout=60) as sess:
                    sess.upload(model["onnx"], "model.onnx")
                    sess.upload(model["lib"], "model.so")
                    on_ort = sess.load_model("model.onnx")
                    on_tvm = sess.load_model("model.so", backend="tvm")
                    y_ort = next(iter(on_ort.run({model["input"]: model["x"]}).values()))
                    y_tvm = next(iter(on_tvm.run({on_tvm.input_names[0]: model["x"]}).values()))
                np.testing.assert_allclose(y_ort, model["expected"], rtol=1e-4, atol=1e-5)
                np.testing.assert_allclose(y_tvm, model["expected"], rtol=1e-3, atol=1e-4)

                registered(tracker, NAT_KEY, hidden, workdir / "tmp-nat" / "server.log")
                with pool.request(NAT_KEY, session_timeout=600, timeout=60) as sess:
                    sess.upload(model["lib"], "model.so")
                    relayed = sess.load_model("model.so", backend="tvm")
                    y_nat = next(iter(relayed.run({relayed.input_names[0]: model["x"]}).values()))
                np.testing.assert_allclose(y_nat, model["expected"], rtol=1e-3, atol=1e-4)
