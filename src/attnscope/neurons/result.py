"""Typed results of the layer-0 neuron stage (:func:`attnscope.neurons.find.find_neurons`): the ranked table,
the measured threshold, the verification against true pre-activations, neuron cards and traces, and
:class:`NeuronResult` with ``save``/``load``."""

from __future__ import annotations

import csv
import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from attnscope.circuit.result import Circuit
from attnscope.core.errors import AttnscopeError
from attnscope.core.serialize import from_dict, read_versioned
from attnscope.core.stats import median
from attnscope.neurons.evidence import NeuronEvidence
from attnscope.neurons.explain import TextDenominators
from attnscope.neurons.groundtruth import D_MIN  # noqa: F401  (re-exported: one definition)
from attnscope.neurons.verification import ContrastVerification

SCHEMA_VERSION = 1  # of neurons.json (1: first loadable version, with the circuit saved beside it)


ROW_TERMS = ("contextual bag", "direct", "other heads")  # the order of NeuronRow.d_bag, d_direct, d_other_heads


@dataclass
class NeuronSettings:
    eval: list[str] | None = None  # held-out sources (default: the bundled texts; the calibration window skipped)
    max_windows: int = 8  # windows per source: first half tunes the threshold, second half reports
    precision_target: float = 0.9  # the reported set: longest prefix of the ranking with tuning precision >= this
    max_neurons: int = 64  # reported neurons given a card (explanation, traces), most sensitive first
    n_random: int = 64  # random neurons for the baselines
    n_top_tokens: int = 20
    top_m: int = 100  # size of the token set that defines a neuron's swing
    seed: int = 0
    chunk: int = 1024  # neurons scored at a time (memory: d_vocab x chunk)


@dataclass
class NeuronRow:
    """One neuron's row of the ranked table (every neuron has one)."""

    index: int
    rank: int  # 1 = most context-sensitive
    sensitivity: float  # max over contrasts of |predicted d|
    best_contrast: str  # the held-out source whose one-vs-rest contrast gives it
    predicted_d: float  # signed, in that contrast
    d_bag: float  # the part of predicted_d carried by the contextual bag (context evidence) ...
    d_direct: float  # ... by the token at n itself (token evidence) ...
    d_other_heads: float  # ... and by the other heads (mostly nearby tokens)
    swing_positive: float  # contextual bag alone: mean(top-m S) - E_cal[S], pre-activation units
    swing_negative: float
    sigma_calibration: float  # std of the true pre-activation on the calibration text
    passed: bool  # sensitivity >= the measured threshold
    validated_tuning: bool  # |d| >= 1 with the predicted sign in some contrast, tuning half
    top_positive_tokens: list[str]
    top_negative_tokens: list[str]
    d_norm_scale: float = 0.0  # ... and by the norm's per-token scale (the token model's "norm scale" term)
    true_d: float | None = None  # the true effect size in best_contrast, reporting half (None: not measured)


def write_neuron_csv(rows: list[NeuronRow], path: Path) -> None:
    """One CSV row per neuron, the columns of :class:`NeuronRow` (token lists joined by spaces); the layer-0 and
    the later-layer results write the same table."""
    cols = [f.name for f in fields(NeuronRow)]
    with path.open("w", newline="") as f:
        wr = csv.writer(f)
        wr.writerow(cols)
        for r in rows:
            wr.writerow([" ".join(v) if isinstance(v, list) else v for v in (getattr(r, c) for c in cols)])


def save_neuron_files(out: str | Path, data: dict, rows: list[NeuronRow]) -> Path:
    """``out/neurons.json`` (``data``, a result's JSON) and ``out/neurons.csv`` (:func:`write_neuron_csv`): what
    the layer-0 and the later-layer results both write."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "neurons.json").write_text(json.dumps(data, indent=1))
    write_neuron_csv(rows, out / "neurons.csv")
    return out


@dataclass
class Threshold:
    value: float  # neurons with sensitivity >= value pass (inf: none)
    precision_target: float
    tuning_precision: float  # precision of the passed set on the tuning half
    n_passed: int
    base_rate_tuning: float  # share of all neurons validated on the tuning half


@dataclass
class FitSummary:
    """Medians over a set of neurons of the full explanation's fit to the true pre-activation."""

    n_neurons: int  # every median is None when there is no finite value (e.g. no neuron)
    r: float | None
    fvu: float | None
    r_within: float | None
    fvu_within: float | None
    parts: dict[str, float | None]  # term -> median share of variance explained
    contextual_r: float | None  # contextual-heads fidelity: predicted vs true contribution of those heads only
    contextual_fvu: float | None


@dataclass
class Verification:
    """Output of :func:`verify`, on the reporting half of the held-out windows."""

    precision: float  # share of the reported set with |d| >= 1 and the predicted sign in some contrast
    precision_random: float  # the same share for all neurons (the base rate)
    recall20: dict[str, float]  # per contrast: share of its top-20 by |d| in the reported set
    recall20_random: float  # expected for a random set of the same size
    reported: FitSummary | None
    random: FitSummary
    circuit_fidelity: dict[str, float]  # linear summary vs the contextual heads' true summed output
    n_positions: int
    # per source, its one-vs-rest contrast verified like for like on the reporting half (prediction from those
    # windows' counts; the tuning-half prediction the ranking uses beside it; noise ceiling, token-mean, null)
    like_for_like: dict[str, ContrastVerification] = field(default_factory=dict)


@dataclass
class CardHead:
    """What every neuron card starts with (layer 0 and the later layers): rank, token evidence and labels."""

    index: int
    rank: int
    sensitivity: float
    top_positive_tokens: list[tuple[str, float]]
    top_negative_tokens: list[tuple[str, float]]
    label: str | None
    label_evidence: str | None
    label_negative: str | None
    label_negative_evidence: str | None


@dataclass
class NeuronCard(CardHead):
    fired_on_calibration: bool
    r: float  # full explanation vs TRUE pre-activation, pooled over the reporting windows
    fvu: float
    r_within: float
    fvu_within: float
    parts: dict[str, float]
    contextual_r: float  # contextual-heads fidelity
    contextual_fvu: float
    true_d: dict[str, float]  # one-vs-rest effect size per source, reporting half
    positive_text: str
    negative_text: str

    @property
    def effect(self) -> float:
        return self.sensitivity


@dataclass
class NeuronTrace:
    neuron: int
    text: str
    true_pre: list[float]
    predicted_pre: list[float]  # the full explanation
    true_contextual: list[float]  # the contextual heads' true contribution
    predicted_contextual: list[float]  # the contextual bag


@dataclass
class NeuronResult:
    model: dict
    circuit: Circuit  # the contextual circuit the neurons were scored with (saved on its own by Circuit.save)
    settings: dict
    sources: list[str]
    rows: list[NeuronRow]  # every neuron, by rank
    threshold: Threshold
    verification: Verification
    cards: list[NeuronCard]  # the reported neurons with a card, by rank
    denominators: list[TextDenominators]
    traces: list[NeuronTrace] = field(repr=False, default_factory=list)
    # the cards' activation examples, histograms and direct logit effects, and the precision curve
    # (evidence.json; None for results saved before it existed)
    evidence: NeuronEvidence | None = field(repr=False, default=None)

    @property
    def n_scored(self) -> int:
        return len(self.rows)

    @property
    def n_selected(self) -> int:
        return self.threshold.n_passed

    @property
    def records(self) -> list[NeuronCard]:
        return self.cards

    @property
    def fidelity(self) -> dict[str, float]:
        return self.verification.circuit_fidelity

    def trace(self, neuron: int, text: str) -> NeuronTrace | None:
        return next((t for t in self.traces if t.neuron == neuron and t.text == text), None)

    def summary(self) -> dict:
        v, rep = self.verification, self.verification.reported
        return {"heads": self.circuit.heads, "n_heads": len(self.circuit.heads),
                "query_conditioned": self.circuit.query_conditioned,
                "n_neurons_scored": self.n_scored,
                "n_neurons_found": self.n_selected,
                "n_verified": len(self.cards), "median_r": rep.r if rep else None,
                "threshold": self.threshold.value, "tuning_precision": self.threshold.tuning_precision,
                "precision": v.precision, "precision_random": v.precision_random,
                "median_recall20": median(list(v.recall20.values())), "recall20_random": v.recall20_random,
                "median_fvu": rep.fvu if rep else None, "median_fvu_within": rep.fvu_within if rep else None,
                "median_fvu_random": v.random.fvu, "median_fvu_within_random": v.random.fvu_within,
                **like_for_like_summary(v.like_for_like),
                "texts_out_of_scope": [d.text for d in self.denominators if not d.in_scope]}

    def to_json(self) -> dict:
        dens = [{**{k: v for k, v in asdict(d).items() if k != "Z_trace"}, "in_scope": d.in_scope}
                for d in self.denominators]
        return {"schema_version": SCHEMA_VERSION, "model": self.model, "circuit": self.circuit.to_json(),
                "settings": self.settings, "sources": self.sources,
                "summary": self.summary(), "threshold": asdict(self.threshold),
                "verification": asdict(self.verification), "denominators": dens,
                "cards": [asdict(c) for c in self.cards], "neurons": [asdict(r) for r in self.rows]}

    @classmethod
    def load(cls, out: str | Path, *, table_only: bool = False) -> NeuronResult:
        """The result :meth:`save` wrote to ``out``; its circuit from ``out/circuit`` or, in a report folder,
        from the sibling ``circuit/`` folder.  ``table_only``: neurons.json and the circuit alone (no traces,
        denominator traces or evidence; what ``serve`` shows), about half the time on the demo."""
        out = Path(out)
        d = read_versioned(out / "neurons.json", SCHEMA_VERSION, "neurons.json (`attnscope neurons` or `report`)")
        circ_dir = next((p for p in (out / "circuit", out.parent / "circuit") if (p / "circuit.json").is_file()), None)
        if circ_dir is None:
            raise AttnscopeError(f"no circuit/ folder beside {out / 'neurons.json'}; re-run `attnscope neurons` or "
                                 "`attnscope report`, which save it")
        trp, ev = out / "traces.json", out / "evidence.json"
        tr = json.loads(trp.read_text()) if trp.is_file() and not table_only else {}
        evidence = from_dict(NeuronEvidence, json.loads(ev.read_text())) if ev.is_file() and not table_only else None
        z = tr.get("denominators", {})
        dens = [from_dict(TextDenominators, {**x, "Z_trace": z.get(x["text"], [])}) for x in d["denominators"]]
        return cls(model=d["model"], circuit=Circuit.load(circ_dir), settings=d["settings"], sources=d["sources"],
                   rows=[NeuronRow(**r) for r in d["neurons"]],  # flat rows: direct, 3x faster than dacite (serve)
                   threshold=from_dict(Threshold, d["threshold"]),
                   verification=from_dict(Verification, d["verification"]),
                   cards=[from_dict(NeuronCard, c) for c in d["cards"]], denominators=dens,
                   traces=[from_dict(NeuronTrace, t) for t in tr.get("traces", [])], evidence=evidence)

    def save(self, out: str | Path) -> Path:
        """``neurons.json`` (everything), ``neurons.csv`` (one row per neuron), ``traces.json`` and
        ``evidence.json`` (the cards' activation examples, histograms, direct logit effects; the precision curve)."""
        out = save_neuron_files(out, self.to_json(), self.rows)
        (out / "traces.json").write_text(json.dumps({"traces": [asdict(t) for t in self.traces],
                                                     "denominators": {d.text: d.Z_trace for d in self.denominators}}))
        if self.evidence is not None:
            (out / "evidence.json").write_text(json.dumps(asdict(self.evidence), allow_nan=True))
        return out


def like_for_like_summary(lfl: dict[str, ContrastVerification]) -> dict:
    """Medians over the one-vs-rest contrasts: like for like, the ranking's prediction, the noise ceiling and
    the baselines (empty when the verification was not run)."""
    if not lfl:
        return {}
    vs = list(lfl.values())
    nc = [v.noise_ceiling.spearman_brown for v in vs if v.noise_ceiling is not None]
    return {"median_spearman_like_for_like": median([v.like_for_like.spearman for v in vs]),
            "median_spearman_tuning_counts": median([v.whole_source.spearman for v in vs]),
            "median_noise_ceiling": median(nc) if nc else None,
            "median_spearman_token_mean": median([v.token_mean.spearman for v in vs]),
            "median_spearman_shuffled": median([v.shuffled_null.spearman for v in vs])}
