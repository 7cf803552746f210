"""The neuron cards' evidence (issue 21, item 3) in headless Chromium, on the hand-built context-neuron model's
report: the highlighted windows, histograms, direct logit effects and the precision curve, each checked against
the saved typed results (``NeuronResult.evidence``) and against the weights."""

from __future__ import annotations

import math
import re

import pytest
from chromium import browser_missing, css, js_click, severe_logs

MISSING = browser_missing()
pytestmark = [pytest.mark.browser, pytest.mark.skipif(MISSING is not None, reason=MISSING or "")]


def _shown(tok: str) -> str:
    """A token as the report writes it (report/evidence.py: line breaks and tabs shown, long space runs counted)."""
    t = tok.replace("\n", "↵").replace("\t", "⇥").replace("\r", "␍")
    return re.sub(r" {3,}", lambda m: f" ␣×{len(m.group())} ", t) or "∅"


def _card(d, k: int):
    el = d.find_element(*css(f"#neuron-0-{k}"))
    d.execute_script("arguments[0].querySelector('details').open = true", el)
    return el


def _prop(d, el, name: str) -> float:
    """A custom CSS property (``--v``, ``--m``) as computed by the browser."""
    return float(d.execute_script("return getComputedStyle(arguments[0]).getPropertyValue(arguments[1])", el, name))


def _vals(d, row) -> list[float]:
    return [float(v) for v in d.execute_script(
        "return Array.from(arguments[0].querySelectorAll('b')).map(b => b.style.getPropertyValue('--v'))", row)]


def test_top_windows_are_the_saved_peaks_true_beside_predicted(report_driver, hand_results):
    d = report_driver
    _, _, _, n, _ = hand_results
    ev = n.evidence
    assert ev is not None and ev.examples
    for ne in ev.examples:
        card = _card(d, ne.neuron)
        head = card.find_element(*css(".acts h4")).text
        assert all(t.split(":", 1)[-1] in head for t in ev.texts)  # the card says which texts they come from
        rows = card.find_elements(*css(".acts table.ex tbody tr"))
        assert len(rows) == len(ne.examples)
        for row, x in zip(rows, ne.examples):
            assert f"{x.text} #{x.window}" in row.find_element(*css(".ex-src")).text
            t_row, p_row = row.find_element(*css("td.ex-t")), row.find_element(*css("td.ex-p"))
            tv, pv = _vals(d, t_row), _vals(d, p_row)
            assert tv == pytest.approx(x.true, abs=0.006) and pv == pytest.approx(x.predicted, abs=0.006)
            toks = d.execute_script("return Array.from(arguments[0].querySelectorAll('b')).map(b => b.textContent)",
                                    t_row)
            assert toks == [_shown(t) for t in x.tokens]
            peak = t_row.find_element(*css("b.pk"))
            assert _prop(d, peak, "--v") == pytest.approx(max(x.true), abs=0.006)
        # the boxed token of the top window holds the largest true pre-activation of all the saved windows
        first = rows[0].find_element(*css("td.ex-t b.pk"))
        assert _prop(d, first, "--v") == pytest.approx(
            max(v for x in ne.examples for v in x.true), abs=0.006)


def test_highlight_colour_follows_the_value_and_hover_gives_it_with_its_unit(report_driver, hand_results):
    d = report_driver
    _, _, _, n, _ = hand_results
    ne = n.evidence.examples[0]
    card = _card(d, ne.neuron)
    scale = _prop(d, card.find_element(*css("table.ex")), "--m")
    assert scale == pytest.approx(max(abs(v) for x in ne.examples for v in x.true), rel=5e-3)
    for b in card.find_elements(*css("td.ex-t b")):  # the peak is at full colour, a weaker token paler
        v = _prop(d, b, "--v")
        bg = b.value_of_css_property("background-color")  # rgba(255, 140, 0, alpha = v / m, at most 1)
        alpha = float(re.findall(r"[\d.]+", bg)[3]) if bg.startswith("rgba") else 1.0
        assert alpha == pytest.approx(min(1.0, max(0.0, v / scale)), abs=0.02), (v, bg)
    b = card.find_element(*css("td.ex-t b.pk"))
    d.execute_script("arguments[0].dispatchEvent(new MouseEvent('mouseover', {bubbles: true}))", b)
    title = b.get_attribute("title")
    assert title.startswith("true pre-activation ") and "pre-activation units" in title
    p = card.find_element(*css("td.ex-p b"))
    d.execute_script("arguments[0].dispatchEvent(new MouseEvent('mouseover', {bubbles: true}))", p)
    assert p.get_attribute("title").startswith("predicted pre-activation ")
    assert card.find_element(*css("table.ex thead th")).get_attribute("title")  # "max" is defined on hover
    assert severe_logs(d) == []


def test_histograms_count_each_texts_positions(report_driver, hand_results):
    from attnscope.report.html import fmt

    d = report_driver
    _, _, _, n, _ = hand_results
    for ne in n.evidence.examples:
        card = _card(d, ne.neuron)
        titles = [g.get_attribute("textContent") for g in card.find_elements(*css("figure.hists svg g title"))]
        assert len(titles) == len(ne.histograms)
        for t, h in zip(titles, ne.histograms):
            assert t == f"{h.text}: {h.n} positions, mean {fmt(h.mean)} (true pre-activation)"
        ticks = card.find_elements(*css("figure.hists svg > text"))
        assert ticks[0].get_attribute("textContent") == fmt(ne.edges[0])
        assert ticks[1].get_attribute("textContent") == fmt(ne.edges[-1])


def test_logit_tables_first_token_is_the_argmax_from_the_weights(report_driver, hand_results):
    import torch

    from attnscope.core.texts import decode_tokens
    from attnscope.models.unembed import direct_logit_effect
    from attnscope.report.html import fmt

    d = report_driver
    w, _, _, n, _ = hand_results
    lg = n.evidence.logits
    assert lg.available
    for e in lg.effects:
        eff = direct_logit_effect(w, w.W_out[0][e.neuron], lg.scale)
        card = _card(d, e.neuron)
        box = card.find_element(*css(".logits"))
        assert "direct effect only" in box.text and "later layers left out" in box.text
        assert "direct effect only" in box.find_element(*css("h4")).get_attribute("title")
        assert "logits per unit" in box.find_element(*css("ol.lg.pos")).get_attribute("title")  # unit on hover
        first = box.find_element(*css("ol.lg.pos li"))
        tok = first.find_element(*css("code")).get_attribute("textContent")
        assert tok == _shown(decode_tokens(w.tokenizer, [int(eff.argmax())])[0])
        assert first.find_element(*css("i")).get_attribute("textContent") == fmt(round(float(eff.max()), 4))
        low = box.find_element(*css("ol.lg.neg li code")).get_attribute("textContent")
        assert low == _shown(decode_tokens(w.tokenizer, [int(torch.argmin(eff))])[0])


def test_precision_curve_draws_the_threshold_and_the_random_baseline(report_driver, hand_results):
    from attnscope.report.html import fmt

    d = report_driver
    _, _, _, n, _ = hand_results
    cur = n.evidence.curve
    fig = d.find_element(*css("#precision-curve"))
    js_click(d, fig)
    pts = fig.find_element(*css("polyline.report")).get_attribute("points").split()
    assert len(pts) == sum(1 for p in cur.precision_reporting if not math.isnan(p))
    assert fmt(n.verification.precision_random) in fig.find_element(*css("line.base title")).get_attribute(
        "textContent")
    assert fmt(n.threshold.precision_target) in fig.find_element(*css("line.target title")).get_attribute(
        "textContent")
    if math.isfinite(n.threshold.value):
        assert f"T = {fmt(n.threshold.value)}" in fig.find_element(*css("line.thr title")).get_attribute(
            "textContent")
    assert fig.size["width"] > 300 and fig.size["height"] > 200
    assert severe_logs(d) == []
