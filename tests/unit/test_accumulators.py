"""Mergeable statistics (attnscope.accumulators) and sharding, without Ray: merged shards equal one pass.

``ShardedHere`` is an executor that runs every shard in this process and merges the partial results in a
scrambled order (then window order, as the Ray executor does), so the sharding logic (offsets of gathered
values, counts, float64 sums) is tested wherever the suite runs; tests/test_distributed.py runs the same
comparisons on a real Ray cluster.
"""

from __future__ import annotations

import pytest
import torch
from conftest import assert_same_kernels, kernel_settings

from attnscope.core.accumulators import EstimationSums, Gathered, Moments, ValidationSums, merge_all
from attnscope.core.distributed import shards
from attnscope.core.errors import AttnscopeError
from attnscope.core.executor import LOCAL, make_executor


class ShardedHere:
    """Every shard in this process; partial results merged in window order (as RayExecutor)."""

    workers = 3

    def __init__(self, shard_size: int | None = None) -> None:
        self.shard_size, self.calls = shard_size, 0

    def map_windows(self, w, task, windows, *args, bar=None, shard_size=4):
        parts = shards(windows.shape[0], self.shard_size or shard_size)
        if not parts:
            return task(w, windows, 0, *args)
        got = {a: task(w, windows[a:b], a, *args) for a, b in reversed(parts)}  # computed out of order
        self.calls += len(parts)
        return merge_all([got[a] for a, _ in parts])

    def map(self, fn, items, *args, log=None):
        return [fn(i, *args) for i in items]

    def close(self):
        pass


def test_moments_merge_equals_one_pass():
    g = torch.Generator().manual_seed(0)
    y = torch.randn(50, 7, generator=g, dtype=torch.float32) * 3 + 1
    whole = Moments.zeros(7).add(y)
    a, b = Moments.zeros(7).add(y[:20]), Moments.zeros(7).add(y[20:])
    s = a + b  # a new object
    assert a.n == 20 and s.n == 50
    merged = a.merge(b)
    assert merged is a and merged.n == 50
    for m in (s, merged):
        torch.testing.assert_close(m.mean, y.double().mean(0), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(m.var, y.double().var(0, unbiased=False), rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(m.s1, whole.s1, rtol=1e-12, atol=1e-12)
    mean, var = whole.finalise()
    assert mean.dtype == var.dtype == torch.float64


def test_gathered_values_come_back_in_window_order():
    g = Gathered(1)
    g.add(4, torch.tensor([[4.0, 5.0]]))
    g.merge(Gathered(1, {0: torch.tensor([[0.0, 1.0]]), 2: torch.tensor([[2.0, 3.0]])}))
    assert g.finalise().tolist() == [[0.0, 1.0, 2.0, 3.0, 4.0, 5.0]]
    with pytest.raises(ValueError, match="gathered twice"):
        g.add(2, torch.zeros(1, 2))
    with pytest.raises(ValueError, match="dims"):
        g.merge(Gathered(0))


def test_merge_refuses_partials_of_different_analyses():
    with pytest.raises(TypeError, match="cannot merge"):
        Moments.zeros(3).merge(Gathered())
    with pytest.raises(ValueError, match="shapes"):
        Moments.zeros(3).merge(Moments.zeros(4))
    a, b = EstimationSums.zeros(2, 1, 8, 4, 6), EstimationSums.zeros(1, 1, 8, 4, 6)
    with pytest.raises(ValueError):
        a.merge(b)
    v = ValidationSums.zeros(1, 2, 3, 8)
    assert v.merge(ValidationSums.zeros(1, 2, 3, 8)).n == 0


def test_shards_cover_the_windows():
    assert shards(10, 4) == [(0, 4), (4, 8), (8, 10)]
    assert shards(0, 4) == [] and shards(3, 0) == [(0, 1), (1, 2), (2, 3)]


def test_sharded_kernels_equal_one_pass(tiny_gpt2):
    from attnscope.kernels.analysis import analyse_kernels

    w, _ = tiny_gpt2
    s = kernel_settings()
    local = analyse_kernels(w, s, cache=False, progress=False)
    ex = ShardedHere()
    sharded = analyse_kernels(w, s, cache=False, progress=False, executor=ex)
    assert ex.calls == 3 + 2  # estimation shards of 2 windows, held-out ones of 2 and 1
    assert_same_kernels(local, sharded)
    # the gathered per-position values are the same values in the same order: medians and quantiles agree exactly
    assert [r.tv_decomposition for r in local.records] == [r.tv_decomposition for r in sharded.records]
    assert [r.sink_mass for r in local.records] == [r.sink_mass for r in sharded.records]


def test_sharded_pre_stats_equal_one_pass(tiny_gpt2):
    from attnscope.core.texts import load_windows
    from attnscope.neurons.contrast import pre_stats

    w, _ = tiny_gpt2
    windows, _ = load_windows("tests/data", w.tokenizer, 32, 5, seed=0)
    one = pre_stats(w, windows, 4)
    many = pre_stats(w, windows, 4, ShardedHere(shard_size=2))
    assert one.n == many.n == 5 * 28
    torch.testing.assert_close(many.s1, one.s1, rtol=1e-12, atol=1e-9)
    torch.testing.assert_close(many.var, one.var, rtol=1e-9, atol=1e-9)
    assert one.s1.abs().max() > 1  # not a comparison of zeros


def test_sharded_per_window_stats_come_back_one_per_window_in_order(tiny_gpt2):
    """The per-window truth (the split-half noise ceiling's input) sharded: one PreStats per window, in window
    order, equal to the windows measured one at a time; a window merged twice is refused."""
    from attnscope.core.accumulators import PerWindow
    from attnscope.core.texts import load_windows
    from attnscope.neurons.verification import window_stats

    w, _ = tiny_gpt2
    windows, _ = load_windows("tests/data", w.tokenizer, 32, 5, seed=0)
    one = window_stats(w, list(windows), 4)
    many = window_stats(w, list(windows), 4, ShardedHere(shard_size=2))
    assert len(one) == len(many) == 5
    for a, b in zip(one, many):
        assert a.n == b.n == 28
        torch.testing.assert_close(b.s1, a.s1, rtol=1e-12, atol=1e-9)
    assert not torch.allclose(many[0].s1, many[1].s1)  # distinct windows, so the order is tested
    with pytest.raises(ValueError, match="added twice"):
        PerWindow().add(0, one[0]).merge(PerWindow().add(0, one[1]))


def test_executor_choice_is_checked():
    assert make_executor("local") is LOCAL
    with pytest.raises(AttnscopeError, match="--executor 'dask'"):
        make_executor("dask")
    with pytest.raises(AttnscopeError, match="only with --executor ray"):
        make_executor("local", workers=2)
    with pytest.raises(AttnscopeError, match="--workers 0"):
        make_executor("ray", workers=0)
