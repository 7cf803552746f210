"""Report sections for the model and provenance, the positional kernels and the contextual circuit.

Each section takes typed results (:class:`~attnscope.kernels.analysis.KernelResult`,
:class:`~attnscope.circuit.build.Circuit`, :class:`~attnscope.neurons.find.NeuronResult`) and returns HTML."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING

from attnscope.kernels.categories import CAT_COLORS
from attnscope.report.findings import ScopeVerdicts
from attnscope.report.html import (
    CIRCUIT_FIGURES,
    KERNEL_FIGURES,
    badge_html,
    esc,
    figures_html,
    fmt,
    json_script,
    kv_table,
    num_html,
    plain_json,
    value_html,
)

if TYPE_CHECKING:
    from attnscope.circuit.build import Circuit
    from attnscope.kernels.analysis import HeadRecord, KernelResult
    from attnscope.neurons.find import NeuronResult


def header_section(model_info: dict, command: str, provenance: dict, date: str, version: str) -> str:
    """Model summary, date, version, command and provenance (hashes and seeds up front)."""
    cmd = f'<pre id="command"><code>{esc(command)}</code></pre>' if command else \
        '<p class="note" id="command">No command recorded (the report was written from the Python API).</p>'
    if provenance:
        boxes = "".join(f'<div class="prov-box"><h4>{esc(k)}</h4>'
                        f'{kv_table(v) if isinstance(v, dict) else value_html(v)}</div>'
                        for k, v in provenance.items())
        keys = []
        for group, v in provenance.items():
            if isinstance(v, dict):
                items = []
                for k2, x in v.items():
                    if x is not None and (k2 == "sha256" or k2.endswith("_sha256") or k2 == "seed"):
                        shown = f"{x[:12]}…" if isinstance(x, str) and len(x) > 16 else fmt(x)
                        items.append(f'{esc(k2)} <code title="{esc(x)}">{esc(shown)}</code>')
                if items:
                    keys.append(f"<li><b>{esc(group)}</b>: {', '.join(items)}</li>")
        key_line = f'<ul class="prov-keys">{"".join(keys)}</ul>' if keys else ""
        prov_html = (f'{key_line}<details id="provenance-details"><summary>All provenance: sample texts, hashes, '
                     f'seeds and settings</summary><div id="provenance" class="prov-grid">{boxes}</div></details>')
    else:
        prov_html = '<p class="note" id="provenance">none recorded</p>'
    return f"""
<section id="summary">
<h2>Model and provenance</h2>
<div class="two-col">
<div><h3>Model</h3>{kv_table(model_info, "model-summary")}</div>
<div><h3>Run</h3>
{kv_table({"date (UTC)": date, "attnscope version": version})}
<h4>Command</h4>{cmd}
<h4>Provenance</h4>
{prov_html}
</div></div>
</section>"""


HEAD_COLUMNS = [  # (key, header, tooltip, getter)
    ("layer", "layer", "layer index", lambda r: r.layer),
    ("head", "head", "head index", lambda r: r.head),
    ("category", "category", "kernel category at the reference query position, first position excluded",
     lambda r: r.category),
    ("sink_mass", "sink", "median held-out attention on the first position (BOS); the category describes the rest",
     lambda r: getattr(r, "sink_mass", None)),
    ("n_eff", "N<sub>eff</sub>", "effective width 1 / Σ K²", lambda r: r.n_eff),
    ("decay_length", "decay τ", "τ of the fit K(d) ∝ exp(−d/τ)", lambda r: r.decay_length),
    ("decay_fit_r2", "fit R²", "weighted R² of the exponential fit (log scale)", lambda r: r.decay_fit_r2),
    ("query_consistency", "query cons.", "mean TV between per-text query kernels and the mean-query kernel",
     lambda r: r.query_consistency),
    ("equivariance", "equivar.", "max TV between K_n(n − d) at different n", lambda r: r.equivariance),
    ("tv_median", "TV split med.", "median TV(true attention, content + position pattern)",
     lambda r: (r.tv_decomposition or {}).get("median")),
    ("tv_p90", "TV split p90", "90th percentile of the same TV", lambda r: (r.tv_decomposition or {}).get("p90")),
    ("tv_kernel_vs_attention", "TV kernel/attn", "TV between the kernel and the mean held-out attention",
     lambda r: r.tv_kernel_vs_attention),
]



def _kernel_table(recs: list[HeadRecord]) -> str:
    """The sortable head table (one row per head, columns :data:`HEAD_COLUMNS`)."""
    head = "".join(f'<th scope="col" data-key="{k}" data-type="{"text" if k == "category" else "num"}" '
                   f'aria-sort="none" title="{esc(tip)}"><button type="button">{label}</button></th>'
                   for k, label, tip, _ in HEAD_COLUMNS)
    rows = []
    for r in recs:
        cells = []
        for k, _, _, g in HEAD_COLUMNS:
            v = g(r)
            if k == "category":
                cells.append(f'<td data-value="{esc(v)}"><span class="dot" style="background:'
                             f'{CAT_COLORS.get(v, "#999")}"></span>{esc(v)}</td>')
            else:
                shown = f"{v:.3f}" if k == "sink_mass" and isinstance(v, float) else fmt(v)  # one format per column
                cells.append(f'<td data-value="{num_html(v)}">{esc(shown)}</td>')
        rows.append(f'<tr data-layer="{r.layer}" data-head="{r.head}">{"".join(cells)}</tr>')
    return (f'<div class="table-wrap tall"><table id="head-table" class="sortable data">\n'
            f'<thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table></div>')


def _head_explorer(res: KernelResult, recs: list[HeadRecord], nref: int | None, causal: bool) -> str:
    """The interactive head explorer: offset kernels (rounded to 4 significant digits) for the page's script."""
    ok = res.arrays.get("offset_kernel")
    layers = res.arrays.get("layers")
    if ok is None or not recs:
        return ""
    ok_list = plain_json(ok.float())
    ok_list = [[[float(f"{v:.4g}") if v is not None else None for v in h] for h in l] for l in ok_list]
    # ints whatever the saved array's dtype (a result reloaded from disk holds them as floats)
    layer_list = [int(x) for x in plain_json(layers)] if layers is not None else sorted({r.layer for r in recs})
    data = {"layers": layer_list, "n_ref": nref, "causal": causal, "offset_kernel": ok_list,
            "records": {f"{r.layer}-{r.head}": dataclasses.asdict(r) for r in recs}, "colors": CAT_COLORS}
    return f"""
<section id="head-selector" class="interactive">
<h3>Head explorer</h3>
<p class="hint">Choose a layer and a head to draw its offset kernel κ(d) (kernel mass at distance d = |n − i|
from the query n = {esc(nref)}, log-log; the layer's other heads in grey) and show its record.
Clicking a row of the table above selects that head.</p>
<div class="controls">
<label>layer <select id="sel-layer" aria-label="layer"></select></label>
<label>head <select id="sel-head" aria-label="head"></select></label>
</div>
<div class="hs-body">
<div class="plot-box"><svg id="kernel-svg" xmlns="http://www.w3.org/2000/svg" viewBox="0 0 560 330" role="img"
 aria-label="offset kernel of the selected head"></svg></div>
<table id="head-record" class="kv"><tbody></tbody></table>
</div>
<noscript><p class="note">The head explorer needs JavaScript; the table above has the same numbers.</p></noscript>
{json_script("kernel-data", data)}
</section>"""


def kernel_section(res: KernelResult, figures: dict[str, Path], used: set[str]) -> str:
    """Positional kernels: category chips, figures, the head table and the head explorer."""
    recs = sorted(res.records, key=lambda r: (r.layer, r.head))
    qpos = list(res.query_positions)
    nref = qpos[-1] if qpos else None
    causal = bool(res.model.get("causal", True))
    counts: dict[str, int] = {}
    for r in recs:
        counts[r.category] = counts.get(r.category, 0) + 1
    chips = "".join(f'<li><span class="dot" style="background:{CAT_COLORS.get(c, "#999")}"></span>{esc(c)}: '
                    f"<b>{n}</b></li>" for c, n in sorted(counts.items(), key=lambda kv: -kv[1]))
    n_sink = sum(getattr(r, "sink_dominated", False) for r in recs)
    chips += (f"<li title='sink mass >= 0.5; their category describes the kernel without the sink'>"
              f"sink-dominated: <b>{n_sink}</b></li>")
    prov, settings = res.provenance, res.settings
    pooled = "" if causal else " (bidirectional model: offsets on both sides are pooled)"
    return f"""
<section id="kernels">
<h2>Positional kernels</h2>
<p>The positional kernel K<sub>n</sub>(i) is how much attention query position n gives key position i
independently of the content there (method §5). It is estimated from
{esc(prov.get("n_estimation", settings.get("n_samples", "?")))} sample windows of {esc(settings.get("n_ctx", "?"))}
tokens (mean queries and keys per position) and checked on {esc(prov.get("n_heldout", settings.get("n_heldout", "?")))}
held-out windows. Kernels are kept at query positions {esc(", ".join(map(str, qpos)))}; properties and
categories use the reference position n = {esc(nref)}{pooled}.</p>
<ul class="chips">{chips}</ul>
{figures_html(KERNEL_FIGURES, figures, used)}
<h3>Heads</h3>
<p class="hint">Click a column header to sort (again to reverse); hover over a header for its definition.
TV = total-variation distance (0 = identical, 1 = disjoint); “split” = the content + position decomposition.</p>
{_kernel_table(recs)}
{_head_explorer(res, recs, nref, causal)}
</section>"""


def _decision_rows(circ: Circuit) -> str:
    """One row per head: the decision, its measurements and every test (unmet ones highlighted)."""
    drows = []
    for d in circ.decisions:
        reasons = "".join(f'<li class="{"" if met else "unmet"}">{esc(x)}</li>' for _, x, met in d.checks())
        drows.append(
            f'<tr class="{"taken" if d.chosen else "left"}"><td>{esc(d.head)}</td>'
            f'<td>{badge_html(d.chosen, "taken", "left out")}</td>'
            f'<td>{fmt(d.n_eff)}</td><td>{fmt(d.logit_std)}</td>'
            f'<td>{fmt(d.denominator_cv)} <span class="muted">({fmt(d.denominator_cv_predicted)})</span></td>'
            f'<td>{fmt(d.share_tv)}</td><td>{fmt(d.decomposition_tv)}</td>'
            f'<td>{fmt(d.denominator)}</td><td><ul class="reasons">{reasons}</ul></td></tr>')
    return "".join(drows)


def _condition_rows(circ: Circuit) -> str:
    return "".join(f'<tr class="{"ok" if c.ok else "failed"}"><td>{esc(c.name)}</td>'
                   f'<td>{esc(c.holds_when)}</td><td>{fmt(c.measured)}</td>'
                   f'<td>{fmt(c.threshold)}</td><td>{badge_html(c.ok)}</td></tr>' for c in circ.conditions)


def _fidelity_and_denominators(neurons: NeuronResult | None, heads: list[int]) -> str:
    """Circuit fidelity and denominator stability on held-out texts (measured by the neuron stage)."""
    if neurons is None:
        return '<p class="note">Fidelity on held-out texts: not measured (no neuron results given).</p>'
    fid = neurons.fidelity
    form = "query-conditioned" if neurons.circuit.query_conditioned else "typical query"
    fid_html = kv_table({"summary form (--query-conditioned)": form,
                          **{f"FVU on the calibration text, {k}": v
                             for k, v in neurons.circuit.calibration_fvu.items()},
                          "FVU of the summed head output (held-out texts)": fid.get("fvu"),
                          "median over dimensions of Pearson r": fid.get("median_r_per_dimension"),
                          "positions compared": fid.get("n_positions"),
                          **{k: v for k, v in fid.items()
                             if k not in ("fvu", "median_r_per_dimension", "n_positions")}},
                         "circuit-fidelity")
    den = neurons.denominators
    den_html = ""
    if den and heads:
        hdr = "".join(f"<th>head {h}</th>" for h in heads)
        rws = []
        for d in den:
            cells = "".join(f'<td class="{"warn" if x < 0.8 or x > 1.25 else ""}">{fmt(x)}</td>' for x in d.ratio)
            rws.append(f"<tr><th>{esc(d.text)}</th>{cells}</tr>")
        den_html = (f'<h3>Denominator stability</h3><p class="hint">Median over positions of Z<sub>n</sub> on each '
                    f'held-out text divided by the calibration denominator: the per-head scale error of reusing the '
                    f'calibration value (outside 0.8–1.25 highlighted).</p><div class="table-wrap">'
                    f'<table id="denominator-table" class="data"><thead><tr><th>text</th>{hdr}</tr></thead>'
                    f'<tbody>{"".join(rws)}</tbody></table></div>')
    return f"{fid_html}\n{den_html}"


def circuit_section(circ: Circuit, neurons: NeuronResult | None, figures: dict[str, Path], used: set[str],
                    verdicts=None) -> str:
    """The contextual circuit: heads, per-head decisions, stated conditions, fidelity and denominators.  The
    banner counts the same conditions as the Scope section (:class:`.findings.ScopeVerdicts`)."""
    chips = "".join(f"<li><b>head {h}</b></li>" for h in circ.heads) or "<li>none</li>"
    status = (verdicts or ScopeVerdicts.of(circ, neurons)).banner()
    summary = {"contextual heads": ", ".join(map(str, circ.heads)) or "none",
               "calibration text": circ.settings.calibration, "calibration sha256": circ.calibration_sha,
               "calibration tokens": int(circ.calibration_tokens.numel()),
               "MLP-norm scale (CV)": f"{fmt(circ.mlp_scale)} ({fmt(circ.mlp_scale_cv)})",
               "masked outlier tokens": int((~circ.token_mask).sum())}
    return f"""
<section id="circuit">
<h2>Contextual circuit (layer 0)</h2>
<p>Layer-0 heads whose kernel is broad and whose scores depend weakly on content have stable softmax
denominators, which are sampled once on a calibration text and reused for any input (method §6–7).
Their summed output is then a linear, kernel-weighted bag of extended token embeddings.</p>
{kv_table(summary, "circuit-summary")}
<ul class="chips">{chips}</ul>
<h3>Head decisions</h3>
<div class="table-wrap"><table id="head-decisions" class="data">
<thead><tr><th>head</th><th>decision</th><th>N<sub>eff</sub></th><th>std log f</th>
<th>CV(Z<sub>n</sub>) <span class="muted">(predicted)</span></th><th>TV to shared kernel</th>
<th>decomposition TV</th><th>Z (calibration)</th><th>reasons</th></tr></thead>
<tbody>{_decision_rows(circ)}</tbody></table></div>
<h3>Conditions</h3>
{status}
<div class="table-wrap"><table id="conditions" class="data">
<thead><tr><th>condition</th><th>holds when</th><th>measured</th><th>threshold</th><th>status</th></tr></thead>
<tbody>{_condition_rows(circ)}</tbody></table></div>
<h3>Circuit fidelity</h3>
{_fidelity_and_denominators(neurons, circ.heads)}
{figures_html(CIRCUIT_FIGURES, figures, used)}
</section>"""
