"""Positional kernels: normalisation, causality, hand-built heads classified and measured as built."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import HAND_NCTX, HAND_TAU

from attnscope.core.errors import IndexOutOfRangeError
from attnscope.kernels.analysis import KernelResult, KernelSettings, analyse_kernels, categorise, fit_decay

S = dict(samples="tests/data", n_samples=8, n_heldout=4, batch_size=4)


@pytest.fixture(scope="module")
def hand(positional_gpt2):
    w, _ = positional_gpt2
    return w, analyse_kernels(w, KernelSettings(n_ctx=HAND_NCTX, layers=[0], **S), cache=False, progress=False)


def test_kernels_normalised_and_causal(hand):
    w, r = hand
    qpos = r.query_positions
    for name in ("data_kernel", "mean_attention"):
        k = r.arrays[name]
        torch.testing.assert_close(k.sum(-1), torch.ones_like(k.sum(-1)), atol=1e-5, rtol=0)
        for j, n in enumerate(qpos):
            assert k[..., j, n + 1 :].abs().max() == 0 if n + 1 < k.shape[-1] else True
    wk = r.arrays["weights_kernel_layer0"]
    torch.testing.assert_close(wk.sum(-1), torch.ones_like(wk.sum(-1)), atol=1e-5, rtol=0)


def test_previous_token_head(hand):
    _, r = hand
    h0 = r.record(0, 0)
    assert h0.category == "previous token" and h0.mass_prev > 0.99
    assert h0.equivariance < 0.02 and h0.tv_decomposition["median"] < 0.01
    assert h0.tv_kernel_vs_attention < 0.02 and h0.tv_weights_vs_data < 0.02


def test_exponential_head(hand):
    _, r = hand
    h1 = r.record(0, 1)
    assert h1.category == "slow decay"
    assert abs(h1.decay_length - HAND_TAU) / HAND_TAU < 0.05 and h1.decay_fit_r2 > 0.99
    # N_eff of a geometric kernel with ratio e^(-1/tau): (1 + r) / (1 - r)
    rr = math.exp(-1 / HAND_TAU)
    assert abs(h1.n_eff - (1 + rr) / (1 - rr)) < 0.5
    assert h1.equivariance < 0.02 and h1.query_consistency < 0.02
    # generic-token queries give the same kernel: token embeddings are tiny in this model
    assert h1.weights_query_consistency < 0.02 and h1.tv_rotary_offset_vs_data is None


def test_uniform_head(hand):
    _, r = hand
    h2 = r.record(0, 2)
    # the first position is the sink and is split off: the kernel proper is uniform over the other n_ctx - 1
    assert h2.category == "uniform" and abs(h2.n_eff - (HAND_NCTX - 1)) < 0.5
    assert h2.decay_length is None
    # the sink mass beside it is the true attention on position 0, 1 / (n + 1) at query n: median over the held-out
    # query positions n = 8..63 (from the first kept query position on) is (1/36 + 1/37) / 2
    n = torch.arange(r.query_positions[0], HAND_NCTX, dtype=torch.float64)
    assert abs(h2.sink_mass - float((1 / (n + 1)).median())) < 1e-3 and abs(h2.sink_mass - (1 / 36 + 1 / 37) / 2) < 2e-3
    assert h2.display() == "uniform" and not h2.sink_dominated  # a sink below 0.05 is left out of the label


def test_categorise_and_fit_units():
    T = 50
    row = torch.zeros(T)
    row[0] = 1.0
    assert categorise(row, T - 1, True)[0] == "first-token sink"
    row = torch.exp(-torch.arange(T - 1, -1, -1.0) / 5.0)
    prof = row.flip(0) / row.sum()
    tau, r2 = fit_decay(prof)
    assert abs(tau - 5.0) < 0.05 and r2 > 0.999


def test_real_models_every_layer(minilm, smollm2):
    for w, _ in (minilm, smollm2):
        r = analyse_kernels(w, KernelSettings(n_ctx=48, layers=[0, 1], n_samples=4, n_heldout=2,
                                              samples="tests/data"), cache=False, progress=False)
        assert len(r.records) == 2 * w.n_heads
        k = r.arrays["data_kernel"]
        torch.testing.assert_close(k.sum(-1), torch.ones_like(k.sum(-1)), atol=1e-4, rtol=0)
        if w.causal:
            assert k[..., 0, r.query_positions[0] + 1 :].abs().max() == 0
        for rec in r.records:
            assert 1.0 <= rec.n_eff <= 48.0 + 1e-6 and 0 <= rec.tv_decomposition["median"] <= 1
        if w.positional == "rotary":  # offset-only kernel through the rotation
            rot = r.arrays["rotary_offset_kernel"]
            torch.testing.assert_close(rot.sum(-1), torch.ones_like(rot.sum(-1)), atol=1e-4, rtol=0)
            assert all(0 <= rec.tv_rotary_offset_vs_data <= 1 for rec in r.records)
            # layer 0 reads token embeddings only: its kernels are close to offset-only ones
            assert sorted(rec.tv_rotary_offset_vs_data for rec in r.records if rec.layer == 0)[w.n_heads // 2] < 0.25
        else:
            assert all(rec.weights_query_consistency is not None for rec in r.records if rec.layer == 0)


def test_cache_roundtrip(tiny_gpt2, tmp_path, monkeypatch):
    monkeypatch.setenv("ATTNSCOPE_CACHE", str(tmp_path))
    w, _ = tiny_gpt2
    s = KernelSettings(n_ctx=32, n_samples=4, n_heldout=2, samples="tests/data")
    r1 = analyse_kernels(w, s, progress=False)
    assert list((tmp_path / "kernels").iterdir())
    r2 = analyse_kernels(w, s, progress=False)
    assert r1.to_json()["heads"] == r2.to_json()["heads"]
    torch.testing.assert_close(r1.arrays["data_kernel"], r2.arrays["data_kernel"])
    loaded = KernelResult.load(next((tmp_path / "kernels").iterdir()))
    assert loaded.records[0] == r1.records[0]


def test_layer_out_of_range(tiny_gpt2):
    w, _ = tiny_gpt2
    with pytest.raises(IndexOutOfRangeError, match="layer index 5 is out of range"):
        analyse_kernels(w, KernelSettings(layers=[5], **S), progress=False)
