"""The cards' evidence (issue 21, item 3): top activating windows highlighted by the true and the predicted
pre-activation, a histogram per held-out text, the direct effect on output tokens; and the precision against the
threshold.  Typed results in (:mod:`attnscope.neurons.evidence`), static HTML and inline SVG out."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from attnscope.report.html import esc, fmt

if TYPE_CHECKING:
    from attnscope.neurons.evidence import DirectLogits, LogitEffect, NeuronExamples, PrecisionCurve

PRE_UNIT = "pre-activation units (the neuron's input, before its nonlinearity)"
_SHOWN = {"\n": "↵", "\t": "⇥", "\r": "␍"}


def _tok(t: str) -> str:
    """A token as it reads in running text (spaces kept, line breaks and tabs shown, a run of more than two
    spaces shortened to ``␣×N``), escaped."""
    shown = "".join(_SHOWN.get(ch, ch) for ch in t)
    return esc(re.sub(r" {3,}", lambda m: f" ␣×{len(m.group())} ", shown)) or "∅"


def _num(v: float) -> str:
    """A value for the page's own use (``--v``): two decimals, no trailing zeros."""
    t = f"{v:.2f}".rstrip("0").rstrip(".")
    return "0" if t in ("-0", "") else t


def _row(tokens: list[str], vals: list[float], peak: int, what: str) -> str:
    """One highlighted row: ``<b style=--v:VALUE>`` per token; the style sheet turns ``--v`` (over the table's
    ``--m``) into the colour, the script into the hover text; class ``pk``: the peak of the true pre-activation."""
    out = [f"<b{' class=pk' if i == peak else ''} style=--v:{_num(v)}>{_tok(t)}</b>"
           for i, (t, v) in enumerate(zip(tokens, vals))]
    return f'<td class="ex-{what}">{"".join(out)}</td>'


EXAMPLES_HINT = ("<b>Top activating windows</b> (each card): the three windows of the held-out texts' reporting half "
                 "with the largest true pre-activation, one per window, the peak boxed. Each token is coloured by the "
                 'pre-activation at its position (<span class="ex-key">orange</span> positive, <span class="ex-key n">'
                 "blue</span> negative; full colour = the largest |true value| in the card's windows), by the TRUE "
                 "value (the model's own forward pass) and, beside it, by the PREDICTED value (the full layer-0 "
                 "explanation from the weights: the dashed line of the traces). Hover a token for its value, in "
                 f"{PRE_UNIT}. <b>Histograms</b>: the true pre-activation at every scored position of each held-out "
                 "text's reporting half; bar height = share of the text's positions in the bin (the tallest bin full "
                 "height). <b>Direct effect on output tokens</b>: {logits}.")


def evidence_hint(texts: list[str], half: str, logits_note: str, el_id: str = "evidence-hint",
                  predicted: str = "") -> str:
    """The one explanation of the cards' evidence (shown once above the cards); ``predicted``: what the
    predicted row is, where it is not the layer-0 explanation."""
    names = ", ".join(esc(t.split(":", 1)[-1]) for t in texts)
    pred = f" Here the predicted value is {esc(predicted)}." if predicted else ""
    return (f'<p class="hint" id="{el_id}">{EXAMPLES_HINT.format(logits=esc(logits_note))}{pred} Windows and '
            f"histograms come from {esc(half)}: {names}.</p>")


LAYER0_PREDICTION = "the full layer-0 explanation from the weights"


def examples_html(ne: NeuronExamples | None, texts: list[str], hint: str = "evidence-hint",
                  predicted: str = LAYER0_PREDICTION) -> str:
    """The neuron's top activating windows: true and predicted pre-activation side by side, one colour scale."""
    if ne is None or not ne.examples:
        return ""
    scale = max(abs(v) for x in ne.examples for v in x.true) or 1.0
    rows = "".join(
        f'<tr><td class="ex-src">{esc(x.text)} #{x.window}<br>max {fmt(x.max_true)}</td>'
        f'{_row(x.tokens, x.true, x.peak, "t")}{_row(x.tokens, x.predicted, x.peak, "p")}</tr>' for x in ne.examples)
    names = ", ".join(esc(t.split(":", 1)[-1]) for t in texts)
    return (f'<div class="acts"><h4>Top activating windows <span class="small">(held-out texts, reporting half: '
            f'{names}; <a href="#{hint}">how to read</a>)</span></h4><div class="table-wrap">'
            f'<table class="data ex" style="--m:{scale:.3g}"><thead><tr><th title="the held-out text, the '
            'window\'s index in its reporting half, and the largest true pre-activation in the window">'
            "text #window, max</th>"
            '<th title="the model\'s own pre-activation">true</th>'
            f'<th title="{esc(predicted)}">predicted</th></tr></thead><tbody>{rows}</tbody></table></div></div>')


def histograms_svg(ne: NeuronExamples | None) -> str:
    """One row per held-out text: the share of its positions in each bin of the true pre-activation."""
    if ne is None or not ne.histograms:
        return ""
    lo, hi = ne.edges[0], ne.edges[-1]
    nb = len(ne.edges) - 1
    bw, lab, mr, rh, top = 10, 126, 6, 15, 4
    W = lab + bw * nb + mr
    X = lambda v: lab + bw * nb * (v - lo) / (hi - lo)  # noqa: E731
    H = top + rh * len(ne.histograms) + 22
    rows = []
    for j, h in enumerate(ne.histograms):
        base = top + rh * (j + 1) - 1
        m = max(h.counts) or 1
        ys = [round(base - (rh - 3) * c / m) for c in h.counts]
        path, prev, run = f"M{lab} {base}", base, 0
        for y in ys:
            if y != prev:
                path += (f"h{run}" if run else "") + f"V{y}"
                prev, run = y, 0
            run += bw
        path += f"h{run}V{base}Z"
        rows.append(f'<g><title>{esc(h.text)}: {h.n} positions, mean {fmt(h.mean)} (true pre-activation)</title>'
                    f'<text x="{lab - 3}" y="{base - 2}" class="tick" text-anchor="end">{esc(h.text[:22])}</text>'
                    f'<path d="{path}" class="hist"/></g>')
    zero = (f'<line x1="{X(0):.0f}" x2="{X(0):.0f}" y1="{top}" y2="{H - 20}" class="zero"/>' if lo < 0 < hi else "")
    axis = (f'<text x="{lab}" y="{H - 10}" class="tick">{fmt(lo)}</text>'
            f'<text x="{W - mr}" y="{H - 10}" class="tick" text-anchor="end">{fmt(hi)}</text>'
            f'<text x="{(lab + W) / 2:.0f}" y="{H - 1}" class="tick" text-anchor="middle">true pre-activation</text>')
    return (f'<figure class="hists"><svg viewBox="0 0 {W} {H}" xmlns="http://www.w3.org/2000/svg" role="img" '
            f'aria-label="histogram of the true pre-activation per held-out text">{"".join(rows)}{zero}{axis}</svg>'
            "<figcaption>True pre-activation per held-out text (hover a row: count, mean)</figcaption></figure>")


def logits_html(lg: DirectLogits | None, e: LogitEffect | None) -> str:
    """The direct effect on output tokens, or why the model has none."""
    if lg is None:
        return ""
    if not lg.available or e is None:
        return f'<div class="logits"><h4>Direct effect on output tokens</h4><p class="note">{esc(lg.note)}.</p></div>'

    def col(items: list[tuple[str, float]], cls: str) -> str:
        li = "".join(f"<li><code>{_tok(t)}</code><i>{fmt(v)}</i></li>" for t, v in items)
        return f'<ol class="lg {cls}" title="logits per unit of the neuron\'s activation (direct effect)">{li}</ol>'

    return (f'<div class="logits"><h4 title="{esc(lg.note)}">Direct effect on output tokens</h4><p class="legend">'
            f"logits per unit of activation through W<sub>U</sub>, final norm frozen at s = {fmt(lg.scale)}; "
            f"<b>direct effect only</b>: later layers left out</p>"
            f'<div class="tok-cols"><div><h5>raises</h5>{col(e.top, "pos")}</div><div><h5>lowers</h5>'
            f'{col(e.bottom, "neg")}</div></div></div>')


def precision_svg(c: PrecisionCurve | None) -> str:
    """Precision of the ranking's prefixes against the threshold, both halves, with the base rate (random
    neurons), the precision target and the tuned threshold drawn in."""
    if c is None or not c.thresholds:
        return ""
    W, H, ml, mr, mt, mb = 460, 300, 44, 12, 14, 40
    xmax = max(c.thresholds) * 1.02 or 1.0
    X = lambda v: ml + (W - ml - mr) * min(v, xmax) / xmax  # noqa: E731
    Y = lambda v: mt + (H - mt - mb) * (1 - v)  # noqa: E731

    def line(ys: list[float], cls: str, title: str) -> str:
        pts = " ".join(f"{X(t):.1f},{Y(p):.1f}" for t, p in zip(c.thresholds, ys) if p == p)
        return f'<polyline points="{pts}" class="{cls}"><title>{esc(title)}</title></polyline>'

    def hline(v: float, cls: str, title: str, label: str) -> str:
        return (f'<line x1="{ml}" x2="{W - mr}" y1="{Y(v):.1f}" y2="{Y(v):.1f}" class="{cls}">'
                f'<title>{esc(title)}</title></line><text x="{W - mr - 2}" y="{Y(v) - 3:.1f}" class="tick" '
                f'text-anchor="end">{esc(label)}</text>')

    grid = "".join(f'<line x1="{ml}" x2="{W - mr}" y1="{Y(v):.1f}" y2="{Y(v):.1f}" class="grid"/>'
                   f'<text x="{ml - 4}" y="{Y(v) + 3:.1f}" class="tick" text-anchor="end">{v:g}</text>'
                   for v in (0, 0.25, 0.5, 0.75, 1))
    step = max(1, round(xmax / 5))
    xt = "".join(f'<text x="{X(v):.1f}" y="{H - mb + 13}" class="tick" text-anchor="middle">{v:g}</text>'
                 for v in range(0, int(xmax) + 1, step))
    thr = (f'<line x1="{X(c.threshold):.1f}" x2="{X(c.threshold):.1f}" y1="{mt}" y2="{H - mb}" class="thr">'
           f"<title>tuned threshold T = {fmt(c.threshold)} (predicted |d|)</title></line>"
           f'<text x="{X(c.threshold) + 3:.1f}" y="{mt + H * 0.55:.0f}" class="tick">T = {fmt(c.threshold)}</text>'
           if c.threshold == c.threshold and c.threshold < float("inf") else "")
    base, target = fmt(c.base_rate_reporting), fmt(c.precision_target)
    return f"""
<figure class="fig" id="precision-curve"><svg viewBox="0 0 {W} {H}" xmlns="http://www.w3.org/2000/svg" role="img"
 aria-label="precision of the ranking against the threshold">
{grid}{xt}{hline(c.base_rate_reporting, "base", f"random neurons (base rate), reporting half: {base}",
                f"random neurons {base}")}
{hline(c.precision_target, "target", f"precision target {target} (set on the tuning half)", f"target {target}")}{thr}
{line(c.precision_tuning, "tune", "tuning half (sets the threshold)")}
{line(c.precision_reporting, "report", "reporting half (the reported precision)")}
<text x="{(ml + W - mr) / 2}" y="{H - 6}" class="axis-label" text-anchor="middle">threshold T on predicted |d|</text>
<text x="12" y="{(mt + H - mb) / 2}" class="axis-label" text-anchor="middle"
 transform="rotate(-90 12 {(mt + H - mb) / 2})">precision of the neurons with predicted |d| ≥ T</text></svg>
<figcaption>Precision (share of the neurons above T with true |d| ≥ 1 and the predicted sign in some contrast)
against the threshold T: <span class="k-report">reporting half</span> (solid), <span class="k-tune">tuning
half</span> (dashed). Baselines: random neurons (the base rate, {fmt(c.base_rate_reporting)} on the reporting
half, dotted) and the precision target {fmt(c.precision_target)}; the vertical line is the tuned threshold
T = {fmt(c.threshold)}. Hover a line for its definition.</figcaption></figure>"""
