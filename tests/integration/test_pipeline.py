"""End to end on the bundled demo model: kernels -> circuit -> neurons -> report, and agreement between the
weights-only labels and where the neurons really fire (the demo model's contexts are known)."""

from __future__ import annotations

import pytest

from attnscope.circuit.build import CircuitSettings
from attnscope.kernels.analysis import KernelSettings
from attnscope.neurons.find import NeuronSettings
from attnscope.report.pipeline import run_report

LABEL_TO_TEXTS = {
    "Python code": {"code_python"},
    "German": {"de_fortunes"},
    "Spanish": {"es_fortunes"},
    "Early Modern English (verse/drama)": {"en_shakespeare", "en_milton"},
    "Shakespearean drama": {"en_shakespeare"},
    "Miltonic verse": {"en_milton"},
}


@pytest.fixture(scope="module")
def demo_report(demo, tmp_path_factory):
    w, _ = demo
    out = tmp_path_factory.mktemp("demo_report")
    return run_report(w, out, kernel_settings=KernelSettings(n_samples=16, n_heldout=4),
                      circuit_settings=CircuitSettings(),
                      neuron_settings=NeuronSettings(max_neurons=32), progress=False, log=lambda *_: None,
                      later_layers=[1])


def test_demo_report_written(demo_report):
    r = demo_report
    assert r.report.exists() and r.report.stat().st_size > 50_000
    assert (r.out / "kernels" / "kernels.json").exists() and (r.out / "neurons" / "neurons.json").exists()
    assert r.circuit_error is None


def test_demo_report_has_the_later_layer_section(demo_report):
    from attnscope.later.result import LaterResult

    r = demo_report
    assert [x.layer for x in r.later] == [1] and "later_layers" in r.timings
    saved = LaterResult.load(r.out / "later" / "L1")
    assert saved.median_spearman("hybrid") == r.later[0].median_spearman("hybrid") > 0.6
    page = r.report.read_text(encoding="utf-8")
    assert 'id="neurons"' in page and 'id="later-L1"' in page and 'href="#later-layers"' in page


def test_demo_neurons_verified(demo_report):
    s = demo_report.neurons.summary()
    assert s["n_heads"] >= 2 and s["n_neurons_found"] >= 5
    assert s["median_r"] > 0.8 and s["median_fvu"] < 0.6


def test_weight_labels_agree_with_true_activations(demo_report):
    """A neuron labelled from its weights as, say, 'Python code' has its highest true mean pre-activation on
    the held-out Python text: the weights-only explanation predicts real behaviour."""
    checked = agree = 0
    for rec in demo_report.neurons.records:
        if rec.label in LABEL_TO_TEXTS:
            checked += 1
            agree += rec.positive_text in LABEL_TO_TEXTS[rec.label]
    assert checked >= 3 and agree / checked >= 0.75, (agree, checked)


def test_demo_report_cards_carry_their_evidence(demo_report):
    """Issue 21: every card has its top windows, histograms and direct logit effect (saved and reloaded), the
    later layer's cards their logit effect, and the report stays one file under 2 MB."""
    from attnscope.later.result import LaterResult
    from attnscope.neurons.result import NeuronResult

    r = demo_report
    ev = r.neurons.evidence
    assert ev is not None and [e.neuron for e in ev.examples] == [c.index for c in r.neurons.cards]
    assert all(len(e.examples) == 3 and len(e.histograms) == len(r.neurons.sources) for e in ev.examples)
    assert ev.logits.available and all(len(e.top) == len(e.bottom) == 10 for e in ev.logits.effects)
    assert NeuronResult.load(r.out / "neurons").evidence == ev
    page = r.report.read_text(encoding="utf-8")
    later = r.later[0]
    lev = later.evidence
    assert lev is not None and lev.logits.available and lev.curve is None
    assert [e.neuron for e in lev.examples] == [e.neuron for e in lev.logits.effects] == [c.index for c in later.cards]
    assert LaterResult.load(r.out / "later" / "L1").evidence == lev
    assert page.count('<div class="acts">') == len(r.neurons.cards) + len(later.cards)
    assert 'id="precision-curve"' in page and 'id="evidence-hint-L1"' in page
    assert "no output head" not in page and r.report.stat().st_size < 2_000_000
