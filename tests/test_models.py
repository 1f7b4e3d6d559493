"""Real models through the whole path: tether client -> tether's tracker -> tether server -> a backend,
compared with a local onnxruntime run; and the ``tether run`` and ``tether pack`` commands."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import tether
from tether.cli.pack import build_zipapp
from tether.models import LIGHT_MODELS
from tether.runtime.reference import write_reference_model
from tether.tracker import TrackerThread

from .conftest import CliProcess, wait_until

np = pytest.importorskip("numpy")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

pytestmark = pytest.mark.timeout(120)

#: the light models with 60-140 M weights: 5-20 s each here, to draw and run
BIG_MODELS = {"bvlc_alexnet", "zfnet512", "vgg19"}


@pytest.fixture(scope="module")
def squeezenet(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tether.models import light_model

    path = tmp_path_factory.mktemp("models") / "squeezenet.onnx"
    onnx.save(light_model("squeezenet", seed=1), str(path))
    return path


def local_run(path: Path, feed: dict[str, Any]) -> list[Any]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return list(session.run(None, feed))


def test_onnx_model_through_the_tracker_equals_local_onnxruntime(
    device_server: Any, tracker: TrackerThread, squeezenet: Path
) -> None:
    device_server(key="cpu", tracker=(tracker.host, tracker.port))
    x = np.random.default_rng(3).standard_normal((1, 3, 224, 224)).astype("float32")
    with (
        tether.connect_tracker(tracker.host, tracker.port) as pool,
        pool.request("cpu", session_timeout=60, timeout=10) as sess,
    ):
        sess.upload(squeezenet)
        model = sess.load_model("squeezenet.onnx", providers=["CPUExecutionProvider"], intra_op_num_threads=1)
        assert model.backend == "onnxruntime"
        assert [s["name"] for s in model.inputs] == ["data_0"]
        remote = model.run({"data_0": x})
        (expected,) = local_run(squeezenet, {"data_0": x})
        (name,) = remote
        assert remote[name].dtype == expected.dtype and remote[name].shape == expected.shape
        np.testing.assert_allclose(remote[name], expected, rtol=1e-5, atol=1e-6)
        assert np.argmax(remote[name]) == np.argmax(expected)

        on_device = sess.tensor(x)
        np.testing.assert_allclose(model.run({"data_0": on_device})[name], expected, rtol=1e-5, atol=1e-6)
        timing = model.benchmark({"data_0": on_device}, number=2, repeat=3)
        assert len(timing.samples) == 3 and all(s > 0 for s in timing.samples)
        with pytest.raises(tether.ModelLoadError, match="NoSuchExecutionProvider"):
            sess.load_model("squeezenet.onnx", providers=["NoSuchExecutionProvider"])


@pytest.mark.tvm
def test_tvm_compiled_model_runs_with_the_tvm_backend_and_matches_onnxruntime(
    device_server: Any, tracker: TrackerThread, squeezenet: Path, tmp_path: Path
) -> None:
    tvm = pytest.importorskip("tvm")
    from tvm.relax.frontend.onnx import from_onnx

    executable = tvm.compile(from_onnx(onnx.load(str(squeezenet))), target=tvm.target.Target({"kind": "llvm"}))
    lib = tmp_path / "squeezenet.so"
    executable.export_library(str(lib))
    device_server(key="cpu", tracker=(tracker.host, tracker.port))
    x = np.random.default_rng(4).standard_normal((1, 3, 224, 224)).astype("float32")
    with tether.connect_tracker(tracker.host, tracker.port) as pool, pool.request("cpu", timeout=10) as sess:
        sess.upload(lib)
        model = sess.load_model("squeezenet.so")  # the backend follows the file type
        assert model.backend == "tvm"
        (out,) = model.run({model.input_names[0]: x}).values()
        (expected,) = local_run(squeezenet, {"data_0": x})
        np.testing.assert_allclose(out.reshape(expected.shape), expected, rtol=1e-4, atol=1e-5)
        assert len(model.benchmark(number=1, repeat=2).samples) == 2


def test_tether_run_prints_outputs_topk_and_timing(
    cli: Any, tracker: TrackerThread, squeezenet: Path, tmp_path: Path
) -> None:
    server: CliProcess = cli(
        "server", "--host", "127.0.0.1", "--port", "0", "--tracker", f"127.0.0.1:{tracker.port}", "--key", "cpu",
        "--preload", "none",
    )  # fmt: skip
    server.listening()
    wait_until(lambda: tracker.call(lambda: tracker.core.summary()["queue_info"].get("cpu", {}).get("free")) == 1)
    out = tmp_path / "out.npz"
    done = subprocess.run(
        [sys.executable, "-m", "tether", "run", str(squeezenet), "--tracker", f"127.0.0.1:{tracker.port}",
         "--key", "cpu", "--fill", "random", "--output", str(out), "--repeat", "3", "--timeout", "30"],
        capture_output=True, text=True, timeout=90,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "data_0: [1, 3, 224, 224] float32 (random on the device)" in done.stdout
    assert "top-5:" in done.stdout and "device timing: 3 repeats" in done.stdout
    with np.load(out) as saved:
        assert saved[saved.files[0]].shape == (1, 1000, 1, 1)
    failed = subprocess.run(
        [sys.executable, "-m", "tether", "run", str(squeezenet), "--tracker", f"127.0.0.1:{tracker.port}",
         "--key", "nobody", "--timeout", "0.2"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert failed.returncode == 1 and "no free server" in failed.stderr


def test_zipapp_server_runs_on_a_bare_python(tracker: TrackerThread, tmp_path: Path) -> None:
    """``tether pack``'s bundle under ``python -S -I``: no site-packages, no numpy; sessions still work."""
    bundle = build_zipapp(tmp_path / "tether-server.pyz")
    proc = subprocess.Popen(
        [sys.executable, "-S", "-I", str(bundle), "--host", "127.0.0.1", "--port", "0",
         "--tracker", f"127.0.0.1:{tracker.port}", "--key", "bare"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        lines = []
        while not any("listening on" in line for line in lines):  # bounded by the test's timeout
            line = proc.stdout.readline()
            assert line, f"the server exited: {lines}"
            lines.append(line)
        wait_until(
            lambda: tracker.call(lambda: tracker.core.summary()["queue_info"].get("bare", {}).get("free")) == 1,
            timeout=15,
        )
        model = tmp_path / "m.json"
        spec = {"dtype": "float32", "shape": [4]}
        model.write_text(
            json.dumps(
                {
                    "format": "tether-reference/1",
                    "inputs": [{"name": "x", **spec}],
                    "outputs": [{"name": "y", **spec}],
                    "ops": [{"op": "affine", "input": "x", "output": "y", "scale": 3.0, "bias": 0.5}],
                }
            )
        )
        with tether.connect_tracker(tracker.host, tracker.port) as pool, pool.request("bare", timeout=10) as sess:
            info = sess.info()
            assert set(info["device"]["backends"]) == {"reference"}  # nothing else importable under -S -I
            sess.upload(model)
            y = sess.load_model("m.json").run({"x": np.arange(4, dtype="float32")})["y"]
            np.testing.assert_array_equal(y, np.arange(4, dtype="float32") * 3 + 0.5)
    finally:
        proc.terminate()
        proc.wait(10)
        if proc.stdout is not None:
            proc.stdout.close()


# -- a first hour without friction ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=pytest.mark.slow) if n in BIG_MODELS else n for n in LIGHT_MODELS]
)
def test_every_light_model_gives_finite_input_dependent_outputs(name: str) -> None:
    """Two different inputs give two different outputs, all finite (batch norms once made NaN of four)."""
    from tether.models import light_model

    session = ort.InferenceSession(light_model(name).SerializeToString(), providers=["CPUExecutionProvider"])
    (spec,) = session.get_inputs()
    shape = [d if isinstance(d, int) else 1 for d in spec.shape]
    rng = np.random.default_rng(7)
    first, second = (session.run(None, {spec.name: rng.standard_normal(shape, np.float32)})[0] for _ in range(2))
    assert np.isfinite(first).all() and np.isfinite(second).all()
    assert not np.allclose(first, second, rtol=1e-3, atol=1e-6)


def _run(tracker: TrackerThread, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tether", "run", *args, "--tracker", f"127.0.0.1:{tracker.port}", "--key", "cpu",
         "--timeout", "30", "--repeat", "1"],
        capture_output=True, text=True, timeout=90,
    )  # fmt: skip


def _dynamic_model(path: Path) -> Path:
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"]), helper.make_node("Relu", ["z"], ["w"])],
        "dynamic",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, None),  # not even a rank
            helper.make_tensor_value_info("z", TensorProto.FLOAT, ["N", 3]),
        ],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, None),
            helper.make_tensor_value_info("w", TensorProto.FLOAT, ["N", 3]),
        ],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8), str(path))
    return path


def test_tether_run_generates_inputs_of_dynamic_shape(
    device_server: Any, tracker: TrackerThread, tmp_path: Path
) -> None:
    device_server(key="cpu", tracker=(tracker.host, tracker.port))
    model = _dynamic_model(tmp_path / "dynamic.onnx")
    done = _run(tracker, str(model), "--shape", "x=4", "--shape", "z=2,3", "--output", str(tmp_path / "out.npz"))
    assert done.returncode == 0, done.stderr
    assert "x: [4] float32 (random on the device, --shape)" in done.stdout
    assert "z: [2, 3] float32 (random on the device, --shape)" in done.stdout
    with np.load(tmp_path / "out.npz") as out:
        assert out["y"].shape == (4,) and out["w"].shape == (2, 3)
    for args, message in [
        ([], "input 'x' has an unknown rank: give its shape with --shape x=D1,D2,..."),
        (["--shape", "x=4"], "input 'z' has dynamic dims ['N', 3]: give its shape with --shape z=D1,D2,..."),
        (["--shape", "x=4", "--shape", "z=2,4"], "shape [2, 4] does not fit input 'z', which is ['N', 3]"),
    ]:
        failed = _run(tracker, str(model), *args)
        assert failed.returncode == 2 and failed.stderr.startswith(f"tether run: {message}"), failed.stderr
        assert failed.stderr.count("\n") == 1
    np.savez(tmp_path / "named.npz", q=np.ones(3, "float32"))
    failed = _run(tracker, str(model), "--input", str(tmp_path / "named.npz"))
    assert failed.returncode == 2
    assert failed.stderr.endswith(": ['q'] not among the model's inputs ['x', 'z']\n"), failed.stderr


def test_inputs_are_checked_at_load_when_the_host_cannot_read_the_model(
    device_server: Any,
    tracker: TrackerThread,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Without the onnx package here only the device can tell the inputs: the same errors, at load."""
    from tether.cli import main

    device_server(key="cpu", tracker=(tracker.host, tracker.port))
    model = _dynamic_model(tmp_path / "dynamic.onnx")
    monkeypatch.setitem(sys.modules, "onnx", None)  # as if not installed
    args = ["run", str(model), "--tracker", f"127.0.0.1:{tracker.port}", "--key", "cpu", "--repeat", "1"]
    assert main([*args, "--shape", "x=4"]) == 2
    assert (
        capsys.readouterr().err
        == "tether run: input 'z' has dynamic dims ['N', 3]: give its shape with --shape z=D1,D2,... (Python: shapes={'z': [...]}), or send it\n"
    )
    assert main([*args, "--shape", "x=2,2", "--shape", "z=1,3"]) == 0
    assert "x: [2, 2] float32 (random on the device, --shape)" in capsys.readouterr().out


def test_tether_run_warns_of_nan_and_inf_outputs(device_server: Any, tracker: TrackerThread, tmp_path: Path) -> None:
    device_server(key="cpu", tracker=(tracker.host, tracker.port))
    spec = {"name": "x", "dtype": "float32", "shape": [2, 3]}
    model = tmp_path / "overflow.json"
    ops = [{"op": "affine", "input": "x", "output": "y", "scale": 3e38, "bias": 3e38}]  # past float32's range
    write_reference_model(model, [spec], [{**spec, "name": "y"}], ops)
    done = _run(tracker, str(model), "--fill", "ones")
    assert done.returncode == 0
    assert done.stderr == "tether run: warning: NaN or Inf in outputs y (6 of 6)\n"
    fine = _run(tracker, str(model), "--fill", "zeros")
    assert fine.returncode == 0 and fine.stderr == ""
