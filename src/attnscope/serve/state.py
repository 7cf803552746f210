r"""What the server holds once: the model, its contextual circuit, the explanation and the neuron table.

With ``--analysis DIR`` the circuit and the selected neurons come from a saved analysis (the output
folder of ``attnscope report`` or ``attnscope neurons``); otherwise they are computed at start-up with
the CLI's defaults (``build_circuit`` then ``find_neurons``).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch

from attnscope.circuit.build import Circuit, CircuitSettings, build_circuit
from attnscope.core.errors import AttnscopeError, ConditionFailedError
from attnscope.models import ModelWeights
from attnscope.neurons.contrast import TokenModel, build_token_model
from attnscope.neurons.find import find_neurons
from attnscope.serve.analysis import Analyser
from attnscope.serve.explanation import Explanation, make_explanation
from attnscope.serve.scope import calibration_reference
from attnscope.serve.table import NeuronRow, build_table


@dataclass
class ServeModel:
    w: ModelWeights
    circ: Circuit
    explanation: Explanation
    analyser: Analyser
    table: list[NeuronRow]
    score_name: str  # what the table's ranking sorts by (a key of table.SCORE_NAMES)
    neurons_json: dict  # the neurons result the table came from (NeuronResult.to_json() or neurons.json)
    source: str  # where the circuit and neurons came from
    timings: dict[str, float] = field(default_factory=dict)
    token_model: TokenModel | None = None  # the token scores the report's cards show (one quantity, both places)


def _check_folder(analysis: Path) -> None:
    if not analysis.is_dir():
        raise AttnscopeError(f"--analysis {analysis} is not a folder; pass the output folder of `attnscope report` "
                             "or `attnscope neurons`")


def _neurons_json(analysis: Path) -> dict | None:
    for p in (analysis / "neurons.json", analysis / "neurons" / "neurons.json"):
        if p.is_file():
            try:
                return json.loads(p.read_text())
            except json.JSONDecodeError as err:
                raise AttnscopeError(f"{p} is not valid JSON ({err.msg}); re-run `attnscope neurons`") from None
    failed = analysis / "neurons" / "condition_failed.json"
    if failed.is_file():
        raise ConditionFailedError(f"the analysis in {analysis} has no circuit: "
                                   f"{json.loads(failed.read_text()).get('error', 'a condition failed')}")
    return None


def _saved_circuit(analysis: Path) -> Circuit | None:
    for p in (analysis, analysis / "circuit"):
        if (p / "circuit.json").is_file() and (p / "circuit.safetensors").is_file():
            return Circuit.load(p)
    return None


def _check_same_model(w: ModelWeights, saved: dict, circ: Circuit | None, analysis: Path) -> None:
    info = w.info()
    keys = ("architecture", "n_layers", "n_heads", "d_model", "d_mlp", "d_vocab")
    diff = [k for k in keys if k in saved and saved[k] != info[k]]
    if circ is not None and tuple(circ.ext.shape) != (w.d_vocab, w.d_model):
        diff.append("d_vocab, d_model")
        saved = {**saved, "d_vocab, d_model": tuple(circ.ext.shape)}
        info = {**info, "d_vocab, d_model": (w.d_vocab, w.d_model)}
    if diff:
        raise AttnscopeError(f"the analysis in {analysis} was made for model {saved.get('name')!r}, "
                             f"not {info['name']!r} "
                             f"({', '.join(f'{k} {saved[k]} != {info[k]}' for k in diff)}); pass that model")


def _rebuild(w: ModelWeights, saved: dict, analysis: Path) -> Circuit:
    """The circuit from a neurons.json's recorded settings and heads (deterministic)."""
    names = {f.name for f in fields(CircuitSettings)}
    s = CircuitSettings(**{k: v for k, v in saved["settings"].items() if k in names})
    s.heads = list(saved["heads"])
    circ = build_circuit(w, s)
    if circ.calibration_sha != saved.get("calibration_sha256", circ.calibration_sha):
        raise AttnscopeError(f"the calibration text {s.calibration} changed since the analysis in {analysis} was made; "
                             "re-run the analysis")
    return circ


def circuit_from_analysis(w: ModelWeights, analysis: Path) -> tuple[Circuit, dict | None]:
    """A saved analysis's circuit (``Circuit.load`` when it was saved, as `attnscope report` does; else rebuilt
    from the settings and heads recorded in ``neurons.json``) and its neurons result as JSON (``None`` if absent)."""
    _check_folder(analysis)
    d = _neurons_json(analysis)
    circ = _saved_circuit(analysis)
    _check_same_model(w, (d or {}).get("model", {}), circ, analysis)
    if circ is None and d is None:
        raise AttnscopeError(f"no circuit or neurons.json in {analysis}; pass the output folder of `attnscope report` "
                             "or `attnscope neurons`")
    if circ is None:
        assert d is not None, "no circuit and no neurons.json raised above"
        circ = _rebuild(w, d["circuit"], analysis)
    return circ, d


def load_serve_model(w: ModelWeights, analysis: Path | None = None, log=print) -> ServeModel:
    """Everything the server needs, computed once."""
    t: dict[str, float] = {}
    t0 = time.perf_counter()
    with torch.no_grad():
        if analysis is not None:
            circ, result = circuit_from_analysis(w, Path(analysis))
            source = f"saved analysis {analysis}"
            if result is None:
                result = find_neurons(w, circ, progress=False).to_json()
        else:
            log(f"computing the contextual circuit and the neurons of {w.name} (`attnscope report {w.name} --out DIR` "
                "once, then --analysis DIR, skips this)")
            try:
                circ = build_circuit(w)
            except ConditionFailedError as err:
                raise ConditionFailedError(f"{err}; or run `attnscope neurons {w.name} --heads ... --out DIR` and "
                                           "pass --analysis DIR") from None
            result = find_neurons(w, circ, progress=False).to_json()
            source = "computed at start-up (calibration " + circ.settings.calibration + ")"
        t["circuit_and_neurons"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        expl = make_explanation(w, circ)
        tm = build_token_model(w, circ, getattr(expl, "ex", None))
        analyser = Analyser(w, circ, expl, calibration_reference(w, circ))
        table, score_name = build_table(result, source)
        t["explanation_and_table"] = time.perf_counter() - t0
    log(f"contextual heads {circ.heads}; {sum(r.selected for r in table)} selected neurons of {len(table)}; "
        f"explanation: {expl.kind} ({source})")
    return ServeModel(w, circ, expl, analyser, table, score_name, result, source, t, tm)
