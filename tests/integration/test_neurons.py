"""Context-sensitive neurons: ranked, selected by a measured threshold, verified against the true
pre-activation (method §8-9, §15), and the contrast command's bad inputs."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import pytest
import torch
from conftest import NEURON

from attnscope.circuit.build import CircuitSettings, build_circuit
from attnscope.neurons.find import NeuronSettings, find_neurons
from attnscope.neurons.labels import AMERICAN, BRITISH, auto_label, dialect

CAL = "tests/data/moby.txt"


@pytest.fixture(scope="module")
def hand_result(context_neuron_gpt2):
    (w, _), ids = context_neuron_gpt2
    c = build_circuit(w, CircuitSettings(calibration=CAL, n_ctx=128))
    return w, ids, find_neurons(w, c, NeuronSettings(max_windows=6), progress=False)


def test_finds_the_hand_built_neuron(hand_result):
    w, ids, res = hand_result
    assert res.rows[0].index == NEURON and res.rows[0].passed  # ranked first, and passes the measured threshold
    row = res.rows[0]
    assert row.best_contrast == "code_python" and row.predicted_d > 1
    assert abs(row.d_bag + row.d_direct + row.d_other_heads + row.d_norm_scale - row.predicted_d) < 1e-6
    assert row.d_bag > 0.9 * row.predicted_d  # built by hand to read the bag of code tokens only
    card = res.cards[0]
    assert card.index == NEURON and card.true_d["code_python"] > 1  # true effect on held-out code windows
    top = {t for t, _ in card.top_positive_tokens[: len(ids)]}
    assert len(top & set(w.tokenizer.convert_ids_to_tokens(ids))) >= len(ids) // 2
    assert card.fvu < 0.2 and card.contextual_r > 0.9  # full explanation vs TRUE pre-activation; contextual heads
    assert card.label == "Python code" and card.label_evidence == "lexicon"


def test_every_neuron_ranked_and_saved(hand_result, tmp_path):
    w, _, res = hand_result
    assert [r.rank for r in res.rows] == list(range(1, w.d_mlp + 1))
    assert sorted(r.index for r in res.rows) == list(range(w.d_mlp))
    assert sum(r.passed for r in res.rows) == res.threshold.n_passed
    res.save(tmp_path)
    with (tmp_path / "neurons.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == w.d_mlp and rows[0]["index"] == str(NEURON)
    d = json.loads((tmp_path / "neurons.json").read_text())
    assert len(d["neurons"]) == w.d_mlp and d["threshold"]["n_passed"] == res.threshold.n_passed
    tr = json.loads((tmp_path / "traces.json").read_text())
    assert set(tr["denominators"]) == {x.text for x in res.denominators}
    assert all(len(z) == len(res.circuit.heads) for z in tr["denominators"].values())


def test_saved_result_loads_back_identical(hand_result, tmp_path):
    from attnscope.core.errors import AttnscopeError
    from attnscope.neurons.find import NeuronResult

    _, _, res = hand_result
    res.save(tmp_path)
    with pytest.raises(AttnscopeError, match="no circuit/ folder"):
        NeuronResult.load(tmp_path)
    res.circuit.save(tmp_path / "circuit")
    back = NeuronResult.load(tmp_path)
    assert json.dumps(back.to_json(), sort_keys=True) == json.dumps(res.to_json(), sort_keys=True)  # every field
    assert back.rows[0] == res.rows[0] and back.cards[0].top_positive_tokens == res.cards[0].top_positive_tokens
    assert back.denominators[0].Z_trace == res.denominators[0].Z_trace and back.traces == res.traces
    (tmp_path / "neurons.json").write_text(json.dumps({**res.to_json(), "schema_version": 0}))
    with pytest.raises(AttnscopeError, match="schema version 0"):
        NeuronResult.load(tmp_path)


def test_random_neurons_beside_the_reported(hand_result):
    _, _, res = hand_result
    v = res.verification
    assert v.random.n_neurons == 64 and v.random.fvu == v.random.fvu  # the baseline is computed, finite
    assert 0 <= v.precision_random <= 1
    for d in res.denominators:  # denominator transfer is a checked condition per text
        assert d.in_scope == all(0.8 <= r <= 1.25 for r in d.ratio)


def test_full_explanation_on_demo(demo):
    """The full explanation's terms sum to a prediction close to the true pre-activation."""
    from attnscope.core.texts import open_source, tokenize
    from attnscope.neurons.explain import build_explainer, score_explanation

    w, _ = demo
    c = build_circuit(w)
    ex = build_explainer(w, c)
    toks = torch.as_tensor(tokenize(open_source("bundled:en_milton"), w.tokenizer))
    texts = [toks[i * 256 : (i + 1) * 256] for i in range(2)]
    g = torch.Generator().manual_seed(0)
    sc = score_explanation(w, c, ex, texts, torch.randperm(w.d_mlp, generator=g)[:64].tolist())
    fvu = sorted(sc.fvu)[32]
    assert fvu < 0.3  # measured 0.10 over all bundled texts (docs/neurons.md)
    assert abs(sum(sorted(v)[32] for v in sc.parts.values()) - 1) < 0.3  # the parts explain most of the variance


def test_contrast_on_demo_beats_the_null(demo, tmp_path):
    from attnscope.neurons.contrast import run_contrast

    w, _ = demo
    res = run_contrast(w, build_circuit(w), "bundled:code_python", "bundled:en_moby_dick", verify=True, max_windows=4)
    v = res.verification
    assert v.like_for_like.spearman > 0.85 and v.shuffled_null.spearman < 0.3  # measured 0.98 / -0.03 (16 windows)
    assert v.like_for_like.precision["10"] >= 0.8
    assert v.like_for_like.spearman > v.token_mean.spearman  # the circuit beats the circuit-free baseline
    assert v.noise_ceiling is not None and 0.8 < v.noise_ceiling.spearman_brown <= 1
    assert "bundled:code_python" not in v.token_mean_fitted_on and len(v.token_mean_fitted_on) == 6
    assert v.like_for_like.r_precision is not None and v.like_for_like.r_precision > 0.5
    js = res.to_json()
    rec = js["neurons"]
    assert len(rec) == w.d_mlp and {"index", "predicted_diff", "true_d"} <= set(rec[0])
    from attnscope.neurons.contrast import ContrastResult

    back = ContrastResult.load(res.save(tmp_path))  # typed, nested verification included
    assert json.dumps(back.to_json(), sort_keys=True) == json.dumps(js, sort_keys=True)
    assert back.verification.like_for_like.spearman == v.like_for_like.spearman
    assert {"like_for_like", "whole_source", "noise_ceiling", "token_mean", "shuffled_null"} <= set(js["verification"])


def test_labels_need_evidence():
    for word in ("water", "after", "better", "doctor", "master", "called", "otherwise", "promise", "exercise",
                 "noise", "praised", "humorous", "honorary"):
        assert dialect(word) is None, word  # spelled the same in both dialects: no evidence
    assert dialect(" realised") == BRITISH and dialect("colour") == BRITISH and dialect("center") == AMERICAN
    lab = auto_label([" realised", " organised", " programme", " colour", " centre", " whilst", "lads"])
    assert lab.text == BRITISH and lab.evidence == "spelling pairs"
    assert auto_label(["water", "after", "better", "doctor", "master", "called"]) is None
    assert auto_label(["de", "la", "que", " el", "los", "para", "con", "x", "y"]).text == "Spanish"
    assert auto_label(["apple", "table", "green"]) is None


@pytest.mark.parametrize("args", [
    ["demo", "--a", "bundled:nope", "--b", "bundled:de_fortunes"],
    ["demo", "--a", "/no/such/file.txt", "--b", "bundled:de_fortunes"],
    ["demo", "--a", "bundled:es_fortunes", "--b", "bundled:es_fortunes"],
    ["demo", "--a", "bundled:es_fortunes", "--b", "bundled:de_fortunes", "--top", "0"],
    ["demo", "--a", "bundled:es_fortunes", "--b", "bundled:de_fortunes", "--max-windows", "1"],
    ["demo", "--a", "bundled:es_fortunes"],
])
def test_contrast_bad_input(args):
    p = subprocess.run([sys.executable, "-m", "attnscope.cli.app", "contrast", *args], capture_output=True, text=True)
    assert p.returncode == 2, p.stderr
    assert "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1 and p.stderr.startswith("error:")


def test_per_source_sd_tracks_the_true_sd_on_demo(demo):
    """Issue 19: each side's sd predicted from its own token counts ranks the neurons' true pooled sd closer than
    the one calibration std does (bundled es_fortunes and code_python, 4 windows each: measured 0.888 against
    0.688; on the unseen benchmark's dev half 0.93 against 0.70 at the median, docs/verification.md)."""
    from attnscope.core.texts import text_tokens
    from attnscope.neurons.contrast import build_token_model, effect_model
    from attnscope.neurons.groundtruth import spearman
    from attnscope.neurons.verification import spread_windows, token_frequencies, window_stats

    w, _ = demo
    circ = build_circuit(w)
    em = effect_model(w, circ, build_token_model(w, circ, source_aware_denominators=True))
    n_min, var_true, var_pred = circ.settings.min_position, [], []
    for s in ("bundled:es_fortunes", "bundled:code_python"):
        wins = spread_windows(w, text_tokens(s, w.tokenizer), circ.T, 4)
        per = window_stats(w, wins, n_min)
        st = sum(per[1:], per[0])
        var_true.append(st.var.double())
        var_pred.append(em.variance(token_frequencies(torch.stack(wins)[:, n_min:], w.d_vocab)))
    sd_true = ((var_true[0] + var_true[1]) / 2).sqrt()
    rho_pred = spearman(((var_pred[0] + var_pred[1]) / 2).sqrt(), sd_true)
    rho_cal = spearman(em.sigma, sd_true)
    print(f"sd rank agreement: per-source {rho_pred:.3f}, calibration std {rho_cal:.3f}")
    assert rho_pred > rho_cal + 0.05 and rho_pred > 0.8, (rho_pred, rho_cal)
