"""``tune()``: an ONNX model auto-tuned with meta_schedule on the pool's devices, exported, and measured
against its untuned self. What ``tether tune`` runs; usable from a notebook::

    from tether.tune import TuneOptions, tune

    report = tune(TuneOptions("mlp.onnx", ("127.0.0.1", 9190), "rasp4", {"kind": "llvm", "num-cores": 4},
                              trials=64, work_dir="tune-mlp", output="mlp.so"), on_line=print)
    print(report.speedup, report.tuned["stats"]["median"])

The steps: import with Relax (``from_onnx``) and lower to fused TIR (``extract_tasks`` finds nothing in the
high-level graph); tune with ``tune_relax``, building in warm local worker processes
(:class:`~tether.tune.builder.WarmBuilder`) and measuring on the key's devices: ``TetherRunner`` when every
server of the key speaks tether's protocol, TVM's ``RPCRunner`` otherwise (the C++ ``tvm_rpc`` of Android and
boards, or a key on TVM's tracker). The work dir keeps meta_schedule's database and every measurement
(:class:`~tether.tune.builder.MeasureCache`): a second run counts the trials already done against ``trials``
and measures no candidate twice. At the end the tuned and the untuned model are exported, measured on one
device in one session with the same settings, and both checked against onnxruntime on the same inputs.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..client.query import query_tracker
from ..client.stats import summarize
from ..errors import ConfigError, TetherError
from .targets import target_dict

__all__ = ["TuneError", "TuneOptions", "TuneReport", "tune"]

logger = logging.getLogger(__name__)

_LOWER_PASSES = (
    "DecomposeOpsForInference",
    "CanonicalizeBindings",
    "LegalizeOps",
    "AnnotateTIROpPattern",
    "FoldConstant",
    "FuseOps",
    "FuseTIR",
)


class TuneError(TetherError):
    """Tuning could not go on (no server of the key, a model TVM cannot import, a failed export)."""


@dataclass
class TuneOptions:
    """What to tune, where, and how. ``target``: a JSON dict or anything :func:`target_dict` reads;
    ``runner``: "auto", "tether" or "tvm"; ``devices``: servers measured on at once (None: every server
    of the key); ``number``/``repeat``/``min_repeat_ms``: meta_schedule's evaluator; ``final_*``: the
    untuned-vs-tuned measurement at the end."""

    model: str | os.PathLike[str]
    tracker: tuple[str, int]
    key: str
    target: str | dict[str, Any]
    trials: int
    work_dir: str | os.PathLike[str]
    output: str | os.PathLike[str] | None = None
    target_host: str | dict[str, Any] | None = None
    cc: str | None = None
    trials_per_iter: int = 0
    max_trials_per_task: int | None = None
    builders: int = 0
    build_timeout_s: float = 120.0
    devices: int | None = None
    runner: str = "auto"
    number: int = 3
    repeat: int = 1
    min_repeat_ms: float = 0.0
    session_timeout_s: float = 60.0
    queue_timeout_s: float = 600.0
    cost_model: str = "auto"
    seed: int | None = 0
    final_number: int = 10
    final_repeat: int = 10
    rtol: float = 1e-3
    atol: float = 1e-4
    measure: bool = True


@dataclass
class TuneReport:
    """The run's outcome (``to_dict()`` is ``--json``'s content); times in seconds, latencies in ms."""

    model: str
    key: str
    target: dict[str, Any]
    runner: str
    work_dir: str
    output: str | None
    trials: int
    trials_before: int = 0
    trials_run: int = 0
    measured: int = 0
    cached: int = 0
    built: int = 0
    build_failures: int = 0
    progress: dict[str, Any] = field(default_factory=dict)
    untuned: dict[str, Any] | None = None
    tuned: dict[str, Any] | None = None
    speedup: float | None = None
    stages_s: dict[str, float] = field(default_factory=dict)
    wall_s: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _tvm() -> Any:
    try:
        import tvm
        from tvm import relax  # noqa: F401
        from tvm.s_tir import meta_schedule  # noqa: F401
    except ImportError as exc:
        raise ConfigError(
            f"tether tune needs apache-tvm 0.27 on this host (pip install 'tether[tvm]'): {exc}"
        ) from None
    return tvm


def load_and_lower(model: Path, target: Any) -> tuple[Any, Any]:
    """The ONNX model as a Relax module (as imported) and lowered to fused TIR (what tasks come from)."""
    import onnx
    import tvm
    from tvm import relax
    from tvm.relax.frontend.onnx import from_onnx

    try:
        imported = from_onnx(onnx.load(str(model)), keep_params_in_input=False)
    except Exception as exc:
        raise TuneError(f"{model.name}: TVM's ONNX importer failed: {type(exc).__name__}: {exc}") from None
    with target:
        lowered = tvm.transform.Sequential([getattr(relax.transform, p)() for p in _LOWER_PASSES])(imported)
    return imported, lowered


def choose_runner(host: str, port: int, key: str, wanted: str) -> tuple[str, int]:
    """``("tether" | "tvm", servers)``: tether's runner only when every server of the key speaks tether."""
    status = query_tracker(host, port)
    servers = [s for s in status.servers if s.key == f"server:{key}"]
    row = next((k for k in status.keys if k.key == key), None)
    count = len(servers) or (row.total if row is not None else 0)
    if count == 0:
        known = sorted({k.key for k in status.keys})
        raise TuneError(
            f"the tracker at {host}:{port} lists no server of key {key!r}"
            + (f" (keys: {', '.join(known)})" if known else " (it lists none at all)")
        )
    if wanted != "auto":
        return wanted, count
    speaks = bool(servers) and all("tether" in s.protocols for s in servers)
    return ("tether" if speaks else "tvm"), count


def _tracker_status(host: str, port: int, key: str) -> Callable[[], str]:
    def status() -> str:
        s = query_tracker(host, port)
        row = next((k for k in s.keys if k.key == key), None)
        if row is None:
            return f"{key}: no server"
        busy = row.busy if row.busy is not None else row.total - row.free
        return f"{key}: {busy}/{row.total} busy, {row.pending} waiting"

    return status


def _cost_model(name: str) -> str:
    if name != "auto":
        return name
    try:
        import xgboost  # noqa: F401
    except ImportError:
        return "random"
    return "xgb"


def _export(lib: Any, path: Path, cc: str | None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        if cc:
            from tvm.support import cc as tvm_cc

            lib.export_library(str(path), fcompile=tvm_cc.cross_compiler(cc))
        else:
            lib.export_library(str(path))
    except Exception as exc:
        raise TuneError(f"exporting {path.name} failed: {type(exc).__name__}: {exc}") from None


def _reference(model: Path, seed: int) -> tuple[list[dict[str, Any]], dict[str, Any], list[str], dict[str, Any]]:
    """Input specs, seeded inputs, output names and onnxruntime's outputs on them."""
    import numpy as np
    import onnxruntime as ort

    sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(seed)
    specs, inputs = [], {}
    for i in sess.get_inputs():
        if any(not isinstance(d, int) for d in i.shape):
            raise TuneError(f"{model.name}: input {i.name!r} has a dynamic shape {i.shape}; give a static one")
        inner = i.type[len("tensor(") : -1]
        dtype = np.dtype({"float": "float32", "double": "float64"}.get(inner, inner))
        shape = tuple(int(d) for d in i.shape)
        specs.append({"name": i.name, "dtype": str(dtype), "shape": list(shape)})
        kind = dtype.kind
        inputs[i.name] = (
            rng.standard_normal(shape).astype(dtype) if kind == "f" else rng.integers(0, 10, shape).astype(dtype)
        )
    names = [o.name for o in sess.get_outputs()]
    expected = dict(zip(names, sess.run(names, inputs), strict=True))
    return specs, inputs, names, expected


def _record(samples: list[float], error: str | None, checked: bool, device: str, path: Path) -> dict[str, Any]:
    out: dict[str, Any] = {"library": str(path), "device": device, "checked": checked, "error": error}
    out["samples_s"] = samples
    out["stats"] = summarize(samples).to_dict() if samples else None
    return out


def _measure_tether(opts: TuneOptions, libs: list[Path], model: Path) -> list[dict[str, Any]]:
    from ..client.bench import BenchSettings, bench

    specs, inputs, names, expected = _reference(model, 0)
    settings = BenchSettings(
        number=opts.final_number,
        repeat=opts.final_repeat,
        backend="tvm",
        options={"inputs": specs, "output_names": names},
        inputs=inputs,
        reference=expected,
        rtol=opts.rtol,
        atol=opts.atol,
        run_timeout=max(opts.session_timeout_s, 60.0),
    )
    host, port = opts.tracker
    records = bench(host, port, opts.key, libs, settings, devices=1, timeout=opts.queue_timeout_s)
    out = []
    for lib, rec in zip(libs, records, strict=True):
        error = None if rec.error is None else f"{rec.error['type']}: {rec.error['message']}"
        out.append(_record(rec.samples, error, rec.checked, rec.device, lib))
    return out


def _measure_tvm(opts: TuneOptions, libs: list[Path], model: Path, target: Any) -> list[dict[str, Any]]:
    """Both libraries in one TVM RPC session (servers that speak only TVM's protocol)."""
    import numpy as np
    import tvm
    from tvm import rpc

    specs, inputs, names, expected = _reference(model, 0)
    host, port = opts.tracker
    device = f"{host}:{port}/{opts.key} (TVM RPC)"

    def one(remote: Any, lib_path: Path) -> dict[str, Any]:
        # every remote object lives in this frame: gone when it returns, so the session can close after
        dev = remote.device(target.kind.name if target.kind.name != "llvm" else "cpu", 0)
        remote.upload(bytearray(lib_path.read_bytes()), lib_path.name)  # upload(path) leaks the open file
        vm = tvm.relax.VirtualMachine(remote.load_module(lib_path.name), dev)
        args = [tvm.runtime.tensor(inputs[s["name"]], dev) for s in specs]
        result = vm["main"](*args)
        flat = [result] if isinstance(result, tvm.runtime.Tensor) else list(result)
        why = None
        for name, value in zip(names, flat, strict=True):
            if not np.allclose(value.numpy(), expected[name], rtol=opts.rtol, atol=opts.atol):
                why = f"output {name!r} differs from onnxruntime's beyond rtol {opts.rtol}, atol {opts.atol}"
        timer = vm.time_evaluator("main", dev, number=opts.final_number, repeat=opts.final_repeat)
        samples = [float(x) for x in timer(*args).results]
        return _record(samples, why, why is None, device, lib_path)

    tracker = rpc.connect_tracker(host, port)
    try:
        remote = tracker.request(opts.key, priority=1, session_timeout=int(max(opts.queue_timeout_s, 60)))
        out = []
        for lib_path in libs:
            try:
                out.append(one(remote, lib_path))
            except Exception as exc:
                out.append(_record([], f"{type(exc).__name__}: {exc}", False, device, lib_path))
        del remote
    finally:
        tracker.close()
    return out


def _task_summary(tasks: list[Any], database: Any, target: Any) -> list[dict[str, Any]]:
    """Each task's trials and best mean latency in the database (this run's and earlier runs'), for this
    kind of target (a work dir may hold other models' records too: they are not this model's tasks)."""
    import tvm_ffi

    by_hash: dict[int, list[Any]] = {}
    for record in database.get_all_tuning_records():
        if record.target is not None and record.target.kind.name != target.kind.name:
            continue
        by_hash.setdefault(tvm_ffi.structural_hash(record.workload.mod), []).append(record)
    out = []
    for task in tasks:
        records = by_hash.get(tvm_ffi.structural_hash(task.dispatched[0]), [])
        means = [sum(float(x) for x in r.run_secs) / len(r.run_secs) for r in records if r.run_secs]
        means = [m for m in means if m < 1e9]  # meta_schedule records a failed candidate as 1e10 s
        out.append(
            {
                "name": str(task.task_name),
                "weight": int(task.weight),
                "trials": len(records),
                "best_ms": min(means) * 1e3 if means else None,
            }
        )
    return out


def tune(opts: TuneOptions, on_line: Callable[[str], None] | None = None) -> TuneReport:
    """Run the whole flow (see the module's text); progress lines go to ``on_line``. Raises
    :class:`TuneError` or :class:`~tether.errors.ConfigError` when it cannot go on."""
    tvm = _tvm()
    from tvm.s_tir import meta_schedule as ms

    from .builder import CachingRunner, MeasureCache, WarmBuilder
    from .progress import ProgressCallback, TuneProgress, failure_kind

    say = on_line or (lambda _line: None)
    ms_logger = logging.getLogger("tvm.s_tir.meta_schedule")
    if ms_logger.level == logging.NOTSET:  # its tables and the cost model's rounds: in the work dir's logs
        ms_logger.setLevel(logging.WARNING)
    started = time.monotonic()
    stages: dict[str, float] = {}
    model = Path(opts.model)
    if not model.is_file():
        raise ConfigError(f"no model file {model}")
    if opts.trials < 0:
        raise ConfigError("trials must be 0 or more")
    tdict = target_dict(opts.target, opts.target_host)
    try:
        target = tvm.target.Target(tdict)
    except Exception as exc:
        raise ConfigError(f"TVM does not take the target {json.dumps(tdict)}: {exc}") from None
    target_json = json.dumps(tdict, sort_keys=True)
    work_dir = Path(opts.work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    host, port = opts.tracker
    runner_kind, servers = choose_runner(host, port, opts.key, opts.runner)
    devices = opts.devices or servers
    report = TuneReport(
        str(model),
        opts.key,
        tdict,
        runner_kind,
        str(work_dir),
        None if opts.output is None else str(opts.output),
        opts.trials,
    )

    cache = MeasureCache(work_dir)
    builder: WarmBuilder | None = None
    try:
        say(
            f"tune: {model.name} for {target_json} on {opts.key!r} ({servers} servers, {runner_kind} runner), "
            f"work dir {work_dir}"
        )
        t0 = time.monotonic()
        _imported, lowered = load_and_lower(model, target)
        tasks = ms.relax_integration.extract_tasks(lowered, target)
        stages["import_s"] = time.monotonic() - t0
        database = ms.database.JSONDatabase(work_dir=str(work_dir))
        report.trials_before = sum(t["trials"] for t in _task_summary(tasks, database, target))
        remaining = max(0, opts.trials - report.trials_before)
        say(
            f"tune: {len(tasks)} tasks ({', '.join(t.task_name for t in tasks)}); "
            f"{report.trials_before} trials in the work dir, {remaining} to run"
        )
        progress = TuneProgress(remaining, on_line=say, status=_tracker_status(host, port, opts.key))
        t0 = time.monotonic()
        if remaining > 0 and tasks:
            builder = WarmBuilder(
                target_json, workers=opts.builders, timeout_s=opts.build_timeout_s, cc=opts.cc, cache=cache
            )
            evaluator = ms.runner.EvaluatorConfig(
                number=opts.number,
                repeat=opts.repeat,
                min_repeat_ms=int(opts.min_repeat_ms),
                enable_cpu_cache_flush=False,
            )
            rpc_config = ms.runner.RPCConfig(
                tracker_host=host,
                tracker_port=port,
                tracker_key=opts.key,
                session_priority=1,
                session_timeout_sec=int(opts.session_timeout_s),
            )
            inner: Any
            if runner_kind == "tether":
                from ..integrations.meta_schedule import TetherRunner

                inner = TetherRunner(
                    rpc_config,
                    evaluator,
                    max_workers=devices,
                    queue_timeout_sec=opts.queue_timeout_s,
                    on_result=progress.measured,
                )
            else:
                inner = ms.runner.RPCRunner(rpc_config, evaluator, max_workers=devices)

            # a candidate that failed to load or run (or gave wrong answers) on a tether server would fail again:
            # kept; a timeout, a lost device or RPCRunner's untyped errors may not: measured again when proposed
            def keep(error: str) -> bool:
                return runner_kind == "tether" and failure_kind(error) in ("load", "run", "wrong_answer")

            runner = CachingRunner(inner, builder, cache, keep)
            # small batches when trials are few, so that every task gets some (the first would take them all)
            per_iter = opts.trials_per_iter or max(1, min(64, remaining // (2 * len(tasks)) or 1))
            callbacks = [*list(ms.measure_callback.MeasureCallback.create("default")), ProgressCallback(progress)]
            database = ms.relax_integration.tune_relax(
                lowered,
                {},
                target,
                str(work_dir),
                max_trials_global=remaining,
                max_trials_per_task=opts.max_trials_per_task,
                num_trials_per_iter=per_iter,
                builder=builder,
                runner=runner,
                database=database,
                cost_model=_cost_model(opts.cost_model),
                measure_callbacks=callbacks,
                seed=opts.seed,
            )
            report.measured = runner.measured
            report.trials_run = progress.done
            report.built, report.build_failures = builder.built, builder.failed
        report.cached = cache.hits
        report.progress = progress.to_dict()
        report.progress["tasks"] = _task_summary(tasks, database, target)
        stages["tune_s"] = time.monotonic() - t0
    finally:
        if builder is not None:
            builder.close()

    t0 = time.monotonic()
    with target:
        tuned = ms.relax_integration.compile_relax(database, lowered, target, params=None)
        # the same pipeline with an empty database: TVM's default schedules (dlight's on GPUs) for every function
        untuned = ms.relax_integration.compile_relax(ms.database.MemoryDatabase(), lowered, target, params=None)
    stages["compile_s"] = time.monotonic() - t0
    output = Path(opts.output) if opts.output is not None else work_dir / f"{model.stem}.tuned.so"
    untuned_path = work_dir / f"{model.stem}.untuned.so"
    _export(tuned, output, opts.cc)
    _export(untuned, untuned_path, opts.cc)
    report.output = str(output)
    say(f"tune: exported {output} ({output.stat().st_size} bytes) and the untuned {untuned_path.name}")

    if opts.measure:
        t0 = time.monotonic()
        say(f"tune: measuring the untuned and the tuned model on one device of {opts.key!r}")
        if runner_kind == "tether":
            results = _measure_tether(opts, [untuned_path, output], model)
        else:
            results = _measure_tvm(opts, [untuned_path, output], model, target)
        report.untuned, report.tuned = results
        a, b = report.untuned.get("stats"), report.tuned.get("stats")
        if a and b:
            report.speedup = a["median"] / b["median"]
        stages["measure_s"] = time.monotonic() - t0
    report.stages_s = stages
    report.wall_s = time.monotonic() - started
    return report


def compile_model(
    model: Path,
    target: str | dict[str, Any],
    output: Path,
    *,
    target_host: str | dict[str, Any] | None = None,
    cc: str | None = None,
    tuned: Path | None = None,
) -> dict[str, Any]:
    """Compile the ONNX ``model`` for ``target`` and export it to ``output``, linked by ``cc`` (a cross
    compiler for another architecture: ``aarch64-linux-gnu-g++``). With ``tuned`` (a ``tether tune`` work
    dir) the schedules found there are applied. Returns what was done: target, seconds, bytes."""
    tvm = _tvm()
    from tvm.s_tir import meta_schedule as ms

    if not model.is_file():
        raise ConfigError(f"no model file {model}")
    if tuned is not None and not (tuned / "database_workload.json").is_file():
        raise ConfigError(f"{tuned} is not a tether tune work dir (no database_workload.json in it)")
    tdict = target_dict(target, target_host)
    try:
        tvm_target = tvm.target.Target(tdict)
    except Exception as exc:
        raise ConfigError(f"TVM does not take the target {json.dumps(tdict)}: {exc}") from None
    t0 = time.monotonic()
    imported, lowered = load_and_lower(model, tvm_target)
    try:
        with tvm_target:
            if tuned is None:
                lib = tvm.compile(imported, target=tvm_target)
            else:
                database = ms.database.JSONDatabase(work_dir=str(tuned))
                lib = ms.relax_integration.compile_relax(database, lowered, tvm_target, params=None)
    except Exception as exc:
        raise TuneError(f"{model.name}: TVM could not compile it: {type(exc).__name__}: {exc}") from None
    _export(lib, output, cc)
    return {"target": tdict, "output": str(output), "bytes": output.stat().st_size, "seconds": time.monotonic() - t0}


def default_work_dir(model: Path, key: str) -> Path:
    """Where a run keeps its database when no ``--work-dir`` is given: beside nothing shared."""
    return Path(tempfile.gettempdir()) / f"tether-tune-{model.stem}-{key}"
