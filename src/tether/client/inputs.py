"""What a model takes, read on the host before a device is taken, and whether the given inputs fit it.

``tether run`` and ``tether bench`` check a model's inputs twice: here, from the file, when its kind
can be read without a device (a reference ``.json`` model; an ``.onnx`` one when the ``onnx`` package is
installed), and again from what the device's backend reports once the model is loaded.
"""

from __future__ import annotations

import os
from collections.abc import Collection, Mapping, Sequence

from ..errors import ConfigError
from ..runtime import BackendError, TensorSpec, backend_for_path, fill_shape
from ..runtime.reference import ReferenceBackend

__all__ = ["input_problem", "local_input_specs", "shapes_for"]


def local_input_specs(path: str | os.PathLike[str], backend: str | None = None) -> list[TensorSpec] | None:
    """The inputs of the model file at ``path``, read here; None when only a device can tell (a TVM
    library, or an ``.onnx`` without the ``onnx`` package). Raises :class:`ConfigError` when the file
    is not a model of its kind (``backend``, else its suffix's)."""
    path = os.fspath(path)
    name = os.path.basename(path)
    if backend is None and not _suffix_known(path):
        raise ConfigError(f"cannot tell the backend of {name} from its suffix: name it (--backend, or backend=)")
    kind = backend or backend_for_path(path)
    try:
        if kind == "reference":
            return ReferenceBackend().load(path, {}).inputs  # the whole model is checked, as the device will
    except BackendError as exc:
        raise ConfigError(str(exc)) from None
    if kind != "onnxruntime":
        return None
    try:
        import onnx
        from onnx.helper import tensor_dtype_to_np_dtype
    except ImportError:
        return None
    try:
        proto = onnx.load(path, load_external_data=False)
    except Exception as exc:  # protobuf's DecodeError and kin: not an ONNX file
        raise ConfigError(f"{name} is not an ONNX model: {exc}") from None
    if not proto.HasField("graph"):  # e.g. an empty file: a valid, empty message
        raise ConfigError(f"{name} is not an ONNX model: it has no graph")
    graph = proto.graph
    weights = {t.name for t in graph.initializer}
    specs = []
    for value in graph.input:
        if value.name in weights:  # old models (IR < 4) list their weights as inputs too
            continue
        tensor = value.type.tensor_type
        try:
            dtype = tensor_dtype_to_np_dtype(tensor.elem_type).name
        except (KeyError, TypeError, ValueError):
            dtype = ""
        shape = None
        if tensor.HasField("shape"):
            shape = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tensor.shape.dim)
        specs.append(TensorSpec(value.name, dtype, shape))
    return specs


def _suffix_known(path: str) -> bool:
    try:
        backend_for_path(path)
    except BackendError:
        return False
    return True


def input_problem(
    specs: Sequence[TensorSpec],
    given: Collection[str],
    shapes: Mapping[str, Sequence[int]],
    sources: tuple[str, str] = ("inputs", "shapes"),
) -> str | None:
    """Why inputs cannot be made for ``specs``: names ``given`` or in ``shapes`` that the model does not
    take (``sources`` names where each came from, e.g. ``--input x.npz``), or an input left to generate
    whose shape is unknown (dynamic dims or rank, no entry in ``shapes``) or does not fit. None when
    every input can be made."""
    names = [s.name for s in specs]
    for what, keys in zip(sources, (given, shapes), strict=True):
        unknown = sorted(set(keys) - set(names))
        if unknown:
            return f"{what}: {unknown} not among the model's inputs {names}"
    for spec in specs:
        if spec.name not in given:
            try:
                fill_shape(spec, shapes.get(spec.name))
            except BackendError as exc:
                return str(exc)
    return None


def shapes_for(specs: Sequence[TensorSpec], shapes: Mapping[str, Sequence[int]]) -> dict[str, Sequence[int]]:
    """The entries of ``shapes`` that one model of several needs: those for its inputs whose shape is not
    fixed (shapes meant for another model's inputs of the same name are left out)."""
    return {
        s.name: shapes[s.name]
        for s in specs
        if s.name in shapes and (s.shape is None or not all(isinstance(d, int) for d in s.shape))
    }
