"""Small statistics shared by the result summaries."""

from __future__ import annotations

import math
from collections.abc import Iterable


def median(xs: Iterable[float | None]) -> float | None:
    """Median of the finite values of ``xs`` (``None`` and NaN are skipped); ``None`` when none is left.

    For an even count it is the *lower* of the two middle values (torch's convention, which every neuron
    summary has used), so a reported median is always one of the measured values."""
    vals = sorted(float(x) for x in xs if x is not None and not math.isnan(float(x)))
    return vals[(len(vals) - 1) // 2] if vals else None
