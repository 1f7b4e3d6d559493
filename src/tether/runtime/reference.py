"""The ``reference`` backend: a tiny interpreter on the standard library alone, to test the session core.

A model is a JSON file::

    {"format": "tether-reference/1",
     "inputs": [{"name": "x", "dtype": "float32", "shape": [2, 3]}],
     "outputs": [{"name": "y", "dtype": "float32", "shape": [2, 3]}],
     "ops": [{"op": "affine", "input": "x", "output": "y", "scale": 2.0, "bias": 1.0}]}

Ops run in order over a table of named values (the inputs first):

- ``{"op": "affine", "input": "x", "output": "y", "scale": 2.0, "bias": 1.0}``: ``y = x * scale + bias``
  elementwise (integers truncate toward zero);
- ``{"op": "add", "inputs": ["a", "b"], "output": "y"}``: elementwise, same dtype and shape;
- ``{"op": "sleep", "seconds": 0.5}``: a slow model;
- ``{"op": "raise", "message": "boom"}``: a failing one (:class:`RuntimeError` at run time);
- ``{"op": "exit", "code": 3}``: a crashing one (``os._exit``, as a native runtime would die).

Dtypes: float32, float64, int32, int64, held in :mod:`array` arrays. Everything is checked at load:
the format, the ops, that each op's inputs exist by then with matching dtypes and shapes, and that each
listed output is computed with its declared dtype and shape.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from array import array
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .base import BackendError, RawTensor, TensorSpec, check_feed, check_input, input_spec

__all__ = ["FORMAT", "ReferenceBackend", "ReferenceModel", "RefTensor", "write_reference_model"]

FORMAT = "tether-reference/1"

#: dtype -> array typecode of that exact size.
_TYPECODES = {
    name: next(code for code in codes if array(code).itemsize == size)
    for name, codes, size in (
        ("float32", "f", 4),
        ("float64", "d", 8),
        ("int32", "ilh", 4),
        ("int64", "qlL", 8),
    )
}
_OPS = {"affine", "add", "sleep", "raise", "exit"}


@dataclass(slots=True)
class RefTensor:
    """A value the reference ops work on: native-endian elements in C order."""

    dtype: str
    shape: tuple[int, ...]
    data: array[Any]


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _spec(raw: Any, where: str) -> TensorSpec:
    if not isinstance(raw, dict) or not isinstance(raw.get("name"), str):
        raise BackendError(f"{where}: each entry must be an object with a string 'name'")
    name, dtype, shape = raw["name"], raw.get("dtype"), raw.get("shape")
    if dtype not in _TYPECODES:
        raise BackendError(f"{where} {name!r}: dtype {dtype!r} is not one of {', '.join(_TYPECODES)}")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise BackendError(f"{where} {name!r}: shape must be a list of non-negative ints, not {shape!r}")
    return TensorSpec(name, dtype, tuple(shape))


def _check_ops(ops: Any, inputs: list[TensorSpec], outputs: list[TensorSpec]) -> list[dict[str, Any]]:
    """Validate ``ops`` by running their dtypes and shapes through, then the declared outputs."""
    if not isinstance(ops, list):
        raise BackendError("'ops' must be a list")
    known = {s.name: (s.dtype, s.shape or ()) for s in inputs}  # a reference model's shapes are all known

    def value(op_index: int, name: Any) -> tuple[str, tuple[int | str | None, ...]]:
        if name not in known:
            raise BackendError(f"op {op_index}: no value {name!r} at this point (have {sorted(known)})")
        return known[name]

    for i, op in enumerate(ops):
        kind = op.get("op") if isinstance(op, dict) else None
        if kind not in _OPS:
            raise BackendError(f"op {i}: unknown op {kind!r}; known: {', '.join(sorted(_OPS))}")
        if kind in ("affine", "add") and not isinstance(op.get("output"), str):
            raise BackendError(f"op {i} ({kind}): 'output' must be a string")
        if kind == "affine":
            if not all(_number(op.get(k, 0)) for k in ("scale", "bias")):
                raise BackendError(f"op {i} (affine): 'scale' and 'bias' must be finite numbers")
            known[op["output"]] = value(i, op.get("input"))
        elif kind == "add":
            names = op.get("inputs")
            if not isinstance(names, list) or len(names) != 2:
                raise BackendError(f"op {i} (add): 'inputs' must be a list of two names")
            a, b = value(i, names[0]), value(i, names[1])
            if a != b:
                raise BackendError(f"op {i} (add): {names[0]!r} is {a[0]}{list(a[1])}, {names[1]!r} {b[0]}{list(b[1])}")
            known[op["output"]] = a
        elif kind == "sleep" and not (_number(op.get("seconds")) and op["seconds"] >= 0):
            raise BackendError(f"op {i} (sleep): 'seconds' must be a non-negative number")
        elif kind == "raise" and not isinstance(op.get("message", ""), str):
            raise BackendError(f"op {i} (raise): 'message' must be a string")
        elif kind == "exit" and not (isinstance(op.get("code"), int) and 0 <= op["code"] <= 255):
            raise BackendError(f"op {i} (exit): 'code' must be an int in 0..255")
    for spec in outputs:
        if spec.name not in known:
            raise BackendError(f"output {spec.name!r} is not computed by any op nor an input")
        if known[spec.name] != (spec.dtype, spec.shape or ()):
            dtype, shape = known[spec.name]
            raise BackendError(
                f"output {spec.name!r} is declared {spec.dtype}{spec.shape_text}, computed {dtype}{list(shape)}"
            )
    return ops


class ReferenceModel:
    """A loaded reference model (see the module docstring)."""

    backend = "reference"

    def __init__(self, inputs: list[TensorSpec], outputs: list[TensorSpec], ops: list[dict[str, Any]]) -> None:
        self.inputs = inputs
        self.outputs = outputs
        self.ops = ops

    def prepare(self, name: str, tensor: RawTensor) -> RefTensor:
        check_input(input_spec(self.inputs, name), tensor)
        data = array(_TYPECODES[tensor.dtype])
        data.frombytes(memoryview(tensor.data).cast("B"))
        if sys.byteorder == "big":
            data.byteswap()
        return RefTensor(tensor.dtype, tensor.shape, data)

    def run(self, inputs: Mapping[str, Any]) -> list[tuple[str, Any]]:
        check_feed(self.inputs, inputs)
        values: dict[str, RefTensor] = dict(inputs)
        for op in self.ops:
            kind = op["op"]
            if kind == "affine":
                x = values[op["input"]]
                scale, bias = op.get("scale", 1), op.get("bias", 0)
                cast = float if x.dtype.startswith("float") else int
                out = array(x.data.typecode, (cast(v * scale + bias) for v in x.data))
                values[op["output"]] = RefTensor(x.dtype, x.shape, out)
            elif kind == "add":
                a, b = (values[n] for n in op["inputs"])
                values[op["output"]] = RefTensor(
                    a.dtype, a.shape, array(a.data.typecode, map(sum, zip(a.data, b.data, strict=True)))
                )
            elif kind == "sleep":
                time.sleep(op["seconds"])
            elif kind == "raise":
                raise RuntimeError(op.get("message", "the model raised"))
            elif kind == "exit":
                os._exit(op["code"])
        return [(spec.name, values[spec.name]) for spec in self.outputs]

    def sync(self) -> None:
        pass

    def to_raw(self, value: RefTensor) -> RawTensor:
        data = value.data
        if sys.byteorder == "big":
            data = array(data.typecode, data)
            data.byteswap()
        return RawTensor(value.dtype, value.shape, data)

    def close(self) -> None:
        self.ops = []


class ReferenceBackend:
    """Loads ``tether-reference/1`` JSON models."""

    name = "reference"

    def version(self) -> str | None:
        from .. import __version__

        return __version__

    def load(self, path: str, options: Mapping[str, Any]) -> ReferenceModel:
        name = os.path.basename(path)  # in messages: the workspace's path means nothing to the user
        if options:
            raise BackendError(f"the reference backend takes no options, got {sorted(options)}")
        try:
            with open(path, encoding="utf-8") as f:
                doc = json.load(f)
        except OSError as exc:
            raise BackendError(f"cannot read {name}: {exc.strerror or exc}") from None
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise BackendError(f"{name} is not a JSON reference model: {exc}") from None
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            got = doc.get("format") if isinstance(doc, dict) else type(doc).__name__
            raise BackendError(f"{name}: format must be {FORMAT!r}, not {got!r}")
        specs = {}
        for key in ("inputs", "outputs"):
            if not isinstance(doc.get(key), list):
                raise BackendError(f"{name}: {key!r} must be a list")
            specs[key] = [_spec(raw, key[:-1]) for raw in doc[key]]
            names = [s.name for s in specs[key]]
            if len(set(names)) != len(names):
                raise BackendError(f"{name}: duplicate {key[:-1]} names in {names}")
        ops = _check_ops(doc.get("ops", []), specs["inputs"], specs["outputs"])
        return ReferenceModel(specs["inputs"], specs["outputs"], ops)


def write_reference_model(
    path: str | os.PathLike[str],
    inputs: Sequence[Mapping[str, Any] | TensorSpec],
    outputs: Sequence[Mapping[str, Any] | TensorSpec],
    ops: Sequence[Mapping[str, Any]],
) -> str:
    """Write a reference model file (not validated: tests write broken ones too); returns its path."""

    def plain(spec: Mapping[str, Any] | TensorSpec) -> dict[str, Any]:
        return spec.to_wire() if isinstance(spec, TensorSpec) else dict(spec)

    doc = {"format": FORMAT, "inputs": [plain(s) for s in inputs], "outputs": [plain(s) for s in outputs]}
    doc["ops"] = [dict(op) for op in ops]
    with open(path, "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=1)
    return os.fspath(path)
