"""One self-contained HTML report of a kernel and neuron analysis.

:func:`write_report` writes ``out_dir/report.html``: figures are embedded as base64 PNG, all CSS and
JavaScript are inline and nothing is fetched from the network, so the file can be mailed, archived or
opened offline.  Sections: model and provenance, positional kernels (figures, a sortable head table and a
head explorer that draws any head's offset kernel on log-log axes), the contextual circuit (head
decisions with reasons, stated conditions with measured values, fidelity, denominator stability), the
context neurons (summary, figures, one card per neuron) and the scope of every approximation.

:func:`screenshot` renders a report in headless Chromium (Debian ``chromium`` + ``chromium-driver``,
driven by Selenium; no driver is ever downloaded) and saves a PNG.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import datetime as _dt
import html
import json
import math
import os
import re
import shutil
import statistics
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .errors import AttnscopeError
from .kernels import CAT_COLORS


FIGURE_CAPTIONS = {
    "kernel_curves": "Offset kernel κ(d) = K<sub>n</sub>(n − d) of every head at the reference query position, "
                     "one panel per layer, coloured by category (log-log).",
    "n_eff_heatmap": "Effective kernel width N<sub>eff</sub> = 1 / Σ K² over layers × heads (log scale).",
    "categories": "Kernel category of every head, with the thresholds used.",
    "tv_per_head": "Per head: total-variation distance of the content + position decomposition (median, bar to "
                   "90th percentile) and between the kernel and the mean held-out attention.",
    "denominators": "Kernel-weighted softmax denominators Z<sub>n</sub> on held-out texts, relative to the "
                    "calibration value (1 = the value reused for every text).",
    "r_fvu": "Distribution over verified neurons of Pearson r and FVU between the predicted and the true "
             "contribution of the contextual heads.",
    "neuron_traces": "Predicted (dashed) vs true contribution of the contextual heads for the top neurons, on "
                     "each neuron's most positive and most negative held-out text.",
}
KERNEL_FIGURES = ("kernel_curves", "n_eff_heatmap", "categories", "tv_per_head")
NEURON_FIGURES = ("r_fvu", "neuron_traces")
CIRCUIT_FIGURES = ("denominators",)
WIDE_FIGURES = ("kernel_curves", "tv_per_head")

# which approximation each circuit condition belongs to (the scope section)
_SPLIT, _STATIC, _DENOM, _SUMMARY, _NEURON = "split", "static", "denom", "summary", "neuron"
CONDITION_GROUP = {
    "content/position split": _SPLIT,
    "broad kernel": _DENOM,
    "weak content dependence": _DENOM,
    "stable denominators": _DENOM,
    "no outlier tokens": _DENOM,
    "shared kernel": _SUMMARY,
    "constant MLP-norm scale": _NEURON,
}


class BrowserUnavailableError(AttnscopeError):
    """Headless Chromium, its driver or Selenium is not installed."""


# --------------------------------------------------------------------------------------------------
# small formatting helpers
# --------------------------------------------------------------------------------------------------


def _esc(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _fmt(v: Any) -> str:
    """Numbers to short text; ``None`` to an em dash."""
    if v is None:
        return "—"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "n/a"
        if math.isinf(v):
            return "∞" if v > 0 else "−∞"
        a = abs(v)
        if a == 0:
            return "0"
        if a >= 1e5 or a < 1e-3:
            return f"{v:.3g}"
        if a >= 1000:
            return f"{v:.0f}"
        if a >= 100:
            return f"{v:.1f}"
        if a >= 10:
            return f"{v:.2f}"
        return f"{v:.3f}"
    return str(v)


def _num(v: Any) -> str:
    """``data-value`` of a table cell: a plain number, or empty for missing values (sorted last)."""
    if v is None or isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        return ""
    return repr(float(v)) if isinstance(v, float) else str(v)


_WS = {" ": "␣", "\n": "↵", "\t": "⇥", "\r": "␍", "\u00a0": "⍽"}


def _token(tok: str) -> str:
    """A token as escaped HTML with its whitespace made visible (spaces as ␣, newlines as ↵, ...)."""
    if tok == "":
        return '<span class="ws">∅</span>'
    out = []
    for ch in tok:
        if ch in _WS:
            out.append(f'<span class="ws">{_WS[ch]}</span>')
        elif ord(ch) < 32 or 0x7F <= ord(ch) < 0xA0:
            out.append(f'<span class="ws">\\x{ord(ch):02x}</span>')
        else:
            out.append(_esc(ch))
    return "".join(out)


def _asdict(x: Any) -> dict:
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return dataclasses.asdict(x)
    return dict(x)


def _den_map(den: Any) -> dict:
    """``{text: {"ratio_to_calibration": [...]}}`` from NeuronResult.denominators (TextDenominators)."""
    if isinstance(den, dict):
        return den
    return {_get(d, "text"): {"ratio_to_calibration": _get(d, "ratio", [])} for d in den or []}


def _trace_map(traces: Any) -> dict:
    """``{neuron: {text: {"true": [...], "pred": [...]}}}`` from NeuronResult.traces (NeuronTrace)."""
    if isinstance(traces, dict):
        return traces
    out: dict = {}
    for t in traces or []:
        out.setdefault(str(_get(t, "neuron")), {})[_get(t, "text")] = {"true": _get(t, "true_pre"),
                                                                      "pred": _get(t, "predicted_pre")}
    return out


def _get(obj: Any, name: str, default: Any = None) -> Any:
    if isinstance(obj, dict):
        return obj.get(name, default)
    return getattr(obj, name, default)


def _plain(x: Any) -> Any:
    """JSON-safe copy: tensors/arrays to lists, non-finite floats to ``None``, paths to strings."""
    if hasattr(x, "tolist") and not isinstance(x, (str, bytes)):
        x = x.tolist()
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if isinstance(x, Path):
        return str(x)
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return _plain(dataclasses.asdict(x))
    return x


def _json_script(el_id: str, obj: Any) -> str:
    """Data embedded for the page's script; ``<``, ``>`` and ``&`` escaped so no text can close the tag."""
    s = json.dumps(_plain(obj), separators=(",", ":"), allow_nan=False)
    s = s.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    return f'<script type="application/json" id="{el_id}">{s}</script>'


def _value_html(v: Any) -> str:
    if isinstance(v, dict):
        if not v:
            return "—"
        rows = "".join(f"<tr><th>{_esc(k)}</th><td>{_value_html(x)}</td></tr>" for k, x in v.items())
        return f'<table class="kv nested">{rows}</table>'
    if isinstance(v, (list, tuple)):
        if all(isinstance(x, (int, float, str, bool)) or x is None for x in v) and len(v) <= 64:
            return ", ".join(_esc(_fmt(x)) for x in v) if v else "—"
        return f"<code>{_esc(json.dumps(_plain(v)))}</code>"
    if isinstance(v, str) and len(v) >= 32 and all(c in "0123456789abcdef" for c in v):
        return f'<code class="hash">{_esc(v)}</code>'  # hashes
    return _esc(_fmt(v))


def _kv_table(d: dict, el_id: str | None = None, cls: str = "kv") -> str:
    ident = f' id="{el_id}"' if el_id else ""
    rows = "".join(f"<tr><th>{_esc(k)}</th><td>{_value_html(v)}</td></tr>" for k, v in d.items())
    return f'<table{ident} class="{cls}"><tbody>{rows}</tbody></table>'


def _badge(ok: bool | None, yes: str = "OK", no: str = "FAILED", none: str = "info") -> str:
    if ok is None:
        return f'<span class="badge info">{_esc(none)}</span>'
    return f'<span class="badge ok">{_esc(yes)}</span>' if ok else f'<span class="badge fail">{_esc(no)}</span>'


def _figure(name: str, path: Path | str | None) -> str:
    cap = FIGURE_CAPTIONS.get(name, _esc(name.replace("_", " ")))
    if path is None or not Path(path).is_file():
        return f'<p class="note">Figure <code>{_esc(name)}</code> is missing ({_esc(path)}).</p>'
    p = Path(path)
    mime = {".png": "image/png", ".svg": "image/svg+xml", ".jpg": "image/jpeg", ".jpeg": "image/jpeg"}.get(
        p.suffix.lower(), "image/png")
    data = base64.b64encode(p.read_bytes()).decode("ascii")
    wide = " wide" if name in WIDE_FIGURES else ""
    return (f'<figure class="fig{wide}" id="fig-{_esc(name)}"><img alt="{_esc(name)}" src="data:{mime};base64,{data}">'
            f"<figcaption>{cap}</figcaption></figure>")


def _figures(names: tuple[str, ...], figures: dict[str, Path], used: set[str]) -> str:
    parts = []
    for n in names:
        if n in figures:
            used.add(n)
            parts.append(_figure(n, figures[n]))
    return f'<div class="figs">{"".join(parts)}</div>' if parts else ""


def _median(xs: list[float]) -> float | None:
    xs = [x for x in xs if x is not None and isinstance(x, (int, float)) and math.isfinite(x)]
    return statistics.median(xs) if xs else None


def _worst(recs: list[dict], key) -> tuple[float | None, str]:
    vals = [(key(r), r) for r in recs if key(r) is not None and math.isfinite(key(r))]
    if not vals:
        return None, ""
    v, r = max(vals, key=lambda t: t[0])
    return v, f"L{r['layer']}H{r['head']}"


# --------------------------------------------------------------------------------------------------
# sections
# --------------------------------------------------------------------------------------------------


def _header_section(model_info: dict, command: str, provenance: dict, date: str, version: str) -> str:
    cmd = f'<pre id="command"><code>{_esc(command)}</code></pre>' if command else \
        '<p class="note" id="command">No command recorded (the report was written from the Python API).</p>'
    if provenance:
        boxes = "".join(f'<div class="prov-box"><h4>{_esc(k)}</h4>'
                        f'{_kv_table(v) if isinstance(v, dict) else _value_html(v)}</div>'
                        for k, v in provenance.items())
        keys = []
        for group, v in provenance.items():
            if isinstance(v, dict):
                items = []
                for k2, x in v.items():
                    if x is not None and (k2 == "sha256" or k2.endswith("_sha256") or k2 == "seed"):
                        shown = f"{x[:12]}…" if isinstance(x, str) and len(x) > 16 else _fmt(x)
                        items.append(f'{_esc(k2)} <code title="{_esc(x)}">{_esc(shown)}</code>')
                if items:
                    keys.append(f"<li><b>{_esc(group)}</b>: {', '.join(items)}</li>")
        key_line = f'<ul class="prov-keys">{"".join(keys)}</ul>' if keys else ""
        prov_html = (f'{key_line}<details id="provenance-details"><summary>All provenance: sample texts, hashes, '
                     f'seeds and settings</summary><div id="provenance" class="prov-grid">{boxes}</div></details>')
    else:
        prov_html = '<p class="note" id="provenance">none recorded</p>'
    return f"""
<section id="summary">
<h2>Model and provenance</h2>
<div class="two-col">
<div><h3>Model</h3>{_kv_table(model_info, "model-summary")}</div>
<div><h3>Run</h3>
{_kv_table({"date (UTC)": date, "attnscope version": version})}
<h4>Command</h4>{cmd}
<h4>Provenance</h4>
{prov_html}
</div></div>
</section>"""


HEAD_COLUMNS = [  # (key, header, tooltip, getter)
    ("layer", "layer", "layer index", lambda r: r["layer"]),
    ("head", "head", "head index", lambda r: r["head"]),
    ("category", "category", "kernel category at the reference query position", lambda r: r["category"]),
    ("n_eff", "N<sub>eff</sub>", "effective width 1 / Σ K²", lambda r: r["n_eff"]),
    ("decay_length", "decay τ", "τ of the fit K(d) ∝ exp(−d/τ)", lambda r: r["decay_length"]),
    ("decay_fit_r2", "fit R²", "weighted R² of the exponential fit (log scale)", lambda r: r["decay_fit_r2"]),
    ("query_consistency", "query cons.", "mean TV between per-text query kernels and the mean-query kernel",
     lambda r: r["query_consistency"]),
    ("equivariance", "equivar.", "max TV between K_n(n − d) at different n", lambda r: r["equivariance"]),
    ("tv_median", "TV split med.", "median TV(true attention, content + position pattern)",
     lambda r: (r.get("tv_decomposition") or {}).get("median")),
    ("tv_p90", "TV split p90", "90th percentile of the same TV", lambda r: (r.get("tv_decomposition") or {}).get("p90")),
    ("tv_kernel_vs_attention", "TV kernel/attn", "TV between the kernel and the mean held-out attention",
     lambda r: r["tv_kernel_vs_attention"]),
]


def _kernel_section(kernels: Any, figures: dict[str, Path], used: set[str]) -> str:
    recs = [_asdict(r) for r in _get(kernels, "records", [])]
    recs.sort(key=lambda r: (r["layer"], r["head"]))
    qpos = list(_get(kernels, "query_positions", []) or [])
    nref = qpos[-1] if qpos else None
    model = _get(kernels, "model", {}) or {}
    causal = bool(model.get("causal", True))
    counts: dict[str, int] = {}
    for r in recs:
        counts[r["category"]] = counts.get(r["category"], 0) + 1
    chips = "".join(f'<li><span class="dot" style="background:{CAT_COLORS.get(c, "#999")}"></span>{_esc(c)}: '
                    f"<b>{n}</b></li>" for c, n in sorted(counts.items(), key=lambda kv: -kv[1]))
    head = "".join(f'<th scope="col" data-key="{k}" data-type="{"text" if k == "category" else "num"}" '
                   f'aria-sort="none" title="{_esc(tip)}"><button type="button">{label}</button></th>'
                   for k, label, tip, _ in HEAD_COLUMNS)
    rows = []
    for r in recs:
        cells = []
        for k, _, _, g in HEAD_COLUMNS:
            v = g(r)
            if k == "category":
                cells.append(f'<td data-value="{_esc(v)}"><span class="dot" style="background:'
                             f'{CAT_COLORS.get(v, "#999")}"></span>{_esc(v)}</td>')
            else:
                cells.append(f'<td data-value="{_num(v)}">{_esc(_fmt(v))}</td>')
        rows.append(f'<tr data-layer="{r["layer"]}" data-head="{r["head"]}">{"".join(cells)}</tr>')
    # data for the head explorer: offset kernels rounded to 4 significant digits
    arrays = _get(kernels, "arrays", {}) or {}
    ok = arrays.get("offset_kernel")
    layers = arrays.get("layers")
    explorer = ""
    if ok is not None and recs:
        ok_list = _plain(ok.float() if hasattr(ok, "float") else ok)
        ok_list = [[[float(f"{v:.4g}") if v is not None else None for v in h] for h in l] for l in ok_list]
        layer_list = _plain(layers) if layers is not None else sorted({r["layer"] for r in recs})
        data = {"layers": layer_list, "n_ref": nref, "causal": causal, "offset_kernel": ok_list,
                "records": {f"{r['layer']}-{r['head']}": r for r in recs}, "colors": CAT_COLORS}
        explorer = f"""
<section id="head-selector" class="interactive">
<h3>Head explorer</h3>
<p class="hint">Choose a layer and a head to draw its offset kernel κ(d) (kernel mass at distance d = |n − i|
from the query n = {_esc(nref)}, log-log; the layer's other heads in grey) and show its record.
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
{_json_script("kernel-data", data)}
</section>"""
    prov = _get(kernels, "provenance", {}) or {}
    settings = _get(kernels, "settings", {}) or {}
    body = f"""
<section id="kernels">
<h2>Positional kernels</h2>
<p>The positional kernel K<sub>n</sub>(i) is how much attention query position n gives key position i
independently of the content there (method §5). It is estimated from
{_esc(prov.get("n_estimation", settings.get("n_samples", "?")))} sample windows of {_esc(settings.get("n_ctx", "?"))}
tokens (mean queries and keys per position) and checked on {_esc(prov.get("n_heldout", settings.get("n_heldout", "?")))}
held-out windows. Kernels are kept at query positions {_esc(", ".join(map(str, qpos)))}; properties and
categories use the reference position n = {_esc(nref)}{"" if causal else " (bidirectional model: offsets on both sides are pooled)"}.</p>
<ul class="chips">{chips}</ul>
{_figures(KERNEL_FIGURES, figures, used)}
<h3>Heads</h3>
<p class="hint">Click a column header to sort (again to reverse); hover over a header for its definition.
TV = total-variation distance (0 = identical, 1 = disjoint); “split” = the content + position decomposition.</p>
<div class="table-wrap tall"><table id="head-table" class="sortable data">
<thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table></div>
{explorer}
</section>"""
    return body


def _circuit_section(neurons: Any, figures: dict[str, Path], used: set[str]) -> str:
    circ = _get(neurons, "circuit", {}) or {}
    cs = circ.get("settings", {}) or {}
    heads = circ.get("heads", []) or []
    decisions = circ.get("decisions", []) or []
    conditions = circ.get("conditions", []) or []
    chips = "".join(f"<li><b>head {h}</b></li>" for h in heads) or "<li>none</li>"
    drows = []
    for d in decisions:
        reasons = "".join(f'<li class="{"unmet" if not d.get("chosen") and re.search(r"[^<>=!][<>][^=]", x) else ""}">'
                          f"{_esc(x)}</li>" for x in d.get("reasons", []))
        drows.append(
            f'<tr class="{"taken" if d.get("chosen") else "left"}"><td>{_esc(d.get("head"))}</td>'
            f'<td>{_badge(bool(d.get("chosen")), "taken", "left out")}</td>'
            f'<td>{_fmt(d.get("n_eff"))}</td><td>{_fmt(d.get("logit_std"))}</td>'
            f'<td>{_fmt(d.get("denominator_cv"))} <span class="muted">({_fmt(d.get("denominator_cv_predicted"))})</span></td>'
            f'<td>{_fmt(d.get("share_tv"))}</td><td>{_fmt(d.get("decomposition_tv"))}</td>'
            f'<td>{_fmt(d.get("denominator"))}</td><td><ul class="reasons">{reasons}</ul></td></tr>')
    crows = []
    for c in conditions:
        crows.append(f'<tr class="{"ok" if c.get("ok") else "failed"}"><td>{_esc(c.get("name"))}</td>'
                     f'<td>{_esc(c.get("holds_when"))}</td><td>{_fmt(c.get("measured"))}</td>'
                     f'<td>{_fmt(c.get("threshold"))}</td><td>{_badge(bool(c.get("ok")))}</td></tr>')
    fid = _get(neurons, "fidelity", {}) or {}
    fid_html = _kv_table({"FVU of the summed head output (held-out texts)": fid.get("fvu"),
                          "median over dimensions of Pearson r": fid.get("median_r_per_dimension"),
                          "positions compared": fid.get("n_positions"),
                          **{k: v for k, v in fid.items() if k not in ("fvu", "median_r_per_dimension", "n_positions")}},
                         "circuit-fidelity")
    den = _den_map(_get(neurons, "denominators", []))
    den_html = ""
    if den and heads:
        hdr = "".join(f"<th>head {h}</th>" for h in heads)
        rws = []
        for name, v in den.items():
            ratios = v.get("ratio_to_calibration", []) or []
            cells = "".join(
                f'<td class="{"warn" if isinstance(x, (int, float)) and (x < 0.8 or x > 1.25) else ""}">{_fmt(x)}</td>'
                for x in ratios)
            rws.append(f"<tr><th>{_esc(name)}</th>{cells}</tr>")
        den_html = (f'<h3>Denominator stability</h3><p class="hint">Median over positions of Z<sub>n</sub> on each '
                    f'held-out text divided by the calibration denominator: the per-head scale error of reusing the '
                    f'calibration value (outside 0.8–1.25 highlighted).</p><div class="table-wrap">'
                    f'<table id="denominator-table" class="data"><thead><tr><th>text</th>{hdr}</tr></thead>'
                    f'<tbody>{"".join(rws)}</tbody></table></div>')
    n_failed = sum(not c.get("ok") for c in conditions)
    status = (f'<p class="alert">{n_failed} stated condition{"s" if n_failed != 1 else ""} '
              f'<b>FAILED</b> on the calibration text: the approximations below are used outside their stated '
              f'scope there.</p>' if n_failed else
              '<p class="good">All stated conditions hold on the calibration text.</p>' if conditions else "")
    return f"""
<section id="circuit">
<h2>Contextual circuit (layer 0)</h2>
<p>Layer-0 heads whose kernel is broad and whose scores depend weakly on content have stable softmax
denominators, which are sampled once on a calibration text and reused for any input (method §6–7).
Their summed output is then a linear, kernel-weighted bag of extended token embeddings.</p>
{_kv_table({"contextual heads": ", ".join(map(str, heads)) or "none",
            "calibration text": cs.get("calibration"),
            "calibration sha256": circ.get("calibration_sha256"),
            "calibration tokens": circ.get("n_calibration_tokens"),
            "MLP-norm scale (CV)": f"{_fmt(circ.get('mlp_scale'))} ({_fmt(circ.get('mlp_scale_cv'))})",
            "masked outlier tokens": circ.get("n_masked_tokens")}, "circuit-summary")}
<ul class="chips">{chips}</ul>
<h3>Head decisions</h3>
<div class="table-wrap"><table id="head-decisions" class="data">
<thead><tr><th>head</th><th>decision</th><th>N<sub>eff</sub></th><th>std log f</th>
<th>CV(Z<sub>n</sub>) <span class="muted">(predicted)</span></th><th>TV to shared kernel</th>
<th>decomposition TV</th><th>Z (calibration)</th><th>reasons</th></tr></thead>
<tbody>{"".join(drows)}</tbody></table></div>
<h3>Conditions</h3>
{status}
<div class="table-wrap"><table id="conditions" class="data">
<thead><tr><th>condition</th><th>holds when</th><th>measured</th><th>threshold</th><th>status</th></tr></thead>
<tbody>{"".join(crows)}</tbody></table></div>
<h3>Circuit fidelity</h3>
{fid_html}
{den_html}
{_figures(CIRCUIT_FIGURES, figures, used)}
</section>"""


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


def _neuron_card(r: dict, traces: dict) -> str:
    idx = r.get("index")
    lab = r.get("label")
    lab_neg = r.get("label_negative")
    fired = r.get("fired_on_calibration")
    tr = traces.get(str(idx), {}) or {}
    pos_t, neg_t = r.get("positive_text"), r.get("negative_text")
    svgs = _trace_svg(tr, pos_t, "positive") if pos_t else ""
    if neg_t and neg_t != pos_t:
        svgs += _trace_svg(tr, neg_t, "negative")
    means = r.get("true_d") or {}
    means_html = ", ".join(f"{_esc(k)} {_esc(_fmt(v))}" for k, v in sorted(means.items(), key=lambda kv: -kv[1]))
    return f"""
<article class="neuron-card" id="neuron-{_esc(r.get("layer", 0))}-{_esc(idx)}" data-index="{_esc(idx)}">
<header><h3>Neuron {_esc(r.get("layer", 0))}.{_esc(idx)}</h3>
<p class="labels"><span class="lab pos" title="label of the positive evidence">+ {_esc(lab) if lab else '<i>unlabelled</i>'}</span>
<span class="lab neg" title="label of the negative evidence">− {_esc(lab_neg) if lab_neg else '<i>unlabelled</i>'}</span></p></header>
<dl class="stats-inline">
<div><dt>rank</dt><dd>{_fmt(r.get("rank"))}</dd></div>
<div><dt>predicted |d|</dt><dd>{_fmt(r.get("sensitivity"))}</dd></div>
<div><dt>r / FVU (full)</dt><dd>{_fmt(r.get("r"))} / {_fmt(r.get("fvu"))}</dd></div>
<div><dt>within-text r / FVU</dt><dd>{_fmt(r.get("r_within"))} / {_fmt(r.get("fvu_within"))}</dd></div>
<div><dt>contextual heads r</dt><dd>{_fmt(r.get("contextual_r"))}</dd></div>
<div><dt>fired on calibration</dt><dd>{_badge(fired, "yes", "no") if fired is not None else "—"}</dd></div>
</dl>
<div class="tok-cols">
<div><h4>raises (+)</h4>{_tokens_html(r.get("top_positive_tokens"), "pos")}</div>
<div><h4>lowers (−)</h4>{_tokens_html(r.get("top_negative_tokens"), "neg")}</div>
</div>
<div class="traces">{svgs}</div>
<p class="legend"><span class="sw true"></span>true pre-activation
<span class="sw pred"></span>full layer-0 explanation from weights{f' · label evidence: {_esc(r.get("label_evidence"))}' if r.get("label_evidence") else ""}</p>
{f'<p class="muted small">true one-vs-rest effect size d by text: {means_html}</p>' if means_html else ""}
</article>"""


def _neuron_section(neurons: Any, figures: dict[str, Path], used: set[str]) -> str:
    recs = [_asdict(r) for r in _get(neurons, "records", [])]
    summ = neurons.summary() if hasattr(neurons, "summary") else (_get(neurons, "summary", {}) or {})
    n_scored = _get(neurons, "n_scored", summ.get("n_neurons_scored"))
    n_found = _get(neurons, "n_selected", summ.get("n_neurons_found"))
    not_fired = sum(not r.get("fired_on_calibration", True) for r in recs)
    med_r = _median([r.get("r") for r in recs])
    med_f = _median([r.get("fvu") for r in recs])
    traces = _trace_map(_get(neurons, "traces", []))
    settings = _get(neurons, "settings", {}) or {}
    labels = sorted({r["label"] for r in recs if r.get("label")} | {r["label_negative"] for r in recs
                                                                     if r.get("label_negative")})
    stats = [("pass / scored", f"{_fmt(n_found)} / {_fmt(n_scored)}"), ("precision (random)",
             f"{_fmt(summ.get('precision'))} ({_fmt(summ.get('precision_random'))})"),
             ("median FVU (random)", f"{_fmt(summ.get('median_fvu'))} ({_fmt(summ.get('median_fvu_random'))})"),
             ("within-text FVU (random)", f"{_fmt(summ.get('median_fvu_within'))} ({_fmt(summ.get('median_fvu_within_random'))})"),
             ("did not fire on calibration", _fmt(not_fired))]
    stat_html = "".join(f'<div class="stat"><div class="v">{v}</div><div class="k">{_esc(k)}</div></div>'
                        for k, v in stats)
    cards = "".join(_neuron_card(r, traces) for r in recs)
    rows = [_asdict(r) for r in (_get(neurons, "rows", []) or [])[:15]]
    table = "".join(f"<tr><td>{_esc(x.get('rank'))}</td><td>{_esc(x.get('index'))}</td><td>{_fmt(x.get('sensitivity'))}</td>"
                    f"<td>{_esc(x.get('best_contrast'))}</td><td>{_fmt(x.get('predicted_d'))}</td>"
                    f"<td>{_badge(bool(x.get('passed')), 'yes', 'no')}</td>"
                    f"<td>{' '.join(f'<code class=tok>{_token(str(t))}</code>' for t in x.get('top_positive_tokens', []))}</td></tr>"
                    for x in rows)
    return f"""
<section id="neurons">
<h2>Context neurons (layer-0 MLP)</h2>
<p>Every neuron is ranked by its predicted context sensitivity: the largest predicted effect size over the
one-vs-rest contrasts of the held-out sources, from the full layer-0 explanation and the sources' token counts
(no forward pass). The threshold is measured: the longest prefix of the ranking whose precision on the tuning half
of the held-out windows is at least {_esc(_fmt(settings.get("precision_target")))}. Reported neurons are then
scored on the reporting half against their TRUE pre-activation, beside random neurons of the same layer.</p>
<div class="stats" id="neuron-summary">{stat_html}</div>
<div class="table-wrap"><table id="neuron-ranking" class="data"><thead><tr><th>rank</th><th>neuron</th>
<th>predicted |d|</th><th>contrast</th><th>predicted d</th><th>passes</th><th>top tokens</th></tr></thead>
<tbody>{table}</tbody></table></div>
{f'<p>Labels: {", ".join(_esc(x) for x in labels)}</p>' if labels else ""}
{_figures(NEURON_FIGURES, figures, used)}
<h3>Neurons</h3>
<p class="hint">Tokens are shown as the tokenizer writes them, with whitespace made visible (␣ space, ↵ newline,
⇥ tab); the number is the token's score, in units of the neuron's pre-activation.</p>
<div class="cards">{cards or '<p class="note">No neuron passed the selection.</p>'}</div>
</section>"""


def _scope_section(kernels: Any, neurons: Any) -> str:
    groups: dict[str, dict] = {
        _SPLIT: {"name": "Content + position split of attention scores",
                 "claim": "attention ≈ K<sub>n</sub>(i) f(x<sub>i</sub>) / Z, with keys split into a static positional "
                          "part and a content part (method §4–5.1)", "rows": []},
        _STATIC: {"name": "Static positional kernel",
                  "claim": "one kernel per head, estimated from mean queries and keys, describes where the head looks "
                           "independently of content (method §5.2–5.3)", "rows": []},
        _DENOM: {"name": "Stable softmax denominators",
                 "claim": "for the contextual heads, Z<sub>n</sub> ≈ the calibration value for any text (method §6)",
                 "rows": []},
        _SUMMARY: {"name": "Linear bag-of-tokens summary",
                   "claim": "the contextual heads' summed output = kernel-weighted sum of extended embeddings "
                            "(method §7)", "rows": []},
        _NEURON: {"name": "Neuron pre-activations from the weights",
                  "claim": "a neuron's contextual input = Σ<sub>i</sub> K<sub>n</sub>(i) S[x<sub>i</sub>, k] "
                           "(method §8)", "rows": []},
        "other": {"name": "Other stated conditions", "claim": "", "rows": []},
    }

    def add(g: str, cond: str, measured: str, ok: bool | None) -> None:
        groups[g]["rows"].append((cond, measured, ok))

    if kernels is not None:
        recs = [_asdict(r) for r in _get(kernels, "records", [])]
        if recs:
            tvm = [(r.get("tv_decomposition") or {}).get("median") for r in recs]
            w, wh = _worst(recs, lambda r: (r.get("tv_decomposition") or {}).get("p90"))
            add(_SPLIT, "TV(true attention, content + position pattern) is small on held-out text "
                        "(the method reports ≈ 0.05 on GPT-2 Small)",
                f"median over heads of the median TV {_fmt(_median(tvm))}; worst 90th percentile {_fmt(w)} ({wh})",
                None)
            w, wh = _worst(recs, lambda r: r.get("tv_kernel_vs_attention"))
            add(_STATIC, "the kernel matches the mean held-out attention (independence of content and position)",
                f"TV median {_fmt(_median([r.get('tv_kernel_vs_attention') for r in recs]))}, worst {_fmt(w)} ({wh})",
                None)
            w, wh = _worst(recs, lambda r: r.get("query_consistency"))
            add(_STATIC, "the kernel is consistent across query vectors (texts)",
                f"TV median {_fmt(_median([r.get('query_consistency') for r in recs]))}, worst {_fmt(w)} ({wh})", None)
            w, wh = _worst(recs, lambda r: r.get("equivariance"))
            add(_STATIC, "translation equivariance: K<sub>n</sub>(n − d) depends on the offset d only",
                f"TV median {_fmt(_median([r.get('equivariance') for r in recs]))}, worst {_fmt(w)} ({wh})", None)
            wd = [r.get("tv_weights_vs_data") for r in recs if r.get("tv_weights_vs_data") is not None]
            if wd:
                add(_STATIC, "layer 0: the weights-only kernel agrees with the data kernel",
                    f"TV median {_fmt(_median(wd))}, worst {_fmt(max(wd))}", None)
            slow = [r.get("decay_fit_r2") for r in recs if r.get("category") == "slow decay"]
            if slow:
                add(_STATIC, "slowly decaying kernels are exponential (decay length τ is meaningful)",
                    f"fit R² median {_fmt(_median(slow))} over {len(slow)} slow-decay heads", None)
    if neurons is not None:
        circ = _get(neurons, "circuit", {}) or {}
        for c in circ.get("conditions", []) or []:
            g = CONDITION_GROUP.get(c.get("name"), "other")
            add(g, f"{_esc(c.get('name'))}: {_esc(c.get('holds_when'))} (threshold {_fmt(c.get('threshold'))})",
                f"{_fmt(c.get('measured'))}", bool(c.get("ok")))
        den = _den_map(_get(neurons, "denominators", []))
        ratios = [x for v in den.values() for x in (v.get("ratio_to_calibration") or [])
                  if isinstance(x, (int, float)) and math.isfinite(x)]
        if ratios:
            out_scope = [k for k, v in den.items() if any(not 0.8 <= x <= 1.25 for x in v["ratio_to_calibration"] or [])]
            add(_DENOM, "denominator transfer: every contextual head's Z / Z<sub>calibration</sub> within 0.8–1.25 "
                        "on each held-out text (outside: that text is outside the explanation's scope)",
                f"from {_fmt(min(ratios))} to {_fmt(max(ratios))} over {len(den)} held-out texts"
                + (f"; out of scope: {_esc(', '.join(out_scope))}" if out_scope else ""), not out_scope)
        fid = _get(neurons, "fidelity", {}) or {}
        if fid:
            add(_SUMMARY, "the summary reproduces the heads' summed output on held-out texts",
                f"FVU {_fmt(fid.get('fvu'))}, median per-dimension r {_fmt(fid.get('median_r_per_dimension'))} "
                f"over {_fmt(fid.get('n_positions'))} positions", None)
        recs = [_asdict(r) for r in _get(neurons, "records", [])]
        if recs:
            mp = (circ.get("settings") or {}).get("min_position")
            add(_NEURON, "the full layer-0 explanation matches the TRUE pre-activation on held-out texts"
                         + (f" (positions n ≥ {mp})" if mp is not None else ""),
                f"median r {_fmt(_median([r.get('r') for r in recs]))}, median FVU "
                f"{_fmt(_median([r.get('fvu') for r in recs]))} over {len(recs)} neurons", None)
    blocks = []
    for g in groups.values():
        if not g["rows"]:
            continue
        rows = "".join(f"<tr><td>{cond}</td><td>{meas}</td><td>{_badge(ok, none='measured')}</td></tr>"
                       for cond, meas, ok in g["rows"])
        claim = f'<p class="claim">{g["claim"]}</p>' if g["claim"] else ""
        blocks.append(f'<div class="scope-item"><h3>{_esc(g["name"])}</h3>{claim}<table class="data">'
                      f"<thead><tr><th>stated condition</th><th>measured on this model</th><th>status</th></tr>"
                      f"</thead><tbody>{rows}</tbody></table></div>")
    if not blocks:
        return '<p class="omitted">Scope: nothing to report (no kernel or neuron results given).</p>'
    return f"""
<section id="scope">
<h2>Scope of each explanation</h2>
<p>Every explanation in this report holds only where its approximations hold. Each approximation is listed
with the conditions it needs and what was measured on this model; “measured” rows have no pass/fail threshold
and are for the reader to judge. Conditions measured on the calibration text need not hold on other texts.</p>
{"".join(blocks)}
</section>"""


# --------------------------------------------------------------------------------------------------
# page assembly
# --------------------------------------------------------------------------------------------------

CSS = r"""
:root{--fg:#1d232a;--muted:#5f6b76;--line:#d9dee3;--bg:#fff;--soft:#f4f6f8;--accent:#1f5fa8;
--ok:#1a7f37;--okbg:#dafbe1;--fail:#b42318;--failbg:#ffe1de;--info:#4b5563;--infobg:#eceff3}
*{box-sizing:border-box}
html{font-size:15px}
body{margin:0;color:var(--fg);background:var(--bg);line-height:1.45;
font-family:system-ui,-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif}
body>header{background:#17324d;color:#fff;padding:1.1rem 2rem .8rem}
body>header h1{margin:0 0 .2rem;font-size:1.55rem;font-weight:600}
body>header .meta{margin:0;color:#c9d6e3;font-size:.9rem}
nav{position:sticky;top:0;z-index:5;background:#fff;border-bottom:1px solid var(--line);padding:.45rem 2rem}
nav ul{list-style:none;margin:0;padding:0;display:flex;flex-wrap:wrap;gap:1.2rem}
nav a{color:var(--accent);text-decoration:none;font-weight:500}
nav a:hover{text-decoration:underline}
main{max-width:1280px;margin:0 auto;padding:.5rem 2rem 3rem}
section{margin-top:1.6rem}
h2{font-size:1.35rem;border-bottom:2px solid var(--line);padding-bottom:.25rem;margin:1.4rem 0 .7rem}
h3{font-size:1.08rem;margin:1.2rem 0 .5rem}
h4{font-size:.95rem;margin:.9rem 0 .35rem}
p{margin:.4rem 0 .7rem;max-width:95ch}
code,pre{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,"DejaVu Sans Mono",monospace;font-size:.86em}
pre{background:var(--soft);border:1px solid var(--line);border-radius:6px;padding:.55rem .7rem;white-space:pre-wrap;
word-break:break-all;margin:.3rem 0}
.hash{word-break:break-all}
.note,.omitted{color:var(--muted);font-style:italic}
.omitted{border-left:3px solid var(--line);padding:.3rem .7rem;background:var(--soft)}
.hint,.muted{color:var(--muted)}
.small{font-size:.82rem}
.prov-grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(290px,1fr));gap:.8rem;align-items:start}
.prov-box td{overflow-wrap:anywhere}
.prov-keys{font-size:.85rem;color:var(--muted);list-style:none;padding:0;margin:.2rem 0 .4rem}
.prov-keys b{font-weight:500;color:var(--fg)}
details>summary{cursor:pointer;color:var(--accent);font-weight:500;margin:.3rem 0 .6rem}
.prov-box{border:1px solid var(--line);border-radius:6px;padding:.2rem .7rem .5rem;background:#fff;break-inside:avoid}
.prov-box h4{margin:.4rem 0 .3rem;font-size:.85rem;color:var(--accent)}
.prov-box table.kv{font-size:.8rem}
.prov-box table.kv th{padding-right:.6rem}
.two-col{display:grid;grid-template-columns:minmax(280px,1fr) minmax(320px,1.3fr);gap:2rem}
table{border-collapse:collapse;font-size:.88rem}
table.kv th{text-align:left;font-weight:500;color:var(--muted);padding:.2rem .9rem .2rem 0;vertical-align:top;
white-space:nowrap}
table.kv td{padding:.2rem 0;vertical-align:top}
table.kv.nested{font-size:.85rem}
table.kv>tbody>tr{border-bottom:1px solid #eef0f2}
.table-wrap{overflow-x:auto;max-width:100%;border:1px solid var(--line);border-radius:6px}
table.data{width:100%}
table.data th,table.data td{padding:.32rem .6rem;border-bottom:1px solid #eef0f2;text-align:left;vertical-align:top}
table.data thead th{background:var(--soft);font-weight:600;border-bottom:1px solid var(--line)}
.table-wrap.tall{max-height:30rem;overflow:auto}
.table-wrap.tall thead th{position:sticky;top:0;z-index:1;box-shadow:0 1px 0 var(--line)}
#head-table thead th{vertical-align:bottom}
table.data tbody tr:nth-child(even){background:#fafbfc}
#head-table td{font-variant-numeric:tabular-nums;white-space:nowrap}
#head-table tbody tr{cursor:pointer}
#head-table tbody tr:hover{background:#eaf2fb}
#head-table tbody tr.selected{background:#dbe9f8}
th button{all:unset;cursor:pointer;display:inline-block}
th button:focus-visible{outline:2px solid var(--accent)}
th[aria-sort] button::after{content:" ⇅";color:#a0a8b0;font-size:.8em}
th[aria-sort=ascending] button::after{content:" ▲";color:var(--accent)}
th[aria-sort=descending] button::after{content:" ▼";color:var(--accent)}
td.warn{background:#fff4d6}
.dot{display:inline-block;width:.7em;height:.7em;border-radius:50%;margin-right:.4em;vertical-align:baseline}
ul.chips{list-style:none;padding:0;margin:.5rem 0;display:flex;flex-wrap:wrap;gap:.4rem}
ul.chips li{background:var(--soft);border:1px solid var(--line);border-radius:999px;padding:.1rem .7rem;font-size:.86rem}
.figs{display:grid;grid-template-columns:repeat(auto-fit,minmax(420px,1fr));gap:1rem;margin:.8rem 0;align-items:start}
figure.fig.wide{grid-column:1/-1}
figure.fig{margin:0;border:1px solid var(--line);border-radius:6px;padding:.6rem;background:#fff;break-inside:avoid}
figure.fig img{max-width:100%;height:auto;display:block;margin:0 auto}
figcaption{font-size:.83rem;color:var(--muted);margin-top:.4rem}
.badge{display:inline-block;border-radius:4px;padding:.05rem .45rem;font-size:.76rem;font-weight:700;
letter-spacing:.02em;white-space:nowrap}
.badge.ok{background:var(--okbg);color:var(--ok)}
.badge.fail{background:var(--failbg);color:var(--fail)}
.badge.info{background:var(--infobg);color:var(--info)}
tr.failed td{background:#fff6f5}
tr.left td{color:#4d5862}
ul.reasons{margin:0;padding:0;list-style:none;display:flex;flex-wrap:wrap;gap:.2rem .35rem;font-size:.78rem}
ul.reasons li{background:#f0f2f4;border-radius:3px;padding:0 .35rem;white-space:nowrap}
ul.reasons li.unmet{background:var(--failbg);color:var(--fail)}
.alert{background:var(--failbg);color:#7a1a12;border-left:4px solid var(--fail);padding:.45rem .8rem;border-radius:4px}
.good{background:var(--okbg);color:#10501f;border-left:4px solid var(--ok);padding:.45rem .8rem;border-radius:4px}
#head-selector{border:1px solid var(--line);border-radius:8px;padding:.3rem 1rem 1rem;background:#fbfcfd}
.controls{display:flex;gap:1.2rem;margin:.3rem 0 .6rem}
.controls label{font-weight:500}
.controls select{font:inherit;padding:.15rem .4rem;margin-left:.3rem;border:1px solid #b8c0c8;border-radius:4px;
background:#fff;min-width:4.5rem}
.hs-body{display:grid;grid-template-columns:minmax(320px,560px) minmax(260px,1fr);gap:1.5rem;align-items:start}
.plot-box{background:#fff;border:1px solid var(--line);border-radius:6px}
#kernel-svg{width:100%;height:auto;display:block}
#kernel-svg text,svg.trace text{font-family:system-ui,Arial,sans-serif}
.stats{display:flex;flex-wrap:wrap;gap:.8rem;margin:.6rem 0 1rem}
.stat{border:1px solid var(--line);border-radius:8px;padding:.5rem .9rem;min-width:9rem;background:#fff}
.stat .v{font-size:1.35rem;font-weight:600;font-variant-numeric:tabular-nums}
.stat .k{font-size:.8rem;color:var(--muted)}
.cards{display:grid;grid-template-columns:repeat(auto-fill,minmax(440px,1fr));gap:1rem}
.neuron-card{border:1px solid var(--line);border-radius:8px;padding:.7rem .9rem;background:#fff;
break-inside:avoid;page-break-inside:avoid;box-shadow:0 1px 2px rgba(0,0,0,.04)}
.neuron-card header{display:flex;justify-content:space-between;align-items:baseline;gap:.6rem;flex-wrap:wrap}
.neuron-card h3{margin:0;font-size:1.05rem}
.labels{margin:0;display:flex;gap:.4rem;flex-wrap:wrap}
.lab{font-size:.78rem;border-radius:4px;padding:.05rem .45rem}
.lab.pos{background:#e3f0ff;color:#1b4f8a}
.lab.neg{background:#fde9e1;color:#8a3b1b}
dl.stats-inline{display:grid;grid-template-columns:repeat(3,1fr);gap:.25rem .8rem;margin:.55rem 0}
dl.stats-inline div{display:flex;flex-direction:column}
dl.stats-inline dt{font-size:.72rem;color:var(--muted)}
dl.stats-inline dd{margin:0;font-variant-numeric:tabular-nums;font-size:.9rem}
.tok-cols{display:grid;grid-template-columns:1fr 1fr;gap:.8rem}
.tok-cols h4{margin:.2rem 0 .25rem;font-size:.8rem;color:var(--muted);font-weight:600}
ol.tokens{list-style:none;margin:0;padding:0;display:flex;flex-wrap:wrap;gap:.22rem}
ol.tokens li{display:inline-flex;align-items:baseline;gap:.25rem;border-radius:4px;padding:.02rem .35rem;font-size:.8rem}
ol.tokens.pos li{background:#eef5fd}
ol.tokens.neg li{background:#fdf1ec}
code.tok{font-size:.8rem;white-space:pre}
.ws{color:#9aa4ad}
.score{color:var(--muted);font-size:.68rem;font-variant-numeric:tabular-nums}
.traces{display:grid;grid-template-columns:1fr 1fr;gap:.5rem;margin-top:.6rem}
svg.trace{width:100%;height:auto;background:#fcfcfd;border:1px solid #eef0f2;border-radius:4px}
svg.trace polyline{fill:none;stroke-width:1.3}
svg.trace polyline.true{stroke:#1d232a}
svg.trace polyline.pred{stroke:#d62728;stroke-dasharray:4 2}
svg.trace .zero{stroke:#c5cbd1;stroke-width:.8}
svg.trace .axis{stroke:#9aa4ad;stroke-width:.8}
svg.trace .tick{font-size:8px;fill:#5f6b76}
svg.trace .svg-title{font-size:9px;fill:#1d232a;font-weight:600}
svg.trace .svg-note{font-size:10px;fill:#9aa4ad}
.legend{font-size:.75rem;color:var(--muted);margin:.3rem 0 0}
.legend .sw{display:inline-block;width:1.4rem;height:0;border-top:2px solid #1d232a;vertical-align:middle;margin:0 .3rem 0 .6rem}
.legend .sw.pred{border-top:2px dashed #d62728}
.scope-item{margin-bottom:1rem}
.scope-item .claim{color:var(--muted);margin-top:0}
.scope-item table{margin-top:.3rem;table-layout:fixed}
.scope-item th:nth-child(1){width:52%}.scope-item th:nth-child(3){width:7rem}
footer{max-width:1280px;margin:0 auto;padding:1rem 2rem 2rem;color:var(--muted);font-size:.8rem;border-top:1px solid var(--line)}
@media (max-width:900px){.two-col,.hs-body{grid-template-columns:1fr}.cards{grid-template-columns:1fr}}
@media print{
html{font-size:11pt}
body>header{background:none;color:#000;padding:0 0 .4rem;border-bottom:2px solid #000}
body>header .meta{color:#333}
nav,#head-selector,.interactive,.hint,noscript{display:none!important}
main{max-width:none;padding:0}
th button::after{content:""!important}
.table-wrap,.table-wrap.tall{overflow:visible;border:none;max-height:none}
.table-wrap.tall thead th{position:static}
.cards{grid-template-columns:1fr 1fr}
.neuron-card,figure.fig,.scope-item,table.kv,.stat{break-inside:avoid;page-break-inside:avoid}
.neuron-card{box-shadow:none}
h2,h3{break-after:avoid;page-break-after:avoid}
tr{break-inside:avoid}
a{color:inherit;text-decoration:none}
.figs{grid-template-columns:1fr 1fr}
}
"""

JS = r"""
(function () {
  "use strict";
  // ---- sortable tables: click a column header (its button) to sort, again to reverse ----
  function cellValue(row, i, type) {
    var c = row.cells[i]; if (!c) return null;
    var v = c.getAttribute("data-value"); if (v === null) v = c.textContent;
    if (type === "num") { if (v === "") return null; var x = parseFloat(v); return isNaN(x) ? null : x; }
    return v.toLowerCase();
  }
  function sortTable(table, th) {
    var ths = Array.prototype.slice.call(th.parentNode.children);
    var i = ths.indexOf(th), type = th.getAttribute("data-type") || "text";
    var dir = th.getAttribute("aria-sort") === "ascending" ? "descending" : "ascending";
    ths.forEach(function (h) { if (h.hasAttribute("aria-sort")) h.setAttribute("aria-sort", "none"); });
    th.setAttribute("aria-sort", dir);
    var body = table.tBodies[0], rows = Array.prototype.slice.call(body.rows);
    var sign = dir === "ascending" ? 1 : -1;
    rows.forEach(function (r, k) { r._k = k; });
    rows.sort(function (a, b) {
      var x = cellValue(a, i, type), y = cellValue(b, i, type);
      if (x === null && y === null) return a._k - b._k;
      if (x === null) return 1; if (y === null) return -1;  // missing values last
      if (x < y) return -sign; if (x > y) return sign; return a._k - b._k;
    });
    rows.forEach(function (r) { body.appendChild(r); });
  }
  Array.prototype.forEach.call(document.querySelectorAll("table.sortable"), function (table) {
    Array.prototype.forEach.call(table.querySelectorAll("thead th"), function (th) {
      th.addEventListener("click", function () { sortTable(table, th); });
    });
  });

  // printing shows everything folded away
  window.addEventListener("beforeprint", function () {
    Array.prototype.forEach.call(document.querySelectorAll("details"), function (d) { d.open = true; });
  });

  // ---- head explorer ----
  var dataEl = document.getElementById("kernel-data");
  if (!dataEl) return;
  var D = JSON.parse(dataEl.textContent);
  var selL = document.getElementById("sel-layer"), selH = document.getElementById("sel-head");
  var svg = document.getElementById("kernel-svg"), recT = document.getElementById("head-record");
  var NS = "http://www.w3.org/2000/svg";
  var W = 560, H = 330, ML = 58, MR = 16, MT = 30, MB = 44;
  function el(name, attrs, text) {
    var e = document.createElementNS(NS, name);
    for (var k in attrs) e.setAttribute(k, attrs[k]);
    if (text !== undefined) e.textContent = text;
    return e;
  }
  function fmt(v) {
    if (v === null || v === undefined) return "\u2014";
    if (typeof v === "boolean") return v ? "yes" : "no";
    if (typeof v !== "number") return String(v);
    if (Number.isInteger(v)) return String(v);
    var a = Math.abs(v);
    if (a === 0) return "0";
    if (a >= 1e5 || a < 1e-3) return v.toPrecision(3);
    return a >= 1000 ? v.toFixed(0) : a >= 100 ? v.toFixed(1) : a >= 10 ? v.toFixed(2) : v.toFixed(3);
  }
  D.layers.forEach(function (l, j) { selL.appendChild(new Option(String(l), String(j))); });
  function heads(j) { return D.offset_kernel[j].length; }
  function fillHeads(j, keep) {
    var old = keep ? selH.value : "0";
    selH.innerHTML = "";
    for (var h = 0; h < heads(j); h++) selH.appendChild(new Option(String(h), String(h)));
    selH.value = (+old < heads(j)) ? old : "0";
  }
  function draw() {
    var j = +selL.value, h = +selH.value, layer = D.layers[j];
    var rec = D.records[layer + "-" + h] || {};
    var color = D.colors[rec.category] || "#1f77b4";
    while (svg.firstChild) svg.removeChild(svg.firstChild);
    var all = D.offset_kernel[j], n = all[h].length;
    var lo = 1;
    all.forEach(function (p) { p.forEach(function (v) { if (v > 0 && v < lo) lo = v; }); });
    var yMinExp = Math.max(-6, Math.floor(Math.log10(lo))), yMin = Math.pow(10, yMinExp), yMax = 1;
    var xMax = Math.max(2, n);  // x = d + 1, from 1 to n
    function X(x) { return ML + (W - ML - MR) * Math.log10(x) / Math.log10(xMax); }
    function Y(y) { y = Math.max(y, yMin); return MT + (H - MT - MB) * (Math.log10(yMax) - Math.log10(y)) / (Math.log10(yMax) - Math.log10(yMin)); }
    var g = el("g", {"class": "grid"});
    for (var e = yMinExp; e <= 0; e++) {
      g.appendChild(el("line", {x1: ML, x2: W - MR, y1: Y(Math.pow(10, e)), y2: Y(Math.pow(10, e)), stroke: "#e6e9ec"}));
      var t = el("text", {x: ML - 6, y: Y(Math.pow(10, e)) + 4, "text-anchor": "end", "font-size": 11, fill: "#5f6b76"}, "10");
      var s = el("tspan", {dy: -5, "font-size": 8}, String(e)); t.appendChild(s); g.appendChild(t);
    }
    for (var ex = 0; Math.pow(10, ex) <= xMax; ex++) {
      var xv = Math.pow(10, ex);
      g.appendChild(el("line", {x1: X(xv), x2: X(xv), y1: MT, y2: H - MB, stroke: "#e6e9ec"}));
      g.appendChild(el("text", {x: X(xv), y: H - MB + 15, "text-anchor": "middle", "font-size": 11, fill: "#5f6b76"}, String(xv)));
    }
    svg.appendChild(g);
    svg.appendChild(el("rect", {x: ML, y: MT, width: W - ML - MR, height: H - MT - MB, fill: "none", stroke: "#9aa4ad"}));
    function poly(p, attrs) {
      var pts = [];
      for (var d = 0; d < p.length; d++) if (p[d] !== null) pts.push(X(d + 1).toFixed(1) + "," + Y(p[d]).toFixed(1));
      attrs.points = pts.join(" "); attrs.fill = "none";
      return el("polyline", attrs);
    }
    all.forEach(function (p, k) { if (k !== h) svg.appendChild(poly(p, {stroke: "#c9ced3", "stroke-width": 1})); });
    svg.appendChild(poly(all[h], {stroke: color, "stroke-width": 2.4, id: "kernel-line", "data-layer": layer, "data-head": h}));
    svg.appendChild(el("text", {x: ML, y: 19, "font-size": 13, "font-weight": 600, fill: "#1d232a"},
      "L" + layer + "H" + h + " \u2014 " + (rec.category || "") + ", N_eff = " + fmt(rec.n_eff)));
    svg.appendChild(el("text", {x: (ML + W - MR) / 2, y: H - 8, "text-anchor": "middle", "font-size": 12, fill: "#1d232a"},
      "offset d + 1 = |n \u2212 i| + 1   (query n = " + D.n_ref + ")"));
    var yl = el("text", {x: 14, y: (MT + H - MB) / 2, "text-anchor": "middle", "font-size": 12, fill: "#1d232a",
      transform: "rotate(-90 14 " + (MT + H - MB) / 2 + ")"}, "kernel mass \u03ba(d)");
    svg.appendChild(yl);
    svg.setAttribute("data-layer", layer); svg.setAttribute("data-head", h);
    // the record
    var tb = recT.tBodies[0]; tb.innerHTML = "";
    Object.keys(rec).forEach(function (k) {
      var v = rec[k], tr = document.createElement("tr"), th = document.createElement("th"), td = document.createElement("td");
      th.textContent = k;
      if (v && typeof v === "object") td.textContent = Object.keys(v).map(function (q) { return q + " " + fmt(v[q]); }).join(", ");
      else td.textContent = fmt(v);
      tr.appendChild(th); tr.appendChild(td); tb.appendChild(tr);
    });
    Array.prototype.forEach.call(document.querySelectorAll("#head-table tbody tr"), function (r) {
      r.classList.toggle("selected", +r.getAttribute("data-layer") === layer && +r.getAttribute("data-head") === h);
    });
  }
  selL.addEventListener("change", function () { fillHeads(+selL.value, true); draw(); });
  selH.addEventListener("change", draw);
  Array.prototype.forEach.call(document.querySelectorAll("#head-table tbody tr"), function (r) {
    r.addEventListener("click", function () {
      var j = D.layers.indexOf(+r.getAttribute("data-layer"));
      if (j < 0) return;
      selL.value = String(j); fillHeads(j, false); selH.value = r.getAttribute("data-head"); draw();
    });
  });
  selL.value = "0"; fillHeads(0, false); draw();
})();
"""


def write_report(out_dir, *, model_info: dict, kernels=None, neurons=None, figures: dict[str, Path] | None = None,
                 command: str = "", provenance: dict | None = None) -> Path:
    """Write one self-contained ``out_dir/report.html`` and return its path.

    ``kernels``: a :class:`~attnscope.kernels.KernelResult`; ``neurons``: a
    :class:`~attnscope.neurons.NeuronResult` (its circuit gives the circuit section); either may be ``None``,
    and its sections are then replaced by a one-line note.  ``figures``: name -> PNG path, as returned by
    :func:`~attnscope.plots.kernel_figures` / :func:`~attnscope.plots.neuron_figures` (embedded as base64;
    unknown names go to an "other figures" section).  ``command``: the command line that produced the
    results; ``provenance``: extra provenance (seeds, hashes, ...) shown next to what the results record.
    """
    from . import __version__

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    figures = {k: Path(v) for k, v in (figures or {}).items()}
    used: set[str] = set()
    model_info = dict(model_info or {})
    if not model_info and kernels is not None:
        model_info = dict(_get(kernels, "model", {}) or {})
    if not model_info and neurons is not None:
        model_info = dict(_get(neurons, "model", {}) or {})
    name = model_info.get("name") or "model"
    date = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")

    prov: dict[str, Any] = {}
    if provenance:
        prov["run"] = dict(provenance)
    if kernels is not None:
        prov["kernel sample texts"] = dict(_get(kernels, "provenance", {}) or {})
        prov["kernel settings"] = dict(_get(kernels, "settings", {}) or {})
        rn = _get(kernels, "ref_norms", None)
        if rn:
            prov["kernel reference norms"] = {f"layer {k}": v for k, v in rn.items()}
    if neurons is not None:
        circ = _get(neurons, "circuit", {}) or {}
        prov["calibration text"] = {"source": (circ.get("settings") or {}).get("calibration"),
                                    "sha256": circ.get("calibration_sha256"),
                                    "tokens": circ.get("n_calibration_tokens")}
        prov["circuit settings"] = dict(circ.get("settings") or {})
        prov["neuron settings"] = dict(_get(neurons, "settings", {}) or {})

    nav = [("summary", "Model")]
    parts = [_header_section(model_info, command, prov, date, __version__)]
    if kernels is not None:
        parts.append(_kernel_section(kernels, figures, used))
        nav.append(("kernels", "Kernels"))
    else:
        parts.append('<p class="omitted">Positional kernels: not part of this report (no kernel results given).</p>')
    if neurons is not None:
        parts.append(_circuit_section(neurons, figures, used))
        parts.append(_neuron_section(neurons, figures, used))
        nav += [("circuit", "Circuit"), ("neurons", "Neurons")]
    else:
        err = (provenance or {}).get("circuit_error")
        if err:  # the pipeline stops before the circuit when one of the method's conditions fails
            parts.append(f'<p class="omitted" id="circuit-error">Contextual circuit and neurons: not computed, a '
                         f'condition of the method fails: {_esc(err)}</p>')
        else:
            parts.append('<p class="omitted">Contextual circuit and neurons: not part of this report (no neuron '
                         'results given).</p>')
    scope = _scope_section(kernels, neurons)
    parts.append(scope)
    if 'id="scope"' in scope:
        nav.append(("scope", "Scope"))
    other = [k for k in figures if k not in used and k not in KERNEL_FIGURES + NEURON_FIGURES + CIRCUIT_FIGURES]
    if other:
        parts.append(f'<section id="other-figures"><h2>Other figures</h2>'
                     f'<div class="figs">{"".join(_figure(k, figures[k]) for k in other)}</div></section>')
        nav.append(("other-figures", "Other figures"))
    nav_html = "".join(f'<li><a href="#{i}">{_esc(t)}</a></li>' for i, t in nav)
    page = f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="generator" content="attnscope {_esc(__version__)}">
<title>attnscope report: {_esc(name)}</title>
<link rel="icon" href="data:,">
<style>{CSS}</style>
</head>
<body>
<header><h1>attnscope report: {_esc(name)}</h1>
<p class="meta">positional kernels, contextual heads and context neurons · {_esc(date)} · attnscope {_esc(__version__)}</p>
</header>
<nav aria-label="sections"><ul>{nav_html}</ul></nav>
<main>
{"".join(parts)}
</main>
<footer>Written by attnscope {_esc(__version__)}. Self-contained: figures and data are embedded, nothing is loaded
from the network.</footer>
<script>{JS}</script>
</body>
</html>
"""
    path = out_dir / "report.html"
    path.write_text(page, encoding="utf-8")
    return path


# --------------------------------------------------------------------------------------------------
# headless Chromium
# --------------------------------------------------------------------------------------------------

CHROMIUM_INSTALL_HINT = "headless Chromium not installed: apt-get install chromium chromium-driver"


def find_chromium() -> tuple[str, str]:
    """``(browser, driver)`` paths: ``$ATTNSCOPE_CHROMIUM`` / ``$ATTNSCOPE_CHROMEDRIVER``, else the Debian
    packages' ``/usr/bin/chromium`` and ``/usr/bin/chromedriver`` (or whatever is on ``PATH``)."""
    browser = os.environ.get("ATTNSCOPE_CHROMIUM") or next(
        (p for p in ("/usr/bin/chromium", shutil.which("chromium"), shutil.which("chromium-browser"))
         if p and Path(p).is_file()), None)
    driver = os.environ.get("ATTNSCOPE_CHROMEDRIVER") or next(
        (p for p in ("/usr/bin/chromedriver", shutil.which("chromedriver")) if p and Path(p).is_file()), None)
    if not browser or not driver or not Path(browser).is_file() or not Path(driver).is_file():
        raise BrowserUnavailableError(CHROMIUM_INSTALL_HINT)
    return browser, driver


@contextlib.contextmanager
def chrome_driver(width: int = 1280, height: int = 1600) -> Iterator[Any]:
    """A headless Chromium WebDriver (Selenium) that never downloads anything; quit on exit.

    Browser console messages are kept (``driver.get_log("browser")``)."""
    browser, driver_path = find_chromium()
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError as e:
        raise BrowserUnavailableError("selenium not installed: pip install selenium") from e
    with tempfile.TemporaryDirectory(prefix="attnscope-chromium-") as profile:
        opts = webdriver.ChromeOptions()
        opts.binary_location = browser
        for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--no-first-run", "--disable-extensions", "--hide-scrollbars", f"--user-data-dir={profile}",
                  f"--window-size={width},{height}"):
            opts.add_argument(a)
        opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
        # an explicit driver path: Selenium Manager is skipped, nothing is downloaded
        service = Service(executable_path=driver_path)
        try:
            drv = webdriver.Chrome(service=service, options=opts)
        except Exception as e:  # noqa: BLE001 - report any start failure as one line
            raise BrowserUnavailableError(f"headless Chromium failed to start ({type(e).__name__}: "
                                          f"{str(e).strip().splitlines()[0] if str(e).strip() else ''})") from e
        try:
            drv.set_window_size(width, height)
            yield drv
        finally:
            drv.quit()


def set_viewport(driver: Any, width: int, height: int) -> None:
    """Exact CSS viewport size (the window size includes the browser's frame)."""
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                           {"width": int(width), "height": int(height), "deviceScaleFactor": 1, "mobile": False})


def screenshot(html_path, png_path, *, width: int = 1280, height: int = 1600, full_page: bool = False,
               driver: Any = None) -> Path:
    """Render ``html_path`` in headless Chromium and save a PNG of the top ``width`` x ``height`` pixels
    (``full_page``: the whole page, up to 16384 pixels high) to ``png_path``.  Raises
    :class:`BrowserUnavailableError` (with the apt command) when Chromium, its driver or Selenium is
    missing.  Pass ``driver`` to reuse an open :func:`chrome_driver`."""
    html_path, png_path = Path(html_path).resolve(), Path(png_path)
    png_path.parent.mkdir(parents=True, exist_ok=True)
    if driver is None:
        with chrome_driver(width, height) as drv:
            return screenshot(html_path, png_path, width=width, height=height, full_page=full_page, driver=drv)
    set_viewport(driver, width, height)
    driver.get(html_path.as_uri())
    if full_page:
        h = int(driver.execute_script("return document.documentElement.scrollHeight"))
        set_viewport(driver, width, min(max(h, 1), 16384))
    driver.execute_script("window.scrollTo(0, 0)")
    if not driver.save_screenshot(str(png_path)):
        raise AttnscopeError(f"could not save a screenshot to {png_path}")
    return png_path
