"""Assemble the report page: typed results in, one self-contained ``report.html`` out.

The page's CSS and JavaScript are package files (``report.css``, ``report.js``) inlined at write time."""

from __future__ import annotations

import datetime as _dt
from dataclasses import asdict
from functools import cache
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from attnscope import __version__
from attnscope.report.cards import neuron_section
from attnscope.report.html import CIRCUIT_FIGURES, KERNEL_FIGURES, NEURON_FIGURES, esc, figure_html
from attnscope.report.later import later_section
from attnscope.report.scope import scope_section
from attnscope.report.sections import circuit_section, header_section, kernel_section

if TYPE_CHECKING:
    from attnscope.circuit.build import Circuit
    from attnscope.kernels.analysis import KernelResult
    from attnscope.later.result import LaterResult
    from attnscope.neurons.find import NeuronResult


@cache
def asset(name: str) -> str:
    """Text of a package file of the report (``report.css``, ``report.js``)."""
    return resources.files(__package__).joinpath(name).read_text(encoding="utf-8")


def _provenance(provenance: dict | None, kernels: KernelResult | None, circuit: Circuit | None,
                neurons: NeuronResult | None) -> dict[str, Any]:
    prov: dict[str, Any] = {}
    if provenance:
        prov["run"] = dict(provenance)
    if kernels is not None:
        prov["kernel sample texts"] = dict(kernels.provenance)
        prov["kernel settings"] = dict(kernels.settings)
        if kernels.ref_norms:
            prov["kernel reference norms"] = {f"layer {k}": v for k, v in kernels.ref_norms.items()}
    if circuit is not None:
        prov["calibration text"] = {"source": circuit.settings.calibration, "sha256": circuit.calibration_sha,
                                    "tokens": int(circuit.calibration_tokens.numel())}
        prov["circuit settings"] = asdict(circuit.settings)
    if neurons is not None:
        prov["neuron settings"] = dict(neurons.settings)
    return prov


def _sections(kernels: KernelResult | None, circuit: Circuit | None, neurons: NeuronResult | None,
              figures: dict[str, Path], circuit_error: str | None,
              later: list[LaterResult] | None = None) -> tuple[list[str], list[tuple[str, str]]]:
    """The sections after the header, and their navigation entries."""
    used: set[str] = set()
    parts, nav = [], []
    if kernels is not None:
        parts.append(kernel_section(kernels, figures, used))
        nav.append(("kernels", "Kernels"))
    else:
        parts.append('<p class="omitted">Positional kernels: not part of this report (no kernel results given).</p>')
    if circuit is not None:
        parts.append(circuit_section(circuit, neurons, figures, used))
        nav.append(("circuit", "Circuit"))
    if neurons is not None:
        parts.append(neuron_section(neurons, figures, used))
        nav.append(("neurons", "Neurons"))
    if later:
        parts.append(later_section(later))
        nav.append(("later-layers", "Later layers"))
    if circuit is None and neurons is None:
        if later:
            parts.append('<p class="omitted">Layer-0 circuit and neurons: not part of this report (later layers '
                         'only).</p>')
        elif circuit_error:  # the pipeline stops before the circuit when one of the method's conditions fails
            parts.append(f'<p class="omitted" id="circuit-error">Contextual circuit and neurons: not computed, a '
                         f'condition of the method fails: {esc(circuit_error)}</p>')
        else:
            parts.append('<p class="omitted">Contextual circuit and neurons: not part of this report (no neuron '
                         'results given).</p>')
    scope = scope_section(kernels, circuit, neurons)
    parts.append(scope)
    if 'id="scope"' in scope:
        nav.append(("scope", "Scope"))
    other = [k for k in figures if k not in used and k not in KERNEL_FIGURES + NEURON_FIGURES + CIRCUIT_FIGURES]
    if other:
        parts.append(f'<section id="other-figures"><h2>Other figures</h2>'
                     f'<div class="figs">{"".join(figure_html(k, figures[k]) for k in other)}</div></section>')
        nav.append(("other-figures", "Other figures"))
    return parts, nav


def _page(name: str, date: str, version: str, nav: list[tuple[str, str]], parts: list[str]) -> str:
    nav_html = "".join(f'<li><a href="#{i}">{esc(t)}</a></li>' for i, t in nav)
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="generator" content="attnscope {esc(version)}">
<title>attnscope report: {esc(name)}</title>
<link rel="icon" href="data:,">
<style>{asset("report.css")}</style>
</head>
<body>
<header><h1>attnscope report: {esc(name)}</h1>
<p class="meta">positional kernels, contextual heads and context neurons · {esc(date)} · attnscope {esc(version)}</p>
</header>
<nav aria-label="sections"><ul>{nav_html}</ul></nav>
<main>
{"".join(parts)}
</main>
<footer>Written by attnscope {esc(version)}. Self-contained: figures and data are embedded, nothing is loaded
from the network.</footer>
<script>{asset("report.js")}</script>
</body>
</html>
"""


def write_report(out_dir: str | Path, *, model_info: dict | None = None, kernels: KernelResult | None = None,
                 circuit: Circuit | None = None, neurons: NeuronResult | None = None,
                 figures: dict[str, Path] | None = None, command: str = "", provenance: dict | None = None,
                 circuit_error: str | None = None, later: list[LaterResult] | None = None) -> Path:
    """Write one self-contained ``out_dir/report.html`` and return its path.

    ``kernels``, ``circuit``, ``neurons``: the typed results of each stage; any may be ``None`` and its
    section is then left out (with a one-line note; ``circuit_error`` says why the circuit was not built).
    ``later``: later-layer results (:class:`~attnscope.later.result.LaterResult`, one per layer), shown in
    their own section.
    ``figures``: name -> PNG path, as returned by :func:`~attnscope.report.plots.kernel_figures` /
    :func:`~attnscope.report.plots.neuron_figures` (embedded as base64; unknown names go to an "other figures"
    section).  ``command``: the command line that produced the results; ``provenance``: extra provenance
    (seeds, hashes, ...) shown next to what the results record.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    figs = {k: Path(v) for k, v in (figures or {}).items()}
    model_info = dict(model_info or {}) or dict(kernels.model if kernels is not None else
                                                neurons.model if neurons is not None else
                                                later[0].model if later else {})
    date = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    prov = _provenance(provenance, kernels, circuit, neurons)
    parts, nav = _sections(kernels, circuit, neurons, figs, circuit_error, later)
    parts.insert(0, header_section(model_info, command, prov, date, __version__))
    page = _page(model_info.get("name") or "model", date, __version__, [("summary", "Model"), *nav], parts)
    path = out_dir / "report.html"
    path.write_text(page, encoding="utf-8", errors="backslashreplace")  # a file name that is not UTF-8
    return path
