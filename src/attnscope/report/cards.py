"""Report section for the context neurons: summary, figures and one card per neuron (static SVG traces)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

from .html import NEURON_FIGURES, _badge, _esc, _figures, _fmt, _median, _token

if TYPE_CHECKING:
    from ..neurons import NeuronRecord, NeuronResult


def _trace_svg(tr: dict, name: str, kind: str) -> str:
    """Small static SVG of the true vs predicted contribution on one text."""
    t = tr.get(name) or {}
    y, yh = list(t.get("true") or []), list(t.get("pred") or [])
    W, H, ml, mr, mt, mb = 300, 110, 34, 6, 16, 16
    vals = [v for v in y + yh if v is not None and math.isfinite(v)]
    title = f'<text x="{ml}" y="11" class="svg-title">{_esc(name)} [{_esc(kind)}]</text>'
    if not vals:
        return (f'<svg class="trace" viewBox="0 0 {W} {H}" xmlns="http://www.w3.org/2000/svg">{title}'
                f'<text x="{W / 2}" y="{H / 2}" text-anchor="middle" class="svg-note">no trace</text></svg>')
    lo, hi = min(vals), max(vals)
    if hi - lo < 1e-9:
        lo, hi = lo - 1, hi + 1
    pad = 0.05 * (hi - lo)
    lo, hi = lo - pad, hi + pad
    n = max(len(y), len(yh), 2)

    def pt(i: int, v: float) -> str:
        return f"{ml + (W - ml - mr) * i / (n - 1):.1f},{mt + (H - mt - mb) * (hi - v) / (hi - lo):.1f}"

    def line(vs: list, cls: str) -> str:
        pts = " ".join(pt(i, v) for i, v in enumerate(vs) if v is not None and math.isfinite(v))
        return f'<polyline class="{cls}" points="{pts}"/>'

    zero = ""
    if lo < 0 < hi:
        zy = mt + (H - mt - mb) * hi / (hi - lo)
        zero = f'<line class="zero" x1="{ml}" x2="{W - mr}" y1="{zy:.1f}" y2="{zy:.1f}"/>'
    axes = (f'<line class="axis" x1="{ml}" x2="{ml}" y1="{mt}" y2="{H - mb}"/>'
            f'<text x="{ml - 3}" y="{mt + 4}" class="tick" text-anchor="end">{_esc(_fmt(hi))}</text>'
            f'<text x="{ml - 3}" y="{H - mb}" class="tick" text-anchor="end">{_esc(_fmt(lo))}</text>'
            f'<text x="{W - mr}" y="{H - 3}" class="tick" text-anchor="end">position →</text>')
    return (f'<svg class="trace" viewBox="0 0 {W} {H}" xmlns="http://www.w3.org/2000/svg" role="img" '
            f'aria-label="true vs predicted contribution on {_esc(name)}">{title}{axes}{zero}'
            f'{line(y, "true")}{line(yh, "pred")}</svg>')


def _tokens_html(toks: list, sign: str) -> str:
    items = []
    for t in toks or []:
        tok, score = (t[0], t[1]) if isinstance(t, (list, tuple)) else (t, None)
        items.append(f'<li><code class="tok">{_token(str(tok))}</code><span class="score">{_esc(_fmt(score))}</span></li>')
    return f'<ol class="tokens {sign}">{"".join(items)}</ol>' if items else '<p class="note">none</p>'


def _neuron_card(r: NeuronRecord, traces: dict) -> str:
    """One card per verified neuron: labels, statistics, top tokens and the true vs predicted traces."""
    idx = r.index
    lab = r.label
    lab_neg = r.label_negative
    fired = r.fired_on_calibration
    tr = traces.get(str(idx), {}) or {}
    pos_t, neg_t = r.positive_text, r.negative_text
    svgs = _trace_svg(tr, pos_t, "positive") if pos_t else ""
    if neg_t and neg_t != pos_t:
        svgs += _trace_svg(tr, neg_t, "negative")
    means = r.mean_pre_by_text or {}
    means_html = ", ".join(f"{_esc(k)} {_esc(_fmt(v))}" for k, v in sorted(means.items(), key=lambda kv: -kv[1]))
    return f"""
<article class="neuron-card" id="neuron-{_esc(r.layer)}-{_esc(idx)}" data-index="{_esc(idx)}">
<header><h3>Neuron {_esc(r.layer)}.{_esc(idx)}</h3>
<p class="labels"><span class="lab pos" title="label of the positive evidence">+ {_esc(lab) if lab else '<i>unlabelled</i>'}</span>
<span class="lab neg" title="label of the negative evidence">− {_esc(lab_neg) if lab_neg else '<i>unlabelled</i>'}</span></p></header>
<dl class="stats-inline">
<div><dt>effect</dt><dd>{_fmt(r.effect)}</dd></div>
<div><dt>swing +/−</dt><dd>{_fmt(r.swing_positive)} / {_fmt(r.swing_negative)}</dd></div>
<div><dt>r</dt><dd>{_fmt(r.r)}</dd></div>
<div><dt>FVU</dt><dd>{_fmt(r.fvu)}</dd></div>
<div><dt>per-text median r</dt><dd>{_fmt(r.r_per_text_median)}</dd></div>
<div><dt>fired on calibration</dt><dd>{_badge(fired, "yes", "no") if fired is not None else "—"}</dd></div>
</dl>
<div class="tok-cols">
<div><h4>raises (+)</h4>{_tokens_html(r.top_positive_tokens, "pos")}</div>
<div><h4>lowers (−)</h4>{_tokens_html(r.top_negative_tokens, "neg")}</div>
</div>
<div class="traces">{svgs}</div>
<p class="legend"><span class="sw true"></span>true contribution of the contextual heads
<span class="sw pred"></span>predicted from weights</p>
{f'<p class="muted small">mean pre-activation by text: {means_html}</p>' if means_html else ""}
</article>"""


def neuron_section(neurons: NeuronResult, figures: dict[str, Path], used: set[str]) -> str:
    """Context neurons: summary statistics, figures and one card per verified neuron."""
    recs = neurons.records
    not_fired = sum(not r.fired_on_calibration for r in recs)
    labels = sorted({r.label for r in recs if r.label} | {r.label_negative for r in recs if r.label_negative})
    stats = [("found / scored", f"{_fmt(neurons.n_selected)} / {_fmt(neurons.n_scored)}"),
             ("verified (cards)", _fmt(len(recs))), ("median r", _fmt(_median([r.r for r in recs]))),
             ("median FVU", _fmt(_median([r.fvu for r in recs]))), ("did not fire on calibration", _fmt(not_fired))]
    stat_html = "".join(f'<div class="stat"><div class="v">{v}</div><div class="k">{_esc(k)}</div></div>'
                        for k, v in stats)
    cards = "".join(_neuron_card(r, neurons.traces) for r in recs)
    return f"""
<section id="neurons">
<h2>Context neurons (layer-0 MLP)</h2>
<p>Every token gets a score for every neuron by composing the contextual circuit with the MLP's input
weights; a neuron is reported when the contextual heads can move its pre-activation by at least
{_esc(_fmt(neurons.settings.get("effect_min")))} calibration standard deviations and it is an outlier among the layer's
neurons (method §8). Each reported neuron is verified on held-out texts: Pearson r and FVU between the predicted
and the true contribution of the contextual heads (the method reports median r ≈ 0.95, FVU ≈ 0.14 on GPT-2 Small).</p>
<div class="stats" id="neuron-summary">{stat_html}</div>
{f'<p>Labels: {", ".join(_esc(x) for x in labels)}</p>' if labels else ""}
{_figures(NEURON_FIGURES, figures, used)}
<h3>Neurons</h3>
<p class="hint">Tokens are shown as the tokenizer writes them, with whitespace made visible (␣ space, ↵ newline,
⇥ tab); the number is the token's score, in units of the neuron's pre-activation.</p>
<div class="cards">{cards or '<p class="note">No neuron passed the selection.</p>'}</div>
</section>"""
