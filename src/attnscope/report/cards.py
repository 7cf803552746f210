"""Report section for the context neurons: summary, figures and one card per neuron (static SVG traces)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

from attnscope.neurons.contrast import TOKEN_SCORE_DEFINITION
from attnscope.neurons.label_check import checked_labels
from attnscope.report.evidence import evidence_hint, examples_html, histograms_svg, logits_html, precision_svg
from attnscope.report.findings import ScopeVerdicts, d_scatter, full_ranking, neuron_name
from attnscope.report.html import NEURON_FIGURES, badge_html, esc, figures_html, fmt, token_html

if TYPE_CHECKING:
    from attnscope.neurons.find import NeuronCard, NeuronResult, NeuronRow


def _trace_svg(tr: dict, name: str, kind: str) -> str:
    """Small static SVG of the true vs predicted contribution on one text."""
    t = tr.get(name) or {}
    y, yh = list(t.get("true") or []), list(t.get("pred") or [])
    W, H, ml, mr, mt, mb = 300, 110, 34, 6, 16, 16
    vals = [v for v in y + yh if v is not None and math.isfinite(v)]
    title = f'<text x="{ml}" y="11" class="svg-title">{esc(name)} [{esc(kind)}]</text>'
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
            f'<text x="{ml - 3}" y="{mt + 4}" class="tick" text-anchor="end">{esc(fmt(hi))}</text>'
            f'<text x="{ml - 3}" y="{H - mb}" class="tick" text-anchor="end">{esc(fmt(lo))}</text>'
            f'<text x="{W - mr}" y="{H - 3}" class="tick" text-anchor="end">position →</text>')
    return (f'<svg class="trace" viewBox="0 0 {W} {H}" xmlns="http://www.w3.org/2000/svg" role="img" '
            f'aria-label="true vs predicted contribution on {esc(name)}">{title}{axes}{zero}'
            f'{line(y, "true")}{line(yh, "pred")}</svg>')


def tokens_html(toks: list, sign: str) -> str:
    items = []
    for t in toks or []:
        tok, score = (t[0], t[1]) if isinstance(t, (list, tuple)) else (t, None)
        items.append(f'<li><code class="tok">{token_html(str(tok))}</code>'
                     f'<span class="score">{esc(fmt(score))}</span></li>')
    return f'<ol class="tokens {sign}">{"".join(items)}</ol>' if items else '<p class="note">none</p>'


def _trace_map(neurons: NeuronResult) -> dict:
    """``{neuron: {text: {"true": ..., "pred": ...}}}``: the true pre-activation and the full explanation."""
    out: dict = {}
    for t in neurons.traces:
        out.setdefault(str(t.neuron), {})[t.text] = {"true": t.true_pre, "pred": t.predicted_pre}
    return out


def _evidence_html(neurons: NeuronResult, k: int) -> str:
    """The card's activation examples, histograms and direct logit effect (none for results saved without them)."""
    ev = neurons.evidence
    if ev is None:
        return ""
    ne, lg = ev.for_neuron(k)
    return (f'{examples_html(ne, ev.texts)}<div class="ev-cols">{histograms_svg(ne)}'
            f"{logits_html(ev.logits, lg)}</div>")


def _neuron_card(r: NeuronCard, traces: dict, verdicts: ScopeVerdicts | None = None, best: str = "",
                 open_: bool = False, predicted_d: float = 0.0, evidence: str = "") -> str:
    """One card per reported neuron: labels (with their evidence), its scope verdict, fits, top tokens and the
    traces; collapsible (the first few open)."""
    idx = r.index
    texts = [best, r.positive_text, r.negative_text]
    mark = verdicts.mark(texts, detail=True) if verdicts is not None else ""
    out = bool(verdicts.for_texts(texts)) if verdicts is not None else False
    tr = traces.get(str(idx), {}) or {}
    pos_t, neg_t = r.positive_text, r.negative_text
    svgs = _trace_svg(tr, pos_t, "positive") if pos_t else ""
    if neg_t and neg_t != pos_t:
        svgs += _trace_svg(tr, neg_t, "negative")
    d_html = ", ".join(f"{esc(k)} {esc(fmt(v))}" for k, v in sorted(r.true_d.items(), key=lambda kv: -kv[1]))
    pos_l, neg_l, withheld = checked_labels(r.label, r.label_negative, best, predicted_d)
    lab = f"{esc(pos_l)} <i>({esc(r.label_evidence)})</i>" if pos_l else "<i>unlabelled</i>"
    lab_neg = f"{esc(neg_l)} <i>({esc(r.label_negative_evidence)})</i>" if neg_l else "<i>unlabelled</i>"
    withheld_html = "".join(f'<p class="small label-withheld">{esc(x)}</p>' for x in withheld)
    search = " ".join(x for x in [neuron_name(idx), str(idx), best, pos_l or "", neg_l or "",
                                  r.positive_text, r.negative_text] if x).lower()
    return f"""
<article class="neuron-card" id="neuron-0-{esc(idx)}" data-index="{esc(idx)}" data-search="{esc(search)}"
 data-scope="{'out' if out else 'in'}"><details{' open' if open_ else ''}>
<summary><h3>{neuron_name(idx)}</h3> <span class="small">rank {fmt(r.rank)} · context {esc(best or '—')}</span>
{mark}
<p class="labels"><span class="lab pos" title="label of the positive token evidence">+ {lab}</span>
<span class="lab neg" title="label of the negative token evidence">− {lab_neg}</span></p>{withheld_html}</summary>
<dl class="stats-inline">
<div><dt>rank</dt><dd>{fmt(r.rank)}</dd></div>
<div><dt>predicted |d|</dt><dd>{fmt(r.sensitivity)}</dd></div>
<div><dt>r / FVU (full)</dt><dd>{fmt(r.r)} / {fmt(r.fvu)}</dd></div>
<div><dt>within-text r / FVU</dt><dd>{fmt(r.r_within)} / {fmt(r.fvu_within)}</dd></div>
<div><dt>contextual heads r</dt><dd>{fmt(r.contextual_r)}</dd></div>
<div><dt>fired on calibration</dt><dd>{badge_html(r.fired_on_calibration, "yes", "no")}</dd></div>
</dl>
<div class="tok-cols">
<div><h4>raises (+)</h4>{tokens_html(r.top_positive_tokens, "pos")}</div>
<div><h4>lowers (−)</h4>{tokens_html(r.top_negative_tokens, "neg")}</div>
</div>
<div class="traces">{svgs}</div>
<p class="legend"><span class="sw true"></span>true pre-activation
<span class="sw pred"></span>full layer-0 explanation from weights</p>
{f'<p class="muted small">true one-vs-rest effect size d by text: {d_html}</p>' if d_html else ""}
{evidence}
</details></article>"""


def ranking_table(neuron_rows: list[NeuronRow], table_id: str, n: int = 15, layer: int = 0) -> str:
    """The top ``n`` rows of a ranked neuron table of MLP ``layer`` (the later layers' sections use it)."""
    rows = "".join(
        f"<tr><td>{r.rank}</td><td>{neuron_name(r.index, layer)}</td><td>{fmt(r.sensitivity)}</td>"
        f"<td>{esc(r.best_contrast)}</td>"
        f"<td>{fmt(r.predicted_d)}</td><td>{badge_html(r.passed, 'yes', 'no')}</td>"
        f"<td>{' '.join(f'<code class=tok>{token_html(t)}</code>' for t in r.top_positive_tokens)}</td></tr>"
        for r in neuron_rows[:n])
    return (f'<div class="table-wrap"><table id="{table_id}" class="data"><thead><tr><th>rank</th><th>neuron</th>'
            f"<th>predicted |d|</th><th>contrast</th><th>predicted d</th><th>passes</th><th>top tokens</th></tr>"
            f"</thead><tbody>{rows}</tbody></table></div>")


def neuron_section(neurons: NeuronResult, figures: dict[str, Path], used: set[str],
                   verdicts: ScopeVerdicts | None = None) -> str:
    """Context neurons: summary with random baselines, the ranked table, figures and one card per neuron."""
    recs = neurons.records
    s = neurons.summary()
    rws = {r.index: r for r in neurons.rows}
    kept = [checked_labels(r.label, r.label_negative, rws[r.index].best_contrast, rws[r.index].predicted_d)
            if r.index in rws else (r.label, r.label_negative, []) for r in recs]
    labels = sorted({p for p, _, _ in kept if p} | {n for _, n, _ in kept if n})
    stats = [("pass / scored", f"{fmt(neurons.n_selected)} / {fmt(neurons.n_scored)}"),
             ("precision, reporting half (all neurons)", f"{fmt(s['precision'])} ({fmt(s['precision_random'])})"),
             ("median FVU (random)", f"{fmt(s['median_fvu'])} ({fmt(s['median_fvu_random'])})"),
             ("within-text FVU (random)", f"{fmt(s['median_fvu_within'])} ({fmt(s['median_fvu_within_random'])})"),
             ("did not fire on calibration", fmt(sum(not r.fired_on_calibration for r in recs)))]
    stat_html = "".join(f'<div class="stat"><div class="v">{v}</div><div class="k">{esc(k)}</div></div>'
                        for k, v in stats)
    verdicts = verdicts or ScopeVerdicts.of(neurons.circuit, neurons)
    rows = {r.index: r for r in neurons.rows}
    traces = _trace_map(neurons)
    cards = "".join(_neuron_card(r, traces, verdicts, rows[r.index].best_contrast if r.index in rows else "", j < 4,
                                 rows[r.index].predicted_d if r.index in rows else 0.0,
                                 _evidence_html(neurons, r.index)) for j, r in enumerate(recs))
    return f"""
<section id="neurons">
<h2>Context neurons (layer-0 MLP)</h2>
<p>Every neuron is ranked by its predicted context sensitivity: the largest predicted effect size over the
one-vs-rest contrasts of the held-out sources, from the full layer-0 explanation and the sources' token counts
(no forward pass over them). The threshold is measured: the longest prefix of the ranking whose precision on the
tuning half of the held-out windows is at least {esc(fmt(neurons.threshold.precision_target))}. Reported neurons
are scored on the reporting half against their true pre-activation, with random neurons of the layer beside them.</p>
<div class="stats" id="neuron-summary">{stat_html}</div>
{full_ranking(neurons.rows, neurons.cards, verdicts)}
<div class="figs">{d_scatter(neurons.rows, neurons.threshold.value)}
{precision_svg(neurons.evidence.curve if neurons.evidence is not None else None)}</div>
{f'<p>Labels (token evidence): {", ".join(esc(x) for x in labels)}</p>' if labels else ""}
{figures_html(NEURON_FIGURES, figures, used)}
<h3 id="neuron-cards">Neuron cards ({len(recs)})</h3>
<div class="card-tools"><input type="search" id="card-search" placeholder="filter cards: L0N172, label, text…"
 aria-label="filter the neuron cards"> <label><input type="checkbox" id="card-out-only"> only outside scope</label>
<button type="button" id="cards-open">open all</button> <button type="button" id="cards-close">close all</button>
<span id="card-count" class="small">{len(recs)} of {len(recs)} shown</span></div>
<p class="hint">Tokens are shown as the tokenizer writes them, with whitespace made visible (␣ space, ↵ newline,
⇥ tab); the number is the {esc(TOKEN_SCORE_DEFINITION)}.
The page (<code>attnscope serve</code>) shows the same numbers.</p>
{evidence_hint(neurons.evidence.texts, neurons.evidence.half, neurons.evidence.logits.note)
 if neurons.evidence is not None else ""}
<div class="cards">{cards or '<p class="note">No neuron passed the threshold.</p>'}</div>
</section>"""
