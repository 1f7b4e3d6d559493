"""Statistics of timing samples, from the raw samples: what ``tether bench`` reports per model and device.

The median's confidence interval is distribution-free (order statistics): with ``n`` samples, the interval
between the ``j``-th and ``k``-th smallest covers the true median with probability
``P(j <= B <= k - 1)`` for ``B ~ Binomial(n, 1/2)``; the narrowest symmetric pair reaching the asked confidence
is chosen. Timing samples are skewed (a few slow runs); a median with such an interval says more than a
mean with a normal one. With too few samples for the confidence asked, the interval is the whole range.

Before a result is called valid, rules in the spirit of MLPerf LoadGen's apply (:func:`validity`): enough
samples, enough measured time (the timed runs' total), and little noise (coefficient of variation, and the
median's confidence interval relative to the median). :func:`condition_warnings` adds what the device's
conditions during the measurement say (other sessions, a CPU frequency that moved, heat). Pure functions,
so that comparisons against a baseline can apply the same rules.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

__all__ = [
    "SampleStats",
    "Validity",
    "ValidityRules",
    "condition_warnings",
    "median_ci",
    "percentile",
    "summarize",
    "validity",
]


def percentile(sorted_samples: Sequence[float], p: float) -> float:
    """Linear interpolation between closest ranks (numpy's default), ``p`` in 0..100."""
    if not sorted_samples:
        raise ValueError("no samples")
    if not 0 <= p <= 100:
        raise ValueError(f"percentile {p} outside 0..100")
    pos = (len(sorted_samples) - 1) * p / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_samples) - 1)
    return sorted_samples[lo] + (sorted_samples[hi] - sorted_samples[lo]) * (pos - lo)


def median_ci(sorted_samples: Sequence[float], confidence: float = 0.95) -> tuple[float, float]:
    """A ``confidence`` interval for the median of the distribution the samples come from."""
    n = len(sorted_samples)
    if n == 0:
        raise ValueError("no samples")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence {confidence} outside (0, 1)")
    cdf = [0.0] * (n + 1)  # cdf[i] = P(B < i)
    total = 0.0
    for i in range(n):
        total += math.comb(n, i) / 2.0**n
        cdf[i + 1] = total
    for j in range(n // 2, -1, -1):  # widen symmetrically until the coverage suffices
        # the (j+1)-th and (n-j)-th smallest: P(X(j+1) <= m <= X(n-j)) = P(j+1 <= B <= n-j-1)
        k = n - j
        if k - 1 < j:
            continue
        if cdf[k] - cdf[j + 1] >= confidence:
            return sorted_samples[j], sorted_samples[k - 1]
    return sorted_samples[0], sorted_samples[-1]


@dataclass(frozen=True, slots=True)
class SampleStats:
    """Summary of ``n`` samples (seconds); ``median_ci`` at ``confidence``."""

    n: int
    mean: float
    median: float
    min: float
    max: float
    std: float
    p90: float
    p99: float
    median_ci: tuple[float, float]
    confidence: float

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["median_ci"] = list(self.median_ci)
        return out


def summarize(samples: Sequence[float], confidence: float = 0.95) -> SampleStats:
    """Statistics of raw samples. Raises ValueError for none."""
    data = sorted(float(s) for s in samples)
    if not data:
        raise ValueError("no samples")
    return SampleStats(
        n=len(data),
        mean=statistics.fmean(data),
        median=statistics.median(data),
        min=data[0],
        max=data[-1],
        std=statistics.stdev(data) if len(data) > 1 else 0.0,
        p90=percentile(data, 90),
        p99=percentile(data, 99),
        median_ci=median_ci(data, confidence),
        confidence=confidence,
    )


@dataclass(frozen=True, slots=True)
class ValidityRules:
    """When a timing result may be trusted. ``min_duration_s``: seconds of timed runs in all (samples x
    runs per sample); ``max_cv``: the samples' standard deviation over their mean; ``max_ci_width``: the
    median's confidence interval, its full width over the median. 0 turns a rule off."""

    min_samples: int = 5
    min_duration_s: float = 1.0
    max_cv: float = 0.05
    max_ci_width: float = 0.05


@dataclass(frozen=True, slots=True)
class Validity:
    """``valid``: every rule held; ``warnings``: why not (``reasons``), then what else to know."""

    valid: bool
    reasons: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()

    @property
    def warnings(self) -> list[str]:
        return [*self.reasons, *self.notes]

    @property
    def noisy(self) -> bool:
        return any(r.startswith(NOISY) for r in self.reasons)

    @property
    def label(self) -> str:
        """``ok``, ``NOISY`` (only noise failed) or ``INVALID``."""
        if self.valid:
            return "ok"
        return "NOISY" if all(r.startswith(NOISY) for r in self.reasons) else "INVALID"


#: How a noise warning starts (the compare code and the CLI look for it).
NOISY = "too noisy to trust"


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def validity(
    samples: Sequence[float],
    number: int = 1,
    rules: ValidityRules | None = None,
    *,
    confidence: float = 0.95,
    conditions: dict[str, Any] | None = None,
) -> Validity:
    """Apply ``rules`` to raw samples (seconds per run; each the mean of ``number`` runs). Conditions
    (what the device recorded around the measurement) add notes, never make a result invalid."""
    rules = rules or ValidityRules()
    data = sorted(float(s) for s in samples)
    reasons: list[str] = []
    if len(data) < max(rules.min_samples, 1):
        reasons.append(f"too few samples: {len(data)} < {rules.min_samples} (raise --repeat; --min-samples)")
    if data:
        measured = sum(data) * max(number, 1)
        if rules.min_duration_s > 0 and measured < rules.min_duration_s:
            reasons.append(
                f"too short: {measured:.3g} s of timed runs < {rules.min_duration_s:g} s "
                "(raise --number/--repeat or --min-repeat-ms; --min-duration)"
            )
        mean = statistics.fmean(data)
        if len(data) > 1 and mean > 0:
            cv = statistics.stdev(data) / mean
            if rules.max_cv > 0 and cv > rules.max_cv:
                reasons.append(f"{NOISY}: coefficient of variation {_pct(cv)} > {_pct(rules.max_cv)}")
            median = statistics.median(data)
            low, high = median_ci(data, confidence)
            width = (high - low) / median if median > 0 else math.inf
            if rules.max_ci_width > 0 and width > rules.max_ci_width:
                reasons.append(
                    f"{NOISY}: the median's {confidence:.0%} CI spans {_pct(width)} of it > {_pct(rules.max_ci_width)}"
                )
    notes = condition_warnings(conditions) if conditions else []
    return Validity(not reasons, tuple(reasons), tuple(notes))


def condition_warnings(conditions: dict[str, Any]) -> list[str]:
    """What the device's conditions say about a measurement: other sessions at the same time, CPU
    frequencies that moved or a governor that scales them, a temperature that rose by 5 °C or more."""
    notes = []
    others = [conditions.get("other_sessions"), conditions.get("other_sessions_after")]
    busy = max((n for n in others if isinstance(n, int)), default=0)
    if busy:
        notes.append(f"{busy} other session(s) ran on the device during the measurement")
    before, after = conditions.get("before") or {}, conditions.get("after") or {}
    f0, f1 = before.get("freq_mhz") or {}, after.get("freq_mhz") or {}
    moved = [cpu for cpu, mhz in f0.items() if mhz and f1.get(cpu) and abs(f1[cpu] - mhz) / mhz > 0.1]
    if moved:
        notes.append(f"CPU frequency changed by over 10% on CPU(s) {', '.join(moved[:8])} during the measurement")
    governors = {g for g in (conditions.get("governor") or {}).values() if g}
    scaling = sorted(governors - {"performance", "userspace"})
    if scaling:
        notes.append(f"CPU governor {', '.join(scaling)}: frequencies may scale while measuring")
    t0, t1 = before.get("temp_c") or {}, after.get("temp_c") or {}
    hot = [name for name, c in t0.items() if isinstance(t1.get(name), int | float) and t1[name] - c >= 5]
    if hot:
        notes.append(f"temperature rose by 5 °C or more ({', '.join(hot[:4])}): thermal throttling possible")
    return notes
