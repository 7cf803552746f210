"""Like-for-like verification pieces and the contrast scope flag on synthetic numbers (issue 19)."""

import math

import pytest
import torch

from attnscope.neurons.verification import (
    PreStats,
    TokenMean,
    noise_ceiling,
    score_predictor,
)
from attnscope.serve.contrast_scope import (
    COMMON_SHIFT_MAX,
    ScopeRule,
    common_shift_share,
    denominator_gap,
    in_flag,
    judged_positions,
    out_of_scope,
    pair_conditions,
    recheck,
)


def _stats(mean: torch.Tensor, n: int = 100, sd: float = 1.0) -> PreStats:
    return PreStats(n, mean * n, (mean**2 + sd**2) * n)


def test_noise_ceiling_is_spearman_brown_of_the_split_half():
    g = torch.Generator().manual_seed(0)
    signal = torch.randn(200, generator=g)
    # four windows per side; the truth's noise differs between windows
    a = [_stats(signal + 0.3 * torch.randn(200, generator=g)) for _ in range(4)]
    b = [_stats(0.3 * torch.randn(200, generator=g)) for _ in range(4)]
    nc = noise_ceiling(a, b)
    assert nc.n_windows_per_draw == 2
    assert nc.spearman_brown == pytest.approx(2 * nc.split_half / (1 + nc.split_half))
    assert 0.8 < nc.split_half < nc.spearman_brown < 1
    assert noise_ceiling(a[:1], b) is None  # one window: no two draws


def test_r_precision_counts_the_neurons_with_large_true_d():
    d = torch.tensor([3.0, -2.0, 1.5, 0.1, -0.2, 0.0])  # three neurons with |d| >= 1
    pred = torch.tensor([2.0, -1.0, -0.5, 1.0, 0.0, 0.1])  # two of its top three right, with their sign
    s = score_predictor("x", pred, d)
    assert s.r_precision == pytest.approx(2 / 3)
    assert score_predictor("x", pred, torch.zeros(6) + 0.1).r_precision is None
    assert set(s.precision) == {"10", "20", "50"}


def test_token_mean_gives_unseen_tokens_the_overall_mean():
    tm = TokenMean(["t"], torch.tensor([1, 3]), torch.tensor([[1.0, 0.0], [3.0, 2.0]], dtype=torch.float64),
                   torch.tensor([10.0, 20.0], dtype=torch.float64))
    q = torch.tensor([0.0, 0.5, 0.25, 0.25])  # token 2 unseen
    assert torch.allclose(tm.expected(q), torch.tensor([0.5 + 0.75 + 2.5, 0.5 + 5.0], dtype=torch.float64))


def test_judged_positions():
    assert judged_positions(1000, 256, 25, bos=True) == 3 * 231 + (1000 - 3 * 255 + 1 - 25)
    assert judged_positions(20, 256, 25, bos=False) == 0


def test_denominator_gap_condition_and_the_flag():
    rule = ScopeRule()
    c = denominator_gap(0.7, 1.25, 0.25, rule)
    assert c.measured == pytest.approx(abs(math.log(0.7) - math.log(1.25)) / 0.25) and not c.ok
    assert denominator_gap(0.74, 0.72, 0.25, rule).ok
    assert not out_of_scope([c])  # measured and shown only: it predicts nothing with source-aware denominators
    centred = torch.tensor([1.0, -1.0, 2.0, -2.0, 0.0])
    short = pair_conditions(39, 4000, centred, rule)
    assert out_of_scope(short) and not out_of_scope(pair_conditions(4000, 4000, centred, rule))
    again = recheck({**c.to_json(), "in_flag": True}, ScopeRule(max_denominator_gap=10.0))
    assert again["ok"] and again["threshold"] == 10.0


def test_robustness_to_the_denominators_is_measured_and_shown_but_not_in_the_flag():
    rule = ScopeRule(min_denominator_robustness=0.9)
    pred = torch.arange(10.0) - 4.5
    same = pair_conditions(4000, 4000, pred, rule, 2 * pred + 1)
    assert same[-1].name == "robust to the denominators" and same[-1].measured == pytest.approx(1.0)
    assert not out_of_scope(same)
    flipped = pair_conditions(4000, 4000, pred, rule, -pred)
    assert not flipped[-1].ok and flipped[-1].measured == pytest.approx(-1.0)
    assert not in_flag(flipped[-1]) and not out_of_scope(flipped)  # measured only, as the common shift now
    again = recheck({**flipped[-1].to_json(), "in_flag": True}, ScopeRule(min_denominator_robustness=-2.0))
    assert again["ok"] and again["threshold"] == -2.0 and not again["in_flag"]


def test_common_shift_measures_a_prediction_that_moves_every_neuron_alike():
    rule = ScopeRule()
    assert common_shift_share(torch.tensor([1.0, -1.0, 3.0, -3.0])) == pytest.approx(0.0)
    assert common_shift_share(torch.full((6,), -0.4)) == pytest.approx(1.0)
    assert common_shift_share(torch.tensor([2.0, 0.0])) == pytest.approx(1 / math.sqrt(2))  # |1| / sqrt(2)
    assert common_shift_share(torch.zeros(4)) == 1.0  # no contrast predicted at all: nothing to rank
    shifted = pair_conditions(4000, 4000, torch.tensor([1.0, 1.2, 0.9, 1.1]), rule)
    c = next(x for x in shifted if x.name == "not a common shift")
    # measured and shown, out of the flag since the per-query bag (issue 19, step 10): no dev pair left to predict
    assert not in_flag(c) and not c.ok and c.threshold == COMMON_SHIFT_MAX and not out_of_scope(shifted)
    assert c.measured == pytest.approx(1.05 / math.sqrt((1 + 1.44 + 0.81 + 1.21) / 4))
    again = recheck({**c.to_json(), "in_flag": True}, ScopeRule(max_common_shift=1.0))
    assert again["ok"] and again["threshold"] == 1.0 and not again["in_flag"]
    assert out_of_scope(pair_conditions(100, 4000, torch.tensor([1.0, -1.0]), rule))  # too few positions: out


def test_noise_ceiling_r_precision_is_one_when_the_halves_agree():
    g = torch.Generator().manual_seed(1)
    signal = 3 * torch.randn(200, generator=g)
    a = [_stats(signal) for _ in range(4)]
    b = [_stats(torch.zeros(200)) for _ in range(4)]
    assert noise_ceiling(a, b).r_precision == pytest.approx(1.0)
    flat = [_stats(torch.zeros(200)) for _ in range(4)]
    assert noise_ceiling(flat, b).r_precision is None


def test_calibrate_threshold_keeps_false_alarms_within_the_limit():
    from attnscope.serve.contrast_scope import calibrate_threshold

    values = [0.1, 0.2, 0.3, 0.9, 0.95, 0.96, 0.97, 0.98, 0.99, 0.995, 0.999]
    failed = [True, True, True] + [False] * 8
    assert calibrate_threshold(values, failed) == pytest.approx(0.6)  # between the worst holding and best failing
    # one holding input among the failing ones: flagging it too costs 1/8 > 10% false alarms
    failed2 = [True, False, True] + [False] * 8
    t = calibrate_threshold(values, failed2)
    assert t == pytest.approx(0.15)
    assert calibrate_threshold(values, [False] * len(values)) < min(values)


def test_the_robustness_threshold_is_the_rule_on_the_saved_dev_runs():
    """The flag's threshold is not set by hand: calibrate_threshold on the dev half's natural pairs of the three
    models pooled (the saved bench/unseen.py runs, the predictor contrast uses) gives it."""
    import json
    from pathlib import Path

    from attnscope.serve.contrast_scope import DENOMINATOR_ROBUSTNESS_MIN, calibrate_threshold

    root = Path(__file__).resolve().parents[2] / "bench" / "results" / "unseen"
    pairs = [p for m in ("demo", "smollm2", "all-MiniLM-L6-v2")
             for p in json.loads((root / f"{m}_dev_srcz_sd.json").read_text())["pairs"] if p["kind"] == "natural"]
    t = calibrate_threshold([p["denominator_robustness"] for p in pairs], [p["failed"] for p in pairs])
    assert DENOMINATOR_ROBUSTNESS_MIN == pytest.approx(t, abs=1e-4)


def test_the_common_shift_threshold_is_the_rule_on_the_saved_dev_runs():
    """The same rule (larger is worse: pass the negated share), the same pooled dev natural pairs; it flags every
    failing dev pair and 14 of the 261 holding ones."""
    import json
    from pathlib import Path

    from attnscope.serve.contrast_scope import COMMON_SHIFT_MAX, calibrate_threshold

    root = Path(__file__).resolve().parents[2] / "bench" / "results" / "unseen"
    runs = [json.loads((root / f"{m}_dev_srcz_sd.json").read_text()) for m in ("demo", "smollm2", "all-MiniLM-L6-v2")]
    assert all(r["half"] == "dev" and r["per_source_sd"] and r["source_aware_denominators"] for r in runs)
    pairs = [p for r in runs for p in r["pairs"] if p["kind"] == "natural"]
    shares = [p["predicted_signal"]["common_shift"] for p in pairs]
    failed = [p["failed"] for p in pairs]
    t = -calibrate_threshold([-x for x in shares], failed)
    assert COMMON_SHIFT_MAX == pytest.approx(t, abs=1e-4)
    flagged = [x > COMMON_SHIFT_MAX for x in shares]
    assert len(pairs) == 3 * 91 and sum(failed) == 12  # all 12 failing pairs are SmolLM2's
    assert sum(g and f for g, f in zip(flagged, failed)) == 12  # every failing dev pair flagged
    assert sum(g and not f for g, f in zip(flagged, failed)) == 14  # 14 of 261 holding ones (5%)
