"""Measure models on the pool: one device, N in parallel, or every device of a key at once.

:func:`bench` requests sessions through a tracker (one per device, held for all the models), uploads
each model, loads it (the first, cold load is timed on the device), runs TVM-style timing on the device
with inputs kept there, and returns one :class:`BenchRecord` per model and device: statistics from the raw
samples (:mod:`tether.client.stats`), the device's facts and labels, or the typed error that ended it.
"""

from __future__ import annotations

import concurrent.futures
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import TetherError
from .api import connect_tracker
from .query import query_tracker
from .stats import SampleStats, summarize

__all__ = ["BenchRecord", "BenchSettings", "bench", "devices_of"]


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
    #: check the outputs: "onnxruntime" (run the same inputs locally) or expected outputs by name
    reference: str | dict[str, Any] | None = None
    rtol: float = 1e-4
    atol: float = 1e-5
    seed: int = 0


def _host_inputs(specs: list[dict[str, Any]], settings: BenchSettings) -> dict[str, Any]:
    """The inputs to check answers with: the given ones, or seeded random ones (symbolic dims: 1)."""
    import numpy as np

    if settings.inputs is not None:
        return {k: np.asarray(v) for k, v in settings.inputs.items()}
    rng = np.random.default_rng(settings.seed)
    out = {}
    for spec in specs:
        shape = [d if isinstance(d, int) and d >= 0 else 1 for d in spec["shape"]]
        dtype = np.dtype(spec["dtype"])
        if dtype.kind == "f":
            out[spec["name"]] = rng.standard_normal(shape).astype(dtype)
        elif dtype.kind in "iu":
            out[spec["name"]] = rng.integers(0, 10, shape).astype(dtype)
        else:
            out[spec["name"]] = np.zeros(shape, dtype)
    return out


def _wrong_answer(path: Path, inputs: dict[str, Any], outputs: dict[str, Any], settings: BenchSettings) -> str | None:
    """Why the device's outputs are wrong, or None when they match the reference within tolerances."""
    import numpy as np

    if settings.reference == "onnxruntime":
        import onnxruntime as ort

        local = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        names = [o.name for o in local.get_outputs()]
        expected = dict(zip(names, local.run(names, inputs), strict=True))
    else:
        assert isinstance(settings.reference, dict)
        expected = settings.reference
    for name, value in expected.items():
        if name not in outputs:
            return f"output {name!r} missing (device gave {sorted(outputs)})"
        got, want = np.asarray(outputs[name]), np.asarray(value)
        if got.shape != want.shape:
            return f"output {name!r}: shape {got.shape}, expected {want.shape}"
        if not np.allclose(got, want, rtol=settings.rtol, atol=settings.atol):
            diff = float(np.max(np.abs(got.astype("float64") - want.astype("float64"))))
            return f"output {name!r}: max |diff| {diff:.3g} beyond rtol {settings.rtol:g}, atol {settings.atol:g}"
    return None


@dataclass(slots=True)
class BenchRecord:
    """One model on one device. ``error``: ``{"type", "message"}`` when it could not be measured."""

    model: str
    device: str
    labels: dict[str, str] = field(default_factory=dict)
    facts: dict[str, Any] = field(default_factory=dict)
    backend: str | None = None
    load_s: float | None = None
    samples: list[float] = field(default_factory=list)
    stats: SampleStats | None = None
    error: dict[str, str] | None = None

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
        }


def devices_of(host: str, port: int, key: str, labels: dict[str, str] | None = None) -> int:
    """How many servers (slots) of ``key`` the tracker knows, free or busy. Labels narrow it down only
    on tether's tracker, where servers are listed with their labels."""
    status = query_tracker(host, port)
    if labels:
        return sum(
            1
            for s in status.servers
            if (s.key == f"server:{key}") and all(s.labels.get(k) == v for k, v in labels.items())
        )
    return next((row.total for row in status.keys if row.key == key), 0)


def _measure_device(
    host: str,
    port: int,
    key: str,
    *,
    models: Sequence[Path],
    settings: BenchSettings,
    labels: dict[str, str] | None,
    timeout: float | None,
    on_event: Callable[[str], None],
) -> list[BenchRecord]:
    # one tracker connection per device: a connection's replies come in its own order, not per thread
    with connect_tracker(host, port) as tracker, tracker.request(key, timeout=timeout, labels=labels) as sess:
        info = sess.info()
        facts = dict(info.get("device") or {})
        dev_labels = dict(info.get("labels") or {})
        device = sess.address + (
            " [" + ",".join(f"{k}={v}" for k, v in sorted(dev_labels.items())) + "]" if dev_labels else ""
        )
        on_event(f"{device}: session open")
        records = []
        for path in models:
            record = BenchRecord(path.name, device, dev_labels, facts)
            try:
                remote = sess.upload(path, path.name)
                model = sess.load_model(remote, settings.backend, **settings.options)
                record.backend, record.load_s = model.backend, model.load_s
                kept: dict[str, Any] | None = None
                if settings.inputs is not None or settings.reference is not None:
                    host_inputs = _host_inputs(model.inputs, settings)
                    kept = {name: sess.tensor(value) for name, value in host_inputs.items()}
                    if settings.reference is not None:
                        why = _wrong_answer(path, host_inputs, model.run(kept), settings)
                        if why is not None:
                            record.error = {"type": "WrongAnswer", "message": why}
                            on_event(f"{device}: {path.name} WRONG ANSWER: {why}")
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
                )
                record.samples = list(result.samples)
                record.stats = summarize(record.samples, settings.confidence)
                model.close()
                on_event(f"{device}: {path.name} median {record.stats.median * 1e3:.3f} ms")
            except TetherError as exc:
                record.error = {"type": type(exc).__name__, "message": str(exc)}
                on_event(f"{device}: {path.name} failed: {type(exc).__name__}")
                if sess.closed:
                    records.append(record)
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
    on_event: Callable[[str], None] | None = None,
) -> list[BenchRecord]:
    """Measure every model on ``devices`` servers of ``key`` at once (None: every server the tracker
    lists). Each device gets its own session, held for all the models; ``timeout`` is queue time."""
    settings = settings or BenchSettings()
    paths = [Path(m) for m in models]
    for path in paths:
        if not path.is_file():
            raise FileNotFoundError(f"no model file {path}")
    count = devices if devices is not None else devices_of(host, port, key, labels)
    if count < 1:
        raise TetherError(f"the tracker at {host}:{port} lists no server of key {key!r}")
    lock = threading.Lock()

    def event(text: str) -> None:
        if on_event is not None:
            with lock:
                on_event(text)

    started = time.monotonic()
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
                on_event=event,
            )
            for _ in range(count)
        ]
        records: list[BenchRecord] = []
        for future in futures:
            try:
                records.extend(future.result())
            except TetherError as exc:
                records.append(BenchRecord("*", "?", error={"type": type(exc).__name__, "message": str(exc)}))
    event(f"done in {time.monotonic() - started:.1f} s")
    return records
