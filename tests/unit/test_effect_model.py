"""The predicted effect size with each side's sd from its own token counts (issue 19: EffectModel)."""

from __future__ import annotations

import pytest
import torch

from attnscope.circuit.build import CircuitSettings, build_circuit
from attnscope.core.stats import cohens_d
from attnscope.core.texts import text_tokens
from attnscope.neurons.contrast import build_token_model, calibration_std, effect_model
from attnscope.neurons.verification import token_frequencies


@pytest.fixture(scope="module")
def effect(tiny_gpt2):
    w, _ = tiny_gpt2
    circ = build_circuit(w, CircuitSettings(calibration="bundled:en_moby_dick", n_ctx=64, window=32, heads=[0, 1]))
    tm = build_token_model(w, circ, source_aware_denominators=True)
    return w, circ, tm, effect_model(w, circ, tm)


def test_token_values_average_to_the_expected_pre_activation(effect):
    """The per-token values the variance is taken over have the token model's expectation as their p-mean."""
    w, _, tm, _ = effect
    p = token_frequencies(text_tokens("bundled:es_fortunes", w.tokenizer, max_tokens=200)[None], w.d_vocab)
    q, a = tm.token_values(p)
    assert q.sum().item() == pytest.approx(1.0) and a.shape == (len(q), tm.W_in.shape[1])
    torch.testing.assert_close(q @ a, tm.expected(p).double(), atol=1e-5, rtol=1e-4)


def test_per_source_sd_is_the_position_variance_scaled_by_calibration(effect):
    """Against an independent count: the variance over the positions of a text of each position's token value
    (no frequency weighting), times kappa; on the calibration positions it is the measured std, so there the
    predicted d is the calibrated one."""
    w, circ, tm, em = effect
    assert em.per_source_sd and em.kappa is not None and bool((em.kappa > 0).all())
    ids = text_tokens("bundled:code_python", w.tokenizer, max_tokens=300)
    p = token_frequencies(ids[None], w.d_vocab)
    _, a = tm.token_values(p)
    present = (p > 0).nonzero().squeeze(1).tolist()
    per_pos = a[[present.index(int(t)) for t in ids]]  # [n_positions, d_mlp]: each position's token value
    torch.testing.assert_close(em.variance(p), em.kappa * per_pos.var(0, unbiased=False), atol=1e-8, rtol=1e-5)
    cal = circ.calibration_tokens[circ.settings.min_position:].cpu()
    p_cal = token_frequencies(cal[None], w.d_vocab)
    torch.testing.assert_close(em.variance(p_cal).sqrt(), calibration_std(w, circ).cpu(), atol=1e-8, rtol=1e-5)


def test_predicted_d_is_cohens_d_of_the_predicted_moments(effect):
    w, circ, tm, em = effect
    pa, pb = (token_frequencies(text_tokens(s, w.tokenizer, max_tokens=300)[None], w.d_vocab)
              for s in ("bundled:es_fortunes", "bundled:code_python"))
    diff = (tm.expected(pa) - tm.expected(pb)).cpu().double()
    torch.testing.assert_close(em.predict_d(pa, pb), cohens_d(diff, em.variance(pa), 0 * diff, em.variance(pb)))
    plain = effect_model(w, circ, tm, per_source_sd=False)
    assert not plain.per_source_sd
    torch.testing.assert_close(plain.predict_d(pa, pb), diff / calibration_std(w, circ).cpu())
    assert not torch.allclose(plain.predict_d(pa, pb), em.predict_d(pa, pb))
