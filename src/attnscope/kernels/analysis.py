r"""Positional kernels of every head of every layer, their properties and categories (method §5).

The kernel ``K_n(i)`` is how much attention query position ``n`` gives key position ``i`` independent of
the content there.  attnscope estimates it three ways:

* **data kernel** (every layer, every positional scheme; method §5.2 b1): run the model on sample texts
  (streamed, stopping at the deepest layer asked for), average the (rotated) queries and keys per
  position, and set ``K_n(i) = softmax_i(\bar q_n . \bar k_i / scale)``.  Content enters the mean key as a
  constant and cancels in the softmax.
* **weights kernel** (layer 0, learned positions; method §5.2 a): from the weights alone, with the
  method's positional keys ``P[n, i]`` and the query of a content vector (the mean token embedding of the
  samples, or one generic token) placed at ``n``.
* **rotary offset kernel** (rotary models; attnscope's extension, method §10): the position-averaged
  pre-rotation query and key through the rotation, ``K_n(i) ∝ exp((R_n q̄) . (R_i k̄) / scale)``, a function
  of the offset ``i - n`` only; ``tv_rotary_offset_vs_data`` says how much of the data kernel it explains.
* **mean attention** (every layer; method §5.2 b2): the average attention row, used as a cross-check on
  held-out samples (``tv_kernel_vs_attention``).

**Sinks** (method §15): every head's attention on the first position (BOS, or the first token) is reported
as its own property, ``sink_mass`` (median over held-out query positions of the true attention there) and
``sink_mass_cv``; the category, ``N_eff``, decay and median offset come from the kernel over the remaining
positions, renormalised, so a head reads ``"sink 0.70 + slow decay"`` (:meth:`HeadRecord.display`).

Kernels are kept for a few query positions only (``[layers, heads, n_query, n_ctx]``), never as full
``n_ctx^2`` matrices; statistics stream over samples so memory does not grow with their number.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from jaxtyping import Float, Int
from torch import Tensor

from attnscope.core.accumulators import EstimationSums, ValidationSums
from attnscope.core.cache import atomic_dir, cache_dir, read_or_drop
from attnscope.core.errors import AttnscopeError, check_index
from attnscope.core.executor import LOCAL, Executor
from attnscope.core.texts import bundled_dir, load_windows, tokenizer_sha256
from attnscope.exact.decomposition import (
    approximate_tv,
    centre,
    layer0_weight_kernels,
    pair_weights_of_kernel,
    pooled_static_keys,
    reference_norm,
    tv_distance,
)
from attnscope.exact.forward import LayerActivations, apply_rotary, iter_layers, mask_scores, qk_scores, rotary_cos_sin
from attnscope.exact.sinks import SinkStats, sink_label, split_sink
from attnscope.kernels.categories import (  # noqa: F401  (re-exported: the categories and their properties used to live here)
    CAT_COLORS,
    CATEGORIES,
    CATEGORY_TABLE,
    LOCAL_MEDIAN,
    LOCAL_NEFF,
    PREV_MASS,
    SELF_MASS,
    SINK_MASS,
    SLOW_MEDIAN_FRAC,
    UNIFORM_FRAC,
    categorise,
    equivariance,
    fit_decay,
    n_eff,
    offset_profile,
    thresholds,
)
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

    def resolved(self, w: ModelWeights) -> KernelSettings:
        s = KernelSettings(**asdict(self))
        s.n_ctx = min(w.n_ctx, 256) if self.n_ctx is None else self.n_ctx
        if s.n_ctx > w.n_ctx:
            raise AttnscopeError(f"--n-ctx {s.n_ctx} exceeds the model's context of {w.n_ctx}; use at most {w.n_ctx}")
        if s.n_ctx < 8:
            raise AttnscopeError("--n-ctx must be at least 8 tokens")
        s.layers = list(range(w.n_layers)) if self.layers is None else sorted(set(self.layers))
        for l in s.layers:
            check_index("layer", l, w.n_layers)
        return s


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
    sink_mass: float | None = 0.0  # None when not measured (n_heldout=0); median over held-out query positions n >= n_sink of the true attention on position 0
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
        return cls(model=d["model"], settings=d["settings"], provenance=d["provenance"],
                   query_positions=d["query_positions"], records=[HeadRecord(**{k: v for k, v in h.items() if k != "display"}) for h in d["heads"]],
                   arrays=load_file(str(out / "kernels.safetensors")),
                   ref_norms={int(k): v for k, v in d["reference_norms"].items()}, schema_version=version)


# --------------------------------------------------------------------------------------------------
# The analysis
# --------------------------------------------------------------------------------------------------


def _cache_key(w: ModelWeights, s: KernelSettings, sha: str) -> str:
    blob = json.dumps({"model": w.fingerprint(), "settings": asdict(s), "samples": sha, "dtype": str(w.dtype),
                       "bos": w.analysis_bos, "tokenizer": tokenizer_sha256(w.tokenizer), "v": 4},
                      sort_keys=True)  # --bos/--no-bos: its own entry; an edited tokenizer.json: its own entry
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _samples_spec(spec: str) -> str:
    if spec in ("bundled:", "bundled", ""):
        return str(bundled_dir())
    return spec


@dataclass
class KernelEstimate:
    """What the estimation pass measures (means over the estimation windows); input of the validation."""

    layers: list[int]
    query_positions: list[int]
    mean_q: Float[Tensor, "layer head ctx d_head"]  # mean (rotated) query per position
    mean_k: Float[Tensor, "layer head ctx d_head"]  # mean (rotated) key per position
    # static positional part (learned) or the mean pre-rotation keys (rotary)
    static: Float[Tensor, "layer ctx d_model"] | Float[Tensor, "layer head ctx d_head"]
    ref_norms: dict[int, float]  # reference norm c per layer
    data_kernel: Float[Tensor, "layer head n_query ctx"]


@dataclass
class KernelValidation:
    """What the held-out pass measures."""

    tv_decomposition: list[Float[Tensor, "head _n"]]  # per layer, over held-out positions: TV(true, content+position)
    mean_attention: Float[Tensor, "layer head n_query ctx"]  # mean held-out attention rows
    query_consistency: Float[Tensor, "layer head"]  # mean TV of per-text query kernels to the data kernel
    sink: list[Float[Tensor, "head _n"]] | None = None  # per layer: true attention on position 0 at n >= n_sink
    n_windows: int = 0  # held-out windows analysed; 0: the validations were not run


def estimation_shard(w: ModelWeights, windows: Int[Tensor, "n ctx"], first_window: int, s: KernelSettings,
                     bar=None) -> EstimationSums:
    """Partial sums over one shard of estimation ``windows`` (every estimation statistic is a sum)."""
    li = {l: j for j, l in enumerate(s.layers)}
    sums = EstimationSums.zeros(len(li), w.n_heads, s.n_ctx, w.d_head, w.d_model, w.device)
    for j, a in _stream_layers(w, windows, s.batch_size, li, bar or _NoBar(), patterns=False):  # fused attention
        sums.add(j, a.q, a.k, a.norm_in, (centre(a.norm_in.to(torch.float64), w) ** 2).sum())
    sums.count(windows.shape[0])
    return sums


def _static_part(w: ModelWeights, s: KernelSettings, mean_resid: Float[Tensor, "layer ctx d_model"],
                 sum_sq: Float[Tensor, " layer"], n_seen: int) -> tuple[Float[Tensor, "layer ctx d_model"], dict[int, float]]:
    """Static positional part of the residual (mean over texts, centred over positions; layer 0 with learned
    positions: the method's exact split ``W_pos`` (+ token type)) and the reference norm of each layer."""
    T = s.n_ctx
    pi = (mean_resid - mean_resid.mean(1, keepdim=True)).to(w.dtype)
    ref_norms: dict[int, float] = {}
    for j, l in enumerate(s.layers):
        if l == 0 and w.W_pos is not None:
            pi[j] = (w.W_pos[:T] + (0 if w.W_type is None else w.W_type)).to(w.dtype)
            ref_norms[l] = s.ref_norm if s.ref_norm is not None else reference_norm(w)
        else:
            ms = float(sum_sq[j]) / (n_seen * T) - float((centre(pi[j].double(), w) ** 2).sum(-1).mean())
            ref_norms[l] = s.ref_norm if s.ref_norm is not None else math.sqrt(max(ms, 1e-12))
    return pi, ref_norms


@torch.no_grad()
def estimate_kernels(w: ModelWeights, s: KernelSettings, windows: Int[Tensor, "n ctx"], *, bar=None,
                     executor: Executor | None = None) -> KernelEstimate:
    """Data kernels of the layers ``s.layers`` (resolved settings) from the estimation ``windows [n, T]``
    (sharded by ``executor``; default: this process)."""
    sums = (executor or LOCAL).map_windows(w, estimation_shard, windows, s, bar=bar, shard_size=s.batch_size)
    qpos = query_positions(s.n_ctx, w.causal)
    mean_q, mean_k, mean_resid, sum_sq = sums.finalise(w.dtype)
    pi, ref_norms = _static_part(w, s, mean_resid, sum_sq, sums.n)
    qp = torch.tensor(qpos, device=w.device)
    data_kernel = positional_kernel_rows_batch(w, s.layers, mean_q[:, :, qp], mean_k)  # [L, H, nq, T]
    static = pi
    if w.positional == "rotary":  # static pre-rotation keys for the decomposition
        cos, sin = rotary_cos_sin(w, torch.arange(s.n_ctx, device=w.device))
        static = apply_rotary(mean_k, cos, -sin)
    return KernelEstimate(s.layers, qpos, mean_q, mean_k, static, ref_norms, data_kernel)


@torch.no_grad()
def validate_kernels(w: ModelWeights, s: KernelSettings, est: KernelEstimate, windows: Int[Tensor, "n ctx"], *,
                     bar=None, executor: Executor | None = None) -> KernelValidation:
    """Held-out checks on ``windows`` (sharded by ``executor``): the decomposition's TV, mean attention, consistency."""
    sums = (executor or LOCAL).map_windows(w, validation_shard, windows, s, est, bar=bar, shard_size=s.batch_size)
    tvs, mean_attention, consistency, sinks = sums.finalise(w.dtype, w.n_heads)
    return KernelValidation(tvs, mean_attention, consistency, sinks, sums.n)


@torch.no_grad()
def validation_shard(w: ModelWeights, windows: Int[Tensor, "n ctx"], first_window: int, s: KernelSettings,
                     est: KernelEstimate, bar=None) -> ValidationSums:
    """Partial held-out sums over one shard of ``windows`` whose first is held-out window ``first_window``."""
    li = {l: j for j, l in enumerate(est.layers)}
    H, qpos = w.n_heads, est.query_positions
    qp = torch.tensor(qpos, device=w.device)
    n_sink = qpos[0]  # sink statistics from the first kept query position on (early rows see few keys)
    sums = ValidationSums.zeros(len(li), H, len(qpos), s.n_ctx, w.device)
    pairs, statics = _rotary_split_inputs(w, est)
    b0 = first_window - s.batch_size  # index of the current batch's first window (layers come in order: j = 0 first)
    for j, a in _stream_layers(w, windows, s.batch_size, li, bar or _NoBar()):
        b0 += s.batch_size if j == 0 else 0
        tv = approximate_tv(w, a.layer, a, statics[j], est.ref_norms[a.layer], pairs[j])  # [b, H, T], in row chunks
        # query consistency: each text's own query at n with the static keys
        per_text = kernel_softmax(w, a.layer, qk_scores(a.q[:, :, qp], est.mean_k[j]), qpos)
        sums.add(j, b0, a.pattern[:, :, qp], tv_distance(per_text, est.data_kernel[j][None]).mean(-1),
                 tv[:, :, 1:].permute(1, 0, 2).reshape(H, -1).float(),
                 a.pattern[:, :, n_sink:, 0].permute(1, 0, 2).reshape(H, -1).float())
    sums.count(windows.shape[0])
    return sums


def _rotary_split_inputs(w: ModelWeights, est: KernelEstimate) -> tuple[list, list]:
    """Per analysed layer: the separable rotary split's pair weights (from the data kernel at the reference
    query, first position excluded; ``None`` for learned positions) and the static part (layer 0 of a rotary
    model: one pooled key for every position after the BOS, positions being exchangeable there)."""
    bos = w.analysis_bos is not None
    if w.positional != "rotary":
        return [None] * len(est.layers), [est.static[j] for j in range(len(est.layers))]
    pairs = [pair_weights_of_kernel(w, est.data_kernel[j, :, -1], True, per_row=True) for j in range(len(est.layers))]
    statics = [pooled_static_keys(est.static[j], bos) if l == 0 else est.static[j] for j, l in enumerate(est.layers)]
    return pairs, statics


def weights_kernels(w: ModelWeights, s: KernelSettings, windows: Int[Tensor, "n ctx"], ref_norm: float, qpos: list[int]
                    ) -> tuple[Float[Tensor, "head n_query ctx"], Float[Tensor, " head"]]:
    """Layer-0 weights kernels ``[H, nq, T]`` (learned positions) with the query of ``s.weights_query``, and
    their consistency ``[H]`` across generic query tokens (the samples' most frequent tokens; method §5.2c)."""
    T, qp = s.n_ctx, torch.tensor(qpos, device=w.device)
    flat = windows.reshape(-1)
    if s.weights_query == "mean":
        query = w.W_E[flat].mean(0)
    else:
        ids = w.tokenizer(s.weights_query, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            raise AttnscopeError(f"--weights-query {s.weights_query!r} is {len(ids)} tokens; give one token or 'mean'")
        query = w.W_E[ids[0]]
    kernel = layer0_weight_kernels(w, query, T, ref_norm, rows=qp)  # [H, nq, T]: only the kept query rows
    common = torch.bincount(flat).topk(min(s.n_query_tokens, int((torch.bincount(flat) > 0).sum()))).indices
    per_tok = torch.stack([layer0_weight_kernels(w, w.W_E[t], T, ref_norm, rows=qp) for t in common])
    return kernel, tv_distance(per_tok, kernel[None]).mean(-1).mean(0)


def rotary_offset_kernels(w: ModelWeights, est: KernelEstimate) -> Float[Tensor, "layer head n_query ctx"]:
    """The attnscope extension for rotary models ``[L, H, nq, T]``: position-averaged pre-rotation query and
    key through the rotation, so ``K_n(i)`` depends on the offset ``i - n`` only (translation-equivariant by
    construction)."""
    T = est.mean_q.shape[2]
    cos, sin = rotary_cos_sin(w, torch.arange(T, device=w.device))
    start = 1 if w.analysis_bos is not None else 0
    q_pre = apply_rotary(est.mean_q, cos, -sin)[:, :, start:].mean(2, keepdim=True).expand(-1, -1, T, -1)
    k_pre = est.static[:, :, start:].mean(2, keepdim=True).expand(-1, -1, T, -1)
    qp = torch.tensor(est.query_positions, device=w.device)
    return positional_kernel_rows_batch(w, est.layers, apply_rotary(q_pre, cos, sin)[:, :, qp],
                                        apply_rotary(k_pre, cos, sin))


def _mean_tv(a: Float[Tensor, "n_query ctx"] | None, b: Float[Tensor, "n_query ctx"]) -> float | None:
    return None if a is None else float(tv_distance(a, b).mean())


def head_records(w: ModelWeights, est: KernelEstimate, val: KernelValidation, arrays: dict[str, Tensor],
                 weights_consistency: Float[Tensor, " head"] | None) -> list[HeadRecord]:
    """One :class:`HeadRecord` per analysed head, from the kernel row at the reference query position."""
    nref, dk, records = est.query_positions[-1], est.data_kernel, []
    wk, rot = arrays.get("weights_kernel_layer0"), arrays.get("rotary_offset_kernel")
    for j, l in enumerate(est.layers):
        for h in range(w.n_heads):
            full, tvd = dk[j, h, -1], val.tv_decomposition[j][h]
            row = split_sink(full)[1]  # the kernel proper: first position dropped, renormalised
            cat, m = categorise(row, nref, w.causal)
            tau, r2 = fit_decay(offset_profile(row, nref, w.causal))
            sk = SinkStats.of(val.sink[j][h]) if val.sink is not None else SinkStats(0.0, 0.0, 0.0)
            records.append(HeadRecord(
                layer=l, head=h, category=cat, n_eff=m["n_eff"], n_eff_fraction=m["n_eff_fraction"],
                decay_length=tau, decay_fit_r2=r2, median_offset=m["median_offset"], mass_first=float(full[0]),
                mass_self=m["mass_self"], mass_prev=m["mass_prev"], query_consistency=float(val.query_consistency[j, h]),
                equivariance=equivariance(dk[j, h], est.query_positions, w.causal),
                tv_decomposition={"mean": float(tvd.mean()), "median": float(tvd.median()),
                                  "p90": float(torch.quantile(tvd, 0.9))},
                tv_kernel_vs_attention=float(tv_distance(dk[j, h], val.mean_attention[j, h]).mean()),
                tv_weights_vs_data=_mean_tv(wk[h] if wk is not None and l == 0 else None, dk[j, h]),
                weights_query_consistency=None if weights_consistency is None or l != 0
                else float(weights_consistency[h]),
                tv_rotary_offset_vs_data=_mean_tv(None if rot is None else rot[j, h], dk[j, h]),
                sink_mass=sk.median, sink_mass_cv=sk.cv, sink_dominated=sk.median >= SINK_MASS))
    if val.n_windows == 0:  # no held-out text: not run, rather than a 0.0 that reads as perfect
        for r in records:
            r.query_consistency = r.tv_decomposition = r.tv_kernel_vs_attention = None
            r.sink_mass = r.sink_mass_cv = None
    return records


def kernel_arrays(w: ModelWeights, s: KernelSettings, est: KernelEstimate, val: KernelValidation,
                  windows: Int[Tensor, "n ctx"]) -> tuple[dict[str, Tensor], Float[Tensor, " head"] | None]:
    """The saved arrays (data kernel, mean attention, weights and rotary kernels, offset kernel) and the
    weights kernel's query consistency ``[H]`` (layer 0, learned positions; else ``None``)."""
    qp = torch.tensor(est.query_positions, device=w.device)
    arrays: dict[str, Tensor] = {"data_kernel": est.data_kernel, "mean_attention": val.mean_attention,
                                 "query_positions": qp, "layers": torch.tensor(est.layers, device=w.device)}
    if val.n_windows == 0:  # no held-out attention to average
        del arrays["mean_attention"]
    consistency = None
    if 0 in est.layers and w.positional == "learned":
        arrays["weights_kernel_layer0"], consistency = weights_kernels(w, s, windows, est.ref_norms[0],
                                                                       est.query_positions)
    if w.positional == "rotary":
        arrays["rotary_offset_kernel"] = rotary_offset_kernels(w, est)
    # offset kernel at the reference query, first position excluded and renormalised: kappa(d) = K_nref(nref - d)
    nref, dk = est.query_positions[-1], split_sink(est.data_kernel)[1]
    arrays["offset_kernel"] = torch.stack([torch.stack([offset_profile(dk[j, h, -1], nref, w.causal)
                                                        for h in range(w.n_heads)]) for j in range(len(est.layers))])
    return arrays, consistency


@torch.no_grad()
def analyse_kernels(w: ModelWeights, settings: KernelSettings | None = None, *, cache: bool = True,
                    progress: bool = True, executor: Executor | None = None) -> KernelResult:
    """Positional kernels and their properties for the chosen layers (see module docstring):
    :func:`estimate_kernels`, :func:`validate_kernels`, :func:`kernel_arrays`, :func:`head_records`.
    ``executor`` shards the two passes over the windows (default: this process); the cache is read first."""
    from tqdm.auto import tqdm

    s = (settings or KernelSettings()).resolved(w)
    bos = w.analysis_bos
    windows, prov = load_windows(_samples_spec(s.samples), w.tokenizer, s.n_ctx, s.n_samples + s.n_heldout,
                                 seed=s.seed, bos_token_id=bos)
    key = _cache_key(w, s, prov["sha256"])
    cdir = cache_dir() / "kernels" / key
    if cache and (hit := read_or_drop(cdir, KernelResult.load)) is not None:
        return hit
    windows = windows.to(w.device)
    est_windows, held = windows[: s.n_samples], windows[s.n_samples :]
    bar = tqdm(total=s.n_samples + s.n_heldout, desc="kernels: estimate", unit="text", disable=not progress)
    est = estimate_kernels(w, s, est_windows, bar=bar, executor=executor)
    bar.set_description("kernels: validate")
    val = validate_kernels(w, s, est, held, bar=bar, executor=executor)
    bar.close()
    arrays, weights_consistency = kernel_arrays(w, s, est, val, est_windows)
    records = head_records(w, est, val, arrays, weights_consistency)
    res = KernelResult(model=w.info(), settings=asdict(s), provenance={**prov, "n_estimation": s.n_samples,
                       "n_heldout": s.n_heldout, "bos": bos, "prepend_bos": w.prepend_bos,
                       "sink_handling": "first position split off: sink_mass beside the kernel of the other positions, "
                       "renormalised", "norm_handling": "exact norm on content at the query "
                       "position; reference norm for positional displacements", "cache_key": key},
                       query_positions=est.query_positions, records=records, arrays=arrays, ref_norms=est.ref_norms)
    if cache:
        with atomic_dir(cdir) as tmp:  # the entry appears complete (data and index) or not at all
            res.save(tmp)
    return res


class _NoBar:
    def update(self, n: int) -> None:
        pass


def _stream_layers(w: ModelWeights, windows: Int[Tensor, "n ctx"], batch_size: int, li: dict[int, int], bar,
                   patterns: bool = True) -> Iterator[tuple[int, LayerActivations]]:
    """Yield ``(index of the layer in the analysis, LayerActivations)`` for every batch of ``windows`` and every
    analysed layer, running each batch only up to the deepest analysed layer (memory: one batch, one layer).
    ``patterns=False``: fused attention, no scores or patterns (the estimation needs only q, k and the input)."""
    last = max(li)
    for b0 in range(0, windows.shape[0], batch_size):
        batch = windows[b0 : b0 + batch_size]
        for a in iter_layers(w, batch, stop_layer=last, patterns=patterns):
            if a.layer in li:
                yield li[a.layer], a
        bar.update(batch.shape[0])


def kernel_softmax(w: ModelWeights, layer: int, scores: Float[Tensor, "*batch n_query ctx"], qpos: list[int]
                   ) -> Float[Tensor, "*batch n_query ctx"]:
    """``softmax_i(scores / scale)`` for query rows at ``qpos`` (``scores [..., nq, T]``), causal mask applied."""
    s = scores / w.attn_scale[layer]
    return mask_scores(w, s, torch.tensor(qpos, device=s.device)).softmax(-1)


def positional_kernel_rows_batch(w: ModelWeights, layers: list[int], q: Float[Tensor, "layer head n_query d_head"],
                                 k: Float[Tensor, "layer head ctx d_head"]) -> Float[Tensor, "layer head n_query ctx"]:
    """Data kernels ``[L, H, nq, T]`` from mean queries ``q [L, H, nq, dh]`` at :func:`query_positions` and
    mean keys ``k [L, H, T, dh]``."""
    qpos = query_positions(k.shape[2], w.causal)
    return torch.stack([kernel_softmax(w, l, qk_scores(q[j], k[j]), qpos)
                        for j, l in enumerate(layers)])
