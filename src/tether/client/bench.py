"""Measure models on the pool: one device, N in parallel, or every device of a key at once.

:func:`bench` requests sessions through a tracker (one per device, held for all the models), uploads
each model, loads it (the first, cold load is timed on the device), runs TVM-style timing on the device
with inputs kept there, and returns one :class:`BenchRecord` per model and device: statistics from the raw
samples (:mod:`tether.client.stats`), the device's facts and labels, or the typed error that ended it.

Progress comes as :class:`BenchEvent` values: while a device's request waits for a grant, a watcher
polls the tracker's detailed summary on its own connection (every ``poll_s``) and reports the requests'
positions in the key's queue (tether's tracker; TVM's tells only that they wait); then which model is
measured on which device, and each result. Events come from several threads, one at a time.

Ctrl-C (KeyboardInterrupt in the calling thread) ends every request and session of the run at once and
raises :class:`BenchInterrupted` with the records that finished, and the rest marked as cut short.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ..aio.tls import TLSLike
from ..errors import ConfigError, RemoteError, TetherError
from ..protocol.tracker import labels_match
from ..runtime import TensorSpec, fill_shape
from .api import Tracker, connect_tracker
from .batch import compare_outputs, device_name
from .inputs import input_problem, shapes_for
from .query import query_tracker, status_from_summary
from .session import Session
from .stats import SampleStats, ValidityRules, summarize, validity
from .tracker import TrackerClient

__all__ = ["BenchEvent", "BenchInterrupted", "BenchRecord", "BenchSettings", "EventKind", "bench", "devices_of"]

logger = logging.getLogger(__name__)

_request_ids = itertools.count(1)
_INTERRUPTED = {"type": "Interrupted", "message": "cut short by Ctrl-C"}


@dataclass(frozen=True, slots=True)
class BenchSettings:
    """TVM's ``time_evaluator`` knobs, and how inputs are made (generated on the device)."""

    number: int = 10
    repeat: int = 5
    min_repeat_ms: float = 0.0
    warmup: int = 1
    cooldown_ms: float = 0.0
    fill: str = "random"
    backend: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    confidence: float = 0.95
    #: inputs by name (arrays), sent once and kept on the device; else generated there with ``fill``
    inputs: dict[str, Any] | None = None
    #: shapes to generate inputs in, by input name (for dynamic dims or an unknown rank); a model gets
    #: those of its own inputs
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    #: check the outputs: "onnxruntime" (run the same inputs locally) or expected outputs by name
    reference: str | dict[str, Any] | None = None
    rtol: float = 1e-4
    atol: float = 1e-5
    seed: int = 0
    #: seconds for one model's load and for its measurement (each; None: no limit). Past it the device ends
    #: the session's worker (``RunTimeout``): the models after it on that device are reported not measured.
    run_timeout: float | None = None
    #: when a result is valid (enough samples, enough measured time, little noise): :mod:`.stats`
    rules: ValidityRules = field(default_factory=ValidityRules)
    #: per-operator times from the backend's profiler, after the timing (``profile_runs`` runs)
    profile: bool = False
    profile_runs: int = 10


def _host_inputs(
    specs: list[TensorSpec], settings: BenchSettings, shapes: Mapping[str, Sequence[int]]
) -> dict[str, Any]:
    """The inputs to check answers with: the given ones, the rest seeded random ones (in ``shapes`` where
    a dim is not fixed)."""
    import numpy as np

    out = {k: np.asarray(v) for k, v in (settings.inputs or {}).items()}
    rng = np.random.default_rng(settings.seed)
    for spec in specs:
        if spec.name in out:
            continue
        shape = fill_shape(spec, shapes.get(spec.name))
        dtype = np.dtype(spec.dtype)
        if dtype.kind == "f":
            out[spec.name] = rng.standard_normal(shape).astype(dtype)
        elif dtype.kind in "iu":
            out[spec.name] = rng.integers(0, 10, shape).astype(dtype)
        else:
            out[spec.name] = np.zeros(shape, dtype)
    return out


def _wrong_answer(path: Path, inputs: dict[str, Any], outputs: dict[str, Any], settings: BenchSettings) -> str | None:
    """Why the device's outputs are wrong, or None when they match the reference within tolerances."""
    if settings.reference == "onnxruntime":
        import onnxruntime as ort

        local = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        names = [o.name for o in local.get_outputs()]
        expected = dict(zip(names, local.run(names, inputs), strict=True))
    else:
        assert isinstance(settings.reference, dict)
        expected = settings.reference
    return compare_outputs(outputs, expected, settings.rtol, settings.atol)


def _error_of(exc: TetherError) -> dict[str, str]:
    """A failure as ``{"type", "message"}``: for a device's error its own type and message, and its
    ``traceback`` when it sent one."""
    if isinstance(exc, RemoteError):
        error = {"type": exc.remote_type, "message": exc.remote_message}
        return {**error, "traceback": exc.remote_traceback} if exc.remote_traceback else error
    return {"type": type(exc).__name__, "message": str(exc)}


class BenchInterrupted(KeyboardInterrupt):
    """Ctrl-C during :func:`bench`. ``records``: those that finished, the models cut short (error type
    ``Interrupted``) and those never reached (``NotMeasured``)."""

    def __init__(self, records: list[BenchRecord]) -> None:
        super().__init__("bench interrupted")
        self.records = records


class _Stop:
    """Ends a bench run early: interrupts every connection registered (a request waiting for a grant,
    a measurement in flight end at once, with a TetherError in their threads), and any registered later."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._targets: list[Session | Tracker] = []
        self.is_set = False

    def register(self, target: Session | Tracker) -> None:
        with self._lock:
            self._targets.append(target)
            stopped = self.is_set
        if stopped:
            target.interrupt()

    def set(self) -> None:
        with self._lock:
            self.is_set = True
            targets = list(self._targets)
        for target in targets:
            target.interrupt()


@dataclass(slots=True)
class BenchRecord:
    """One model on one device. ``error``: ``{"type", "message"}`` (and the device's ``traceback``) when
    it could not be measured; ``checked``: its outputs matched the reference."""

    model: str
    device: str
    labels: dict[str, str] = field(default_factory=dict)
    facts: dict[str, Any] = field(default_factory=dict)
    backend: str | None = None
    load_s: float | None = None
    samples: list[float] = field(default_factory=list)
    stats: SampleStats | None = None
    error: dict[str, str] | None = None
    checked: bool = False
    #: runs per sample (TVM's ``number``, after ``min_repeat_ms`` grew it)
    number: int | None = None
    #: the device's conditions around the measurement (:attr:`BenchmarkResult.conditions`)
    conditions: dict[str, Any] | None = None
    #: the worker's high-water resident memory in bytes: ``after_load``, ``after_bench``
    memory: dict[str, int | None] = field(default_factory=dict)
    #: the validity rules held (None: not measured); ``warnings``: why not, then what else to know
    valid: bool | None = None
    warnings: list[str] = field(default_factory=list)
    #: per-operator times (``--profile``), slowest first, or why there are none
    profile: list[dict[str, Any]] | None = None
    profile_error: str | None = None

    @property
    def verdict(self) -> str:
        """``ok``, ``NOISY``, ``INVALID`` or ``-`` (not measured)."""
        if self.valid is None:
            return "-"
        if self.valid:
            return "ok"
        reasons = [w for w in self.warnings if w.startswith("too ")]
        return "NOISY" if reasons and all(w.startswith("too noisy") for w in reasons) else "INVALID"

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "device": self.device,
            "labels": self.labels,
            "facts": self.facts,
            "backend": self.backend,
            "load_s": self.load_s,
            "samples": self.samples,
            "stats": self.stats.to_dict() if self.stats else None,
            "error": self.error,
            "checked": self.checked,
            "number": self.number,
            "valid": self.valid,
            "warnings": self.warnings,
            "conditions": self.conditions,
            "memory": self.memory,
            "profile": self.profile,
            "profile_error": self.profile_error,
        }


def devices_of(
    host: str, port: int, key: str, labels: dict[str, str] | None = None, *, tls: TLSLike | None = None
) -> int:
    """How many servers (slots) of ``key`` the tracker knows, free or busy. Labels narrow it down only
    on tether's tracker, where servers are listed with their labels."""
    status = query_tracker(host, port, tls=tls)
    if labels:
        return sum(1 for s in status.servers if (s.key == f"server:{key}") and labels_match(s.labels, labels))
    return next((row.total for row in status.keys if row.key == key), 0)


def device_count(
    host: str,
    port: int,
    key: str,
    labels: dict[str, str] | None,
    devices: int | None,
    *,
    tls: TLSLike | None = None,
) -> int:
    """``devices``, else every server of ``key`` the tracker lists; an unreachable tracker raises
    ConnectFailed now (after 5 s of retries), a key without servers TetherError."""
    connect_tracker(host, port, tls=tls).close()
    count = devices if devices is not None else devices_of(host, port, key, labels, tls=tls)
    if count < 1:
        raise TetherError(f"the tracker at {host}:{port} lists no server of key {key!r}")
    return count


EventKind = Literal["queued", "session", "measuring", "result", "failed", "done"]


@dataclass(frozen=True, slots=True)
class BenchEvent:
    """One step of a bench run; ``text`` is the line to print.

    Kinds: ``queued`` (requests waiting for a grant: ``positions`` in the key's queue, 1-based, with
    ``ahead`` requests before the first of them and ``queue_length`` waiting in all, ``waited_s``; positions
    are empty on TVM's tracker), ``session`` (a device granted), ``measuring`` (``model`` on ``device``,
    number ``index`` of ``count``), ``result`` and ``failed`` (its ``record``), ``done`` (``waited_s``: the
    whole run). ``queued`` and ``measuring`` are passing states; the others are finished steps.
    """

    kind: EventKind
    text: str
    device: str | None = None
    model: str | None = None
    index: int | None = None
    count: int | None = None
    positions: tuple[int, ...] = ()
    ahead: int | None = None
    queue_length: int | None = None
    waited_s: float | None = None
    record: BenchRecord | None = None

    @property
    def passing(self) -> bool:
        """True for a state that the next event replaces (a status line), False for a finished step."""
        return self.kind in ("queued", "measuring")

    def __str__(self) -> str:
        return self.text


class QueueWatch:
    """The bench's requests that still wait for a grant, and a thread that reports them until none does.

    The thread polls the tracker's detailed summary every ``poll_s`` seconds on its own connection (a
    connection's replies come in its own order) and finds the requests by their ids in the key's waiters.
    Against TVM's tracker, or once the summary fails, it reports waited time only. Best effort: a failed
    poll never fails the bench.
    """

    def __init__(
        self,
        host: str,
        port: int,
        key: str,
        emit: Callable[[BenchEvent], None],
        *,
        poll_s: float,
        clock: Callable[[], float] = time.monotonic,
        tls: TLSLike | None = None,
    ) -> None:
        self._tls = tls
        self._host, self._port, self._key = host, port, key
        self._emit, self._poll_s, self._clock = emit, poll_s, clock
        self._cond = threading.Condition()
        self._waiting: dict[str, float] = {}  # request id -> when it started waiting (clock)
        self._thread = threading.Thread(target=self._run, name="tether-bench-queue", daemon=True)

    def start(self, request_ids: Sequence[str]) -> None:
        now = self._clock()
        with self._cond:
            self._waiting.update(dict.fromkeys(request_ids, now))
        self._thread.start()

    def done(self, request_id: str) -> None:
        """The request was granted or failed (idempotent)."""
        with self._cond:
            self._waiting.pop(request_id, None)
            self._cond.notify_all()

    def stop(self) -> None:
        with self._cond:
            self._waiting.clear()
            self._cond.notify_all()
        self._thread.join()

    def _wait(self) -> dict[str, float]:
        """Wait ``poll_s`` or until nothing waits; what still waits then."""
        with self._cond:
            self._cond.wait_for(lambda: not self._waiting, self._poll_s)
            return dict(self._waiting)

    def _run(self) -> None:
        client: TrackerClient | None = None
        tether = True  # until the tracker says it is TVM's
        try:
            while waiting := self._wait():
                event = None
                try:
                    if tether and client is None:  # (again after a failure: the tracker may have restarted)
                        client = TrackerClient.connect(self._host, self._port, tls=self._tls)
                        tether = client.tether_version is not None
                        if not tether:  # TVM's tracker: nothing to ask it
                            client.close()
                            client = None
                    if tether and client is not None:
                        event = self._positions(client, waiting)
                except (TetherError, OSError, TimeoutError) as exc:
                    logger.debug("queue watch: %s; reporting waited time only this time", exc)
                    if client is not None:
                        client.close()
                        client = None
                self._emit(event or self._waited_only(waiting, tether=tether))
        finally:
            if client is not None:
                client.close()

    def _positions(self, client: TrackerClient, waiting: dict[str, float]) -> BenchEvent | None:
        summary = client.summary(detail=True, timeout=5.0, key=self._key)  # this key only, not the pool
        status = status_from_summary(summary, f"{self._host}:{self._port}")
        rows = [w for w in status.waiters if w.key == self._key]
        ours = [w for w in rows if w.id in waiting]
        if not ours:
            return None  # not queued yet, or granted a moment ago
        positions = tuple(w.position for w in ours)
        waited = max(w.waited_s for w in ours)
        ahead = positions[0] - 1
        where = f"position {positions[0]}" if len(ours) == 1 else f"{len(ours)} requests at positions "
        if len(ours) > 1:
            where += ", ".join(map(str, positions))
        text = f"queued for key {self._key!r}: {where} of {len(rows)} ({ahead} ahead), waited {waited:.1f} s"
        return BenchEvent("queued", text, positions=positions, ahead=ahead, queue_length=len(rows), waited_s=waited)

    def _waited_only(self, waiting: dict[str, float], *, tether: bool) -> BenchEvent:
        waited = self._clock() - min(waiting.values())
        many = f"{len(waiting)} requests " if len(waiting) > 1 else ""
        why = "" if tether else " (position unknown: not tether's tracker)"
        text = f"waiting for key {self._key!r}: {many}waited {waited:.1f} s{why}"
        return BenchEvent("queued", text, waited_s=waited)


def _measure_device(
    host: str,
    port: int,
    key: str,
    *,
    models: Sequence[Path],
    settings: BenchSettings,
    labels: dict[str, str] | None,
    timeout: float | None,
    unservable_after: float | None,
    request_id: str,
    granted: Callable[[str], None],
    on_event: Callable[[BenchEvent], None],
    stop: _Stop,
    tls: TLSLike | None = None,
) -> list[BenchRecord]:
    # one tracker connection per device: a connection's replies come in its own order, not per thread
    try:
        tracker = connect_tracker(host, port, tls=tls)
        try:
            stop.register(tracker)  # (its interrupt also stops it reconnecting)
            sess = tracker.request(
                key, timeout=timeout, labels=labels, request_id=request_id, unservable_after=unservable_after
            )
        except BaseException:
            tracker.close()
            raise
    finally:
        granted(request_id)
    with tracker, sess:
        stop.register(sess)
        return _measure_models(sess, models, settings, on_event, stop)


def _measure_models(
    sess: Session,
    models: Sequence[Path],
    settings: BenchSettings,
    on_event: Callable[[BenchEvent], None],
    stop: _Stop,
) -> list[BenchRecord]:
    info = sess.info()
    facts = dict(info.get("device") or {})
    dev_labels = dict(info.get("labels") or {})
    device = device_name(sess.address, dev_labels)
    on_event(BenchEvent("session", f"{device}: session open", device=device))
    records = []
    for index, path in enumerate(models, 1):
        record = BenchRecord(path.name, device, dev_labels, facts)
        where = (device, path.name, index, len(models))
        on_event(BenchEvent("measuring", f"{device}: {path.name} ({index}/{len(models)}) measuring", *where))
        try:
            remote = sess.upload(path, path.name)
            model = sess.load_model(remote, settings.backend, timeout=settings.run_timeout, **settings.options)
            record.backend, record.load_s = model.backend, model.load_s
            record.memory["after_load"] = model.peak_rss
            specs = [TensorSpec.from_wire(spec) for spec in model.inputs]
            shapes = shapes_for(specs, settings.shapes)
            why = input_problem(specs, settings.inputs or {}, shapes)
            kept: dict[str, Any] | None = None
            if why is None and (settings.inputs is not None or settings.reference is not None):
                host_inputs = _host_inputs(specs, settings, shapes)
                kept = {name: sess.tensor(value) for name, value in host_inputs.items()}
                if settings.reference is not None:
                    outputs = model.run(kept, timeout=settings.run_timeout)
                    why = _wrong_answer(path, host_inputs, outputs, settings)
                    record.checked = why is None
            if why is not None:
                record.error = {"type": "InputError" if kept is None else "WrongAnswer", "message": why}
                text = f"{device}: {path.name} {record.error['type']}: {why}"
                on_event(BenchEvent("failed", text, *where, record=record))
                records.append(record)
                continue
            result = model.benchmark(
                kept,
                number=settings.number,
                repeat=settings.repeat,
                min_repeat_ms=settings.min_repeat_ms,
                cooldown_ms=settings.cooldown_ms,
                warmup=settings.warmup,
                fill=settings.fill,
                timeout=settings.run_timeout,
                shapes=shapes,
                profile=settings.profile,
                profile_runs=settings.profile_runs,
            )
            record.samples = list(result.samples)
            record.stats = s = summarize(record.samples, settings.confidence)
            record.number, record.conditions = result.number, result.conditions
            record.memory["after_bench"] = result.peak_rss
            record.profile, record.profile_error = result.profile, result.profile_error
            verdict = validity(
                record.samples,
                result.number,
                settings.rules,
                confidence=settings.confidence,
                conditions=result.conditions,
            )
            record.valid, record.warnings = verdict.valid, verdict.warnings
            model.close()
            text = (
                f"{device}: {path.name} median {s.median * 1e3:.3f} ms "
                f"(95% CI {s.median_ci[0] * 1e3:.3f}..{s.median_ci[1] * 1e3:.3f}, n={s.n})"
            )
            if not verdict.valid:
                text += f" {verdict.label}: {'; '.join(verdict.reasons)}"
            on_event(BenchEvent("result", text, *where, record=record))
        except TetherError as exc:
            record.error = _error_of(exc) if not stop.is_set else dict(_INTERRUPTED)
            text = f"{device}: {path.name} failed: {record.error['type']}"
            on_event(BenchEvent("failed", text, *where, record=record))
            if sess.closed:  # the rest cannot run in this session: say so rather than drop them
                records.append(record)
                why = f"the session ended at {path.name} ({record.error['type']})"
                for rest in models[index:]:
                    records.append(
                        BenchRecord(rest.name, device, dev_labels, facts, error={"type": "NotMeasured", "message": why})
                    )
                break
        records.append(record)
    return records


def bench(
    host: str,
    port: int,
    key: str,
    models: Sequence[str | os.PathLike[str]],
    settings: BenchSettings | None = None,
    *,
    labels: dict[str, str] | None = None,
    devices: int | None = 1,
    timeout: float | None = 300.0,
    unservable_after: float | None = None,
    on_event: Callable[[BenchEvent], None] | None = None,
    poll_s: float = 0.5,
    tls: TLSLike | None = None,
) -> list[BenchRecord]:
    """Measure every model on ``devices`` servers of ``key`` at once (None: every server the tracker
    lists). Each device gets its own session, held for all the models; ``timeout`` is queue time;
    ``unservable_after``: see :meth:`Tracker.request` (a request no server could serve fails with the
    reason, :class:`~tether.errors.Unservable`, in its record).

    ``on_event`` gets every :class:`BenchEvent`, one at a time; while requests wait, ``queued`` events
    come every ``poll_s`` seconds. Raises FileNotFoundError for a missing model file,
    :class:`~tether.errors.ConfigError` for a model that the reference cannot check,
    :class:`~tether.errors.ConnectFailed` when the tracker cannot be reached,
    :class:`~tether.errors.TetherError` when it lists no server of the key, and
    :class:`BenchInterrupted` on Ctrl-C; errors of a device or a model are in the records.
    """
    settings = settings or BenchSettings()
    paths = [Path(m) for m in models]
    for path in paths:
        if not path.is_file():
            raise FileNotFoundError(f"no model file {path}")
        if settings.reference == "onnxruntime" and path.suffix.lower() != ".onnx":
            raise ConfigError(f"{path.name}: only .onnx models can be checked against a local onnxruntime run")
    count = device_count(host, port, key, labels, devices, tls=tls)
    lock = threading.Lock()

    def event(ev: BenchEvent) -> None:
        if on_event is not None:
            with lock:
                on_event(ev)

    started = time.monotonic()
    request_ids = [f"bench-{os.getpid()}-{next(_request_ids)}" for _ in range(count)]
    watch = QueueWatch(host, port, key, event, poll_s=poll_s, tls=tls)
    stop = _Stop()
    if on_event is not None:
        watch.start(request_ids)
    try:
        with concurrent.futures.ThreadPoolExecutor(count) as pool:
            futures = [
                pool.submit(
                    _measure_device,
                    host,
                    port,
                    key,
                    models=paths,
                    settings=settings,
                    labels=labels,
                    timeout=timeout,
                    unservable_after=unservable_after,
                    request_id=rid,
                    granted=watch.done,
                    on_event=event,
                    stop=stop,
                    tls=tls,
                )
                for rid in request_ids
            ]

            def outcome(future: concurrent.futures.Future[list[BenchRecord]]) -> list[BenchRecord]:
                try:
                    return future.result()
                except TetherError as exc:  # no session: the request failed
                    return [BenchRecord("*", "?", error=dict(_INTERRUPTED) if stop.is_set else _error_of(exc))]

            try:
                records = [record for future in futures for record in outcome(future)]
            except KeyboardInterrupt:
                stop.set()  # every thread ends now: collect what each has
                records = [record for future in futures for record in outcome(future)]
                raise BenchInterrupted(records) from None
    finally:
        if on_event is not None:
            watch.stop()
    elapsed = time.monotonic() - started
    event(BenchEvent("done", f"done in {elapsed:.1f} s", waited_s=elapsed))
    return records
