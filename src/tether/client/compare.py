"""A/B comparison of two models on the same devices, with a verdict: ``tether compare``.

On each device (one session per device, both models uploaded and loaded once) the two models are
measured in interleaved rounds, in ABBA order: round 1 measures A then B, round 2 B then A, and so on,
so that drift on the device (heat, a clock that changes, a neighbour's load) hits both alike. Each
round gives each model ``repeat`` samples (TVM's ``time_evaluator`` samples, seconds per run).

The statistic is B's time relative to A's, a Hodges-Lehmann estimate on log times: per round, the log
of the ratio of the two models' medians; the estimate is the median of those rounds' Walsh averages, and
its interval the Wilcoxon signed-rank one (exact, distribution-free: it assumes only that rounds are
independent and that, without a difference, a round's log ratio is as likely above zero as below, which
the ABBA order supports). Over several devices, the devices' rounds are pooled as strata
(:func:`tether.client.stats.ratio_ci`). A difference is significant when the interval excludes 1.0 and the
estimate differs from 1.0 by at least ``min_effect`` (1 % by default); see :class:`Comparison` for the
verdict's words. At 95 % confidence it takes 6 rounds or more to find any difference (99.9 %: 11).
"""

from __future__ import annotations

import concurrent.futures
import itertools
import math
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ..aio.tls import TLSLike
from ..errors import TetherError
from ..runtime import TensorSpec
from .api import connect_tracker
from .batch import device_name
from .bench import BenchEvent, BenchSettings, _error_of, _Stop, device_count
from .inputs import input_problem, shapes_for
from .session import Session
from .stats import Blocks, SampleStats, ratio_ci, summarize

__all__ = [
    "Comparison",
    "CompareResult",
    "DeviceComparison",
    "MIN_EFFECT",
    "compare",
    "compare_blocks",
    "is_regression",
    "overall",
]

#: The smallest change (a fraction of A's median) that a verdict calls a difference.
MIN_EFFECT = 0.01

Direction = Literal["faster", "slower", "same"]
_ids = itertools.count(1)


def _pct(x: float) -> str:
    return f"{x * 100:.1f}"


@dataclass(frozen=True, slots=True)
class Comparison:
    """B against A: ``ratio`` = B's time relative to A's (below 1: B takes less time; the Hodges-Lehmann
    estimate), its ``confidence`` interval ``ci`` (``(0, inf)``: too few rounds or samples to tell), and
    what that means. ``a_median``, ``b_median``: the samples' medians (seconds).

    ``significant``: the interval excludes 1.0 and ``|ratio - 1| >= min_effect``. Then ``direction`` is
    ``faster`` (B takes ``1 - ratio`` less time than A) or ``slower`` (``ratio - 1`` more); else ``same``.
    ``devices``/``agree``: for an overall comparison, how many devices it pools and how many of them have
    its direction.
    """

    ratio: float
    ci: tuple[float, float]
    confidence: float
    min_effect: float = MIN_EFFECT
    a_median: float | None = None
    b_median: float | None = None
    devices: int = 1
    agree: int = 1

    @property
    def significant(self) -> bool:
        return (self.ci[0] > 1 or self.ci[1] < 1) and abs(self.ratio - 1) >= self.min_effect

    @property
    def direction(self) -> Direction:
        if not self.significant:
            return "same"
        return "faster" if self.ratio < 1 else "slower"

    @property
    def change(self) -> float:
        """B's time relative to A's, minus one: -0.07 is 7 % less time."""
        return self.ratio - 1

    def verdict(self, b: str = "B") -> str:
        """``B is 7.3 % faster (5.9-8.6 %)``, ``no significant difference (-0.4 % .. +0.9 %)``, ``B is 12.0 %
        slower (9.1-15.2 %)``; with ``, 3 devices agree`` (or ``2 of 3``) when it pools devices."""
        lo, hi = self.ci
        if self.direction == "faster":
            text = f"{b} is {_pct(1 - self.ratio)} % faster ({_pct(1 - hi)}-{_pct(1 - lo)} %)"
        elif self.direction == "slower":
            text = f"{b} is {_pct(self.ratio - 1)} % slower ({_pct(lo - 1)}-{_pct(hi - 1)} %)"
        else:
            text = f"no significant difference ({(lo - 1) * 100:+.1f} % .. {(hi - 1) * 100:+.1f} %)"
        if self.devices > 1:
            who = f"{self.devices} devices" if self.agree == self.devices else f"{self.agree} of {self.devices} devices"
            text += f", {who} agree"
        return text

    def to_dict(self) -> dict[str, Any]:
        return {
            "ratio": self.ratio,
            "ci": [x if math.isfinite(x) else None for x in self.ci],
            "confidence": self.confidence,
            "change_pct": self.change * 100,
            "ci_pct": [(x - 1) * 100 if math.isfinite(x) else None for x in self.ci],
            "min_effect": self.min_effect,
            "significant": self.significant,
            "direction": self.direction,
            "verdict": self.verdict(),
            "a_median": self.a_median,
            "b_median": self.b_median,
            "devices": self.devices,
            "agree": self.agree,
        }


def is_regression(c: Comparison, threshold: float) -> bool:
    """B is significantly slower than A (the interval lies above 1.0) and its point estimate is more than
    ``threshold`` (a fraction: 0.05 for 5 %) slower."""
    return c.direction == "slower" and c.change > threshold


def compare_blocks(
    a: Blocks,
    b: Blocks,
    *,
    paired: bool,
    confidence: float = 0.95,
    min_effect: float = MIN_EFFECT,
) -> Comparison:
    """One device's :class:`Comparison` of samples in blocks (see :func:`~tether.client.stats.ratio_ci`)."""
    ratio, ci = ratio_ci([(a, b, paired)], confidence)
    a_med = summarize([s for blk in a for s in blk]).median
    b_med = summarize([s for blk in b for s in blk]).median
    return Comparison(ratio, ci, confidence, min_effect, a_med, b_med)


def overall(
    groups: Sequence[tuple[Blocks, Blocks, bool]],
    per_device: Sequence[Comparison],
    *,
    confidence: float = 0.95,
    min_effect: float = MIN_EFFECT,
) -> Comparison:
    """The pooled comparison of several devices (geometric mean of their ratios) and how many agree."""
    ratio, ci = ratio_ci(groups, confidence)
    pooled = Comparison(ratio, ci, confidence, min_effect, devices=len(groups))
    agree = sum(1 for c in per_device if c.direction == pooled.direction)
    return Comparison(ratio, ci, confidence, min_effect, devices=len(groups), agree=agree)


@dataclass(slots=True)
class DeviceComparison:
    """A and B on one device: per round, each model's samples (seconds per run); ``error`` when it could
    not be measured (``{"type", "message"}``)."""

    device: str
    labels: dict[str, str] = field(default_factory=dict)
    facts: dict[str, Any] = field(default_factory=dict)
    a_rounds: list[list[float]] = field(default_factory=list)
    b_rounds: list[list[float]] = field(default_factory=list)
    comparison: Comparison | None = None
    error: dict[str, str] | None = None

    @property
    def fingerprint(self) -> str | None:
        from .baseline import fingerprint

        return fingerprint(self.facts) if self.facts else None

    def stats(self, side: Literal["a", "b"]) -> SampleStats | None:
        samples = [s for r in (self.a_rounds if side == "a" else self.b_rounds) for s in r]
        return summarize(samples) if samples else None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "device": self.device,
            "labels": self.labels,
            "facts": self.facts,
            "fingerprint": self.fingerprint,
            "error": self.error,
        }
        for side, rounds in (("a", self.a_rounds), ("b", self.b_rounds)):
            stats = self.stats(side)  # type: ignore[arg-type]
            out[side] = {
                "samples": [s for r in rounds for s in r],
                "rounds": rounds,
                "stats": stats.to_dict() if stats else None,
            }
        out["comparison"] = self.comparison.to_dict() if self.comparison else None
        return out


@dataclass(slots=True)
class CompareResult:
    """Every device's comparison and the overall one (None when no device measured both models)."""

    a: str
    b: str
    rounds: int
    devices: list[DeviceComparison]
    overall: Comparison | None
    settings: BenchSettings

    def to_dict(self) -> dict[str, Any]:
        s = self.settings
        return {
            "format": "tether-compare/1",
            "a": self.a,
            "b": self.b,
            "rounds": self.rounds,
            "order": "ABBA",
            "settings": {
                "number": s.number,
                "repeat": s.repeat,
                "min_repeat_ms": s.min_repeat_ms,
                "warmup": s.warmup,
                "cooldown_ms": s.cooldown_ms,
                "fill": s.fill,
                "backend": s.backend,
                "confidence": s.confidence,
            },
            "devices": [d.to_dict() for d in self.devices],
            "overall": self.overall.to_dict() if self.overall else None,
        }


def _measure_pair(
    sess: Session,
    *,
    paths: tuple[Path, Path],
    settings: BenchSettings,
    rounds: int,
    on_event: Callable[[BenchEvent], None],
    min_effect: float,
    stop: _Stop,
) -> DeviceComparison:
    info = sess.info()
    labels = dict(info.get("labels") or {})
    result = DeviceComparison(device_name(sess.address, labels), labels, dict(info.get("device") or {}))
    on_event(BenchEvent("session", f"{result.device}: session open", device=result.device))
    try:
        _rounds(sess, result, paths=paths, settings=settings, rounds=rounds, on_event=on_event)
    except TetherError as exc:
        result.error = {"type": "Interrupted", "message": "cut short by Ctrl-C"} if stop.is_set else _error_of(exc)
        on_event(BenchEvent("failed", f"{result.device}: failed: {result.error['type']}", device=result.device))
        return result
    result.comparison = compare_blocks(
        result.a_rounds, result.b_rounds, paired=True, confidence=settings.confidence, min_effect=min_effect
    )
    on_event(BenchEvent("result", f"{result.device}: {result.comparison.verdict()}", device=result.device))
    return result


def _rounds(
    sess: Session,
    result: DeviceComparison,
    *,
    paths: tuple[Path, Path],
    settings: BenchSettings,
    rounds: int,
    on_event: Callable[[BenchEvent], None],
) -> None:
    device = result.device
    models = []
    for letter, path in zip("ab", paths, strict=True):
        remote = sess.upload(path, f"{letter}-{path.name}")  # A and B may have the same name
        model = sess.load_model(remote, settings.backend, timeout=settings.run_timeout, **settings.options)
        specs = [TensorSpec.from_wire(spec) for spec in model.inputs]
        shapes = shapes_for(specs, settings.shapes)
        why = input_problem(specs, settings.inputs or {}, shapes)
        if why is not None:
            raise TetherError(f"{path.name}: {why}")
        kept = {name: sess.tensor(value) for name, value in settings.inputs.items()} if settings.inputs else None
        models.append((model, kept, shapes))
    for r in range(rounds):
        order = (0, 1) if r % 2 == 0 else (1, 0)  # ABBA: drift hits both alike
        for side in order:
            model, kept, shapes = models[side]
            name = paths[side].name
            text = f"{device}: round {r + 1}/{rounds}: {'AB'[side]} ({name}) measuring"
            on_event(BenchEvent("measuring", text, device=device, model=name, index=r + 1, count=rounds))
            samples = model.benchmark(
                kept,
                number=settings.number,
                repeat=settings.repeat,
                min_repeat_ms=settings.min_repeat_ms,
                cooldown_ms=settings.cooldown_ms,
                warmup=settings.warmup,
                fill=settings.fill,
                timeout=settings.run_timeout,
                shapes=shapes,
            ).samples
            (result.a_rounds if side == 0 else result.b_rounds).append([float(s) for s in samples])


def _on_device(
    host: str,
    port: int,
    key: str,
    *,
    paths: tuple[Path, Path],
    settings: BenchSettings,
    rounds: int,
    labels: dict[str, str] | None,
    timeout: float | None,
    unservable_after: float | None,
    on_event: Callable[[BenchEvent], None],
    stop: _Stop,
    min_effect: float,
    tls: TLSLike | None,
) -> DeviceComparison:
    tracker = connect_tracker(host, port, tls=tls)
    with tracker:
        stop.register(tracker)
        request_id = f"compare-{os.getpid()}-{next(_ids)}"
        sess = tracker.request(
            key, timeout=timeout, labels=labels, request_id=request_id, unservable_after=unservable_after
        )
        with sess:
            stop.register(sess)
            return _measure_pair(
                sess, paths=paths, settings=settings, rounds=rounds, on_event=on_event, min_effect=min_effect, stop=stop
            )


def compare(
    host: str,
    port: int,
    key: str,
    a: str | os.PathLike[str],
    b: str | os.PathLike[str],
    *,
    settings: BenchSettings | None = None,
    rounds: int = 10,
    min_effect: float = MIN_EFFECT,
    labels: dict[str, str] | None = None,
    devices: int | None = 1,
    timeout: float | None = 300.0,
    unservable_after: float | None = None,
    on_event: Callable[[BenchEvent], None] | None = None,
    tls: TLSLike | None = None,
) -> CompareResult:
    """Measure models ``a`` and ``b`` in ``rounds`` interleaved ABBA rounds on ``devices`` servers of
    ``key`` at once (None: every server the tracker lists), and compare them (module docstring).

    Raises FileNotFoundError for a missing model file, :class:`~tether.errors.ConnectFailed` when the
    tracker cannot be reached, :class:`~tether.errors.TetherError` when it lists no server of the key;
    a device's failure is in its :class:`DeviceComparison`. Ctrl-C ends every session and re-raises.
    """
    settings = settings or BenchSettings()
    if rounds < 1:
        raise ValueError("rounds must be 1 or more")
    paths = (Path(a), Path(b))
    for path in paths:
        if not path.is_file():
            raise FileNotFoundError(f"no model file {path}")
    count = device_count(host, port, key, labels, devices, tls=tls)
    lock = threading.Lock()

    def event(ev: BenchEvent) -> None:
        if on_event is not None:
            with lock:
                on_event(ev)

    started = time.monotonic()
    stop = _Stop()
    kwargs: dict[str, Any] = dict(
        paths=paths,
        settings=settings,
        rounds=rounds,
        labels=labels,
        timeout=timeout,
        unservable_after=unservable_after,
        on_event=event,
        stop=stop,
        min_effect=min_effect,
        tls=tls,
    )
    with concurrent.futures.ThreadPoolExecutor(count) as pool:
        futures = [pool.submit(_on_device, host, port, key, **kwargs) for _ in range(count)]

        def outcome(future: concurrent.futures.Future[DeviceComparison]) -> DeviceComparison:
            try:
                return future.result()
            except TetherError as exc:  # no session: the request failed
                return DeviceComparison("?", error=_error_of(exc))

        try:
            results = [outcome(f) for f in futures]
        except KeyboardInterrupt:
            stop.set()
            raise
    measured = [d for d in results if d.comparison is not None]
    pooled = None
    if measured:
        groups = [(d.a_rounds, d.b_rounds, True) for d in measured]
        comparisons = [d.comparison for d in measured if d.comparison is not None]
        pooled = overall(groups, comparisons, confidence=settings.confidence, min_effect=min_effect)
    event(BenchEvent("done", f"done in {time.monotonic() - started:.1f} s", waited_s=time.monotonic() - started))
    return CompareResult(paths[0].name, paths[1].name, rounds, results, pooled, settings)
