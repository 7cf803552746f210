"""The one median of the result summaries: None (not NaN) for no value, the lower middle value otherwise."""

import math

import torch

from attnscope.core.stats import median


def test_median_skips_missing_values_and_returns_none_when_empty():
    assert median([]) is None
    assert median([None, float("nan")]) is None
    assert median([3.0, None, 1.0, float("nan"), 2.0]) == 2.0


def test_median_even_count_is_the_lower_middle_value_like_torch():
    xs = [0.25, 4.0, -1.5, 3.0]
    assert median(xs) == 0.25
    assert median(xs) == float(torch.tensor(xs, dtype=torch.float64).median())
    assert median(iter([math.inf, 1.0, 2.0])) == 2.0  # a generator works; inf is a value
