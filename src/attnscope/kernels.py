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

Kernels are kept for a few query positions only (``[layers, heads, n_query, n_ctx]``), never as full
``n_ctx^2`` matrices; statistics stream over samples so memory does not grow with their number.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .decomposition import (
    approximate_pattern,
    centre,
    layer0_weight_kernels,
    reference_norm,
    tv_distance,
)
from .errors import AttnscopeError, check_index
from .forward import apply_rotary, iter_layers, rotary_cos_sin
from .cache import atomic_dir, cache_dir, read_or_drop
from .models import ModelWeights
from .texts import load_windows

# Category thresholds (documented in docs/kernels.md and drawn on the figures).
SINK_MASS = 0.5  # K_n(0) >= this: first-token sink
SELF_MASS = 0.5  # K_n(n) >= this: current token
PREV_MASS = 0.5  # K_n(n-1) >= this: previous token
LOCAL_NEFF = 10.0  # N_eff <= this and half the mass within LOCAL_MEDIAN tokens: sharp local decay
LOCAL_MEDIAN = 10
UNIFORM_FRAC = 0.5  # N_eff >= this * (number of visible keys): uniform
SLOW_MEDIAN_FRAC = 0.25  # otherwise, median offset <= this * visible keys: slow decay
CATEGORIES = ("sharp local decay", "slow decay", "uniform", "previous token", "current token",
              "first-token sink", "other")
#: colour of each category on the figures and in the HTML report
CAT_COLORS = {
    "sharp local decay": "#d62728",
    "slow decay": "#ff7f0e",
    "uniform": "#2ca02c",
    "previous token": "#9467bd",
    "current token": "#8c564b",
    "first-token sink": "#7f7f7f",
    "other": "#17becf",
}


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
    category: str
    n_eff: float  # effective width 1/sum K^2 at the reference query position
    n_eff_fraction: float  # n_eff / number of visible keys
    decay_length: float | None  # tau of the exponential fit K(d) ~ exp(-d / tau)
    decay_fit_r2: float | None  # weighted R^2 of that fit (log scale)
    median_offset: int  # offset below which half the kernel mass lies
    mass_first: float  # K_n(0)
    mass_self: float  # K_n(n)
    mass_prev: float  # K_n(n-1)
    query_consistency: float  # mean TV between per-text query kernels and the mean-query kernel
    equivariance: float  # max TV between K_n(n - d) at different n (renormalised on common offsets)
    tv_decomposition: dict[str, float]  # TV(true, content+position pattern): mean, median, p90
    tv_kernel_vs_attention: float  # TV between kernel and mean held-out attention (mean over query positions)
    tv_weights_vs_data: float | None = None  # layer 0, learned positions: weights kernel vs data kernel
    weights_query_consistency: float | None = None  # layer 0: TV of generic-token-query kernels to the mean one
    tv_rotary_offset_vs_data: float | None = None  # rotary: offset-only kernel vs the data kernel

    def label(self) -> str:
        return f"L{self.layer}H{self.head}"


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

    def record(self, layer: int, head: int) -> HeadRecord:
        for r in self.records:
            if r.layer == layer and r.head == head:
                return r
        raise KeyError((layer, head))

    def to_json(self) -> dict:
        return {
            "model": self.model,
            "settings": self.settings,
            "provenance": self.provenance,
            "query_positions": self.query_positions,
            "reference_norms": {str(k): v for k, v in self.ref_norms.items()},
            "thresholds": thresholds(),
            "heads": [asdict(r) for r in self.records],
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
        return cls(model=d["model"], settings=d["settings"], provenance=d["provenance"],
                   query_positions=d["query_positions"], records=[HeadRecord(**h) for h in d["heads"]],
                   arrays=load_file(str(out / "kernels.safetensors")),
                   ref_norms={int(k): v for k, v in d["reference_norms"].items()})


def thresholds() -> dict[str, float]:
    return {"sink_mass": SINK_MASS, "self_mass": SELF_MASS, "prev_mass": PREV_MASS, "local_n_eff": LOCAL_NEFF,
            "local_median_offset": LOCAL_MEDIAN, "uniform_n_eff_fraction": UNIFORM_FRAC,
            "slow_median_offset_fraction": SLOW_MEDIAN_FRAC}


# --------------------------------------------------------------------------------------------------
# Kernel properties
# --------------------------------------------------------------------------------------------------


def n_eff(k: Tensor) -> Tensor:
    """Collision (Renyi-2) effective width ``1 / sum K^2`` along the last axis."""
    return 1.0 / (k.double() ** 2).sum(-1)


def offset_profile(row: Tensor, n: int, causal: bool) -> Tensor:
    """Kernel mass by distance ``|i - n|`` from the query (``[max distance + 1]``)."""
    T = row.shape[-1]
    dist = (torch.arange(T, device=row.device) - n).abs()
    if causal:
        dist = dist[: n + 1]
        row = row[: n + 1]
    out = torch.zeros(int(dist.max()) + 1, dtype=row.dtype, device=row.device)
    return out.index_add_(0, dist, row)


def fit_decay(profile: Tensor, mass: float = 0.95) -> tuple[float | None, float | None]:
    """Exponential fit ``K(d) ~ A exp(-d / tau)`` over ``1 <= d <= d_mass`` (weighted least squares of
    log K, weights K).  Returns ``(tau, weighted R^2)``; ``(None, None)`` with fewer than 4 points."""
    p = profile.double().cpu().numpy()
    cum = np.cumsum(p)
    d_max = int(np.searchsorted(cum, mass * cum[-1])) + 1
    d = np.arange(1, min(d_max, len(p) - 1) + 1)
    d = d[p[d] > 1e-12]
    if len(d) < 4:
        return None, None
    y, wts = np.log(p[d]), p[d] / p[d].sum()
    X = np.stack([np.ones_like(d, dtype=float), d.astype(float)], 1)
    W = np.diag(wts)
    beta = np.linalg.lstsq(X.T @ W @ X, X.T @ W @ y, rcond=None)[0]
    resid = y - X @ beta
    ybar = (wts * y).sum()
    ss_tot = (wts * (y - ybar) ** 2).sum()
    r2 = float(1 - (wts * resid**2).sum() / ss_tot) if ss_tot > 0 else 0.0
    slope = beta[1]
    tau = float(-1.0 / slope) if slope < 0 else None  # no decay: undefined
    return tau, r2


def categorise(row: Tensor, n: int, causal: bool) -> tuple[str, dict[str, float]]:
    """Category of a kernel row ``K_n`` (thresholds above), with the measured quantities."""
    row = row.double()
    visible = n + 1 if causal else row.shape[-1]
    ne = float(n_eff(row[:visible] if causal else row))
    prof = offset_profile(row, n, causal)
    med = int(torch.searchsorted(prof.cumsum(0), torch.tensor(0.5 * float(prof.sum()), dtype=prof.dtype)))
    m = {"n_eff": ne, "n_eff_fraction": ne / visible, "median_offset": med, "mass_first": float(row[0]),
         "mass_self": float(row[n]), "mass_prev": float(row[n - 1]) if n >= 1 else 0.0}
    if m["mass_first"] >= SINK_MASS and n > 0:
        cat = "first-token sink"
    elif m["mass_self"] >= SELF_MASS:
        cat = "current token"
    elif causal and m["mass_prev"] >= PREV_MASS:
        cat = "previous token"
    elif ne <= LOCAL_NEFF and med <= LOCAL_MEDIAN:
        cat = "sharp local decay"
    elif ne >= UNIFORM_FRAC * visible:
        cat = "uniform"
    elif med <= SLOW_MEDIAN_FRAC * visible:
        cat = "slow decay"
    else:
        cat = "other"
    return cat, m


def equivariance(rows: Tensor, qpos: list[int], causal: bool) -> float:
    """Max TV between the reference row and each other row, compared on their common offsets.

    rows: ``[n_query, n_ctx]`` kernel rows at ``qpos``; for causal kernels offsets ``0..n_min``.
    """
    ref = len(qpos) - 1
    nr = qpos[ref]
    worst = 0.0
    T = rows.shape[-1]
    for j, n in enumerate(qpos[:-1]):
        lo = -min(n, nr)
        hi = 0 if causal else min(T - 1 - n, T - 1 - nr)
        offs = torch.arange(lo, hi + 1)
        a = rows[j, n + offs]
        b = rows[ref, nr + offs]
        if a.sum() <= 0 or b.sum() <= 0:
            continue
        worst = max(worst, float(tv_distance(a / a.sum(), b / b.sum())))
    return worst


# --------------------------------------------------------------------------------------------------
# The analysis
# --------------------------------------------------------------------------------------------------


def _cache_key(w: ModelWeights, s: KernelSettings, sha: str) -> str:
    blob = json.dumps({"model": w.fingerprint(), "settings": asdict(s), "samples": sha, "dtype": str(w.dtype),
                       "v": 2}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _samples_spec(spec: str) -> str:
    if spec in ("bundled:", "bundled", ""):
        from .texts import bundled_dir

        return str(bundled_dir())
    return spec


@torch.no_grad()
def analyse_kernels(w: ModelWeights, settings: KernelSettings | None = None, *, cache: bool = True,
                    progress: bool = True) -> KernelResult:
    """Positional kernels and their properties for the chosen layers (see module docstring)."""
    from tqdm.auto import tqdm

    s = (settings or KernelSettings()).resolved(w)
    T = s.n_ctx
    bos = w.bos_token_id if w.prepend_bos else None
    windows, prov = load_windows(_samples_spec(s.samples), w.tokenizer, T, s.n_samples + s.n_heldout,
                                 seed=s.seed, bos_token_id=bos)
    key = _cache_key(w, s, prov["sha256"])
    cdir = cache_dir() / "kernels" / key
    if cache and (hit := read_or_drop(cdir, KernelResult.load)) is not None:
        return hit
    windows = windows.to(w.device)
    est, held = windows[: s.n_samples], windows[s.n_samples :]
    layers = s.layers
    L, H, dh, d = len(layers), w.n_heads, w.d_head, w.d_model
    qpos = query_positions(T, w.causal)
    qp = torch.tensor(qpos, device=w.device)
    li = {l: j for j, l in enumerate(layers)}
    f64 = torch.float64
    sum_q = torch.zeros(L, H, T, dh, dtype=f64, device=w.device)
    sum_k = torch.zeros_like(sum_q)
    sum_resid = torch.zeros(L, T, d, dtype=f64, device=w.device)
    sum_sq = torch.zeros(L, dtype=f64, device=w.device)
    bar = tqdm(total=s.n_samples + s.n_heldout, desc="kernels: estimate", unit="text", disable=not progress)
    # pass 1: streaming means of queries, keys and the (pre-norm) residual per position
    for j, a in _stream_layers(w, est, s.batch_size, li, bar):
        sum_q[j] += a.q.sum(0).to(f64)
        sum_k[j] += a.k.sum(0).to(f64)
        sum_resid[j] += a.norm_in.sum(0).to(f64)
        sum_sq[j] += (centre(a.norm_in.to(f64), w) ** 2).sum()
    n_seen = est.shape[0]
    mean_q = (sum_q / n_seen).to(w.dtype)  # [L, H, T, dh]
    mean_k = (sum_k / n_seen).to(w.dtype)
    mean_resid = sum_resid / n_seen  # [L, T, d]
    # static positional part of the residual: mean over texts, centred over positions
    pi = (mean_resid - mean_resid.mean(1, keepdim=True)).to(w.dtype)
    ref_norms: dict[int, float] = {}
    for l in layers:
        j = li[l]
        if l == 0 and w.W_pos is not None:
            # layer 0 with learned positions: the method's exact split, pi = W_pos (+ token type)
            pi[j] = (w.W_pos[:T] + (0 if w.W_type is None else w.W_type)).to(w.dtype)
            ref_norms[l] = s.ref_norm if s.ref_norm is not None else reference_norm(w)
        else:
            ms = float(sum_sq[j]) / (n_seen * T) - float((centre(pi[j].double(), w) ** 2).sum(-1).mean())
            ref_norms[l] = s.ref_norm if s.ref_norm is not None else math.sqrt(max(ms, 1e-12))
    data_kernel = positional_kernel_rows_batch(w, layers, mean_q[:, :, qp], mean_k)  # [L, H, nq, T]
    if w.positional == "rotary":  # static pre-rotation keys for the decomposition
        cos, sin = rotary_cos_sin(w, torch.arange(T, device=w.device))
        k_static = apply_rotary(mean_k, cos, -sin)
    # pass 2: held-out validations
    tvs: list[list[Tensor]] = [[] for _ in layers]
    sum_attn = torch.zeros(L, H, len(qpos), T, dtype=f64, device=w.device)
    cons = torch.zeros(L, H, dtype=f64, device=w.device)
    bar.set_description("kernels: validate")
    for j, a in _stream_layers(w, held, s.batch_size, li, bar):
        static = k_static[j] if w.positional == "rotary" else pi[j]
        approx = approximate_pattern(w, a.layer, a, static, ref_norms[a.layer])
        tv = tv_distance(approx, a.pattern)  # [b, H, T]
        tvs[j].append(tv[:, :, 1:].permute(1, 0, 2).reshape(H, -1).float().cpu())
        sum_attn[j] += a.pattern[:, :, qp].sum(0).to(f64)
        # query consistency: each text's own query at n with the static keys
        per_text = kernel_softmax(w, a.layer, torch.einsum("bhne,hie->bhni", a.q[:, :, qp], mean_k[j]), qpos)
        cons[j] += tv_distance(per_text, data_kernel[j][None]).mean(-1).sum(0).to(f64)
    bar.close()
    n_held = max(1, s.n_heldout)
    mean_attn = (sum_attn / n_held).to(w.dtype)
    cons = cons / n_held
    arrays: dict[str, Tensor] = {"data_kernel": data_kernel, "mean_attention": mean_attn,
                                 "query_positions": qp, "layers": torch.tensor(layers)}
    weights_kernel = None
    weights_consistency = None
    if 0 in li and w.positional == "learned":
        flat = est.reshape(-1)
        if s.weights_query == "mean":
            query = w.W_E[flat].mean(0)
        else:
            ids = w.tokenizer(s.weights_query, add_special_tokens=False)["input_ids"]
            if len(ids) != 1:
                raise AttnscopeError(f"--weights-query {s.weights_query!r} is {len(ids)} tokens; give one token or 'mean'")
            query = w.W_E[ids[0]]
        weights_kernel = layer0_weight_kernels(w, query, T, ref_norms[0])[:, qp]  # [H, nq, T]
        arrays["weights_kernel_layer0"] = weights_kernel
        # consistency across generic query tokens (the sample's most frequent tokens), method §5.2c
        common = torch.bincount(flat).topk(min(s.n_query_tokens, int((torch.bincount(flat) > 0).sum()))).indices
        per_tok = torch.stack([layer0_weight_kernels(w, w.W_E[t], T, ref_norms[0])[:, qp] for t in common])
        weights_consistency = tv_distance(per_tok, weights_kernel[None]).mean(-1).mean(0)  # [H]
    if w.positional == "rotary":
        # the attnscope extension for rotary models: position-averaged pre-rotation query and key through the
        # rotation, so K_n(i) depends on the offset i - n only (translation-equivariant by construction)
        cos, sin = rotary_cos_sin(w, torch.arange(T, device=w.device))
        start = 1 if bos is not None else 0
        q_pre = apply_rotary(mean_q, cos, -sin)[:, :, start:].mean(2, keepdim=True).expand(-1, -1, T, -1)
        k_pre = k_static[:, :, start:].mean(2, keepdim=True).expand(-1, -1, T, -1)
        rot = positional_kernel_rows_batch(w, layers, apply_rotary(q_pre, cos, sin)[:, :, qp], apply_rotary(k_pre, cos, sin))
        arrays["rotary_offset_kernel"] = rot
    # offset kernel at the reference query: kappa(d) = K_nref(nref - d)
    nref = qpos[-1]
    arrays["offset_kernel"] = torch.stack([torch.stack([offset_profile(data_kernel[j, h, -1], nref, w.causal)
                                                        for h in range(H)]) for j in range(L)])
    records = []
    for l in layers:
        j = li[l]
        tv_all = torch.cat(tvs[j], 1) if tvs[j] else torch.zeros(H, 1)
        for h in range(H):
            row = data_kernel[j, h, -1]
            cat, m = categorise(row, nref, w.causal)
            tau, r2 = fit_decay(offset_profile(row, nref, w.causal))
            tvd = tv_all[h]
            rec = HeadRecord(
                layer=l, head=h, category=cat, n_eff=m["n_eff"], n_eff_fraction=m["n_eff_fraction"],
                decay_length=tau, decay_fit_r2=r2, median_offset=m["median_offset"], mass_first=m["mass_first"],
                mass_self=m["mass_self"], mass_prev=m["mass_prev"], query_consistency=float(cons[j, h]),
                equivariance=equivariance(data_kernel[j, h], qpos, w.causal),
                tv_decomposition={"mean": float(tvd.mean()), "median": float(tvd.median()),
                                  "p90": float(torch.quantile(tvd, 0.9))},
                tv_kernel_vs_attention=float(tv_distance(data_kernel[j, h], mean_attn[j, h]).mean()),
                tv_weights_vs_data=None if weights_kernel is None or l != 0
                else float(tv_distance(weights_kernel[h], data_kernel[j, h]).mean()),
                weights_query_consistency=None if weights_consistency is None or l != 0 else float(weights_consistency[h]),
                tv_rotary_offset_vs_data=float(tv_distance(arrays["rotary_offset_kernel"][j, h], data_kernel[j, h]).mean())
                if "rotary_offset_kernel" in arrays else None,
            )
            records.append(rec)
    res = KernelResult(model=w.info(), settings=asdict(s), provenance={**prov, "n_estimation": s.n_samples,
                       "n_heldout": s.n_heldout, "bos": bos, "norm_handling": "exact norm on content at the query "
                       "position; reference norm for positional displacements", "cache_key": key},
                       query_positions=qpos, records=records, arrays=arrays, ref_norms=ref_norms)
    if cache:
        with atomic_dir(cdir) as tmp:  # the entry appears complete (data and index) or not at all
            res.save(tmp)
    return res


def _stream_layers(w: ModelWeights, windows: Tensor, batch_size: int, li: dict[int, int], bar):
    """Yield ``(index of the layer in the analysis, LayerActivations)`` for every batch of ``windows`` and every
    analysed layer, running each batch only up to the deepest analysed layer (memory: one batch, one layer)."""
    last = max(li)
    for b0 in range(0, windows.shape[0], batch_size):
        batch = windows[b0 : b0 + batch_size]
        for a in iter_layers(w, batch, stop_layer=last):
            if a.layer in li:
                yield li[a.layer], a
        bar.update(batch.shape[0])


def kernel_softmax(w: ModelWeights, layer: int, scores: Tensor, qpos: list[int]) -> Tensor:
    """``softmax_i(scores / scale)`` for query rows at ``qpos`` (``scores [..., nq, T]``), causal mask applied."""
    s = scores / w.attn_scale[layer]
    if w.causal:
        T = s.shape[-1]
        mask = torch.arange(T, device=s.device)[None, :] > torch.tensor(qpos, device=s.device)[:, None]
        s = s.masked_fill(mask, float("-inf"))
    return s.softmax(-1)


def positional_kernel_rows_batch(w: ModelWeights, layers: list[int], q: Tensor, k: Tensor) -> Tensor:
    """Data kernels ``[L, H, nq, T]`` from mean queries ``q [L, H, nq, dh]`` at :func:`query_positions` and
    mean keys ``k [L, H, T, dh]``."""
    qpos = query_positions(k.shape[2], w.causal)
    return torch.stack([kernel_softmax(w, l, torch.einsum("hne,hie->hni", q[j], k[j]), qpos)
                        for j, l in enumerate(layers)])
