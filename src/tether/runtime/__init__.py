"""Model backends: what runs a model file on the device, behind one small interface (:mod:`.base`).

- ``onnxruntime``: ``.onnx`` files (:mod:`.ort_backend`);
- ``tvm``: libraries exported by apache-tvm, Relax VM executables or plain functions (:mod:`.tvm_backend`);
- ``reference``: a JSON interpreter on the standard library alone, to test the session core
  (:mod:`.reference`);
- plug-ins: backends other packages register under the entry-point group ``tether.backends``
  (:mod:`.plugins`: a vendor's NPU runtime), found and imported the first time they are needed.

Importing this package imports no runtime: each backend imports its own inside ``load``, and
:func:`available_backends` reads versions from package metadata. :func:`fill_tensor` makes input tensors
on the device (numpy when it is there, else the standard library).
"""

from __future__ import annotations

import logging
import math
import os
import random
import struct
from typing import Any

from ..protocol.session import DTYPE_SIZES
from .base import Backend, BackendError, Model, RawTensor, TensorSpec, fill_shape, module_installed, numpy_to_raw
from .ort_backend import OnnxRuntimeBackend
from .plugins import GROUP, LABEL_PREFIX, Plugin, backend_label, registry
from .reference import ReferenceBackend
from .tvm_backend import TVMBackend

__all__ = [
    "Backend",
    "BackendError",
    "Model",
    "RawTensor",
    "TensorSpec",
    "GROUP",
    "LABEL_PREFIX",
    "Plugin",
    "available_backends",
    "backend_for_path",
    "backend_label",
    "backend_labels",
    "fill_shape",
    "fill_tensor",
    "get_backend",
    "plugins",
]

_BACKENDS: dict[str, Backend] = {b.name: b for b in (OnnxRuntimeBackend(), TVMBackend(), ReferenceBackend())}
#: The module each backend's runtime is imported as (the reference backend needs none).
_RUNTIME_MODULES = {"onnxruntime": "onnxruntime", "tvm": "tvm"}
_SUFFIXES = {".onnx": "onnxruntime", ".so": "tvm", ".dylib": "tvm", ".dll": "tvm", ".tar": "tvm", ".json": "reference"}
FILL_KINDS = ("random", "zeros", "ones")


def plugins(log: int = logging.WARNING) -> dict[str, Plugin]:
    """The ``tether.backends`` plug-ins of this process, found (and imported) on the first call, loaded
    or with their error (:mod:`.plugins`). ``log``: the level of the first call's lines about plug-ins
    that fail or are refused."""
    return registry.get(_BACKENDS.keys(), _SUFFIXES, log)


def _plugin_backends() -> dict[str, Plugin]:
    return {p.name: p for p in plugins().values() if p.backend is not None}


def get_backend(name: str) -> Backend:
    """The backend called ``name``: a built-in one, or a plug-in's."""
    if name in _BACKENDS:
        return _BACKENDS[name]
    found = plugins()
    plugin = found.get(name)
    if plugin is not None and plugin.backend is not None:
        return plugin.backend
    if plugin is not None:
        raise BackendError(f"backend plug-in {name!r} is installed here but did not load: {plugin.error}")
    known = [*_BACKENDS, *(p.name for p in found.values() if p.backend is not None)]
    raise BackendError(f"unknown backend {name!r}; known: {', '.join(known)}")


def backend_for_path(path: str) -> str:
    """The backend a model file's suffix implies (a plug-in's suffixes included)."""
    suffix = os.path.splitext(path)[1].lower()
    if suffix in _SUFFIXES:
        return _SUFFIXES[suffix]
    for plugin in _plugin_backends().values():
        if suffix in plugin.suffixes:
            return plugin.name
    known = [*_BACKENDS, *_plugin_backends()]
    raise BackendError(f"cannot tell the backend of {path!r} from its suffix: pass backend= ({', '.join(known)})")


def available_backends() -> dict[str, str | None]:
    """Backend name -> runtime version (None when unknown), for the backends whose runtime is installed,
    plug-ins that loaded included. Imports no built-in runtime (a plug-in's module, yes)."""
    found = {
        name: backend.version()
        for name, backend in _BACKENDS.items()
        if name not in _RUNTIME_MODULES or module_installed(_RUNTIME_MODULES[name])
    }
    found.update((name, plugin.version()) for name, plugin in _plugin_backends().items())
    return found


def backend_labels() -> dict[str, str]:
    """The labels a server advertises for its plug-in backends: ``backend.<name>`` -> version (``"unknown"``
    without one). A request for ``{"backend.<name>": "*"}`` is granted only to servers that have it."""
    return {backend_label(name): plugin.version() or "unknown" for name, plugin in _plugin_backends().items()}


# -- generated tensors ---------------------------------------------------------------------------


def fill_tensor(dtype: str, shape: tuple[int, ...], kind: str, seed: int | None = None) -> RawTensor:
    """A tensor of ``kind`` ``"zeros"``, ``"ones"`` or ``"random"`` (floats uniform in [0, 1), integers in
    0..9, bools, complex numbers with both parts in [0, 1)), seeded by ``seed`` when given.

    Uses numpy when it can be imported, else the standard library (the two draw different numbers)."""
    if dtype not in DTYPE_SIZES:
        raise BackendError(f"unsupported dtype {dtype!r}; known: {', '.join(DTYPE_SIZES)}")
    if kind not in FILL_KINDS:
        raise BackendError(f"unknown fill {kind!r}; known: {', '.join(FILL_KINDS)}")
    if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise BackendError(f"shape must be non-negative ints, not {list(shape)}")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool) or seed < 0):
        raise BackendError(f"seed must be a non-negative int, not {seed!r}")
    try:
        import numpy  # noqa: F401
    except ImportError:
        return _fill_stdlib(dtype, tuple(shape), kind, seed)
    return _fill_numpy(dtype, tuple(shape), kind, seed)


def _fill_numpy(dtype: str, shape: tuple[int, ...], kind: str, seed: int | None) -> RawTensor:
    import numpy as np

    if dtype == "bfloat16":  # the top half of float32's bits, whether or not ml_dtypes is installed
        f32 = np.frombuffer(_fill_numpy("float32", shape, kind, seed).data, dtype="<u4")
        return RawTensor(dtype, shape, (f32 >> 16).astype("<u2").view(np.uint8))
    rng = np.random.default_rng(seed)
    arr: Any
    if kind != "random":
        arr = (np.zeros if kind == "zeros" else np.ones)(shape, dtype=dtype)
    elif dtype == "float16":  # k / 2048 is exact in float16: nothing rounds up to 1
        arr = (rng.integers(0, 2048, shape) / 2048).astype(np.float16)
    elif dtype == "float32":  # drawn as float32: a rounded float64 could be 1.0
        arr = rng.random(shape, dtype=np.float32)
    elif dtype == "float64":
        arr = rng.random(shape)
    elif dtype.startswith("complex"):
        arr = (rng.random(shape) + 1j * rng.random(shape)).astype(dtype)
    elif dtype == "bool":
        arr = rng.integers(0, 2, shape).astype(bool)
    else:
        arr = rng.integers(0, 10, shape, dtype=dtype)
    return numpy_to_raw(arr)


#: struct formats per dtype (complex: two floats an element; bfloat16: its bits as a uint16).
_STRUCT_FORMATS = {
    "bool": "?",
    "int8": "b",
    "uint8": "B",
    "int16": "h",
    "uint16": "H",
    "float16": "e",
    "bfloat16": "H",
    "int32": "i",
    "uint32": "I",
    "float32": "f",
    "int64": "q",
    "uint64": "Q",
    "float64": "d",
    "complex64": "f",
    "complex128": "d",
}


def _fill_stdlib(dtype: str, shape: tuple[int, ...], kind: str, seed: int | None) -> RawTensor:
    count = math.prod(shape) * (2 if dtype.startswith("complex") else 1)
    fmt = _STRUCT_FORMATS[dtype]
    if kind == "zeros":
        return RawTensor(dtype, shape, bytearray(count * struct.calcsize(fmt)))
    values: list[Any]
    if kind == "ones":
        one: list[Any] = [0x3F80] if dtype == "bfloat16" else [1, 0] if dtype.startswith("complex") else [1]
        element = struct.pack(f"<{len(one)}{fmt}", *one)
        return RawTensor(dtype, shape, bytearray(element * (count // len(one))))
    rnd = random.Random(seed)
    if dtype == "bfloat16":  # k / 256 is exact in bfloat16: its bits are float32's top half
        floats = struct.pack(f"<{count}f", *(rnd.randrange(256) / 256 for _ in range(count)))
        values = [bits >> 16 for bits in struct.unpack(f"<{count}I", floats)]
    elif dtype == "float16":
        values = [rnd.randrange(2048) / 2048 for _ in range(count)]
    elif fmt in "fd":
        values = [rnd.random() for _ in range(count)]
    else:
        values = [rnd.randrange(2 if dtype == "bool" else 10) for _ in range(count)]
    return RawTensor(dtype, shape, bytearray(struct.pack(f"<{count}{fmt}", *values)))
