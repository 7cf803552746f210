r"""What the server holds once: the model, its contextual circuit, the explanation and the neuron table.

With ``--analysis DIR`` the circuit and the ranked neurons come from a saved analysis (the output folder of
``attnscope report`` or ``attnscope neurons``), loaded as the typed
:class:`~attnscope.neurons.result.NeuronResult` (``NeuronResult.load``: ``neurons.json`` with the circuit
saved beside it); otherwise they are computed at start-up with the CLI's defaults (``build_circuit`` then
``find_neurons``).  The page's table is the result's :class:`~attnscope.neurons.result.NeuronRow` list, shown
with each reported neuron's card (:meth:`ServeModel.row_json`).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from attnscope.circuit.build import Circuit, build_circuit
from attnscope.core.errors import AttnscopeError, ConditionFailedError
from attnscope.models import ModelWeights
from attnscope.neurons.contrast import TokenModel, build_token_model
from attnscope.neurons.find import find_neurons
from attnscope.neurons.label_check import checked_labels
from attnscope.neurons.result import NeuronCard, NeuronResult, NeuronRow
from attnscope.serve.analysis import Analyser
from attnscope.serve.explanation import Explanation, make_explanation
from attnscope.serve.scope import calibration_reference

N_TOP_TOKENS = 8  # top tokens per row of the page's table
SCORE_NAMES = {  # the ranking's score, as the page names it
    "sensitivity": "sensitivity: the largest predicted one-vs-rest effect size |d| over the held-out contexts",
}


@dataclass
class ServeModel:
    w: ModelWeights
    circ: Circuit
    explanation: Explanation
    analyser: Analyser
    neurons: NeuronResult | None  # the ranked neurons (saved or computed at start-up); None: no table (benchmarks)
    source: str  # where the circuit and neurons came from
    timings: dict[str, float] = field(default_factory=dict)
    token_model: TokenModel | None = None  # the token scores the report's cards show (one quantity, both places)
    score_name: str = "sensitivity"  # what the table's ranking sorts by (a key of SCORE_NAMES)
    table: list[NeuronRow] = field(init=False)  # every neuron, in rank order (NeuronRow.sensitivity is the score)
    cards: dict[int, NeuronCard] = field(init=False)  # the reported neurons' cards, by neuron index

    def __post_init__(self) -> None:
        res = self.neurons
        self.table = sorted(res.rows, key=lambda r: r.rank) if res is not None else []
        self.cards = {c.index: c for c in res.cards} if res is not None else {}

    def row_json(self, row: NeuronRow) -> dict:
        """The page's row of the ranked table: the row's score, swings, selection and top tokens, with its card's
        labels (withheld when they contradict the neuron's best contrast, as in the report) and held-out fit."""
        c = self.cards.get(row.index)
        lab, lab_neg, _ = checked_labels(c.label if c else None, c.label_negative if c else None, row.best_contrast,
                                         row.predicted_d)
        d = {"index": row.index, "rank": row.rank, "score": float(row.sensitivity),
             "swing_positive": float(row.swing_positive), "swing_negative": float(row.swing_negative),
             "selected": bool(row.passed), "label": lab, "label_negative": lab_neg,
             "r": c.r if c else None, "fvu": c.fvu if c else None,
             "top_positive": row.top_positive_tokens[:N_TOP_TOKENS],
             "top_negative": row.top_negative_tokens[:N_TOP_TOKENS]}
        return {k: (None if isinstance(v, float) and v != v else v) for k, v in d.items()}


def _check_folder(analysis: Path) -> None:
    if not analysis.is_dir():
        raise AttnscopeError(f"--analysis {analysis} is not a folder; pass the output folder of `attnscope report` "
                             "or `attnscope neurons`")


def _neurons_dir(analysis: Path) -> Path | None:
    """The folder holding the saved ``neurons.json`` (``DIR`` itself or ``DIR/neurons``), or ``None``."""
    for p in (analysis, analysis / "neurons"):
        if (p / "neurons.json").is_file():
            return p
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


def circuit_from_analysis(w: ModelWeights, analysis: Path) -> tuple[Circuit, NeuronResult | None]:
    """A saved analysis's circuit and its ranked neurons: the :class:`NeuronResult` saved in ``DIR`` or
    ``DIR/neurons`` (``NeuronResult.load``, with the circuit saved beside it), else the circuit alone
    (``DIR/circuit`` or ``DIR``; the neurons are then computed) and ``None``."""
    _check_folder(analysis)
    ndir = _neurons_dir(analysis)
    res = NeuronResult.load(ndir, table_only=True) if ndir is not None else None  # no traces or evidence
    circ = res.circuit if res is not None else _saved_circuit(analysis)
    if circ is None:
        raise AttnscopeError(f"no circuit or neurons.json in {analysis}; pass the output folder of `attnscope report` "
                             "or `attnscope neurons`")
    _check_same_model(w, res.model if res is not None else {}, circ, analysis)
    return circ, res


def load_serve_model(w: ModelWeights, analysis: Path | None = None, log=print) -> ServeModel:
    """Everything the server needs, computed once."""
    t: dict[str, float] = {}
    t0 = time.perf_counter()
    with torch.no_grad():
        if analysis is not None:
            circ, result = circuit_from_analysis(w, Path(analysis))
            source = f"saved analysis {analysis}"
            if result is None:
                result = find_neurons(w, circ, progress=False)
        else:
            log(f"computing the contextual circuit and the neurons of {w.name} (`attnscope report {w.name} --out DIR` "
                "once, then --analysis DIR, skips this)")
            try:
                circ = build_circuit(w)
            except ConditionFailedError as err:
                raise ConditionFailedError(f"{err}; or run `attnscope neurons {w.name} --heads ... --out DIR` and "
                                           "pass --analysis DIR") from None
            result = find_neurons(w, circ, progress=False)
            source = "computed at start-up (calibration " + circ.settings.calibration + ")"
        t["circuit_and_neurons"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        expl = make_explanation(w, circ)
        tm = build_token_model(w, circ, getattr(expl, "ex", None))
        analyser = Analyser(w, circ, expl, calibration_reference(w, circ))
        m = ServeModel(w, circ, expl, analyser, result, source, t, tm)
        t["explanation_and_table"] = time.perf_counter() - t0
    log(f"contextual heads {circ.heads}; {sum(r.passed for r in m.table)} selected neurons of {len(m.table)}; "
        f"explanation: {expl.kind} ({source})")
    return m
