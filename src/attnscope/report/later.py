"""Report section for the context neurons of later MLP layers (issue 11): per layer the effective-embedding
approximation and its error, the contextual heads of every layer ``<= L`` (or the condition that fails),
the ground-truth scores of each predictor beside the circuit-free and shuffled baselines, the ranked table
and one card per reported neuron with its predicted and true per-context effects."""

from __future__ import annotations

from typing import TYPE_CHECKING

from attnscope.report.cards import ranking_table, tokens_html
from attnscope.report.evidence import evidence_hint, examples_html, histograms_svg, logits_html
from attnscope.report.findings import neuron_name
from attnscope.report.html import badge_html, esc, fmt

if TYPE_CHECKING:
    from attnscope.later.result import LaterCard, LaterResult, LayerPiece
    from attnscope.neurons.evidence import NeuronEvidence

_PREDICTORS = {"hybrid": "hybrid (token mean + broad heads)", "full": "full composition", "heads": "heads only",
               "direct": "effective embedding only",
               "token_mean": "token-mean (circuit-free baseline)", "shuffled": "shuffled (null)"}


def _summary_table(results: list[LaterResult]) -> str:
    preds = [p for p in _PREDICTORS if any(p in r.scores for r in results)]
    head = "".join(f"<th>Spearman {esc(_PREDICTORS[p])}</th>" for p in preds)
    rows = []
    for r in results:
        p, v = r.circuit.pieces[r.layer], r.verification
        fv = "—" if p.circuit_fvu_effective is None else f"{fmt(p.circuit_fvu_effective)} / {fmt(p.circuit_fvu_true)}"
        cells = "".join(f"<td>{fmt(r.median_spearman(q) if q in r.scores else None)}</td>" for q in preds)
        cells += f"<td>{fmt(r.median_ceiling)}</td>"
        fit = v.fit_cards
        rows.append(f'<tr><td><a href="#later-L{r.layer}">{r.layer}</a></td><td>{fmt(p.approximation.fvu)}</td>'
                    f"<td>{fmt(r.circuit.approximation_with_earlier_terms.fvu)}</td><td>{fmt(p.approximation.unseen_share)}</td>"
                    f"<td>{esc(', '.join(map(str, p.heads)) or 'none')}</td><td>{fv}</td><td>{v.n_passed}</td>"
                    f"<td>{fmt(v.precision)} ({fmt(v.precision_random)})</td>"
                    f"<td>{fmt(fit.median_r if fit else None)} ({fmt(v.fit_random.median_r)})</td>{cells}</tr>")
    return ('<div class="table-wrap"><table id="later-summary" class="data"><thead><tr><th>layer L</th>'
            "<th>approx. FVU (token + position)</th><th>FVU with earlier heads</th><th>unseen share</th>"
            "<th>contextual heads of L</th><th>circuit FVU eff. / true</th><th>neurons passed</th>"
            "<th>precision (all neurons)</th><th>card median r (random)</th>"
            f"{head}<th>noise ceiling (tuning half's true d)</th></tr></thead>"
            f"<tbody>{''.join(rows)}</tbody></table></div>")


def _piece_rows(pieces: list[LayerPiece]) -> str:
    rows = []
    for p in pieces:
        fv = "—" if p.circuit_fvu_effective is None else f"{fmt(p.circuit_fvu_effective)} / {fmt(p.circuit_fvu_true)}"
        gain = "—" if p.propagation_norm is None else f"{fmt(p.propagation_norm)} (gain {fmt(p.propagation_gain)})"
        failed = [c.name for c in p.conditions if not c.ok]
        cond = (f"{badge_html(False, 'OK', 'no contextual head')} {esc(p.limiting_condition)}" if p.circuit_error else
                badge_html(not failed, "all conditions hold", "fails: " + ", ".join(failed)))
        rows.append(f"<tr><td>{p.layer}</td><td>{fmt(p.approximation.fvu)}</td><td>{fmt(p.effective.fallback_r2)}</td>"
                    f"<td>{esc(', '.join(map(str, p.heads)) or 'none')}</td><td>{fv}</td><td>{gain}</td>"
                    f"<td>{cond}</td></tr>")
    return ('<div class="table-wrap"><table class="data later-pieces"><thead><tr><th>layer l</th>'
            "<th>approx. FVU</th><th>fallback R²</th><th>contextual heads</th><th>circuit FVU eff. / true</th>"
            "<th>‖G_l‖ to the MLP of L</th>"
            f"<th>conditions</th></tr></thead><tbody>{''.join(rows)}</tbody></table></div>")


def _d_table(c: LaterCard) -> str:
    rows = "".join(f"<tr><td>{esc(s)}</td><td>{fmt(c.predicted_d[s])}</td><td>{fmt(c.true_d[s])}</td></tr>"
                   for s in c.true_d)
    return (f'<table class="data small"><thead><tr><th>context</th><th>predicted d</th><th>true d</th></tr></thead>'
            f"<tbody>{rows}</tbody></table>")


def _card(L: int, c: LaterCard, ev: NeuronEvidence | None = None) -> str:
    lab = f"{esc(c.label)} <i>({esc(c.label_evidence)})</i>" if c.label else "<i>unlabelled</i>"
    neg = (f"{esc(c.label_negative)} <i>({esc(c.label_negative_evidence)})</i>" if c.label_negative
           else "<i>unlabelled</i>")
    parts = ", ".join(f"{esc(k)} {esc(fmt(v))}" for k, v in c.parts.items())
    return f"""
<article class="neuron-card" id="neuron-{L}-{c.index}" data-index="{c.index}">
<header><h3>{neuron_name(c.index, L)}</h3>
<p class="labels"><span class="lab pos">+ {lab}</span> <span class="lab neg">− {neg}</span></p></header>
<dl class="stats-inline">
<div><dt>rank</dt><dd>{fmt(c.rank)}</dd></div>
<div><dt>predicted |d|</dt><dd>{fmt(c.sensitivity)}</dd></div>
<div><dt>r / FVU vs true pre-activation</dt><dd>{fmt(c.r)} / {fmt(c.fvu)}</dd></div>
</dl>
<div class="tok-cols">
<div><h4>raises (+)</h4>{tokens_html(c.top_positive_tokens, "pos")}</div>
<div><h4>lowers (−)</h4>{tokens_html(c.top_negative_tokens, "neg")}</div>
</div>
{_d_table(c)}
<p class="muted small">share of the true pre-activation's variance per term: {parts}</p>
{_evidence(L, c.index, ev)}
</article>"""


LATER_PREDICTION = ("the cards' per-position prediction (the ranking predictor's terms plus a bias fitted on the "
                    "tuning windows: the prediction their r / FVU score)")


def _evidence(L: int, k: int, ev: NeuronEvidence | None) -> str:
    if ev is None:
        return ""
    ne, lg = ev.for_neuron(k)
    return (f'{examples_html(ne, ev.texts, f"evidence-hint-L{L}", LATER_PREDICTION)}<div class="ev-cols">'
            f"{histograms_svg(ne)}{logits_html(ev.logits, lg)}</div>")


def _full_fit(v) -> str:
    if v.fit_random_full is None:
        return ""
    c = v.fit_cards_full.median_r if v.fit_cards_full else None
    return f"; the weights-only composition: {fmt(c)} and {fmt(v.fit_random_full.median_r)}"


def _layer(r: LaterResult) -> str:
    v, a = r.verification, r.circuit.approximation_with_earlier_terms
    cards = "".join(_card(r.layer, c, r.evidence) for c in r.cards)
    card_r = fmt(v.fit_cards.median_r if v.fit_cards else None)
    return f"""
<section class="later-layer" id="later-L{r.layer}">
<h3>MLP of layer {r.layer}</h3>
<p>Residual entering layer {r.layer}: token + position leave {fmt(r.circuit.pieces[r.layer].approximation.fvu)} of its
(normalised) variance unexplained on the reporting windows, {fmt(a.fvu)} with the earlier layers' heads
propagated. Ranked by the {esc(v.fit_predictor)} predictor, {v.n_passed} neurons pass the measured threshold
{fmt(r.threshold.value)} (precision on the reporting
half {fmt(v.precision)}; all neurons {fmt(v.precision_random)}). Per-position check of the {esc(v.fit_predictor)}
predictor against the true pre-activation (reporting windows): median r {card_r}
over the cards, {fmt(v.fit_random.median_r)} over random neurons{_full_fit(v)}.</p>
{_piece_rows(r.circuit.pieces)}
{ranking_table(r.rows, f"later-ranking-L{r.layer}", layer=r.layer)}
{evidence_hint(r.evidence.texts, r.evidence.half, r.evidence.logits.note, f"evidence-hint-L{r.layer}",
               LATER_PREDICTION) if r.evidence is not None and r.cards else ""}
<div class="cards">{cards or '<p class="note">No neuron passed the threshold.</p>'}</div>
</section>"""


def later_section(results: list[LaterResult]) -> str:
    """The later-layer section: a summary row per layer, then each layer's conditions, ranking and cards."""
    results = sorted(results, key=lambda r: r.layer)
    return f"""
<section id="later-layers">
<h2>Context neurons of later layers</h2>
<p>Each layer's input is approximated by a token-conditional effective embedding plus a positional part
(estimated on the tuning halves of the labelled sources); the layer-0 method then runs on every layer ≤ L and
the heads' summaries are composed into the MLP of L (docs/later-layers.md). Scores are on the reporting halves:
Spearman between each predictor's and the true per-neuron one-vs-rest effect sizes, median over the contrasts,
beside the circuit-free token-mean predictor and the shuffled null.</p>
{_summary_table(results)}
{"".join(_layer(r) for r in results)}
</section>"""
