"""Statistics of timing samples, from the raw samples: what ``tether bench`` reports per model and device.

The median's confidence interval is distribution-free (order statistics): with ``n`` samples, the interval
between the ``j``-th and ``k``-th smallest covers the true median with probability
``P(j <= B <= k - 1)`` for ``B ~ Binomial(n, 1/2)``; the narrowest symmetric pair reaching the asked confidence
is chosen. Timing samples are skewed (a few slow runs); a median with such an interval says more than a
mean with a normal one. With too few samples for the confidence asked, the interval is the whole range.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["SampleStats", "median_ci", "percentile", "summarize"]


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

__all__ += ["RESAMPLES", "ratio_ci"]

#: Bootstrap resamples for :func:`ratio_ci`
RESAMPLES = 2000
#: ... and the seed that makes its interval the same for the same samples, on every run
SEED = 20240601

#: Blocks of samples: a list of samples that belong together (one round of an interleaved run)
Blocks = Sequence[Sequence[float]]


def ratio_ci(
    groups: Sequence[tuple[Blocks, Blocks, bool]],
    confidence: float = 0.95,
    *,
    resamples: int = RESAMPLES,
    seed: int = SEED,
) -> tuple[float, tuple[float, float]]:
    """The ratio of medians ``median(B) / median(A)`` and a bootstrap percentile ``confidence`` interval.

    ``groups``: one ``(a_blocks, b_blocks, paired)`` per device. A block is a list of samples that belong
    together (one round of an interleaved run); the bootstrap resamples blocks, not samples, so that what
    a round shares (the load on the device at that moment) counts as one draw. ``paired``: the blocks of A
    and B are the same rounds (as many of each), resampled together; else each side's blocks are resampled
    on their own (saved results, where each sample is its own block). With several groups the ratio is
    the geometric mean of the groups' ratios, each group resampled on its own (a stratified bootstrap).

    Seeded (``seed``, :class:`random.Random`): the same samples give the same interval. Raises ValueError
    for no groups, an empty block, a sample that is not positive, or paired groups with unequal block counts.
    """
    import random

    if not groups:
        raise ValueError("no samples")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence {confidence} outside (0, 1)")
    for a_blocks, b_blocks, paired in groups:
        blocks = [*a_blocks, *b_blocks]
        if not a_blocks or not b_blocks or not all(blocks):
            raise ValueError("no samples (an empty side or block)")
        if any(not s > 0 for block in blocks for s in block):
            raise ValueError("samples must be positive times")
        if paired and len(a_blocks) != len(b_blocks):
            raise ValueError(f"paired blocks differ in number: {len(a_blocks)} and {len(b_blocks)}")

    def median(blocks: Blocks, picks: Sequence[int]) -> float:
        return statistics.median([s for i in picks for s in blocks[i]])

    point = statistics.fmean(math.log(median(b, range(len(b))) / median(a, range(len(a)))) for a, b, _ in groups)
    rng = random.Random(seed)
    draws = []
    for _ in range(resamples):
        total = 0.0
        for a_blocks, b_blocks, paired in groups:
            pick_a = [rng.randrange(len(a_blocks)) for _ in a_blocks]
            pick_b = pick_a if paired else [rng.randrange(len(b_blocks)) for _ in b_blocks]
            total += math.log(median(b_blocks, pick_b) / median(a_blocks, pick_a))
        draws.append(total / len(groups))
    draws.sort()
    alpha = (1 - confidence) / 2
    lo, hi = percentile(draws, 100 * alpha), percentile(draws, 100 * (1 - alpha))
    return math.exp(point), (math.exp(lo), math.exp(hi))
