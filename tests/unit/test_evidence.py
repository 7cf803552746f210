"""The cards' evidence (issue 21, item 3) on the hand-built context-neuron model: activation examples against
the model's own pre-activations and the cards' traces, histograms, the direct logit effect against the weights,
and the precision curve against the threshold and the verification it came from."""

from __future__ import annotations

import math

import torch
from conftest import NEURON

from attnscope.models.unembed import direct_logit_effect
from attnscope.neurons.evidence import N_BINS, N_LOGITS, NeuronEvidence
from attnscope.neurons.explain import true_pre
from attnscope.neurons.find import held_out_windows
from attnscope.neurons.result import NeuronResult


def _windows(w, c, n):
    return {s.name: s for s in held_out_windows(w, c, n.settings["eval"], n.settings["max_windows"])}


def test_examples_are_the_true_peaks_with_the_traces_prediction(hand_results):
    w, _, c, n, _ = hand_results
    ev = n.evidence
    assert isinstance(ev, NeuronEvidence) and [e.neuron for e in ev.examples] == [r.index for r in n.cards]
    assert NEURON in [e.neuron for e in ev.examples]
    assert ev.texts == n.sources
    wins = _windows(w, c, n)
    n_min = c.settings.min_position
    for ne in ev.examples:
        k = ne.neuron
        # the first example holds the largest true pre-activation over every reporting window (positions >= n_min)
        best = max(float(true_pre(w, win)[n_min:, k].max()) for s in wins.values() for win in s.report)
        assert math.isclose(ne.examples[0].max_true, best, rel_tol=1e-4, abs_tol=1e-4)
        assert [x.max_true for x in ne.examples] == sorted((x.max_true for x in ne.examples), reverse=True)
        assert len({(x.text, x.window) for x in ne.examples}) == len(ne.examples)  # one example per window
        for x in ne.examples:
            win = wins[x.text].report[x.window]
            y = true_pre(w, win)[x.start : x.start + len(x.tokens), k]
            torch.testing.assert_close(torch.tensor(x.true, dtype=torch.float64), y.double(), atol=1e-3, rtol=1e-4)
            assert x.peak == int(torch.tensor(x.true).argmax()) and x.start >= n_min
            tr = n.trace(k, x.text)
            if tr is not None and x.window == 0:  # the traces are drawn on each text's first reporting window
                ref = tr.predicted_pre[x.start - n_min : x.start - n_min + len(x.tokens)]
                torch.testing.assert_close(torch.tensor(x.predicted), torch.tensor(ref), atol=1e-3, rtol=1e-4)


def test_histograms_count_every_reporting_position(hand_results):
    w, _, c, n, _ = hand_results
    wins = _windows(w, c, n)
    n_min = c.settings.min_position
    for ne in n.evidence.examples:
        assert len(ne.edges) == N_BINS + 1 and ne.edges == sorted(ne.edges)
        assert {h.text for h in ne.histograms} == set(wins)
        for h in ne.histograms:
            rep = wins[h.text].report
            assert sum(h.counts) == h.n == rep.shape[0] * (rep.shape[1] - n_min)
            ys = torch.cat([true_pre(w, win)[n_min:, ne.neuron] for win in rep])
            assert math.isclose(h.mean, float(ys.mean()), abs_tol=1e-3)


def test_direct_logits_are_the_output_weight_through_the_unembedding(hand_results):
    w, _, _, n, _ = hand_results
    lg = n.evidence.logits
    assert lg.available and lg.scale is not None and lg.scale > 0 and "direct effect only" in lg.note
    for e in lg.effects:
        eff = direct_logit_effect(w, w.W_out[0][e.neuron], lg.scale)
        assert len(e.top) == len(e.bottom) == N_LOGITS
        assert math.isclose(e.top[0][1], float(eff.max()), rel_tol=1e-4, abs_tol=1e-4)
        assert math.isclose(e.bottom[0][1], float(eff.min()), rel_tol=1e-4, abs_tol=1e-4)
        assert [v for _, v in e.top] == sorted((v for _, v in e.top), reverse=True)


def test_precision_curve_matches_the_threshold_and_the_verification(hand_results):
    _, _, _, n, _ = hand_results
    cur = n.evidence.curve
    assert cur is not None and cur.thresholds == sorted(cur.thresholds, reverse=True)
    assert math.isclose(cur.base_rate_reporting, n.verification.precision_random, abs_tol=1e-9)
    assert math.isclose(cur.base_rate_tuning, n.threshold.base_rate_tuning, abs_tol=1e-9)
    assert cur.n_passed[-1] == n.n_scored and math.isclose(cur.precision_reporting[-1], cur.base_rate_reporting,
                                                           abs_tol=1e-4)
    if n.n_selected:
        i = cur.n_passed.index(n.n_selected)
        assert math.isclose(cur.precision_tuning[i], n.threshold.tuning_precision, abs_tol=1e-4)
        assert math.isclose(cur.precision_reporting[i], n.verification.precision, abs_tol=1e-4)
        assert cur.thresholds[i] == round(n.threshold.value, 4)


def test_evidence_survives_save_and_load(hand_results, tmp_path):
    _, _, c, n, _ = hand_results
    n.save(tmp_path)
    c.save(tmp_path / "circuit")
    back = NeuronResult.load(tmp_path)
    assert back.evidence == n.evidence


def test_a_model_without_an_output_head_says_so_on_every_card(hand_results):
    from dataclasses import replace

    from attnscope.neurons.evidence import direct_logits
    from attnscope.report.cards import neuron_section

    w, _, c, n, _ = hand_results
    lg = direct_logits(replace(w, W_U=None), [r.index for r in n.cards], [c.calibration_tokens], 1, "calibration")
    assert not lg.available and lg.effects == [] and "no output head in this model" in lg.note
    html = neuron_section(replace(n, evidence=replace(n.evidence, logits=lg)), {}, set())
    assert html.count("no output head in this model") == len(n.cards) + 1  # each card, and the hint above them
    assert 'class="lg pos"' not in html
