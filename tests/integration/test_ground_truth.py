"""Ground truth on the demo model (issue 9, method §15): floors well below the measured values.

The full measurement (every window, docs/neurons.md) is `python bench/ground_truth.py demo`; this test
uses 6 windows per context (3 tune, 3 report) so a regression in the predictor, the threshold or the
explanation fails it within seconds.
"""

from __future__ import annotations

import statistics as st

import pytest

from attnscope.circuit.build import build_circuit
from attnscope.neurons.evaluation import evaluate_ground_truth


@pytest.fixture(scope="module")
def gt(demo):
    w, _ = demo
    return evaluate_ground_truth(w, build_circuit(w), max_windows=6)


def test_spearman_beats_baselines(gt):
    full = gt.median_spearman("full")  # measured 0.955 on all windows
    assert full > 0.85
    assert full > gt.median_spearman("token_mean") + 0.02  # measured +0.097
    assert full > gt.median_spearman("contextual")  # the full explanation adds to the bag alone
    assert abs(gt.median_spearman("shuffled")) < 0.4  # the null ranks nothing


def test_reported_set_and_explanation(gt):
    rep = gt.reported
    assert rep["n_passed"] >= 100  # measured 341 of 768
    assert rep["precision"] > rep["precision_random"] + 0.15  # measured 0.78 vs 0.40
    assert st.median(rep["recall20"].values()) >= 0.6  # measured 0.95
    assert rep["fvu_reported"]["fvu"] < 0.3 and rep["fvu_reported"]["fvu_within"] < 0.4  # measured 0.11 / 0.15
    p10 = st.median(v["precision"]["10"] for v in gt.scores["full"].values())
    p10_null = st.median(v["precision"]["10"] for v in gt.scores["shuffled"].values())
    assert p10 >= 0.7 and p10_null <= 0.3  # measured 1.00 / 0.00


def test_label_precision(gt):
    lp = gt.labels
    assert lp["n_checked"] >= 5 and lp["precision"] >= 0.6  # measured 40 of 46


def test_like_for_like_with_ceiling_and_baselines(gt):
    lfl = gt.like_for_like
    assert set(lfl) == set(gt.contexts)
    med = st.median(v.like_for_like.spearman for v in lfl.values())
    assert med > 0.85  # the prediction from the reporting windows' own counts
    for v in lfl.values():
        assert v.noise_ceiling is not None and -1 <= v.noise_ceiling.split_half <= v.noise_ceiling.spearman_brown <= 1
        assert v.token_mean_fitted_on == ["bundled:en_moby_dick (calibration)"]
    assert abs(st.median(v.shuffled_null.spearman for v in lfl.values())) < 0.4  # the null ranks nothing
    assert med > st.median(v.token_mean.spearman for v in lfl.values())
