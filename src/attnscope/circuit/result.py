"""The contextual circuit as a saved, typed result (method §6-7): settings, the per-head decisions with
their failed criteria, the stated conditions with their group, and :class:`Circuit` with ``save``/``load``
(``circuit.json`` + ``circuit.safetensors``, versioned by ``schema_version``).  Built by
:func:`attnscope.circuit.build.build_circuit`."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from enum import Enum
from pathlib import Path
from typing import Literal

from jaxtyping import Bool, Float, Int
from torch import Tensor

from attnscope.core.errors import AttnscopeError

LAYER = 0  # the method is exact about layer 0: its heads read token and position embeddings only
SCHEMA_VERSION = 2  # of circuit.json / circuit.safetensors (2: the query-conditioned form and its fidelity)

#: ``CircuitSettings.query_conditioned``: which per-position summary the circuit uses (docs/rotary-split.md)
QUERY_CONDITIONED_CHOICES = ("auto", "on", "off")
#: the issue-10 target for the summary's FVU; ``auto`` takes the query-conditioned form when the typical-query
#: summary misses it on the calibration text and the query-conditioned one does better there
SUMMARY_FVU_MAX = 0.35


@dataclass
class CircuitSettings:
    """Choices that determine the circuit (recorded in the output)."""

    calibration: str = "bundled:en_moby_dick"
    n_ctx: int | None = None  # calibration tokens used (default min(context, 256))
    window: int = 100  # windowed-denominator width (the method's 100)
    min_position: int | None = None  # positions n < this are excluded from statistics (default window // 4)
    heads: list[int] | None = None  # force the contextual heads (skip detection)
    neff_min: float = 16.0  # broad kernel: N_eff >= this
    logit_std_max: float = 1.0  # weak content dependence: std of log f over calibration tokens <= this
    denominator_cv_max: float = 0.15  # stable denominator: CV of Z_n over calibration positions <= this
    share_tv_max: float = 0.3  # shared kernel: TV(head kernel, shared kernel) <= this
    decomposition_tv_max: float = 0.2  # the content/position split holds: median TV <= this
    f_clip: float = 3.0  # f is clipped at f_clip * median f (the method clips f at 3)
    query_conditioned: str = "auto"  # auto | on | off: content factors per query token (circuit_query.py)


@dataclass
class CircuitRecord(CircuitSettings):
    """The settings as a built circuit used them: the user's :class:`CircuitSettings` with ``n_ctx`` and
    ``min_position`` resolved, plus what was derived from the model and the calibration text."""

    # always resolved by the build; redeclared (not optional) so that use sites need no None check.  A
    # redeclared dataclass field keeps its place in the field order, so circuit.json is unchanged.
    n_ctx: int = 0
    min_position: int = 0
    reference_position: int = 0  # n*: the position whose content the content factors are measured at
    reference_norm: float = 0.0  # norm of the typical residual used to normalise positional value inputs
    bos: int | None = None  # the BOS token id split off as a sink, None without a BOS
    prepend_bos: bool = False  # the model's analysis texts start with a BOS
    sink_handling: str = "none (no BOS)"
    rotary_pair_weights_abs: list | None = None  # rotary: |complex weight| of the last frequency pair, per head

    @classmethod
    def from_json(cls, d: dict) -> CircuitRecord:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


class Criterion(str, Enum):
    """A test a head or the circuit must pass; the value is the condition's display name."""

    BROAD = "broad kernel"
    WEAK = "weak content dependence"
    SPLIT = "content/position split"
    STABLE = "stable denominators"
    SHARED = "shared kernel"
    MLP_SCALE = "constant MLP-norm scale"
    NO_OUTLIERS = "no outlier tokens"
    SINK = "constant sink mass"
    FIDELITY = "summary fidelity"  # FVU of the summary the circuit uses, on the calibration text
    TRANSFER = "denominator transfer"  # per held-out text: Z / calibration Z (checked by the neuron stage)
    USER = "user choice"  # with --heads: the head was not named


#: the per-head tests, in the order of :attr:`HeadDecision.reasons`
HEAD_CRITERIA = (Criterion.BROAD, Criterion.WEAK, Criterion.SPLIT, Criterion.STABLE, Criterion.SHARED)

#: which approximation a condition belongs to: the content/position split of the scores, the static
#: positional part, the calibrated denominators, the linear bag-of-tokens summary, or the neuron scores
ConditionGroup = Literal["split", "static", "denom", "summary", "neuron"]
CONDITION_GROUP: dict[Criterion, ConditionGroup] = {
    Criterion.SPLIT: "split", Criterion.BROAD: "denom", Criterion.WEAK: "denom", Criterion.STABLE: "denom",
    Criterion.NO_OUTLIERS: "denom", Criterion.SHARED: "summary", Criterion.MLP_SCALE: "neuron",
    Criterion.SINK: "summary", Criterion.FIDELITY: "summary",
    Criterion.TRANSFER: "denom",
}


@dataclass
class HeadDecision:
    """Whether a head of layer 0 is contextual, with every measured criterion.

    ``reasons[i]`` describes the test :data:`HEAD_CRITERIA` ``[i]`` (a further entry says whether ``--heads``
    named the head); ``failed`` lists the criteria the head does not meet."""

    head: int
    chosen: bool
    reasons: list[str]
    n_eff: float
    logit_std: float
    denominator: float  # kernel-weighted Z on the calibration text (median over positions)
    denominator_windowed: float
    denominator_cv: float  # measured CV of Z_n over calibration positions
    denominator_cv_predicted: float  # std f / (mean f sqrt(N_eff)), the concentration bound's scale
    share_tv: float
    decomposition_tv: float
    failed: list[Criterion] = field(default_factory=list)
    sink_mass: float = 0.0  # median over calibration positions of the true attention on the BOS (0 without BOS)
    sink_mass_cv: float = 0.0  # its CV over those positions
    separable_tv: float | None = None  # median TV of the fully separable pattern (the circuit's typical query)

    def checks(self) -> list[tuple[Criterion, str, bool]]:
        """``(criterion, reason, met)`` for each entry of :attr:`reasons`."""
        crit = list(HEAD_CRITERIA) + [Criterion.USER] * (len(self.reasons) - len(HEAD_CRITERIA))
        return [(c, r, c not in self.failed) for c, r in zip(crit, self.reasons)]

    @classmethod
    def from_json(cls, d: dict) -> HeadDecision:
        return cls(**{**d, "failed": [Criterion(c) for c in d.get("failed", [])]})


@dataclass
class Condition:
    """One stated input condition of an approximation, with its measured value."""

    name: str
    holds_when: str
    measured: float
    threshold: float
    ok: bool
    group: ConditionGroup

    @property
    def criterion(self) -> Criterion:
        return Criterion(self.name)


_TENSORS = ("kernel", "head_kernels", "f", "Z", "ext", "positional", "calibration_tokens", "token_mask")


@dataclass
class Circuit:
    """The contextual circuit of layer 0 (a saved, typed result; tensors' shapes in comments)."""

    settings: CircuitRecord
    heads: list[int]
    decisions: list[HeadDecision]
    conditions: list[Condition]
    kernel: Float[Tensor, "ctx ctx"]  # shared kernel K_n(i) (rows: query n)
    head_kernels: Float[Tensor, "chosen ctx ctx"]  # each chosen head's own kernel
    f: Float[Tensor, "chosen vocab"]  # clipped content factors
    Z: Float[Tensor, " chosen"]  # calibrated denominators
    ext: Float[Tensor, "vocab d_model"]  # extended embeddings
    positional: Float[Tensor, "ctx d_model"]  # Pi(n) + C: positional and bias terms of the summed output
    mlp_scale: float  # constant scale replacing the next norm (LN2), measured on the calibration text
    mlp_scale_cv: float
    calibration_tokens: Int[Tensor, " ctx"]
    calibration_sha: str
    token_mask: Bool[Tensor, " vocab"]  # False for outlier-norm (glitch-like) tokens
    denominators_windowed: list[float]  # per chosen head: median over positions of the windowed mean of f
    query_conditioned: bool = False  # the per-position summary conditions f on the query token (then ``ext`` is
    #                                  the query-averaged extended embedding, circuit_query.py)
    calibration_fvu: dict[str, float] = field(default_factory=dict)  # form -> FVU on the calibration text
    schema_version: int = SCHEMA_VERSION

    @property
    def T(self) -> int:
        return self.kernel.shape[0]

    def summary(self, tokens: Int[Tensor, "*batch pos"]) -> Float[Tensor, "*batch pos d_model"]:
        """Linear bag-of-tokens summary ``[pos, d_model]`` of a text ``tokens [pos]`` (pos <= T), or of each of a
        batch of equal-length windows ``[batch, pos]``; for a query-conditioned circuit, the query-averaged bag
        (what the neuron scores read)."""
        n = tokens.shape[-1]
        return self.kernel[:n, :n] @ self.ext[tokens] + self.positional[:n]

    def condition(self, criterion: Criterion | str) -> Condition:
        for c in self.conditions:
            if c.name == Criterion(criterion).value:
                return c
        raise KeyError(criterion)

    def to_json(self) -> dict:
        return {"schema_version": self.schema_version, "settings": asdict(self.settings), "heads": self.heads,
                "decisions": [asdict(d) for d in self.decisions], "conditions": [asdict(c) for c in self.conditions],
                "mlp_scale": self.mlp_scale, "mlp_scale_cv": self.mlp_scale_cv,
                "calibration_sha256": self.calibration_sha,
                "n_calibration_tokens": int(self.calibration_tokens.numel()),
                "n_masked_tokens": int((~self.token_mask).sum()), "denominators_windowed": self.denominators_windowed,
                "query_conditioned": self.query_conditioned, "calibration_fvu": self.calibration_fvu}

    def save(self, out: str | Path) -> Path:
        """Write ``out/circuit.json`` and ``out/circuit.safetensors`` (tensors in their own dtype)."""
        from safetensors.torch import save_file

        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "circuit.json").write_text(json.dumps(self.to_json(), indent=1))
        save_file({k: getattr(self, k).detach().contiguous().cpu() for k in _TENSORS}, str(out / "circuit.safetensors"))
        return out

    @classmethod
    def load(cls, out: str | Path) -> Circuit:
        from safetensors.torch import load_file

        out = Path(out)
        d = json.loads((out / "circuit.json").read_text())
        if d.get("schema_version") != SCHEMA_VERSION:
            raise AttnscopeError(f"{out / 'circuit.json'} has schema version {d.get('schema_version')}, this attnscope "
                                 f"reads {SCHEMA_VERSION}; recompute the circuit")
        t = load_file(str(out / "circuit.safetensors"))
        return cls(settings=CircuitRecord.from_json(d["settings"]), heads=d["heads"],
                   decisions=[HeadDecision.from_json(x) for x in d["decisions"]],
                   conditions=[Condition(**c) for c in d["conditions"]], mlp_scale=d["mlp_scale"],
                   mlp_scale_cv=d["mlp_scale_cv"], calibration_sha=d["calibration_sha256"],
                   denominators_windowed=d["denominators_windowed"], query_conditioned=d["query_conditioned"],
                   calibration_fvu=d["calibration_fvu"], schema_version=d["schema_version"],
                   **{k: t[k] for k in _TENSORS})
