"""The kernel analysis' settings and its typed result: :class:`KernelSettings` (and the
:class:`ResolvedKernelSettings` the passes run with), :class:`HeadRecord` per head and :class:`KernelResult`
(saved as ``kernels.json`` + ``kernels.safetensors``, loaded back by :meth:`KernelResult.load`)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from torch import Tensor

from attnscope.core.errors import AttnscopeError, check_index
from attnscope.exact.sinks import sink_label
from attnscope.kernels.categories import thresholds
from attnscope.models import ModelWeights

SCHEMA_VERSION = 2  # of kernels.json / kernels.safetensors (2: sink-aware categories, sink_mass fields)


@dataclass
class KernelSettings:
    """Everything that determines a kernel analysis (recorded in the output and used as the cache key)."""

    samples: str = "bundled:"  # text source; "bundled:" = all bundled texts
    n_ctx: int | None = None  # default: min(model context, 256)
    n_samples: int = 32  # windows for estimation (the method uses 500 for GPT-2)
    n_heldout: int = 8  # further, disjoint windows for the validations
    seed: int = 0
    layers: list[int] | None = None  # default: all
    ref_norm: float | None = None  # method's constant c (3.5 for GPT-2); default: measured per layer
    weights_query: str = "mean"  # layer-0 weights kernel: "mean" embedding of the samples, or a token, e.g. ","
    n_query_tokens: int = 16  # weights-kernel query consistency: the most frequent sample tokens as queries
    batch_size: int = 4

    def resolved(self, w: ModelWeights) -> ResolvedKernelSettings:
        """These settings with the model's defaults filled in (context length, layers), checked against it."""
        n_ctx = min(w.n_ctx, 256) if self.n_ctx is None else self.n_ctx
        if n_ctx > w.n_ctx:
            raise AttnscopeError(f"--n-ctx {n_ctx} exceeds the model's context of {w.n_ctx}; use at most {w.n_ctx}")
        if n_ctx < 8:
            raise AttnscopeError("--n-ctx must be at least 8 tokens")
        layers = list(range(w.n_layers)) if self.layers is None else sorted(set(self.layers))
        for l in layers:
            check_index("layer", l, w.n_layers)
        return ResolvedKernelSettings(**{**asdict(self), "n_ctx": n_ctx, "layers": layers})


@dataclass
class ResolvedKernelSettings(KernelSettings):
    """:class:`KernelSettings` after :meth:`KernelSettings.resolved`: the context length and the layers are known
    (same fields in the same order, so ``asdict`` and the cache key are those of the settings it came from)."""

    n_ctx: int = 256
    layers: list[int] = field(default_factory=list)


def query_positions(n_ctx: int, causal: bool) -> list[int]:
    """Query positions at which kernels are kept; the last one is the reference ``n_ref``."""
    fr = (0.125, 0.25, 0.5, 0.75, 1.0) if causal else (0.25, 0.75, 0.5)
    return sorted({min(n_ctx - 1, max(1, int(round(f * (n_ctx - 1))))) for f in fr}, key=lambda n: (
        n == (n_ctx - 1 if causal else int(round(0.5 * (n_ctx - 1)))), n))


@dataclass
class HeadRecord:
    """One head's kernel properties (a row of ``kernels.json``)."""

    layer: int
    head: int
    category: str  # of the kernel without the first position (renormalised): never "first-token sink"
    n_eff: float  # effective width 1/sum K^2 at the reference query position (first position excluded)
    n_eff_fraction: float  # n_eff / number of visible keys
    decay_length: float | None  # tau of the exponential fit K(d) ~ exp(-d / tau)
    decay_fit_r2: float | None  # weighted R^2 of that fit (log scale)
    median_offset: int  # offset below which half the kernel mass lies
    mass_first: float  # K_n(0) of the full data kernel
    mass_self: float  # K_n(n)
    mass_prev: float  # K_n(n-1)
    query_consistency: float | None  # mean TV between per-text query kernels and the mean-query kernel
    equivariance: float  # max TV between K_n(n - d) at different n (renormalised on common offsets)
    tv_decomposition: dict[str, float] | None  # TV(true, content+position pattern): mean, median, p90
    tv_kernel_vs_attention: float | None  # TV between kernel and mean held-out attention (mean over query positions)
    # these three are None when no held-out window was analysed (n_heldout=0): the validation was not run
    tv_weights_vs_data: float | None = None  # layer 0, learned positions: weights kernel vs data kernel
    weights_query_consistency: float | None = None  # layer 0: TV of generic-token-query kernels to the mean one
    tv_rotary_offset_vs_data: float | None = None  # rotary: offset-only kernel vs the data kernel
    # None when not measured (n_heldout=0); median over held-out query positions n >= n_sink of the true
    # attention on position 0
    sink_mass: float | None = 0.0
    sink_mass_cv: float | None = 0.0  # its coefficient of variation over those positions (and texts)
    sink_dominated: bool = False  # sink_mass >= SINK_MASS: the head's attention is mostly on the sink

    def label(self) -> str:
        return f"L{self.layer}H{self.head}"

    def display(self) -> str:
        """``"sink 0.70 + slow decay"``, or the category alone when the sink mass is small."""
        return sink_label(self.sink_mass, self.category)


@dataclass
class KernelResult:
    """Kernels, per-head records and provenance of one analysis."""

    model: dict
    settings: dict
    provenance: dict
    query_positions: list[int]
    records: list[HeadRecord]
    arrays: dict[str, Tensor] = field(repr=False)  # see module docstring for shapes
    ref_norms: dict[int, float] = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION

    def record(self, layer: int, head: int) -> HeadRecord:
        for r in self.records:
            if r.layer == layer and r.head == head:
                return r
        raise KeyError((layer, head))

    def to_json(self) -> dict:
        return {
            "schema_version": self.schema_version,
            "model": self.model,
            "settings": self.settings,
            "provenance": self.provenance,
            "query_positions": self.query_positions,
            "reference_norms": {str(k): v for k, v in self.ref_norms.items()},
            "thresholds": thresholds(),
            "heads": [{**asdict(r), "display": r.display()} for r in self.records],
        }

    def save(self, out: str | Path) -> Path:
        from safetensors.torch import save_file

        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "kernels.json").write_text(json.dumps(self.to_json(), indent=1))
        save_file({k: v.contiguous().float().cpu() for k, v in self.arrays.items()}, str(out / "kernels.safetensors"))
        return out

    @classmethod
    def load(cls, out: str | Path) -> KernelResult:
        from safetensors.torch import load_file

        out = Path(out)
        d = json.loads((out / "kernels.json").read_text())
        version = d.get("schema_version", 1)  # files written before the field existed have version 1's layout
        if version != SCHEMA_VERSION:
            raise AttnscopeError(f"{out / 'kernels.json'} has schema version {version}, this attnscope reads "
                                 f"{SCHEMA_VERSION}; recompute the kernels (attnscope kernels ... --no-cache)")
        records = [HeadRecord(**{k: v for k, v in h.items() if k != "display"}) for h in d["heads"]]
        return cls(model=d["model"], settings=d["settings"], provenance=d["provenance"],
                   query_positions=d["query_positions"], records=records,
                   arrays=load_file(str(out / "kernels.safetensors")),
                   ref_norms={int(k): v for k, v in d["reference_norms"].items()}, schema_version=version)

