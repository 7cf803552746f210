"""Small statistics shared by the result summaries, and the one definition of the effect size ``d``."""

from __future__ import annotations

import math
from collections.abc import Iterable

from torch import Tensor


def median(xs: Iterable[float | None]) -> float | None:
    """Median of the finite values of ``xs`` (``None`` and NaN are skipped); ``None`` when none is left.

    For an even count it is the *lower* of the two middle values (torch's convention, which every neuron
    summary has used), so a reported median is always one of the measured values."""
    vals = sorted(float(x) for x in xs if x is not None and not math.isnan(float(x)))
    return vals[(len(vals) - 1) // 2] if vals else None


def tensor_sum(xs: Iterable[Tensor]) -> Tensor:
    """``sum(xs)`` of a non-empty iterable of tensors (same numbers), typed as a tensor: the built-in ``sum``
    starts from the int 0, so its declared result also allows ``0``."""
    total = sum(xs)
    assert isinstance(total, Tensor), "tensor_sum of no tensors"
    return total


def cohens_d(mean_a: Tensor, var_a: Tensor, mean_b: Tensor, var_b: Tensor, min_std: float = 1e-9) -> Tensor:
    """The effect size of every true or predicted effect in attnscope (method §15):
    ``d = (mean_A - mean_B) / sqrt((var_A + var_B) / 2)``, the pooled standard deviation floored at ``min_std``
    (a constant neuron gives ``d = 0``, not a division by zero).  The caller chooses the variances (the
    neuron stage: population variances over all positions; the page's contrast: unbiased, per text)."""
    return (mean_a - mean_b) / ((var_a + var_b) / 2).sqrt().clamp_min(min_std)
