"""The one median of the result summaries: None (not NaN) for no value, the lower middle value otherwise; and the
one effect size d (core.stats.cohens_d) that the neuron stage and the page's contrast share."""

import math

import torch

from attnscope.core.accumulators import Moments
from attnscope.core.stats import cohens_d, median
from attnscope.neurons.verification import effect_sizes


def test_median_skips_missing_values_and_returns_none_when_empty():
    assert median([]) is None
    assert median([None, float("nan")]) is None
    assert median([3.0, None, 1.0, float("nan"), 2.0]) == 2.0


def test_median_even_count_is_the_lower_middle_value_like_torch():
    xs = [0.25, 4.0, -1.5, 3.0]
    assert median(xs) == 0.25
    assert median(xs) == float(torch.tensor(xs, dtype=torch.float64).median())
    assert median(iter([math.inf, 1.0, 2.0])) == 2.0  # a generator works; inf is a value


def test_cohens_d_is_the_effect_size_of_the_neuron_stage():
    g = torch.Generator().manual_seed(0)
    ya, yb = torch.randn(40, 5, generator=g, dtype=torch.float64), torch.randn(30, 5, generator=g, dtype=torch.float64)
    ya[:, 4] = yb[:, 4] = 2.0  # a constant neuron: d = 0 (the floor), not nan
    a, b = Moments.zeros(5).add(ya), Moments.zeros(5).add(yb)
    d = effect_sizes(a, b)
    ref = (ya.mean(0) - yb.mean(0)) / ((ya.var(0, unbiased=False) + yb.var(0, unbiased=False)) / 2).sqrt()
    torch.testing.assert_close(d[:4], ref[:4], rtol=1e-12, atol=0)
    assert d[4] == 0.0
    assert torch.equal(d, cohens_d(a.mean, a.var, b.mean, b.var))


def test_cohens_d_floor_on_the_std_equals_the_floor_on_the_variance():
    """The page's contrast floored the pooled variance at 1e-12; flooring the std at 1e-6 is bit for bit the same
    (sqrt is correctly rounded and sqrt(1e-12) == 1e-6 in float32 and float64), so it can share cohens_d."""
    for dt in (torch.float32, torch.float64):
        va = torch.tensor([0.0, 1e-14, 1e-12, 3e-12, 0.5, 2.0], dtype=dt)
        vb = torch.tensor([0.0, 0.0, 1e-12, 1e-13, 0.25, 1.0], dtype=dt)
        ma, mb = torch.linspace(-1, 1, 6, dtype=dt), torch.zeros(6, dtype=dt)
        old = (ma - mb) / ((va + vb) / 2).clamp_min(1e-12).sqrt()
        assert torch.equal(cohens_d(ma, va, mb, vb, min_std=1e-6), old)
