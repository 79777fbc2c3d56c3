"""Variance-minimising non-uniform INT2 levels (Eliassen & Selvan, ICASSP 2024).

Model: a block of ``d`` values, normalised to [0, 3], is normal N(1.5, sigma^2) with its minimum and
maximum at the 1/d and 1 - 1/d quantiles, so ``sigma = -1.5 / Phi^-1(1/d)``. With levels
{0, alpha, 3 - alpha, 3}, stochastic rounding of x between neighbours l <= x <= u has variance
(x - l)(u - x); alpha minimises its expectation under the model (truncated to [0, 3]). exactq
computes that minimum numerically (composite Simpson rule + golden-section search), once per block size.
"""
from __future__ import annotations

import functools
import math
from statistics import NormalDist

_SIMPSON_INTERVALS = 400  # per segment; the objective is smooth, so this is exact to ~1e-10


def _simpson(f, a: float, b: float, n: int = _SIMPSON_INTERVALS) -> float:
    if b <= a:
        return 0.0
    h = (b - a) / n
    s = f(a) + f(b) + sum((4 if k % 2 else 2) * f(a + k * h) for k in range(1, n))
    return s * h / 3


def _sigma(block_size: int) -> float:
    return -1.5 / NormalDist().inv_cdf(1.0 / block_size)


def expected_variance(alpha: float, block_size: int) -> float:
    """Expected rounding variance E[(x - l)(u - x)], in units of (range / 3)^2, for levels
    {0, alpha, 3 - alpha, 3} and a block of ``block_size`` normal-like values (block_size >= 3)."""
    sigma = _sigma(block_size)

    def pdf(x: float) -> float:
        return math.exp(-0.5 * ((x - 1.5) / sigma) ** 2)

    segments = ((0.0, alpha), (alpha, 3.0 - alpha), (3.0 - alpha, 3.0))
    total = sum(_simpson(lambda x, l=l, u=u: (x - l) * (u - x) * pdf(x), l, u) for l, u in segments)
    return total / _simpson(pdf, 0.0, 3.0)


@functools.lru_cache(maxsize=None)
def optimal_alpha(block_size: int) -> float:
    """The alpha in [0.5, 1.5) that minimises ``expected_variance`` for ``block_size`` elements.

    Blocks of at most 2 elements have no interior values to model; they get uniform levels (alpha = 1).
    """
    if block_size <= 2:
        return 1.0
    lo, hi = 0.5, 1.499
    ratio = (math.sqrt(5.0) - 1.0) / 2.0
    while hi - lo > 1e-7:
        a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
        if expected_variance(a, block_size) < expected_variance(b, block_size):
            hi = b
        else:
            lo = a
    return (lo + hi) / 2.0


def int2_levels(block_size: int) -> tuple[float, float, float, float]:
    """The four non-uniform INT2 levels for blocks of ``block_size`` elements, as fractions of the
    block range: ``(0, alpha / 3, 1 - alpha / 3, 1)``.

    >>> [round(v, 3) for v in int2_levels(128)]
    [0.0, 0.367, 0.633, 1.0]
    """
    if not isinstance(block_size, int) or isinstance(block_size, bool) or block_size < 1:
        raise ValueError(f"block_size must be an int >= 1, got {block_size!r}")
    a = optimal_alpha(block_size) / 3.0
    return (0.0, a, 1.0 - a, 1.0)


def predicted_variance_reduction(block_size: int) -> float:
    """Fractional reduction of the expected rounding variance, optimal alpha vs uniform levels."""
    if block_size <= 2:
        return 0.0
    return 1.0 - expected_variance(optimal_alpha(block_size), block_size) / expected_variance(1.0, block_size)
