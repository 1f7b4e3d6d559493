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
    "Blocks",
    "SampleStats",
    "Validity",
    "ValidityRules",
    "condition_warnings",
    "median_ci",
    "min_rounds",
    "percentile",
    "ratio_ci",
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


# -- comparing two sets of samples (``tether compare``, baselines) ---------------------------------------
#
# Hodges-Lehmann estimates on log times, with the distribution-free intervals of the rank tests they
# come from. Paired (interleaved rounds): per round r, d_r = log(median(B_r) / median(A_r)); the estimate
# is the median of the Walsh averages (d_i + d_j) / 2, i <= j, and the interval the Wilcoxon signed-rank
# one (exact, from the distribution of the statistic, up to 60 rounds; normal beyond). Unpaired (saved
# samples): the median of every log(b / a), and the Mann-Whitney interval (normal approximation). Several
# devices (strata): the devices' Walsh averages (or differences) pooled, the statistic summed over them
# (van Elteren's stratified test), so that no device's differences mix with another's.


#: Blocks of samples: samples that belong together (one round of an interleaved run)
Blocks = Sequence[Sequence[float]]
_EXACT_MAX = 60  # rounds (in all strata) up to which the signed-rank distribution is computed exactly


def _signed_rank_cdf(sizes: Sequence[int]) -> list[float]:
    """P(W <= w) for w = 0..max, W the sum over strata of Wilcoxon signed-rank statistics under the null."""
    dist = [1.0]
    for n in sizes:
        counts = [1.0]  # ways to reach each sum with ranks 1..k
        for rank in range(1, n + 1):
            grown = counts + [0.0] * rank
            for w in range(len(counts)):
                grown[w + rank] += counts[w]
            counts = grown
        total = 2.0**n
        probs = [c / total for c in counts]
        merged = [0.0] * (len(dist) + len(probs) - 1)
        for i, p in enumerate(dist):
            if p:
                for j, q in enumerate(probs):
                    merged[i + j] += p * q
        dist = merged
    out, acc = [], 0.0
    for p in dist:
        acc += p
        out.append(acc)
    return out


def _rank_k(total: int, cdf: list[float] | None, mean: float, var: float, confidence: float) -> int:
    """The 1-based rank of the interval's lower end among ``total`` sorted estimates (0: none is far
    enough out for ``confidence``): the largest k with P(stat <= k - 1) <= (1 - confidence) / 2."""
    alpha = (1 - confidence) / 2
    if cdf is not None:
        k = 0
        while k < len(cdf) and cdf[k] <= alpha:
            k += 1
        return min(k, total // 2)
    z = statistics.NormalDist().inv_cdf(1 - alpha)
    return max(0, min(math.floor(mean - z * math.sqrt(var) + 0.5), total // 2))


def min_rounds(confidence: float = 0.95) -> int:
    """The fewest paired rounds whose signed-rank interval can exclude no change at ``confidence``."""
    n = 1
    while 2 / 2**n > 1 - confidence:
        n += 1
    return n


def ratio_ci(
    groups: Sequence[tuple[Blocks, Blocks, bool]], confidence: float = 0.95
) -> tuple[float, tuple[float, float]]:
    """B's time relative to A's, ``exp(HL estimate)``, and its ``confidence`` interval (see above).

    ``groups``: one ``(a_blocks, b_blocks, paired)`` per device. Paired: the blocks are the rounds, as many
    for A as for B; unpaired: every sample of each side (blocks flattened). All groups paired or none.
    With too few rounds or samples for ``confidence`` the interval is ``(0, inf)``: no conclusion.
    Raises ValueError for no groups, an empty side or block, a sample that is not a positive time.
    """
    if not groups:
        raise ValueError("no samples")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence {confidence} outside (0, 1)")
    kinds = {paired for _, _, paired in groups}
    if len(kinds) > 1:
        raise ValueError("groups must be all paired or all unpaired")
    estimates: list[float] = []
    for a_blocks, b_blocks, paired in groups:
        blocks = [*a_blocks, *b_blocks]
        if not a_blocks or not b_blocks or not all(blocks):
            raise ValueError("no samples (an empty side or block)")
        if any(not s > 0 for block in blocks for s in block):
            raise ValueError("samples must be positive times")
        if paired and len(a_blocks) != len(b_blocks):
            raise ValueError(f"paired blocks differ in number: {len(a_blocks)} and {len(b_blocks)}")
    if kinds == {True}:
        sizes = [len(a) for a, _, _ in groups]
        for a_blocks, b_blocks, _ in groups:
            d = [math.log(statistics.median(b) / statistics.median(a)) for a, b in zip(a_blocks, b_blocks, strict=True)]
            estimates.extend((d[i] + d[j]) / 2 for i in range(len(d)) for j in range(i, len(d)))
        mean = sum(n * (n + 1) / 4 for n in sizes)
        var = sum(n * (n + 1) * (2 * n + 1) / 24 for n in sizes)
        cdf = _signed_rank_cdf(sizes) if sum(sizes) <= _EXACT_MAX else None
    else:
        mean = var = 0.0
        for a_blocks, b_blocks, _ in groups:
            log_a = [math.log(s) for blk in a_blocks for s in blk]
            log_b = [math.log(s) for blk in b_blocks for s in blk]
            estimates.extend(y - x for x in log_a for y in log_b)
            m, n = len(log_a), len(log_b)
            mean += m * n / 2
            var += m * n * (m + n + 1) / 12
        cdf = None
    estimates.sort()
    point = statistics.median(estimates)
    k = _rank_k(len(estimates), cdf, mean, var, confidence)
    if k < 1:
        return math.exp(point), (0.0, math.inf)
    return math.exp(point), (math.exp(estimates[k - 1]), math.exp(estimates[len(estimates) - k]))


@dataclass(frozen=True, slots=True)
class ValidityRules:
    """When a timing result may be trusted. ``min_duration_s``: seconds of timed runs in all (samples x
    runs per sample); ``max_cv``: the samples' standard deviation over their mean; ``max_ci_width``: the
    median's confidence interval, its full width over the median. 0 turns a rule off."""

    min_samples: int = 5
    min_duration_s: float = 0.1
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
