"""The whole method end to end: kernels -> contextual circuit -> neurons -> figures -> HTML report."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from attnscope.circuit.build import Circuit, CircuitSettings, build_circuit
from attnscope.core.errors import ConditionFailedError
from attnscope.kernels.analysis import KernelResult, KernelSettings, analyse_kernels
from attnscope.later.evaluate import find_later_layers
from attnscope.later.method import LaterSettings
from attnscope.later.result import LaterResult
from attnscope.models import ModelWeights
from attnscope.neurons.find import NeuronResult, NeuronSettings, find_neurons
from attnscope.report import write_report
from attnscope.report.plots import kernel_figures, neuron_figures


@dataclass
class ReportResult:
    out: Path
    report: Path
    kernels: KernelResult
    circuit: Circuit | None
    neurons: NeuronResult | None
    circuit_error: str | None  # why the circuit was not built (a condition of the method failed)
    timings: dict[str, float] = field(default_factory=dict)
    later: list[LaterResult] = field(default_factory=list)  # later MLP layers, when asked for


def run_report(w: ModelWeights, out: str | Path, *, kernel_settings: KernelSettings | None = None,
               circuit_settings: CircuitSettings | None = None, neuron_settings: NeuronSettings | None = None,
               command: str = "", progress: bool = True, log=print,
               later_layers: list[int] | None = None, shown_out: str | Path | None = None) -> ReportResult:
    """Run every stage on ``w`` and write ``out/report.html`` (plus each stage's JSON, arrays and figures:
    ``out/kernels``, ``out/circuit``, ``out/neurons``; ``later_layers``: also the context neurons of those
    MLP layers, ``out/later/L{L}``, in their own report section).  ``shown_out``: the folder named in the log
    lines (the final one, when ``out`` is a staging folder renamed into place afterwards)."""
    out = Path(out)
    shown = Path(shown_out) if shown_out is not None else out
    out.mkdir(parents=True, exist_ok=True)
    t: dict[str, float] = {}
    t0 = time.perf_counter()
    kres = analyse_kernels(w, kernel_settings or KernelSettings(), progress=progress)
    kres.save(out / "kernels")
    figs = {k: p for k, p in kernel_figures(kres, out / "kernels").items()}
    t["kernels"] = time.perf_counter() - t0
    log(f"kernels: {len(kres.records)} heads in {t['kernels']:.1f} s -> {shown / 'kernels'}")
    circ, nres, err = None, None, None
    t0 = time.perf_counter()
    try:
        circ = build_circuit(w, circuit_settings or CircuitSettings())
        circ.save(out / "circuit")
        nres = find_neurons(w, circ, neuron_settings or NeuronSettings(), progress=progress)
        nres.save(out / "neurons")
        figs.update(neuron_figures(nres, circ, out / "neurons"))
        s = nres.summary()
        log(f"neurons: contextual heads {s['heads']}; {s['n_neurons_found']} neurons found, median r "
            f"{s['median_r']:.3f}, median FVU {s['median_fvu']:.3f} -> {shown / 'neurons'}" if s["median_r"] is not None
            else f"neurons: contextual heads {s['heads']}; no neuron passed the selection")
    except ConditionFailedError as e:
        err = str(e)
        (out / "neurons").mkdir(exist_ok=True)
        (out / "neurons" / "condition_failed.json").write_text(json.dumps({"error": err}))
        log(f"neurons: not computed, a condition of the method fails: {err}")
    t["circuit_and_neurons"] = time.perf_counter() - t0
    later = _later(w, later_layers, circuit_settings, neuron_settings, out, log, shown) if later_layers else []
    if later:
        t["later_layers"] = time.perf_counter() - t0 - t["circuit_and_neurons"]
    report = write_report(out, model_info=w.info(), kernels=kres, circuit=circ, neurons=nres, figures=figs,
                          command=command, provenance={"kernels": kres.provenance, "timings_s": t},
                          circuit_error=err, later=later)
    return ReportResult(out, report, kres, circ, nres, err, t, later)


def _later(w: ModelWeights, layers: list[int], cs: CircuitSettings | None, ns: NeuronSettings | None, out: Path,
           log, shown: Path) -> list[LaterResult]:
    ns = ns or NeuronSettings()
    res = find_later_layers(w, layers, cs, LaterSettings(eval=ns.eval, n_cards=ns.max_neurons))
    for r in res:
        r.save(out / "later" / f"L{r.layer}")
        log(f"layer {r.layer}: {r.verification.n_passed} neurons pass; median Spearman full "
            f"{r.median_spearman('full'):.3f} (token-mean {r.median_spearman('token_mean'):.3f}) -> {shown / 'later'}")
    return res
