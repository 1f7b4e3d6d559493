"""The ``tvm`` backend: libraries written by TVM's ``export_library`` (apache-tvm 0.27), two kinds.

A **Relax VM executable** (``tvm.compile`` of a Relax module, e.g. from ``tvm.relax.frontend.onnx``) is
recognised by its ``vm_load_executable`` function and runs in a ``tvm.runtime.vm.VirtualMachine`` (what
``tvm.relax`` exports, without the compiler: a board with TVM's runtime alone runs it). Its inputs are
the entry function's parameters: names from the VM (``from_onnx`` renames ``input.1`` to
``input_1``), dtypes and shapes from the argument checks the compiler leaves in the executable's
constant pool (``ErrorContext(..., param=x, annotation=R.Tensor((N, 3), dtype="float32"))``, read
from its ``stats`` text); an input without one has dtype ``""`` and is checked by the VM itself at run
time. Outputs (a tensor, or a tuple of them, flattened) are ``output0``, ``output1``, ...; their specs
come from the return check when the compiler wrote one (symbolic shapes), else from the first run.

A **plain library** (``tvm.compile`` of a TIR/TE function) is called in destination-passing style:
inputs first, then output tensors allocated once from ``outputs`` (and reused by every run). Its inputs
come from ``inputs``, else from the signature TVM's argument check reports when the function is called
with no arguments (``add_one(A: Tensor([n], float32), B: ...)``: the leading ones are inputs).

Options::

    device        "cpu" (default), "cuda", "cuda:1", "vulkan", ... (tvm.device's kinds)
    function      the entry function: "main" by default for a Relax VM; required for a plain library
    inputs        [{"name", "dtype", "shape"}, ...]: the inputs, in order (overrides what TVM says)
    outputs       [{"name", "dtype", "shape"}, ...]: a plain library's outputs (int dims); a VM's specs
    output_names  ["logits", ...]: names for a VM's flattened outputs
"""

from __future__ import annotations

import contextlib
import os
import re
import time
from collections.abc import Mapping, Sequence
from typing import Any

from ..protocol.session import DTYPE_SIZES
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

__all__ = ["TVMBackend", "TVMModel", "parse_tensor_annotation", "vm_signature"]

_DISTRIBUTIONS = ("apache-tvm", "tlcpack", "tlcpack-nightly", "mlc-ai-nightly")
_OPTIONS = {"device", "function", "inputs", "outputs", "output_names"}
_ERROR_CONTEXT = re.compile(
    r"ErrorContext\(fn=(?P<fn>[^,]*), loc=(?:param\[(?P<index>\d+)\][^\n]*?|return), annotation="
)
_TYPED_INT = re.compile(r"T\.u?int\d+\((-?\d+)\)")
_SIGNATURE = re.compile(r"`[^`(]*\((?P<params>[^`]*)\)`")
_SIGNATURE_PARAM = re.compile(r"(?P<name>\w+): Tensor\(\[(?P<shape>[^\]]*)\], (?P<dtype>\w+)\)")


# -- what TVM tells about a function -------------------------------------------------------------


def _split_top(text: str) -> list[str]:
    """``text`` split on commas outside parentheses and brackets, stripped, empty parts dropped."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch in "([":
            depth += 1
        elif ch in ")]":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return [p.strip() for p in parts if p.strip()]


def _closing(text: str, open_at: int) -> int:
    """The index of the parenthesis closing the one at ``open_at`` (or -1)."""
    depth = 0
    for i in range(open_at, len(text)):
        if text[i] == "(":
            depth += 1
        elif text[i] == ")":
            depth -= 1
            if depth == 0:
                return i
    return -1


def _dim(text: str) -> int | str:
    text = text.strip()
    match = _TYPED_INT.fullmatch(text)
    if match:
        return int(match.group(1))
    return int(text) if text.lstrip("-").isdigit() else text


def parse_tensor_annotation(text: str) -> list[tuple[str, tuple[int | str | None, ...]]] | None:
    """The tensors of a Relax struct-info annotation, tuples flattened: ``R.Tensor((N, 3), dtype="float32")``
    gives ``[("float32", ("N", 3))]``; None when it holds anything but tensors and tuples."""
    tensors: list[tuple[str, tuple[int | str | None, ...]]] = []
    rest, pos = [], 0
    shape: tuple[int | str | None, ...] | None
    while (at := text.find("R.Tensor(", pos)) >= 0:
        end = _closing(text, at + len("R.Tensor"))
        if end < 0:
            return None
        rest.append(text[pos:at])
        dtype, shape = "", None
        for arg in _split_top(text[at + len("R.Tensor(") : end]):
            if arg.startswith("("):
                shape = tuple(_dim(d) for d in _split_top(arg[1:-1]))
            elif arg.startswith("dtype="):
                dtype = arg[len("dtype=") :].strip("\"'")
            elif arg.startswith("ndim=") and arg[len("ndim=") :].isdigit() and shape is None:
                shape = (None,) * int(arg[len("ndim=") :])
        if shape is None:
            return None
        tensors.append((dtype if dtype in DTYPE_SIZES else "", shape))
        pos = end + 1
    rest.append(text[pos:])
    leftover = re.sub(r"[TR]\.Tuple\(|[\s,()]", "", "".join(rest))
    return tensors if tensors and not leftover else None


def vm_signature(
    stats: str, function: str
) -> tuple[dict[int, tuple[str, tuple[int | str | None, ...]]], list[tuple[str, tuple[int | str | None, ...]]] | None]:
    """Parameter and return specs of ``function`` from a Relax VM executable's ``stats`` text: the
    annotations of the argument and return checks the compiler put in the constant pool."""
    params: dict[int, tuple[str, tuple[int | str | None, ...]]] = {}
    returns = None
    for match in _ERROR_CONTEXT.finditer(stats):
        if match.group("fn") != function:
            continue
        start = match.end()
        head = re.match(r"[\w.]+\(", stats[start:])  # R.Tensor(, R.Tuple(, T.Tuple(: anything else is unknown
        end = _closing(stats, start + head.end() - 1) if head else -1
        parsed = parse_tensor_annotation(stats[start : end + 1]) if end > 0 else None
        if match.group("index") is None:
            returns = parsed
        elif parsed is not None and len(parsed) == 1:
            params[int(match.group("index"))] = parsed[0]
    return params, returns


def _probe_signature(fn: Any) -> list[TensorSpec] | None:
    """A TIR function's parameters, from the arity error TVM raises when it is called with no arguments."""
    try:
        fn()
    except TypeError as exc:
        match = _SIGNATURE.search(str(exc))
    except Exception:
        return None
    else:
        return None
    if match is None:
        return None
    params = _split_top(match.group("params"))
    specs = [_SIGNATURE_PARAM.fullmatch(p) for p in params]
    if not specs or not all(specs):
        return None
    return [
        TensorSpec(m["name"], m["dtype"], tuple(_dim(d) for d in _split_top(m["shape"])))
        for m in specs
        if m is not None
    ]


# -- options -------------------------------------------------------------------------------------


def _option_specs(raw: Any, key: str, concrete: bool = False) -> list[TensorSpec]:
    if not isinstance(raw, list):
        raise BackendError(f"option {key!r} must be a list of {{name, dtype, shape}} objects")
    specs = []
    for item in raw:
        ok = isinstance(item, dict) and isinstance(item.get("name"), str) and item.get("dtype") in DTYPE_SIZES
        shape: Any = item.get("shape") if isinstance(item, dict) else None
        dims_ok = isinstance(shape, list) and all(
            (isinstance(d, int) and not isinstance(d, bool) and d >= 0)
            or (not concrete and (d is None or isinstance(d, str)))
            for d in shape
        )
        if not (ok and dims_ok):
            need = "non-negative int dims" if concrete else "int, string or null dims"
            raise BackendError(f"option {key!r}: {item!r} needs a name, a dtype of {', '.join(DTYPE_SIZES)} and {need}")
        specs.append(TensorSpec(item["name"], item["dtype"], tuple(shape)))
    return specs


def _device(tvm: Any, text: Any) -> Any:
    if not isinstance(text, str):
        raise BackendError(f"option 'device' must be a string like 'cpu' or 'cuda:1', not {text!r}")
    kind, _, index = text.partition(":")
    try:
        dev = tvm.device(kind, int(index or 0))
    except ValueError as exc:
        raise BackendError(f"bad device {text!r}: {exc}") from None
    if not dev.exist:
        raise BackendError(f"device {text!r} does not exist here")
    return dev


# -- the model -----------------------------------------------------------------------------------


class TVMModel:
    """A loaded TVM library: a Relax VM function, or a plain destination-passing function."""

    backend = "tvm"

    def __init__(
        self,
        tvm: Any,
        dev: Any,
        fn: Any,
        inputs: list[TensorSpec],
        outputs: list[TensorSpec],
        *,
        checked: set[str],
        destinations: list[Any] | None = None,
        output_names: Sequence[str] | None = None,
        lib: Any = None,
        function: str | None = None,
    ) -> None:
        self._tvm = tvm
        self._lib, self._function = lib, function  # a Relax VM's library: a second VM profiles it
        self.dev = dev
        self._fn = fn
        self.inputs = inputs
        self.outputs = outputs
        self._checked = checked
        self._destinations = destinations
        self._output_names = list(output_names) if output_names else [s.name for s in outputs]

    def prepare(self, name: str, tensor: RawTensor) -> Any:
        spec = input_spec(self.inputs, name)
        if name in self._checked:
            check_input(spec, tensor)
        return self._tvm.runtime.tensor(numpy_view(tensor), self.dev)

    def run(self, inputs: Mapping[str, Any]) -> list[tuple[str, Any]]:
        check_feed(self.inputs, inputs)
        args = [inputs[s.name] for s in self.inputs]
        try:
            if self._destinations is not None:
                self._fn(*args, *self._destinations)
                values = list(self._destinations)
            else:
                values = self._flatten(self._fn(*args), [])
        except BackendError:
            raise
        except Exception as exc:
            raise BackendError(f"tvm: {exc}") from None
        if not self._output_names:
            self._output_names = [f"output{i}" for i in range(len(values))]
        if len(values) != len(self._output_names):
            raise BackendError(f"the function returned {len(values)} tensors for outputs {self._output_names}")
        if len(self.outputs) != len(values):  # the compiler wrote no return check: learn the specs now
            self.outputs = [
                TensorSpec(name, str(v.dtype), tuple(int(d) for d in v.shape))
                for name, v in zip(self._output_names, values, strict=True)
            ]
        return list(zip(self._output_names, values, strict=True))

    def _flatten(self, value: Any, into: list[Any]) -> list[Any]:
        if isinstance(value, self._tvm.runtime.Tensor):
            into.append(value)
        elif isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
            for item in value:
                self._flatten(item, into)
        else:
            raise BackendError(f"the function returned a {type(value).__name__}, not tensors")
        return into

    def sync(self) -> None:
        self.dev.sync()

    def to_raw(self, value: Any) -> RawTensor:
        return numpy_to_raw(value.numpy())

    def close(self) -> None:
        self._fn = None
        self._destinations = None
        self._lib = None

    def threads(self) -> dict[str, Any]:
        """TVM's thread settings: ``TVM_NUM_THREADS`` as set, and the thread count its runtime uses.

        Asking for the count starts TVM's thread pool, which pins the calling thread to one CPU: the
        measurement would then run pinned where the same model in-process is not (and run 2-6 % apart on a
        2-CPU machine). The thread's affinity is put back as it was.
        """
        get, put = getattr(os, "sched_getaffinity", None), getattr(os, "sched_setaffinity", None)
        cpus = get(0) if get is not None else None
        try:
            count: int | None = int(self._tvm.runtime.num_threads())
        except Exception:
            count = None
        finally:
            if cpus is not None and put is not None and get is not None and get(0) != cpus:
                with contextlib.suppress(OSError):
                    put(0, cpus)
        return {
            "runtime": "tvm",
            "TVM_NUM_THREADS": os.environ.get("TVM_NUM_THREADS"),
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
            "num_threads": count,
            "device": str(self.dev),
        }

    def profile(self, inputs: Mapping[str, Any], runs: int) -> list[dict[str, Any]]:
        """Per-call times over ``runs`` runs: for a Relax VM, every call the VM makes (kernels and its
        builtins), timed around the call by the VM's instrument hook (``set_instrument``; apache-tvm 0.27
        has no ``profile=True`` VM) in a second VM made only for this, synchronised after each call; for a
        plain library, its one function."""
        check_feed(self.inputs, inputs)
        args = [inputs[s.name] for s in self.inputs]
        rows: dict[str, dict[str, Any]] = {}

        def add(name: str, kind: str, seconds: float) -> None:
            row = rows.setdefault(name, {"name": name, "op": kind, "calls": 0, "total_s": 0.0})
            row["calls"] += 1
            row["total_s"] += seconds

        try:
            if self._lib is None or self._function is None:
                for _ in range(max(runs, 1)):
                    start = time.perf_counter()
                    self.run(inputs)
                    self.sync()
                    add(self._function or "function", "function", time.perf_counter() - start)
            else:
                vm = self._tvm.runtime.vm.VirtualMachine(self._lib, self.dev)
                stack: list[float] = []

                def instrument(func: Any, symbol: str, before: bool, ret: Any, *rest: Any) -> int:
                    if before:
                        stack.append(time.perf_counter())
                    elif stack:
                        self.dev.sync()
                        seconds = time.perf_counter() - stack.pop()
                        add(str(symbol), "builtin" if str(symbol).startswith("vm.builtin.") else "kernel", seconds)
                    return 0  # VMInstrumentReturnKind.NO_OP

                vm.set_instrument(instrument)
                fn = vm[self._function]
                for _ in range(max(runs, 1)):
                    fn(*args)
                    self.dev.sync()
        except Exception as exc:
            raise BackendError(f"tvm profiling failed: {exc}") from None
        return profile_rows(list(rows.values()), max(runs, 1))


class TVMBackend:
    """Loads libraries exported by apache-tvm."""

    name = "tvm"

    def version(self) -> str | None:
        return runtime_version("tvm", _DISTRIBUTIONS)

    def load(self, path: str, options: Mapping[str, Any]) -> TVMModel:
        check_options("tvm", options, _OPTIONS)
        try:
            import tvm
            import tvm.runtime.vm  # the Relax VM's runtime half: a board with TVM's runtime alone has it
        except ImportError as exc:
            raise BackendError(f"the tvm backend needs apache-tvm and numpy: {exc}") from None
        dev = _device(tvm, options.get("device", "cpu"))
        try:
            lib = tvm.runtime.load_module(path)
        except Exception as exc:
            name = os.path.basename(path)  # the workspace's path means nothing to the user
            raise BackendError(f"TVM cannot load {name}: {str(exc).replace(path, name)}") from None
        inputs = _option_specs(options["inputs"], "inputs") if "inputs" in options else None
        outputs = _option_specs(options["outputs"], "outputs") if "outputs" in options else None
        names = options.get("output_names")
        if names is not None and not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
            raise BackendError("option 'output_names' must be a list of strings")
        if lib.implements_function("vm_load_executable"):
            return self._load_vm(
                tvm,
                lib,
                dev,
                function=str(options.get("function", "main")),
                inputs=inputs,
                outputs=outputs,
                names=names,
            )
        return self._load_plain(
            tvm, lib, dev, function=options.get("function"), inputs=inputs, outputs=outputs, names=names
        )

    def _load_vm(
        self,
        tvm: Any,
        lib: Any,
        dev: Any,
        *,
        function: str,
        inputs: list[TensorSpec] | None,
        outputs: list[TensorSpec] | None,
        names: list[str] | None,
    ) -> TVMModel:
        try:
            vm = tvm.runtime.vm.VirtualMachine(lib, dev)
            arity = vm._get_function_arity(function)
            fn = vm[function]
        except Exception as exc:
            raise BackendError(f"TVM cannot set up function {function!r} of the Relax VM: {exc}") from None
        params, returns = vm_signature(str(lib["stats"]()), function)
        if inputs is not None:
            if len(inputs) != arity:
                raise BackendError(f"option 'inputs' names {len(inputs)} inputs, {function!r} takes {arity}")
            checked = {s.name for s in inputs}
        else:
            inputs = []
            for i in range(arity):
                dtype, shape = params.get(i, ("", None))  # no argument check: dtype and rank unknown
                inputs.append(TensorSpec(str(vm._get_function_param_name(function, i)), dtype, shape))
            checked = {s.name for i, s in enumerate(inputs) if i in params and s.dtype}
        if outputs is None:
            prefix = names or [f"output{i}" for i in range(len(returns or []))]
            outputs = [TensorSpec(n, d, s) for n, (d, s) in zip(prefix, returns or [], strict=False)]
            if names and len(outputs) != len(names):
                outputs = []
        return TVMModel(
            tvm,
            dev,
            fn,
            inputs,
            outputs,
            checked=checked,
            output_names=names or [s.name for s in outputs],
            lib=lib,
            function=function,
        )

    def _load_plain(
        self,
        tvm: Any,
        lib: Any,
        dev: Any,
        *,
        function: Any,
        inputs: list[TensorSpec] | None,
        outputs: list[TensorSpec] | None,
        names: list[str] | None,
    ) -> TVMModel:
        if not isinstance(function, str):
            raise BackendError("a plain TVM library (not a Relax VM executable) needs option 'function'")
        if outputs is None or not all(
            s.shape is not None and all(isinstance(d, int) for d in s.shape) for s in outputs
        ):
            raise BackendError("a plain TVM function writes into its outputs: pass option 'outputs' with int dims")
        try:
            fn = lib.get_function(function, query_imports=True)
        except Exception as exc:
            raise BackendError(f"the library has no function {function!r}: {exc}") from None
        if inputs is None:
            params = _probe_signature(fn)
            if params is None or len(params) < len(outputs):
                raise BackendError(f"cannot tell the inputs of {function!r}: pass option 'inputs'")
            inputs = params[: len(params) - len(outputs)]
        try:
            destinations = [tvm.runtime.empty(tuple(s.shape or ()), s.dtype, dev) for s in outputs]
        except Exception as exc:
            raise BackendError(f"cannot allocate the outputs: {exc}") from None
        return TVMModel(
            tvm,
            dev,
            fn,
            inputs,
            outputs,
            checked={s.name for s in inputs},
            destinations=destinations,
            output_names=names,
            function=function,
        )
