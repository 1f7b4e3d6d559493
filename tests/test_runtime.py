"""Model backends: the stdlib reference interpreter, generated tensors, onnxruntime and TVM against the real
runtimes (each compared with calling the runtime directly), and the backend registry."""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

import tether
from tether.protocol.session import DTYPE_SIZES
from tether.runtime import (
    BackendError,
    RawTensor,
    TensorSpec,
    available_backends,
    backend_for_path,
    fill_shape,
    fill_tensor,
    get_backend,
)
from tether.runtime import _fill_stdlib as fill_stdlib
from tether.runtime.reference import write_reference_model
from tether.runtime.tvm_backend import parse_tensor_annotation, vm_signature

SRC = Path(tether.__file__).parent.parent


def raw(arr: Any) -> RawTensor:
    """A numpy array as a received tensor (a bytearray, as the session worker has it)."""
    return RawTensor(arr.dtype.name, arr.shape, bytearray(arr.astype(arr.dtype.newbyteorder("<")).tobytes()))


def run_model(model: Any, feed: dict[str, Any]) -> dict[str, Any]:
    """Prepare, run and read back: name -> numpy array."""
    import numpy as np

    outputs = model.run({name: model.prepare(name, raw(arr)) for name, arr in feed.items()})
    model.sync()
    result = {}
    for name, value in outputs:
        tensor = model.to_raw(value)
        result[name] = np.frombuffer(memoryview(tensor.data).tobytes(), tensor.dtype).reshape(tensor.shape)
    return result


# -- the reference backend -------------------------------------------------------------------------


def ref_model(tmp_path: Path, ops: list[dict[str, Any]], dtype: str = "float32", **doc: Any) -> str:
    spec = {"dtype": dtype, "shape": [2, 3]}
    return write_reference_model(
        tmp_path / "m.json",
        doc.get("inputs", [{"name": "x", **spec}, {"name": "b", **spec}]),
        doc.get("outputs", [{"name": "y", **spec}]),
        ops,
    )


AFFINE_ADD = [
    {"op": "affine", "input": "x", "output": "t", "scale": 2.0, "bias": 1.0},
    {"op": "add", "inputs": ["t", "b"], "output": "y"},
]


@pytest.mark.parametrize(("dtype", "fmt"), [("float32", "f"), ("float64", "d"), ("int32", "i"), ("int64", "q")])
def test_reference_affine_and_add(tmp_path: Path, dtype: str, fmt: str) -> None:
    model = get_backend("reference").load(ref_model(tmp_path, AFFINE_ADD, dtype), {})
    assert model.backend == "reference"
    assert model.inputs == [TensorSpec("x", dtype, (2, 3)), TensorSpec("b", dtype, (2, 3))]
    assert model.outputs == [TensorSpec("y", dtype, (2, 3))]
    x, b = [0, 1, 2, 3, 4, 5], [10, 20, 30, 40, 50, 60]
    pack = struct.Struct(f"<6{fmt}")
    prepared = {n: model.prepare(n, RawTensor(dtype, (2, 3), pack.pack(*v))) for n, v in (("x", x), ("b", b))}
    ((name, value),) = model.run(prepared)
    out = model.to_raw(value)
    assert (name, out.dtype, out.shape) == ("y", dtype, (2, 3))
    assert list(pack.unpack(bytes(memoryview(out.data)))) == [2 * i + 1 + j for i, j in zip(x, b, strict=True)]
    model.close()


def test_reference_outputs_in_listed_order(tmp_path: Path) -> None:
    spec = {"dtype": "float64", "shape": [1]}
    path = write_reference_model(
        tmp_path / "m.json",
        [{"name": "x", **spec}],
        [{"name": "second", **spec}, {"name": "x", **spec}, {"name": "first", **spec}],
        [
            {"op": "affine", "input": "x", "output": "first", "bias": 1},
            {"op": "affine", "input": "x", "output": "second", "scale": -1},
        ],
    )
    model = get_backend("reference").load(path, {})
    outputs = model.run({"x": model.prepare("x", RawTensor("float64", (1,), struct.pack("<d", 5.0)))})
    assert [(n, struct.unpack("<d", bytes(model.to_raw(v).data))[0]) for n, v in outputs] == [
        ("second", -5.0),
        ("x", 5.0),
        ("first", 6.0),
    ]


def test_reference_input_checks(tmp_path: Path) -> None:
    model = get_backend("reference").load(ref_model(tmp_path, AFFINE_ADD), {})
    good = RawTensor("float32", (2, 3), bytes(24))
    with pytest.raises(BackendError, match=r"input 'x' takes float32\[2, 3\], got float64\[2, 3\]"):
        model.prepare("x", RawTensor("float64", (2, 3), bytes(48)))
    with pytest.raises(BackendError, match=r"got float32\[3, 2\]"):
        model.prepare("x", RawTensor("float32", (3, 2), bytes(24)))
    with pytest.raises(BackendError, match=r"no input 'z'; it takes \['x', 'b'\]"):
        model.prepare("z", good)
    with pytest.raises(BackendError, match=r"missing inputs \['b'\]; the model takes \['x', 'b'\]"):
        model.run({"x": model.prepare("x", good)})
    with pytest.raises(BackendError, match=r"unknown inputs \['z'\]"):
        model.run({"x": model.prepare("x", good), "b": model.prepare("b", good), "z": None})


def test_reference_sleep_raise(tmp_path: Path) -> None:
    spec = [{"name": "x", "dtype": "int32", "shape": [1]}]
    sleepy = write_reference_model(tmp_path / "s.json", spec, spec, [{"op": "sleep", "seconds": 0.2}])
    model = get_backend("reference").load(sleepy, {})
    start = time.perf_counter()
    model.run({"x": model.prepare("x", RawTensor("int32", (1,), bytes(4)))})
    assert time.perf_counter() - start >= 0.2
    failing = write_reference_model(tmp_path / "f.json", spec, spec, [{"op": "raise", "message": "boom"}])
    model = get_backend("reference").load(failing, {})
    with pytest.raises(RuntimeError, match=r"^boom$"):
        model.run({"x": model.prepare("x", RawTensor("int32", (1,), bytes(4)))})


@pytest.mark.timeout(60)
def test_reference_exit_ends_the_process(tmp_path: Path) -> None:
    spec = [{"name": "x", "dtype": "int32", "shape": [1]}]
    path = write_reference_model(tmp_path / "e.json", spec, spec, [{"op": "exit", "code": 3}])
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); from tether.runtime import get_backend, RawTensor\n"
        "m = get_backend('reference').load(sys.argv[2], {})\n"
        "m.run({'x': m.prepare('x', RawTensor('int32', (1,), bytes(4)))}); print('survived')"
    )
    done = subprocess.run([sys.executable, "-S", "-I", "-c", code, str(SRC), path], capture_output=True, timeout=60)
    assert done.returncode == 3, done.stderr
    assert b"survived" not in done.stdout


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "not a JSON reference model"),
        ('{"format": "onnx"}', "format must be 'tether-reference/1'"),
        ("[1, 2]", "format must be"),
        ('{"format": "tether-reference/1", "inputs": {}, "outputs": []}', "'inputs' must be a list"),
        (
            '{"format": "tether-reference/1", "inputs": [{"name": "x", "dtype": "float16", "shape": [1]}], "outputs": []}',
            "dtype 'float16' is not one of",
        ),
        (
            '{"format": "tether-reference/1", "inputs": [{"name": "x", "dtype": "int32", "shape": [-1]}], "outputs": []}',
            "non-negative ints",
        ),
    ],
)
def test_reference_malformed_files(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(BackendError, match=message):
        get_backend("reference").load(str(path), {})


@pytest.mark.parametrize(
    ("ops", "outputs", "message"),
    [
        ([{"op": "conv"}], None, "op 0: unknown op 'conv'"),
        ([], None, "output 'y' is not computed"),
        ([{"op": "affine", "input": "nope", "output": "y"}], None, "op 0: no value 'nope'"),
        ([{"op": "affine", "input": "x", "output": "y", "scale": "2"}], None, "finite numbers"),
        ([{"op": "add", "inputs": ["x"], "output": "y"}], None, "two names"),
        ([{"op": "sleep", "seconds": -1}], None, "non-negative number"),
        ([{"op": "exit", "code": "3"}], None, "int in 0..255"),
        (
            [{"op": "affine", "input": "x", "output": "y"}],
            [{"name": "y", "dtype": "float32", "shape": [6]}],
            r"declared float32\[6\], computed float32\[2, 3\]",
        ),
    ],
)
def test_reference_invalid_ops(tmp_path: Path, ops: list[Any], outputs: Any, message: str) -> None:
    doc = {"outputs": outputs} if outputs else {}
    with pytest.raises(BackendError, match=message):
        get_backend("reference").load(ref_model(tmp_path, ops, **doc), {})


def test_reference_add_needs_matching_shapes(tmp_path: Path) -> None:
    path = write_reference_model(
        tmp_path / "m.json",
        [{"name": "a", "dtype": "int32", "shape": [2]}, {"name": "b", "dtype": "int32", "shape": [3]}],
        [],
        [{"op": "add", "inputs": ["a", "b"], "output": "y"}],
    )
    with pytest.raises(BackendError, match=r"'a' is int32\[2\], 'b' int32\[3\]"):
        get_backend("reference").load(path, {})


def test_reference_missing_file_and_options(tmp_path: Path) -> None:
    with pytest.raises(BackendError, match=r"cannot read none\.json: ") as failed:
        get_backend("reference").load(str(tmp_path / "none.json"), {})
    assert str(tmp_path) not in str(failed.value)
    with pytest.raises(BackendError, match="takes no options"):
        get_backend("reference").load(ref_model(tmp_path, AFFINE_ADD), {"device": "cpu"})


# -- generated tensors -------------------------------------------------------------------------------

FILL_CASES = [(dtype, kind) for dtype in DTYPE_SIZES for kind in ("zeros", "ones", "random")]


def decode(tensor: RawTensor) -> Any:
    """A filled tensor's values as float64/complex128/int numpy arrays (bfloat16 through its bits)."""
    import numpy as np

    data = memoryview(tensor.data).tobytes()
    if tensor.dtype == "bfloat16":
        bits = np.frombuffer(data, "<u2").astype("<u4") << 16
        return bits.view("<f4").astype(np.float64).reshape(tensor.shape)
    return np.frombuffer(data, np.dtype(tensor.dtype).newbyteorder("<")).reshape(tensor.shape)


def check_fill(tensor: RawTensor, dtype: str, kind: str) -> None:
    import numpy as np

    assert (tensor.dtype, tensor.shape, tensor.nbytes) == (dtype, (3, 50), 150 * DTYPE_SIZES[dtype])
    values = decode(tensor)
    if kind == "zeros":
        assert memoryview(tensor.data).tobytes() == bytes(tensor.nbytes)
    elif kind == "ones":
        assert np.all(values == 1)
    elif dtype == "bool":
        assert set(values.reshape(-1).tolist()) == {False, True}
    elif dtype.startswith(("float", "bfloat", "complex")):
        parts = [values.real, values.imag] if dtype.startswith("complex") else [values]
        for part in parts:
            assert np.all((part >= 0) & (part < 1)) and len(np.unique(part)) > 10
    else:
        assert set(values.reshape(-1).tolist()) == set(range(10))


@pytest.mark.parametrize(("dtype", "kind"), FILL_CASES)
def test_fill_with_numpy(dtype: str, kind: str) -> None:
    pytest.importorskip("numpy")
    tensor = fill_tensor(dtype, (3, 50), kind, seed=7)
    check_fill(tensor, dtype, kind)
    again = fill_tensor(dtype, (3, 50), kind, seed=7)
    assert memoryview(again.data).tobytes() == memoryview(tensor.data).tobytes()
    if kind == "random":
        other = fill_tensor(dtype, (3, 50), kind, seed=8)
        assert memoryview(other.data).tobytes() != memoryview(tensor.data).tobytes()


@pytest.mark.parametrize(("dtype", "kind"), FILL_CASES)
def test_fill_with_the_standard_library(dtype: str, kind: str) -> None:
    pytest.importorskip("numpy")  # to check the values
    tensor = fill_stdlib(dtype, (3, 50), kind, 7)
    check_fill(tensor, dtype, kind)
    if kind != "random":  # zeros and ones: the same bytes as numpy's
        assert bytes(tensor.data) == memoryview(fill_tensor(dtype, (3, 50), kind).data).tobytes()


def test_fill_edge_cases_and_errors() -> None:
    assert fill_tensor("float32", (), "ones").nbytes == 4
    assert fill_tensor("int64", (0, 5), "random").nbytes == 0
    assert fill_stdlib("float32", (0,), "random", None).nbytes == 0
    with pytest.raises(BackendError, match="unsupported dtype 'float8'"):
        fill_tensor("float8", (1,), "zeros")
    with pytest.raises(BackendError, match="unknown fill 'twos'; known: random, zeros, ones"):
        fill_tensor("float32", (1,), "twos")
    with pytest.raises(BackendError, match="non-negative ints"):
        fill_tensor("float32", (-1,), "zeros")


@pytest.mark.timeout(60)
def test_fill_runs_with_no_site_packages() -> None:
    """``python -S -I``: no numpy; every dtype and kind still fills, zeros and ones byte for byte as numpy's."""
    pytest.importorskip("numpy")
    code = (
        "import sys, hashlib; sys.path.insert(0, sys.argv[1])\n"
        "from tether.runtime import fill_tensor\n"
        "from tether.protocol.session import DTYPE_SIZES\n"
        "for d in DTYPE_SIZES:\n"
        "    for k in ('zeros', 'ones', 'random'):\n"
        "        t = fill_tensor(d, (4, 5), k, seed=1)\n"
        "        print(d, k, t.nbytes, hashlib.sha256(bytes(t.data)).hexdigest())\n"
        "assert 'numpy' not in sys.modules\n"
    )
    done = subprocess.run(
        [sys.executable, "-S", "-I", "-c", code, str(SRC)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.split("\n")
    assert len([line for line in lines if line]) == 3 * len(DTYPE_SIZES)
    for line in filter(None, lines):
        dtype, kind, nbytes, digest = line.split()
        assert int(nbytes) == 20 * DTYPE_SIZES[dtype]
        if kind != "random":
            here = memoryview(fill_tensor(dtype, (4, 5), kind).data).tobytes()
            assert digest == hashlib.sha256(here).hexdigest(), (dtype, kind)


# -- onnxruntime -------------------------------------------------------------------------------------


def tiny_onnx(path: Path, batch: int | str = 2) -> Path:
    """MatMul + Add + Relu, x: float32[batch, 3] -> y: float32[batch, 4], saved at IR version 8."""
    np = pytest.importorskip("numpy")
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "W"], ["m"]),
            helper.make_node("Add", ["m", "B"], ["a"]),
            helper.make_node("Relu", ["a"], ["y"]),
        ],
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 4])],
        [
            numpy_helper.from_array(rng.standard_normal((3, 4)).astype(np.float32), "W"),
            numpy_helper.from_array(rng.standard_normal(4).astype(np.float32), "B"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_onnx(tmp_path_factory.mktemp("onnx") / "tiny.onnx")


@pytest.fixture(scope="module")
def squeezenet_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    onnx = pytest.importorskip("onnx")
    from tether.models import light_model

    path = tmp_path_factory.mktemp("onnx") / "squeezenet.onnx"
    onnx.save(light_model("squeezenet"), str(path))
    return path


def ort_direct(path: Path, feed: dict[str, Any]) -> list[Any]:
    ort = pytest.importorskip("onnxruntime")
    return list(ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feed))


def test_onnxruntime_tiny_model(tiny_path: Path) -> None:
    np = pytest.importorskip("numpy")
    pytest.importorskip("onnxruntime")
    model = get_backend("onnxruntime").load(str(tiny_path), {})
    assert model.backend == "onnxruntime"
    assert model.inputs == [TensorSpec("x", "float32", (2, 3))]
    assert model.outputs == [TensorSpec("y", "float32", (2, 4))]
    x = np.random.default_rng(1).standard_normal((2, 3)).astype(np.float32)
    out = run_model(model, {"x": x})
    assert list(out) == ["y"]
    np.testing.assert_array_equal(out["y"], ort_direct(tiny_path, {"x": x})[0])
    assert out["y"].max() > 0
    model.close()


def test_onnxruntime_symbolic_dims_and_session_options(tmp_path: Path) -> None:
    np = pytest.importorskip("numpy")
    pytest.importorskip("onnxruntime")
    path = tiny_onnx(tmp_path / "dyn.onnx", batch="N")
    options = {
        "providers": [["CPUExecutionProvider", {}]],
        "intra_op_num_threads": 1,
        "inter_op_num_threads": 1,
        "graph_optimization_level": "disable",
        "execution_mode": "sequential",
        "log_severity_level": 3,
    }
    model = get_backend("onnxruntime").load(str(path), options)
    assert model.inputs == [TensorSpec("x", "float32", ("N", 3))]
    x = np.random.default_rng(2).standard_normal((5, 3)).astype(np.float32)
    np.testing.assert_allclose(run_model(model, {"x": x})["y"], ort_direct(path, {"x": x})[0], rtol=1e-6, atol=1e-6)


@pytest.mark.timeout(60)
def test_onnxruntime_squeezenet(squeezenet_path: Path) -> None:
    np = pytest.importorskip("numpy")
    pytest.importorskip("onnxruntime")
    model = get_backend("onnxruntime").load(str(squeezenet_path), {})
    assert model.inputs == [TensorSpec("data_0", "float32", (1, 3, 224, 224))]
    x = np.random.default_rng(3).random((1, 3, 224, 224), dtype=np.float32)
    out = run_model(model, {"data_0": x})
    expected = ort_direct(squeezenet_path, {"data_0": x})[0]
    assert out["softmaxout_1"].shape == (1, 1000, 1, 1)
    np.testing.assert_allclose(out["softmaxout_1"], expected, rtol=1e-5, atol=1e-6)


def test_onnxruntime_input_errors(tiny_path: Path) -> None:
    np = pytest.importorskip("numpy")
    pytest.importorskip("onnxruntime")
    model = get_backend("onnxruntime").load(str(tiny_path), {})
    with pytest.raises(BackendError, match=r"input 'x' takes float32\[2, 3\], got float64\[2, 3\]"):
        model.prepare("x", raw(np.zeros((2, 3))))
    with pytest.raises(BackendError, match=r"input 'x' takes float32\[2, 3\], got float32\[2, 4\]"):
        model.prepare("x", raw(np.zeros((2, 4), np.float32)))
    with pytest.raises(BackendError, match=r"no input 'z'; it takes \['x'\]"):
        model.prepare("z", raw(np.zeros((2, 3), np.float32)))
    with pytest.raises(BackendError, match=r"missing inputs \['x'\]; the model takes \['x'\]"):
        model.run({})
    with pytest.raises(BackendError, match=r"unknown inputs \['z'\]"):
        model.run({"x": model.prepare("x", raw(np.zeros((2, 3), np.float32))), "z": None})


def test_onnxruntime_load_errors(tiny_path: Path, tmp_path: Path) -> None:
    ort = pytest.importorskip("onnxruntime")
    backend = get_backend("onnxruntime")
    available = ", ".join(ort.get_available_providers())
    with pytest.raises(BackendError, match=f"'NoSuchExecutionProvider' is not available here; available: {available}"):
        backend.load(str(tiny_path), {"providers": ["NoSuchExecutionProvider"]})
    with pytest.raises(BackendError, match="unknown onnxruntime options"):
        backend.load(str(tiny_path), {"provider": ["CPUExecutionProvider"]})
    with pytest.raises(BackendError, match="graph_optimization_level must be one of disable, basic, extended, all"):
        backend.load(str(tiny_path), {"graph_optimization_level": "max"})
    with pytest.raises(BackendError, match="intra_op_num_threads must be an int"):
        backend.load(str(tiny_path), {"intra_op_num_threads": "2"})
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"not a model")
    with pytest.raises(BackendError, match=r"onnxruntime cannot load garbage\.onnx: ") as failed:
        backend.load(str(garbage), {})
    assert str(tmp_path) not in str(failed.value)  # a device's workspace path means nothing to its user


def test_onnxruntime_unknown_rank_and_generated_shapes(tmp_path: Path) -> None:
    """An input without a shape is reported with none (onnxruntime lists it as a scalar, ``[]``); a real
    scalar stays one; :func:`fill_shape` asks for a shape where one is not fixed, and checks it."""
    np = pytest.importorskip("numpy")
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from onnx import TensorProto, helper

    nodes = [helper.make_node("Relu", [name], [f"{name}_out"]) for name in ("x", "z", "s")]
    graph = helper.make_graph(
        nodes,
        "shapes",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, None),  # no shape at all
            helper.make_tensor_value_info("z", TensorProto.FLOAT, ["N", 3]),
            helper.make_tensor_value_info("s", TensorProto.FLOAT, []),  # a scalar
        ],
        [helper.make_tensor_value_info(f"{n}_out", TensorProto.FLOAT, None) for n in ("x", "z", "s")],
    )
    path = tmp_path / "shapes.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8), str(path))
    model = get_backend("onnxruntime").load(str(path), {})
    x_spec, z_spec, s_spec = model.inputs
    assert (x_spec.shape, z_spec.shape, s_spec.shape) == (None, ("N", 3), ())
    assert TensorSpec.from_wire(x_spec.to_wire()) == x_spec and x_spec.shape_text == "[?]"
    feed = {"x": np.ones((2, 5), np.float32), "z": np.ones((4, 3), np.float32), "s": np.float32(-1)}
    assert run_model(model, feed)["x_out"].shape == (2, 5)  # any rank fits an unknown one
    with pytest.raises(BackendError, match=r"input 'x' has an unknown rank: give its shape with --shape x="):
        fill_shape(x_spec)
    with pytest.raises(BackendError, match=r"input 'z' has dynamic dims \['N', 3\]: .*--shape z=D1,D2"):
        fill_shape(z_spec)
    assert fill_shape(x_spec, [2, 5]) == (2, 5) and fill_shape(z_spec, (7, 3)) == (7, 3) and fill_shape(s_spec) == ()
    with pytest.raises(BackendError, match=r"shape \[7, 4\] does not fit input 'z', which is \['N', 3\]"):
        fill_shape(z_spec, [7, 4])
    with pytest.raises(BackendError, match="non-negative ints"):
        fill_shape(z_spec, [7, -3])
    with pytest.raises(BackendError, match="no known dtype"):
        fill_shape(TensorSpec("u", "", (1,)))


# -- TVM ---------------------------------------------------------------------------------------------


def test_parse_relax_annotations() -> None:
    assert parse_tensor_annotation('R.Tensor((2, 3), dtype="float32")') == [("float32", (2, 3))]
    assert parse_tensor_annotation(
        'T.Tuple(R.Tensor((N, T.int64(3)), dtype="float32"), R.Tensor((T.int64(1),), dtype="int64"))'
    ) == [("float32", ("N", 3)), ("int64", (1,))]
    assert parse_tensor_annotation('R.Tensor(dtype="float16", ndim=2)') == [("float16", (None, None))]
    assert parse_tensor_annotation('R.Tensor((n * 2,), dtype="float8")') == [("", ("n * 2",))]
    assert parse_tensor_annotation('R.Tuple(R.Tensor((1,), dtype="int32"), R.Shape([1]))') is None
    assert parse_tensor_annotation('R.Tensor(dtype="float32")') is None
    stats = (
        'Constant pool (# 3): [float32, "ErrorContext(fn=main, loc=param[0], param=x, annotation=R.Tensor((N, 3), '
        'dtype="float32")) ", "ErrorContext(fn=other, loc=param[0], param=q, annotation=R.Tensor((1,), dtype="int8")) ", '
        '"ErrorContext(fn=main, loc=param[1], param=s, annotation=R.Shape([2])) ", '
        '"ErrorContext(fn=main, loc=return, annotation=R.Tensor((N, 4), dtype="float32")) "]'
    )
    assert vm_signature(stats, "main") == ({0: ("float32", ("N", 3))}, [("float32", ("N", 4))])
    assert vm_signature(stats, "other") == ({0: ("int8", (1,))}, None)


def compile_onnx(onnx_path: Path, lib_path: Path) -> Path:
    """``from_onnx`` + ``tvm.compile`` for llvm + ``export_library``: a Relax VM executable."""
    tvm = pytest.importorskip("tvm")
    onnx = pytest.importorskip("onnx")
    from tvm.relax.frontend.onnx import from_onnx

    executable = tvm.compile(from_onnx(onnx.load(str(onnx_path))), target=tvm.target.Target({"kind": "llvm"}))
    executable.export_library(str(lib_path))
    return lib_path


@pytest.fixture(scope="module")
def tiny_lib(tiny_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return compile_onnx(tiny_path, tmp_path_factory.mktemp("tvm") / "m.so")


@pytest.fixture(scope="module")
def add_one_lib(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A plain library: ``add_one(A, B)`` writes ``B = A + 1`` for float32 vectors of any length."""
    tvm = pytest.importorskip("tvm")
    from tvm import te

    n = te.var("n")
    a = te.placeholder((n,), name="A", dtype="float32")
    b = te.compute(a.shape, lambda i: a[i] + 1.0, name="B")
    mod = tvm.IRModule({"add_one": te.create_prim_func([a, b]).with_attr("global_symbol", "add_one")})
    lib = tvm.compile(mod, target=tvm.target.Target({"kind": "llvm"}))
    path = tmp_path_factory.mktemp("tvm") / "add_one.so"
    lib.export_library(str(path))
    return path


@pytest.mark.tvm
@pytest.mark.timeout(120)
def test_tvm_relax_matches_onnxruntime(tiny_path: Path, tiny_lib: Path) -> None:
    np = pytest.importorskip("numpy")
    model = get_backend("tvm").load(str(tiny_lib), {})
    assert model.backend == "tvm"
    assert model.inputs == [TensorSpec("x", "float32", (2, 3))]  # names from the VM, specs from its checks
    assert model.outputs == []  # static shapes: no return check to read, learnt on the first run
    x = np.random.default_rng(4).standard_normal((2, 3)).astype(np.float32)
    out = run_model(model, {"x": x})
    assert model.outputs == [TensorSpec("output0", "float32", (2, 4))]
    np.testing.assert_allclose(out["output0"], ort_direct(tiny_path, {"x": x})[0], rtol=1e-5, atol=1e-5)
    with pytest.raises(BackendError, match=r"input 'x' takes float32\[2, 3\], got int32\[2, 3\]"):
        model.prepare("x", raw(np.zeros((2, 3), np.int32)))
    model.close()


@pytest.mark.tvm
@pytest.mark.timeout(120)
def test_tvm_relax_symbolic_dims_tuple_output(tmp_path: Path) -> None:
    np = pytest.importorskip("numpy")
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [
            helper.make_node("Cast", ["i"], ["c"], to=TensorProto.FLOAT),
            helper.make_node("Mul", ["x", "c"], ["y"]),
            helper.make_node("Identity", ["i"], ["j"]),
        ],
        "dyn",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3]),
            helper.make_tensor_value_info("i", TensorProto.INT64, [1, 3]),
        ],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3]),
            helper.make_tensor_value_info("j", TensorProto.INT64, [1, 3]),
        ],
    )
    onnx_model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx_model.ir_version = 8
    onnx.save(onnx_model, str(tmp_path / "dyn.onnx"))
    lib = compile_onnx(tmp_path / "dyn.onnx", tmp_path / "dyn.so")
    model = get_backend("tvm").load(str(lib), {"output_names": ["y", "j"]})
    assert model.inputs == [TensorSpec("x", "float32", ("N", 3)), TensorSpec("i", "int64", (1, 3))]
    assert model.outputs == [TensorSpec("y", "float32", ("N", 3)), TensorSpec("j", "int64", (1, 3))]
    xs, ii = np.random.default_rng(5).random((5, 3), dtype=np.float32), np.array([[1, 2, 3]], np.int64)
    out = run_model(model, {"x": xs, "i": ii})
    expected = ort_direct(tmp_path / "dyn.onnx", {"x": xs, "i": ii})
    np.testing.assert_allclose(out["y"], expected[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(out["j"], expected[1])
    override = [
        {"name": "a", "dtype": "float32", "shape": ["batch", 3]},
        {"name": "b", "dtype": "int64", "shape": [1, 3]},
    ]
    model = get_backend("tvm").load(str(lib), {"inputs": override})
    assert [s.name for s in model.inputs] == ["a", "b"]
    assert [s.name for s in model.outputs] == ["output0", "output1"]
    with pytest.raises(BackendError, match="names 1 inputs, 'main' takes 2"):
        get_backend("tvm").load(str(lib), {"inputs": override[:1]})


@pytest.mark.tvm
@pytest.mark.timeout(120)
def test_tvm_squeezenet_matches_onnxruntime(squeezenet_path: Path, tmp_path: Path) -> None:
    np = pytest.importorskip("numpy")
    lib = compile_onnx(squeezenet_path, tmp_path / "squeezenet.so")
    model = get_backend("tvm").load(str(lib), {"output_names": ["softmaxout_1"]})
    assert model.inputs == [TensorSpec("data_0", "float32", (1, 3, 224, 224))]
    x = np.random.default_rng(6).random((1, 3, 224, 224), dtype=np.float32)
    out = run_model(model, {"data_0": x})
    expected = ort_direct(squeezenet_path, {"data_0": x})[0]
    np.testing.assert_allclose(out["softmaxout_1"], expected, rtol=1e-5, atol=1e-5)


@pytest.mark.tvm
@pytest.mark.timeout(120)
def test_tvm_plain_function(add_one_lib: Path) -> None:
    np = pytest.importorskip("numpy")
    outputs = [{"name": "B", "dtype": "float32", "shape": [4]}]
    model = get_backend("tvm").load(str(add_one_lib), {"function": "add_one", "outputs": outputs})
    assert model.inputs == [TensorSpec("A", "float32", ("n",))]  # from TVM's own signature
    assert model.outputs == [TensorSpec("B", "float32", (4,))]
    a = np.arange(4, dtype=np.float32)
    np.testing.assert_array_equal(run_model(model, {"A": a})["B"], a + 1)
    np.testing.assert_array_equal(run_model(model, {"A": a * 2})["B"], a * 2 + 1)  # outputs are reused
    named = [{"name": "arg0", "dtype": "float32", "shape": [4]}]
    model = get_backend("tvm").load(str(add_one_lib), {"function": "add_one", "inputs": named, "outputs": outputs})
    np.testing.assert_array_equal(run_model(model, {"arg0": a})["B"], a + 1)
    with pytest.raises(BackendError, match=r"input 'arg0' takes float32\[4\], got float32\[5\]"):
        model.prepare("arg0", raw(np.zeros(5, np.float32)))
    wrong = get_backend("tvm").load(
        str(add_one_lib), {"function": "add_one", "outputs": [{"name": "B", "dtype": "float32", "shape": [3]}]}
    )
    with pytest.raises(BackendError, match=r"^tvm: "):  # TVM's own check of the output's length
        run_model(wrong, {"A": a})


@pytest.mark.tvm
def test_tvm_load_errors(tiny_lib: Path, add_one_lib: Path, tmp_path: Path) -> None:
    tvm = pytest.importorskip("tvm")
    backend = get_backend("tvm")
    outputs = [{"name": "B", "dtype": "float32", "shape": [4]}]
    with pytest.raises(BackendError, match="needs option 'function'"):
        backend.load(str(add_one_lib), {"outputs": outputs})
    with pytest.raises(BackendError, match="pass option 'outputs' with int dims"):
        backend.load(str(add_one_lib), {"function": "add_one"})
    with pytest.raises(BackendError, match="has no function 'nope'"):
        backend.load(str(add_one_lib), {"function": "nope", "outputs": outputs})
    with pytest.raises(BackendError, match="function 'nope' of the Relax VM"):
        backend.load(str(tiny_lib), {"function": "nope"})
    with pytest.raises(BackendError, match="unknown tvm options"):
        backend.load(str(tiny_lib), {"target": "llvm"})
    with pytest.raises(BackendError, match="bad device 'tpu'"):
        backend.load(str(tiny_lib), {"device": "tpu"})
    if not tvm.cuda(0).exist:
        with pytest.raises(BackendError, match="device 'cuda:0' does not exist here"):
            backend.load(str(tiny_lib), {"device": "cuda:0"})
    garbage = tmp_path / "garbage.so"
    garbage.write_bytes(b"not a library")
    with pytest.raises(BackendError, match=r"TVM cannot load garbage\.so: ") as failed:
        backend.load(str(garbage), {})
    assert str(tmp_path) not in str(failed.value)
    with pytest.raises(BackendError, match="TVM cannot load"):
        backend.load(str(tmp_path / "missing.so"), {})
    with pytest.raises(BackendError, match="option 'inputs'"):
        backend.load(str(tiny_lib), {"inputs": [{"name": "x", "dtype": "float33", "shape": [2, 3]}]})


# -- the registry ------------------------------------------------------------------------------------


def test_backend_for_path() -> None:
    assert backend_for_path("model.onnx") == "onnxruntime"
    assert backend_for_path("dir.d/MODEL.ONNX") == "onnxruntime"
    for suffix in ("so", "dylib", "dll", "tar"):
        assert backend_for_path(f"lib/net.{suffix}") == "tvm"
    assert backend_for_path("m.json") == "reference"
    with pytest.raises(BackendError, match=r"cannot tell the backend of 'model\.pt'.*pass backend="):
        backend_for_path("model.pt")
    with pytest.raises(BackendError, match="pass backend="):
        backend_for_path("model")


def test_get_backend() -> None:
    assert {get_backend(n).name for n in ("onnxruntime", "tvm", "reference")} == {"onnxruntime", "tvm", "reference"}
    with pytest.raises(BackendError, match="unknown backend 'torch'; known: onnxruntime, tvm, reference"):
        get_backend("torch")


@pytest.mark.timeout(60)
def test_available_backends_imports_no_runtime() -> None:
    code = (
        "import json, sys; from tether.runtime import available_backends\n"
        "found = available_backends()\n"
        "print(json.dumps([found, sorted(m for m in ('onnxruntime', 'tvm', 'numpy') if m in sys.modules)]))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    found, imported = json.loads(done.stdout)
    assert imported == []
    assert found["reference"] == tether.__version__
    assert found == available_backends()
    for name, dist in (("onnxruntime", "onnxruntime"), ("tvm", "apache-tvm")):
        try:
            expected = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
        assert found[name] == expected
