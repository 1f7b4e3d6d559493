"""The ``onnxruntime`` backend: ``.onnx`` files in an ``onnxruntime.InferenceSession``.

Options (all optional)::

    providers                 ["CUDAExecutionProvider", ["CPUExecutionProvider", {...}]]; default CPU only
    intra_op_num_threads      int
    inter_op_num_threads      int
    graph_optimization_level  "disable" | "basic" | "extended" | "all"
    execution_mode            "sequential" | "parallel"
    log_severity_level        int, 0 (verbose) .. 4 (fatal)

Inputs are numpy views of the received bytes (no copy); outputs are the numpy arrays onnxruntime returns.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from .base import (
    BackendError,
    RawTensor,
    TensorSpec,
    check_feed,
    check_input,
    check_options,
    input_spec,
    numpy_to_raw,
    numpy_view,
    profile_rows,
    runtime_version,
)

__all__ = ["ORT_DTYPES", "OnnxRuntimeBackend", "OnnxRuntimeModel"]

#: onnxruntime's type strings -> numpy dtype names.
ORT_DTYPES = {
    "tensor(float)": "float32",
    "tensor(double)": "float64",
    "tensor(float16)": "float16",
    "tensor(bfloat16)": "bfloat16",
    "tensor(int8)": "int8",
    "tensor(int16)": "int16",
    "tensor(int32)": "int32",
    "tensor(int64)": "int64",
    "tensor(uint8)": "uint8",
    "tensor(uint16)": "uint16",
    "tensor(uint32)": "uint32",
    "tensor(uint64)": "uint64",
    "tensor(bool)": "bool",
    "tensor(complex64)": "complex64",
    "tensor(complex128)": "complex128",
}
_DISTRIBUTIONS = ("onnxruntime", "onnxruntime-gpu", "onnxruntime-directml", "onnxruntime-openvino", "ort-nightly")
_OPT_LEVELS = {
    "disable": "ORT_DISABLE_ALL",
    "basic": "ORT_ENABLE_BASIC",
    "extended": "ORT_ENABLE_EXTENDED",
    "all": "ORT_ENABLE_ALL",
}
_EXEC_MODES = {"sequential": "ORT_SEQUENTIAL", "parallel": "ORT_PARALLEL"}
_INT_OPTIONS = ("intra_op_num_threads", "inter_op_num_threads", "log_severity_level")
_OPTIONS = {"providers", "graph_optimization_level", "execution_mode", *_INT_OPTIONS}


def _specs(args: Any) -> list[TensorSpec]:
    """Specs from ``session.get_inputs()``/``get_outputs()``: symbolic dims stay strings (or None)."""
    return [
        TensorSpec(
            a.name, ORT_DTYPES.get(a.type, a.type), tuple(d if isinstance(d, (int, str)) else None for d in a.shape)
        )
        for a in args
    ]


def _providers(raw: Any, available: list[str]) -> list[Any]:
    """``providers`` as onnxruntime takes them: names, or ``(name, options)`` pairs; each one available."""
    if not isinstance(raw, list) or not raw:
        raise BackendError(f"'providers' must be a non-empty list, not {raw!r}")
    providers: list[Any] = []
    for item in raw:
        if isinstance(item, (list, tuple)) and len(item) == 2 and isinstance(item[1], dict):
            name, opts = item
            entry: Any = (name, dict(opts))
        else:
            name = entry = item
        if name not in available:
            raise BackendError(f"execution provider {name!r} is not available here; available: {', '.join(available)}")
        providers.append(entry)
    return providers


def _choice(options: Mapping[str, Any], key: str, table: dict[str, str]) -> str:
    value = options[key]
    if value not in table:
        raise BackendError(f"{key} must be one of {', '.join(table)}, not {value!r}")
    return table[value]


class OnnxRuntimeModel:
    """A loaded ``onnxruntime.InferenceSession``."""

    backend = "onnxruntime"

    def __init__(self, session: Any, path: str = "", make_options: Any = None, providers: Any = None) -> None:
        self.session = session
        self._path, self._make_options, self._providers = path, make_options, providers
        self.inputs = _specs(session.get_inputs())
        self.outputs = _specs(session.get_outputs())
        self._output_names = [s.name for s in self.outputs]

    def prepare(self, name: str, tensor: RawTensor) -> Any:
        check_input(input_spec(self.inputs, name), tensor)
        return numpy_view(tensor)

    def run(self, inputs: Mapping[str, Any]) -> list[tuple[str, Any]]:
        check_feed(self.inputs, inputs)
        try:
            values = self.session.run(None, dict(inputs))
        except Exception as exc:
            raise BackendError(f"onnxruntime: {exc}") from None
        return list(zip(self._output_names, values, strict=True))

    def sync(self) -> None:
        pass  # session.run returns when the outputs are on the host

    def to_raw(self, value: Any) -> RawTensor:
        return numpy_to_raw(value)

    def close(self) -> None:
        self.session = None

    def threads(self) -> dict[str, Any]:
        """The thread settings the session runs with (0: onnxruntime's default, one per physical core)."""
        so = self.session.get_session_options()
        return {
            "runtime": "onnxruntime",
            "intra_op_num_threads": so.intra_op_num_threads,
            "inter_op_num_threads": so.inter_op_num_threads,
            "execution_mode": str(so.execution_mode).rpartition(".")[2],
            "providers": list(self.session.get_providers()),
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        }

    def profile(self, inputs: Mapping[str, Any], runs: int) -> list[dict[str, Any]]:
        """Per-operator times over ``runs`` runs, from onnxruntime's own profiler, in a second session made
        for it (profiling is a session option: the timed session stays as it was)."""
        if self._make_options is None:
            raise BackendError("this model cannot be profiled (it was not loaded by the onnxruntime backend)")
        import onnxruntime as ort

        folder = tempfile.mkdtemp(prefix="tether-ort-profile-")
        try:
            so = self._make_options()
            so.enable_profiling = True
            so.profile_file_prefix = os.path.join(folder, "profile")
            session = ort.InferenceSession(self._path, sess_options=so, providers=self._providers)
            feed = dict(inputs)
            for _ in range(max(runs, 1)):
                session.run(None, feed)
            trace_path = session.end_profiling()
            with open(trace_path, encoding="utf-8") as f:
                trace = json.load(f)
        except BackendError:
            raise
        except Exception as exc:
            raise BackendError(f"onnxruntime profiling failed: {exc}") from None
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        return ort_operator_times(trace, max(runs, 1))


def ort_operator_times(trace: Any, runs: int) -> list[dict[str, Any]]:
    """onnxruntime's profile (a Chrome trace) aggregated by node: ``{name, op, calls, total_s, mean_s,
    percent}`` per node, slowest first; ``percent`` of the nodes' summed time; ``calls`` over ``runs`` runs."""
    events = trace if isinstance(trace, list) else trace.get("traceEvents", [])
    nodes: dict[str, dict[str, Any]] = {}
    for event in events:
        if not isinstance(event, dict) or event.get("cat") != "Node":
            continue
        name = str(event.get("name", ""))
        if not name.endswith("_kernel_time"):
            continue  # (the _fence_before/_fence_after events around each kernel)
        args = event.get("args") or {}
        row = nodes.setdefault(
            name.removesuffix("_kernel_time"),
            {"name": name.removesuffix("_kernel_time"), "op": str(args.get("op_name", "")), "calls": 0, "total_s": 0.0},
        )
        row["calls"] += 1
        row["total_s"] += float(event.get("dur", 0)) / 1e6
    return profile_rows(list(nodes.values()), runs)


class OnnxRuntimeBackend:
    """Loads ``.onnx`` models with onnxruntime."""

    name = "onnxruntime"

    def version(self) -> str | None:
        return runtime_version("onnxruntime", _DISTRIBUTIONS)

    def load(self, path: str, options: Mapping[str, Any]) -> OnnxRuntimeModel:
        check_options("onnxruntime", options, _OPTIONS)
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise BackendError(f"the onnxruntime backend needs onnxruntime and numpy: {exc}") from None
        available = list(ort.get_available_providers())
        providers = _providers(options.get("providers", ["CPUExecutionProvider"]), available)
        so = _session_options(ort, options)
        try:
            session = ort.InferenceSession(path, sess_options=so, providers=providers)
        except Exception as exc:
            name = os.path.basename(path)  # the workspace's path means nothing to the user
            raise BackendError(f"onnxruntime cannot load {name}: {str(exc).replace(path, name)}") from None
        model = OnnxRuntimeModel(session, path, lambda: _session_options(ort, options), providers)
        unknown = _unknown_ranks(path, {s.name for s in model.inputs if s.shape == ()})
        model.inputs = [replace(s, shape=None) if s.name in unknown else s for s in model.inputs]
        return model


def _session_options(ort: Any, options: Mapping[str, Any]) -> Any:
    """``ort.SessionOptions`` from the backend's options (checked)."""
    so = ort.SessionOptions()
    for key in _INT_OPTIONS:
        if key in options:
            if not isinstance(options[key], int) or isinstance(options[key], bool):
                raise BackendError(f"{key} must be an int, not {options[key]!r}")
            setattr(so, key, options[key])
    if "graph_optimization_level" in options:
        so.graph_optimization_level = getattr(
            ort.GraphOptimizationLevel, _choice(options, "graph_optimization_level", _OPT_LEVELS)
        )
    if "execution_mode" in options:
        so.execution_mode = getattr(ort.ExecutionMode, _choice(options, "execution_mode", _EXEC_MODES))
    return so


def _unknown_ranks(path: str, names: set[str]) -> set[str]:
    """Which of ``names`` (inputs onnxruntime lists with shape ``[]``) the model gives no shape at all:
    onnxruntime shows both as ``[]``, the ``onnx`` package tells them apart. Empty when it cannot tell."""
    if not names:
        return set()
    try:
        import onnx

        graph = onnx.load(path, load_external_data=False).graph
    except Exception:  # no onnx package, or a model only onnxruntime reads (.ort): scalars, as listed
        return set()
    return {i.name for i in graph.input if i.name in names and not i.type.tensor_type.HasField("shape")}
