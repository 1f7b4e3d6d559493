"""The interface every model backend implements, and the stdlib tensor the session core moves around.

The session worker (``tether.device.worker``) receives tensors from the wire into :class:`RawTensor`
buffers (standard library only), hands them to a backend's :meth:`Model.prepare` once (numpy view, TVM
tensor on the device, ...), calls :meth:`Model.run` with prepared values, and sends back what
:meth:`Model.to_raw` makes of each output. Backends import their runtimes lazily, inside ``load``.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from ..protocol.session import DTYPE_SIZES, TensorDesc

__all__ = ["Backend", "BackendError", "Model", "RawTensor", "TensorSpec", "fill_shape", "profile_rows"]


class BackendError(Exception):
    """A backend could not load or run a model; the message says why in the user's terms."""


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """A model input or output: dims are ints, or a string/None where the model leaves them symbolic;
    ``shape`` None when even the rank is unknown. ``dtype`` ``""`` when unknown."""

    name: str
    dtype: str
    shape: tuple[int | str | None, ...] | None

    def to_wire(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": None if self.shape is None else list(self.shape)}

    @classmethod
    def from_wire(cls, value: Mapping[str, Any]) -> TensorSpec:
        """The inverse of :meth:`to_wire` (what ``RemoteModel.inputs`` holds)."""
        shape = value.get("shape")
        return cls(str(value["name"]), str(value.get("dtype") or ""), None if shape is None else tuple(shape))

    @property
    def shape_text(self) -> str:
        """``[1, 3, 'N']``, or ``[?]`` for an unknown rank."""
        if self.shape is None:
            return "[?]"
        return "[" + ", ".join("?" if d is None else repr(d) for d in self.shape) + "]"


@dataclass(slots=True)
class RawTensor:
    """Raw little-endian C-order bytes with a numpy dtype name and a shape.

    ``data`` is any object with the buffer protocol (bytes, bytearray, memoryview, a numpy array);
    ``keepalive`` holds whatever owns that memory (a TVM tensor behind a numpy view).
    """

    dtype: str
    shape: tuple[int, ...]
    data: Any
    keepalive: Any = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.dtype not in DTYPE_SIZES:
            raise BackendError(f"unsupported dtype {self.dtype!r}")
        have = memoryview(self.data).nbytes
        if have != self.nbytes:
            raise BackendError(f"tensor of {self.dtype}{list(self.shape)} needs {self.nbytes} bytes, has {have}")

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPE_SIZES[self.dtype]

    def desc(self, name: str) -> TensorDesc:
        return TensorDesc(name, self.dtype, self.shape)


class Model(Protocol):
    """A loaded model. One thread calls it at a time."""

    backend: str
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]

    def prepare(self, name: str, tensor: RawTensor) -> Any:
        """Turn a received tensor into what :meth:`run` takes for input ``name`` (kept across runs)."""
        ...

    def run(self, inputs: Mapping[str, Any]) -> list[tuple[str, Any]]:
        """Run once on prepared inputs; outputs in the model's order, in the backend's own form."""
        ...

    def sync(self) -> None:
        """Wait until the device has finished the work :meth:`run` started (timing needs this)."""
        ...

    def to_raw(self, value: Any) -> RawTensor:
        """An output of :meth:`run` as host bytes."""
        ...

    def close(self) -> None: ...


class Backend(Protocol):
    """Loads models of one kind. ``options`` come from the client, as JSON values.

    Other packages add backends through the entry-point group ``tether.backends`` (:mod:`.plugins` has the
    contract: the entry point's name is the backend's, ``version()`` and a ``suffixes`` tuple are optional)."""

    name: str

    def version(self) -> str | None:
        """The runtime's version when it is installed (without importing it), else None."""
        ...

    def load(self, path: str, options: Mapping[str, Any]) -> Model: ...


# -- helpers the backends share ------------------------------------------------------------------


def check_options(backend: str, options: Mapping[str, Any], known: Iterable[str]) -> None:
    """Refuse option names a backend does not know (a typo must not be ignored silently)."""
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise BackendError(f"unknown {backend} options {unknown}; known: {', '.join(sorted(known))}")


def module_installed(module: str) -> bool:
    """Whether the top-level ``module`` can be imported, without importing it."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def runtime_version(module: str, distributions: Iterable[str]) -> str | None:
    """The version of the distribution that installs ``module`` (tried in order, then whichever package
    metadata says provides it), without importing it; None when it is not installed or has no metadata."""
    if not module_installed(module):
        return None
    candidates = [*distributions, *importlib.metadata.packages_distributions().get(module, [])]
    for dist in candidates:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def input_spec(specs: Sequence[TensorSpec], name: str) -> TensorSpec:
    """The spec of input ``name``; :class:`BackendError` naming the model's inputs when it has none."""
    for spec in specs:
        if spec.name == name:
            return spec
    raise BackendError(f"the model has no input {name!r}; it takes {[s.name for s in specs]}")


def _fits(spec: TensorSpec, shape: Sequence[int]) -> bool:
    """Whether ``shape`` has the spec's rank (when known) and its size on every fixed dim."""
    return spec.shape is None or (
        len(spec.shape) == len(shape)
        and all(not isinstance(want, int) or want == have for want, have in zip(spec.shape, shape, strict=True))
    )


def check_input(spec: TensorSpec, tensor: RawTensor) -> None:
    """Raise :class:`BackendError` when ``tensor`` cannot be input ``spec``: another dtype (unless the spec's
    is unknown, ``""``), another rank (unless unknown), or another size on a fixed dim."""
    if (not spec.dtype or spec.dtype == tensor.dtype) and _fits(spec, tensor.shape):
        return
    raise BackendError(
        f"input {spec.name!r} takes {spec.dtype or '?'}{spec.shape_text}, got {tensor.dtype}{list(tensor.shape)}"
    )


def fill_shape(spec: TensorSpec, given: Sequence[int] | None = None) -> tuple[int, ...]:
    """The shape to generate input ``spec`` with: ``given`` (which must fit the spec's rank and fixed dims),
    else the spec's own when every dim is fixed. Raises :class:`BackendError` naming the fix for an input
    with dynamic dims or an unknown rank, or an unknown dtype, and nothing given."""
    name = spec.name
    if not spec.dtype:
        raise BackendError(f"input {name!r} has no known dtype, so it cannot be generated: send it (--input X.NPZ)")
    if given is None:
        if spec.shape is not None and all(isinstance(d, int) for d in spec.shape):
            return tuple(int(d) for d in spec.shape if isinstance(d, int))
        what = "an unknown rank" if spec.shape is None else f"dynamic dims {spec.shape_text}"
        raise BackendError(
            f"input {name!r} has {what}: give its shape with --shape {name}=D1,D2,... "
            f"(Python: shapes={{{name!r}: [...]}}), or send it"
        )
    if not (isinstance(given, list | tuple) and all(type(d) is int and d >= 0 for d in given)):
        raise BackendError(f"the shape for input {name!r} must be non-negative ints, not {given!r}")
    if not _fits(spec, given):
        raise BackendError(f"shape {list(given)} does not fit input {name!r}, which is {spec.shape_text}")
    return tuple(given)


def check_feed(specs: Sequence[TensorSpec], names: Iterable[str]) -> None:
    """Raise :class:`BackendError` unless ``names`` are exactly the model's inputs."""
    given = set(names)
    expected = [s.name for s in specs]
    missing = [n for n in expected if n not in given]
    unknown = sorted(given.difference(expected))
    problems = [f"missing inputs {missing}"] if missing else []
    problems += [f"unknown inputs {unknown}"] if unknown else []
    if problems:
        raise BackendError(f"{'; '.join(problems)}; the model takes {expected}")


def numpy_dtype(name: str) -> Any:
    """The little-endian numpy dtype for a protocol dtype name (bfloat16 through ``ml_dtypes``)."""
    import numpy as np

    if name == "bfloat16":
        try:
            import ml_dtypes
        except ImportError:
            raise BackendError("bfloat16 tensors need the ml_dtypes package") from None
        return np.dtype(ml_dtypes.bfloat16)
    if name not in DTYPE_SIZES:
        raise BackendError(f"unsupported dtype {name!r}")
    return np.dtype(name).newbyteorder("<")


def numpy_view(tensor: RawTensor) -> Any:
    """``tensor`` as a numpy array over its own bytes (no copy on little-endian hosts)."""
    import numpy as np

    arr = np.frombuffer(tensor.data, dtype=numpy_dtype(tensor.dtype)).reshape(tensor.shape)
    return arr.astype(arr.dtype.newbyteorder("="), copy=False)


def numpy_to_raw(arr: Any, keepalive: Any = None) -> RawTensor:
    """A numpy array as a :class:`RawTensor`: C order, little-endian, ``data`` a flat uint8 view (any dtype,
    bfloat16 included, then passes through ``memoryview``)."""
    import numpy as np

    arr = np.asarray(arr)
    arr = arr.astype(arr.dtype.newbyteorder("<"), order="C", copy=False)
    return RawTensor(arr.dtype.name, tuple(int(d) for d in arr.shape), arr.reshape(-1).view(np.uint8), keepalive)


def profile_rows(rows: list[dict[str, Any]], runs: int) -> list[dict[str, Any]]:
    """A backend's per-operator profile, finished: each row (``name``, ``op``, ``calls``, ``total_s`` over
    ``runs`` runs) gets ``mean_s`` (per call), ``per_run_s`` and ``percent`` (of all rows' time); slowest first."""
    total = sum(r["total_s"] for r in rows) or 1.0
    for r in rows:
        r["mean_s"] = r["total_s"] / r["calls"] if r["calls"] else 0.0
        r["per_run_s"] = r["total_s"] / max(runs, 1)
        r["percent"] = 100 * r["total_s"] / total
    return sorted(rows, key=lambda r: -r["total_s"])
