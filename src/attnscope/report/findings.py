"""The report's first screen and the scope verdict carried to every neuron (issue 21, items 1-2).

* :class:`ScopeVerdicts`: the stated conditions that FAILED, where (the calibration text, or a held-out text),
  with the measured value.  The findings banner, the circuit section's banner, the ranking rows and the cards
  all count from this one object, which lists exactly the rows the Scope section marks FAILED.
* :func:`findings_section`: what the report claims, within one screen: contextual heads, passing neurons beside
  random neurons, the fit beside the random neurons' fit, the contrast beside its noise ceiling and null (or
  "not measured"), where the explanation does not hold, and the top neurons with their verdicts.
* :func:`full_ranking`: every neuron, sortable and searchable, predicted and true d side by side, each row
  linked to its card and carrying its verdict.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from attnscope.neurons.label_check import checked_labels
from attnscope.report.html import esc, fmt, token_html

if TYPE_CHECKING:
    from attnscope.circuit.build import Circuit
    from attnscope.circuit.result import Condition
    from attnscope.neurons.find import NeuronCard, NeuronResult, NeuronRow


def neuron_name(index: int, layer: int = 0) -> str:
    """TransformerLens-style name: ``L0N172`` is neuron 172 of the layer-0 MLP."""
    return f"L{layer}N{index}"


def _text_key(t: str) -> str:
    """``bundled:code_python``, ``code_python`` and ``.../code_python.txt`` name the same held-out text."""
    return Path(t.split(":", 1)[-1]).stem if t else t


@dataclass
class Failure:
    where: str  # "calibration" or a held-out text's name
    name: str
    measured: float
    holds_when: str

    def short(self) -> str:
        return f"{self.name} on {self.where}: {fmt(self.measured)} (holds when {self.holds_when})"


@dataclass
class ScopeVerdicts:
    calibration: list[Failure] = field(default_factory=list)  # fail on the calibration text: apply to everything
    by_text: dict[str, list[Failure]] = field(default_factory=dict)  # held-out text -> its failing conditions
    n_conditions: int = 0  # stated conditions with a pass/fail status (the Scope section's FAILED/OK rows)

    @classmethod
    def of(cls, circ: Circuit | None, neurons: NeuronResult | None) -> ScopeVerdicts:
        v = cls()
        conds: list[Condition] = list(circ.conditions) if circ is not None else []
        v.n_conditions = len(conds)
        v.calibration = [Failure("calibration", c.name, c.measured, c.holds_when) for c in conds if not c.ok]
        for d in neurons.denominators if neurons is not None else []:
            c = d.condition
            v.n_conditions += 1
            v.by_text.setdefault(_text_key(d.text), [])
            if not c.ok:
                v.by_text[_text_key(d.text)].append(Failure(_text_key(d.text), c.name, c.measured, c.holds_when))
        return v

    @property
    def failures(self) -> list[Failure]:
        return self.calibration + [f for fs in self.by_text.values() for f in fs]

    @property
    def n_failed(self) -> int:
        return len(self.failures)

    def texts_out_of_scope(self) -> list[str]:
        return [t for t, fs in self.by_text.items() if fs]

    def for_texts(self, texts: list[str]) -> list[Failure]:
        """The failing conditions measured on ``texts`` (held-out texts a result was read on).  Those that fail on
        the calibration text apply to every result alike and are stated once, in the banners and the legends."""
        out: list[Failure] = []
        for t in dict.fromkeys(_text_key(t) for t in texts if t):
            out += self.by_text.get(t, [])
        return out

    def mark(self, texts: list[str], detail: bool = False) -> str:
        """A verdict cell: "✓ in scope", or "✗ outside scope" with the failing texts and measured values (and,
        with ``detail``, each condition on hover; the ranking states them once in its legend, to stay small)."""
        fs = self.for_texts(texts)
        if not fs:
            return '<span class="verdict ok">✓ in scope</span>'
        tip = f' title="{esc("; ".join(f.short() for f in fs))}"' if detail else ""
        what = ", ".join(dict.fromkeys(f"{f.where} {fmt(f.measured)}" for f in fs))
        return f'<span class="verdict fail"{tip}>✗ outside scope ({esc(what)})</span>'

    def legend(self) -> str:
        """What the verdict marks mean, with every failing condition in full (once)."""
        per_text = [f for fs in self.by_text.values() for f in fs]
        parts = ["<b>scope</b>: ✓ in scope = every stated condition measured on the neuron's texts holds; ✗ outside "
                 "scope = one fails there (text and measured value shown)."]
        if per_text:
            parts.append("Failing on held-out texts: " + "; ".join(esc(f.short()) for f in per_text) + ".")
        if self.calibration:
            parts.append(f"{len(self.calibration)} condition{'s' if len(self.calibration) != 1 else ''} fail"
                         f"{'' if len(self.calibration) != 1 else 's'} on the calibration text itself and apply to "
                         "every neuron alike: " + "; ".join(esc(f.short()) for f in self.calibration) + ".")
        return f'<p class="small scope-legend">{" ".join(parts)}</p>'

    def banner(self) -> str:
        """The count the Scope section shows, split by where the conditions were measured."""
        if not self.n_conditions:
            return ""
        if not self.n_failed:
            return (f'<p class="good" id="conditions-banner">All {self.n_conditions} stated conditions with a '
                    "threshold hold (calibration text and held-out texts).</p>")
        n_cal, n_txt = len(self.calibration), self.n_failed - len(self.calibration)
        texts = self.texts_out_of_scope()
        return (f'<p class="alert" id="conditions-banner" data-failed="{self.n_failed}">{self.n_failed} of '
                f"{self.n_conditions} stated conditions <b>FAILED</b>: {n_cal} on the calibration text, {n_txt} on "
                f"held-out texts ({esc(', '.join(texts)) or 'none'}). Results read on those texts are outside the "
                f'explanation\'s stated scope; each neuron below carries its own verdict (<a href="#scope">Scope</a> '
                "lists every condition).</p>")


def _tile(value: str, key: str, note: str, el_id: str) -> str:
    return (f'<div class="finding" id="{el_id}"><div class="v">{value}</div><div class="k">{key}</div>'
            f'<div class="n">{note}</div></div>')


def _contrast_tile(contrast: dict | None) -> str:
    """Contrast Spearman beside its noise ceiling and null, when the report was given a contrast result."""
    if not contrast or contrast.get("spearman") is None:
        return _tile("not measured", "contrast Spearman",
                     "no contrast result in this report (run <code>attnscope contrast --verify</code>); noise "
                     "ceiling: not measured; null: not measured", "finding-contrast")
    ceil = contrast.get("noise_ceiling")
    null = contrast.get("null")
    return _tile(fmt(contrast["spearman"]), "contrast Spearman (predicted vs true d)",
                 f"noise ceiling {fmt(ceil) if ceil is not None else 'not measured'}; null "
                 f"{fmt(null) if null is not None else 'not measured'}", "finding-contrast")


def findings_section(circ: Circuit | None, neurons: NeuronResult | None, verdicts: ScopeVerdicts,
                     contrast: dict | None = None, n_top: int = 5) -> str:
    """What the report claims, with its baselines, in one screen (see the module docstring)."""
    if neurons is None and circ is None:
        return ""
    tiles = []
    if circ is not None:
        tiles.append(_tile(", ".join(f"L0H{h}" for h in circ.heads) or "none", "contextual heads (layer 0)",
                           f"calibration {esc(circ.settings.calibration)}; "
                           f'<a href="#circuit">circuit</a>', "finding-heads"))
    top_html = ""
    if neurons is not None:
        s, v, thr = neurons.summary(), neurons.verification, neurons.threshold
        tiles.append(_tile(f"{neurons.n_selected} / {neurons.n_scored}", "neurons pass",
                           f"precision {fmt(s['precision'])} on the reporting half; random neurons "
                           f"{fmt(s['precision_random'])} (the base rate)", "finding-pass"))
        rnd = v.random
        tiles.append(_tile(f"r {fmt(s['median_r'])} · FVU {fmt(s['median_fvu'])}", "fit of the reported neurons",
                           f"random neurons: r {fmt(rnd.r)} · FVU {fmt(rnd.fvu)}. They fit as well, so the fit "
                           "shows the explanation is faithful for any neuron; the claim about <i>which</i> neurons "
                           "depend on context is the precision", "finding-fit"))
        tiles.append(_contrast_tile(contrast))
        top_html = _top_neurons(neurons, verdicts, n_top)
        pass_def = (f'<p class="small" id="pass-definition"><b>pass</b> = predicted context sensitivity (largest '
                    f"|predicted d| over the one-vs-rest contrasts of the held-out texts) ≥ {fmt(thr.value)}, the "
                    f"threshold tuned on the <i>tuning</i> half of the held-out windows to reach precision ≥ "
                    f"{fmt(thr.precision_target)} there ({fmt(thr.tuning_precision)} reached). The precision above "
                    f"is measured on the other, <i>reporting</i> half: the share of passing neurons whose true "
                    f"|d| ≥ 1 with the predicted sign in some contrast.</p>")
    else:
        pass_def = ""
    out = verdicts.texts_out_of_scope()
    tiles.append(_tile(f"{verdicts.n_failed} of {verdicts.n_conditions}", "stated conditions FAILED",
                       (f"outside scope: {esc(', '.join(out))}" if out else "no held-out text outside scope")
                       + (f"; {len(verdicts.calibration)} on the calibration text" if verdicts.calibration else "")
                       + '; <a href="#scope">scope</a>', "finding-scope"))
    links = " · ".join(f'<a href="#{i}">{t}</a>' for i, t in (
        ("neuron-ranking-block", "full ranking"), ("neuron-cards", "neuron cards"), ("neurons", "neuron summary"),
        ("circuit", "circuit"), ("scope", "scope"), ("kernels", "kernels"), ("summary", "model and provenance")))
    return f"""
<section id="findings">
<h2>Findings</h2>
<div class="findings">{"".join(tiles)}</div>
{pass_def}
{top_html}
<p class="small">Details: {links}</p>
</section>"""


def _top_neurons(neurons: NeuronResult, verdicts: ScopeVerdicts, n: int) -> str:
    cards = {c.index: c for c in neurons.cards}
    rows = []
    for r in neurons.rows[:n]:
        c = cards.get(r.index)
        label = _label(c, r) or "—"
        rows.append(f'<tr><td><a href="#neuron-0-{r.index}">{neuron_name(r.index)}</a></td><td>{esc(label)}</td>'
                    f"<td>{esc(r.best_contrast)}</td><td>{fmt(r.predicted_d)}</td><td>{fmt(r.true_d)}</td>"
                    f"<td>{verdicts.mark([r.best_contrast])}</td></tr>")
    return ('<table class="data compact" id="top-neurons"><thead><tr><th>neuron</th><th>label</th><th>context '
            '(one vs rest)</th><th title="predicted effect size in that contrast, from the weights">predicted d</th>'
            '<th title="true effect size, reporting half of the held-out windows">true d</th><th>scope</th></tr>'
            f'</thead><tbody>{"".join(rows)}</tbody></table>')


def _label(card: NeuronCard | None, row: NeuronRow) -> str:
    """The card's labels that agree with the row's best contrast (:mod:`attnscope.label_check`), "+a / −b"."""
    if card is None:
        return ""
    pos, neg, _ = checked_labels(card.label, card.label_negative, row.best_contrast, row.predicted_d)
    return " / ".join(x for x in (f"+{pos}" if pos else "", f"−{neg}" if neg else "") if x)


RANKING_COLUMNS = [  # (header, type, tooltip)
    ("rank", "num", "1 = most context-sensitive (largest predicted |d|)"),
    ("neuron", "text", "L{layer}N{index}; links to the neuron's card when it has one"),
    ("predicted |d|", "num", "context sensitivity: the largest |predicted d| over the one-vs-rest contrasts"),
    ("context", "text", "the held-out text whose one-vs-rest contrast gives it"),
    ("predicted d", "num", "signed predicted effect size in that contrast (from the weights, no forward pass)"),
    ("true d", "num", "signed true effect size in that contrast, reporting half of the held-out windows"),
    ("passes", "text", "predicted |d| >= the threshold (see 'pass' in Findings)"),
    ("label", "text", "label of the neuron's token evidence (cards only)"),
    ("scope", "text", "the stated conditions on its context text and on the calibration text"),
    ("top tokens (+)", "text", "tokens that raise its pre-activation most"),
]


def _short(v: float | None) -> str:
    """``data-value`` for sorting: 6 significant digits (the cell shows 3-4)."""
    return "" if v is None or v != v else f"{v:.6g}"


def full_ranking(rows: list[NeuronRow], cards: list[NeuronCard], verdicts: ScopeVerdicts) -> str:
    """Every neuron: sortable (click a header), searchable (the box filters rows), linked to the cards."""
    by = {c.index: c for c in cards}
    head = "".join(f'<th scope="col" data-type="{t}" aria-sort="none" title="{esc(tip)}"><button type="button">'
                   f"{esc(h)}</button></th>" for h, t, tip in RANKING_COLUMNS)
    body = []
    for r in rows:
        c = by.get(r.index)
        label = _label(c, r)
        name = neuron_name(r.index)
        link = f'<a href="#neuron-0-{r.index}">{name}</a>' if c else name
        toks = " ".join(f"<code class=tok>{token_html(t)}</code>" for t in r.top_positive_tokens[:3])
        search = name.lower()  # the script adds the row's text (context, label, tokens)
        body.append(f'<tr data-search="{esc(search)}" data-index="{r.index}"><td>{r.rank}</td>'
                    f'<td data-value="{r.index}">{link}</td>'
                    f'<td>{fmt(r.sensitivity)}</td><td>{esc(r.best_contrast)}</td><td>{fmt(r.predicted_d)}</td>'
                    f'<td data-value="{_short(r.true_d)}">{fmt(r.true_d)}</td><td>{"yes" if r.passed else "no"}</td>'
                    f'<td>{esc(label)}</td><td>{verdicts.mark([r.best_contrast])}</td>'
                    f"<td>{toks}</td></tr>")
    return f"""
<div id="neuron-ranking-block">
<h3>Full ranking ({len(rows)} neurons)</h3>
<p class="small">Click a header to sort; type to filter by name, index, context, label or token. Predicted d is
from the weights alone; true d is measured on the reporting half of the held-out windows (method §15).</p>
{verdicts.legend()}
<input type="search" id="ranking-search" placeholder="filter: L0N172, code_python, Spanish, token…"
 aria-label="filter the ranking"> <span id="ranking-count" class="small">{len(rows)} of {len(rows)} shown</span>
<div class="table-wrap tall"><table id="neuron-ranking" class="sortable data">
<thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table></div>
</div>"""


def d_scatter(rows: list[NeuronRow], threshold: float, random_idx: list[int] | None = None) -> str:
    """Inline SVG: predicted d (x) against true d (y, reporting half) for every neuron, in its best contrast.

    Baselines drawn in: the identity line (a perfect prediction), the validation band |true d| < 1 (a neuron
    inside it is not validated whatever its prediction), and the pass threshold ±T on the predicted axis.
    Passing neurons are filled, the others hollow grey; each point's ``<title>`` names it."""
    pts = [(r.predicted_d, r.true_d, r) for r in rows if r.true_d is not None]
    if not pts:
        return ""
    W, H, ml, mr, mt, mb = 460, 380, 48, 12, 14, 40
    lim = max(2.0, max(max(abs(x), abs(y)) for x, y, _ in pts)) * 1.05
    X = lambda v: ml + (W - ml - mr) * (v + lim) / (2 * lim)  # noqa: E731
    Y = lambda v: mt + (H - mt - mb) * (lim - v) / (2 * lim)  # noqa: E731
    grid = "".join(f'<line x1="{X(v):.1f}" x2="{X(v):.1f}" y1="{mt}" y2="{H - mb}" class="grid"/>'
                   f'<line x1="{ml}" x2="{W - mr}" y1="{Y(v):.1f}" y2="{Y(v):.1f}" class="grid"/>'
                   f'<text x="{X(v):.1f}" y="{H - mb + 13}" class="tick" text-anchor="middle">{v:g}</text>'
                   f'<text x="{ml - 4}" y="{Y(v) + 3:.1f}" class="tick" text-anchor="end">{v:g}</text>'
                   for v in range(-int(lim), int(lim) + 1) if v % max(1, int(lim) // 4) == 0)
    band = (f'<rect x="{ml}" y="{Y(1):.1f}" width="{W - ml - mr}" height="{Y(-1) - Y(1):.1f}" class="band">'
            "<title>|true d| &lt; 1: not validated</title></rect>")
    thr = "".join(f'<line x1="{X(s * threshold):.1f}" x2="{X(s * threshold):.1f}" y1="{mt}" y2="{H - mb}" '
                  f'class="thr"><title>pass threshold ±{fmt(threshold)}</title></line>'
                  for s in (1, -1)) if threshold == threshold and abs(threshold) < lim else ""
    ident = f'<line x1="{X(-lim):.1f}" y1="{Y(-lim):.1f}" x2="{X(lim):.1f}" y2="{Y(lim):.1f}" class="ident"/>'
    dots = "".join(f'<circle cx="{X(x):.1f}" cy="{Y(y):.1f}" class="{"pass" if r.passed else "fail"}" '
                   f'data-index="{r.index}"><title>{neuron_name(r.index)} {esc(r.best_contrast)} {fmt(x)}, '
                   f"{fmt(y)}</title></circle>" for x, y, r in pts)
    n_pass = sum(r.passed for _, _, r in pts)
    sign = sum((x > 0) == (y > 0) for x, y, r in pts if r.passed)
    return f"""
<figure class="fig" id="d-scatter"><svg viewBox="0 0 {W} {H}" xmlns="http://www.w3.org/2000/svg" role="img"
 aria-label="predicted against true effect size d for every neuron">
{grid}{band}{thr}{ident}{dots}
<text x="{(ml + W - mr) / 2}" y="{H - 6}" class="axis-label" text-anchor="middle">predicted d (weights only)</text>
<text x="12" y="{(mt + H - mb) / 2}" class="axis-label" text-anchor="middle"
 transform="rotate(-90 12 {(mt + H - mb) / 2})">true d (reporting half)</text></svg>
<figcaption>Predicted against true one-vs-rest effect size d of all {len(pts)} neurons, each in its best
contrast (hover: name, context, predicted d, true d). Filled: the {n_pass} passing neurons ({sign} with the
true sign). Baselines: the diagonal is a perfect
prediction, the shaded band |true d| &lt; 1 is "not validated", the dashed lines the pass threshold
±{fmt(threshold)}.</figcaption></figure>"""
