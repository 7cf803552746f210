"""The later-layer analysis as saved, typed results (issue 11): the composed circuit's record
(:class:`LaterCircuitRecord`: per layer ``l <= L`` its effective embedding, approximation error, contextual
heads with their conditions, circuit FVUs and propagation), the neuron cards and :class:`LaterResult`
with ``to_json`` / ``save`` / ``load`` (``neurons.json`` + ``neurons.csv``, versioned by ``schema_version``).

The tensors of the composition (effective embeddings, ``G_l``, each layer's kernels) are not saved: they
are recomputed from the model and the sample in about a minute on the demo model; the record keeps every
measured number the table, the cards and the report need."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from torch import Tensor

from attnscope.circuit.result import Condition
from attnscope.core.errors import AttnscopeError
from attnscope.core.serialize import from_dict
from attnscope.core.stats import median
from attnscope.neurons.evidence import NeuronEvidence
from attnscope.neurons.find import CardHead, NeuronRow, Threshold
from attnscope.neurons.groundtruth import DiscoveryScores
from attnscope.neurons.result import save_neuron_files
from attnscope.neurons.verification import ContrastVerification

SCHEMA_VERSION = 1  # of a later-layer neurons.json


@dataclass
class Approximation:
    """Held-out error of the token + position approximation of the residual entering a layer."""

    fvu: float  # normalised residual unexplained by E[x] + pi(n) (+ the known offset, if any)
    fvu_token_only: float  # by E[x] alone
    unseen_share: float  # share of positions whose token the sample never saw (direct-path fallback)
    n_positions: int


@dataclass
class EffectiveSummary:
    """What :meth:`attnscope.later.effective.EffectiveEmbedding.to_json` records about one estimate."""

    layer: int
    exact: bool
    n_seen_tokens: int
    n_vocab: int
    n_sample_positions: int
    fit_fvu: float
    fallback_r2: float | None
    n_iterations: int
    prior_count: float
    offset_removed: bool = False


@dataclass
class LayerPiece:
    """What layer ``l <= L`` contributes, with its measured conditions."""

    layer: int
    effective: EffectiveSummary
    approximation: Approximation  # held-out error of token + position
    heads: list[int]
    conditions: list[Condition]
    circuit_error: str | None  # why no contextual circuit (a failed condition), if none
    circuit_fvu_effective: float | None  # linear summary vs the heads' output on effective inputs
    circuit_fvu_true: float | None  # linear summary vs the heads' TRUE output in the model
    propagation_norm: float | None  # ||G_l||_2 (l < L): gain of the path to the MLP of L
    propagation_gain: float | None = None  # fitted scalar on G_l (1: the linearisation is calibrated)
    limiting: str | None = None  # the failed condition's measurement: the closest head and what it fails

    @property
    def limiting_condition(self) -> str:
        """The failed condition's measurement (typed, from :class:`~attnscope.core.errors.NoContextualHeadsError`;
        results saved before it was recorded show the whole ``circuit_error``)."""
        return self.limiting if self.limiting is not None else (self.circuit_error or "")

    @classmethod
    def from_json(cls, d: dict) -> LayerPiece:
        return cls(**{**d, "effective": EffectiveSummary(**d["effective"]),
                      "approximation": Approximation(**d["approximation"]),
                      "conditions": [Condition(**c) for c in d["conditions"]]})


@dataclass
class LaterCircuitRecord:
    """The composed circuit feeding the MLP of ``layer``, as measured (see :mod:`attnscope.later.method`)."""

    layer: int
    mlp_scale: float  # median scale of the norm in front of the MLP of L (true model, sample)
    min_position: int
    pieces: list[LayerPiece]  # layers 0..L
    direct: EffectiveSummary  # E'_L, pi'_L (the earlier heads' terms removed)
    approximation_with_earlier_terms: Approximation  # held-out error of E'_L + pi'_L + c_L

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> LaterCircuitRecord:
        return cls(d["layer"], d["mlp_scale"], d["min_position"], [LayerPiece.from_json(p) for p in d["pieces"]],
                   EffectiveSummary(**d["direct"]), Approximation(**d["approximation_with_earlier_terms"]))


@dataclass
class LaterCard(CardHead):
    r: float  # per-position prediction of the ranking predictor vs TRUE pre-activation, pooled over reporting
    fvu: float  # windows (bias fitted on the sample)
    parts: dict[str, float]  # term -> cov(term, y) / var(y)
    true_d: dict[str, float]  # one-vs-rest effect size per source, reporting half
    predicted_d: dict[str, float]
    positive_text: str
    negative_text: str

    @classmethod
    def from_json(cls, d: dict) -> LaterCard:
        return cls(**{**d, "top_positive_tokens": [tuple(t) for t in d["top_positive_tokens"]],
                      "top_negative_tokens": [tuple(t) for t in d["top_negative_tokens"]]})


@dataclass
class FitMedians:
    """Medians over a set of neurons of the per-position fit to the true pre-activation (None: no neuron)."""

    median_r: float | None
    median_fvu: float | None
    parts: dict[str, float | None]  # term -> median share of variance

    @classmethod
    def of(cls, r: list[float], fvu: list[float], parts: dict[str, list[float]]) -> FitMedians:
        return cls(median(r), median(fvu), {k: median(v) for k, v in parts.items()})


@dataclass
class LaterVerification:
    n_passed: int
    precision: float | None  # passed neurons validated on the reporting half (None: none passed)
    precision_random: float  # all neurons
    recall20: dict[str, float]  # source -> share of its top-20 true |d| neurons that passed
    recall20_random: float
    fit_cards: FitMedians | None  # per-position fits of the ranking predictor (fit_predictor)
    fit_random: FitMedians
    fit_predictor: str = "full"  # "hybrid": token mean + broad heads; "full": the weights-only composition
    fit_cards_full: FitMedians | None = None  # the weights-only composition beside the hybrid
    fit_random_full: FitMedians | None = None

    @classmethod
    def from_json(cls, d: dict) -> LaterVerification:
        fm = {k: None if d.get(k) is None else FitMedians(**d[k])
              for k in ("fit_cards", "fit_random", "fit_cards_full", "fit_random_full")}
        return cls(**{**d, **fm})


def _scores_from_json(d: dict) -> DiscoveryScores:
    return DiscoveryScores(d["spearman"], {int(k): v for k, v in d["precision"].items()},
                           {int(k): v for k, v in d["recall"].items()})


@dataclass
class LaterResult:
    """Context neurons of the MLP of a later layer: the ranked table, cards, verification and ground truth."""

    model: dict
    layer: int
    circuit: LaterCircuitRecord
    settings: dict  # {"circuit": CircuitSettings, "later": LaterSettings} as JSON
    sources: list[str]
    scores: dict[str, dict[str, DiscoveryScores]]  # predictor -> source -> scores on the reporting half
    random_precision: dict[str, dict[str, float]]  # source -> k -> precision@k of random neurons
    threshold: Threshold
    verification: LaterVerification
    cards: list[LaterCard]
    rows: list[NeuronRow] = field(repr=False, default_factory=list)  # every neuron, by rank
    timings: dict[str, float] = field(default_factory=dict)
    # source -> Spearman of the tuning half's TRUE effect sizes against the reporting half's: the noise of the
    # evaluation (what the tuning half's own measured truth reaches)
    ceiling: dict[str, float] = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION
    # source -> every neuron's TRUE one-vs-rest effect size on the reporting half ([d_mlp]); kept from the run
    # for callers that track neurons (attnscope evolution --layer), not saved
    true_d_report: dict[str, Tensor] = field(default_factory=dict, repr=False, compare=False)
    # the cards' top windows, histograms and direct effect on output tokens (evidence.json; no precision curve;
    # None for results saved before it existed)
    evidence: NeuronEvidence | None = field(default=None, repr=False)
    # source -> the one-vs-rest contrast verified like for like on the reporting half (issue 19: the prediction
    # from those windows' own counts, the tuning-half prediction beside it, noise ceiling, token-mean, null)
    like_for_like: dict[str, ContrastVerification] = field(default_factory=dict)

    @property
    def median_ceiling(self) -> float | None:
        return median(self.ceiling.values())

    def median_spearman(self, predictor: str) -> float | None:
        """Median over the one-vs-rest contrasts of the Spearman of ``predictor``
        (:func:`attnscope.core.stats.median`; ``None`` when no contrast has a finite one)."""
        return median(s.spearman for s in self.scores[predictor].values())

    def to_json(self) -> dict:
        return {"schema_version": self.schema_version, "model": self.model, "layer": self.layer,
                "circuit": self.circuit.to_json(), "settings": self.settings, "sources": self.sources,
                "median_spearman": {p: self.median_spearman(p) for p in self.scores},
                "ceiling": self.ceiling, "median_ceiling": self.median_ceiling,
                "scores": {p: {s: v.to_json() for s, v in d.items()} for p, d in self.scores.items()},
                "random_precision": self.random_precision, "threshold": asdict(self.threshold),
                "verification": asdict(self.verification), "timings": self.timings,
                "cards": [asdict(c) for c in self.cards], "neurons": [asdict(r) for r in self.rows],
                "like_for_like": {k: asdict(v) for k, v in self.like_for_like.items()}}

    def save(self, out: str | Path) -> Path:
        """``out/neurons.json`` (everything), ``out/neurons.csv`` (one row per neuron, as at layer 0) and
        ``out/evidence.json`` (the cards' top windows, histograms and direct effect on output tokens)."""
        out = save_neuron_files(out, self.to_json(), self.rows)
        if self.evidence is not None:
            (out / "evidence.json").write_text(json.dumps(asdict(self.evidence)))
        return out

    @classmethod
    def from_json(cls, d: dict) -> LaterResult:
        if d.get("schema_version") != SCHEMA_VERSION:
            raise AttnscopeError(f"this later-layer result has schema version {d.get('schema_version')}, this "
                                 f"attnscope reads {SCHEMA_VERSION}; rerun `attnscope neurons MODEL --layer L`")
        return cls(d["model"], d["layer"], LaterCircuitRecord.from_json(d["circuit"]), d["settings"], d["sources"],
                   {p: {s: _scores_from_json(v) for s, v in x.items()} for p, x in d["scores"].items()},
                   d["random_precision"], Threshold(**d["threshold"]), LaterVerification.from_json(d["verification"]),
                   [LaterCard.from_json(c) for c in d["cards"]], [NeuronRow(**r) for r in d["neurons"]], d["timings"],
                   d.get("ceiling", {}),
                   like_for_like={k: from_dict(ContrastVerification, v) for k, v in d.get("like_for_like", {}).items()})

    @classmethod
    def load(cls, out: str | Path) -> LaterResult:
        """Read ``out/neurons.json`` written by :meth:`save` (a later-layer one: it names its ``layer``)."""
        p = Path(out) / "neurons.json"
        if not p.is_file():
            raise AttnscopeError(f"{p} does not exist; pass the --out folder of `attnscope neurons MODEL --layer L`")
        try:
            d = json.loads(p.read_text())
        except json.JSONDecodeError as e:
            raise AttnscopeError(f"{p} is not valid JSON ({e.msg}, line {e.lineno}); rerun the analysis") from None
        if not isinstance(d, dict) or "layer" not in d:
            raise AttnscopeError(f"{p} is not a later-layer result (no 'layer'); it may be a layer-0 neurons.json")
        res = cls.from_json(d)
        ev = Path(out) / "evidence.json"
        if ev.is_file():
            res.evidence = from_dict(NeuronEvidence, json.loads(ev.read_text()))
        return res
