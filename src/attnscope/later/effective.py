r"""Effective embeddings: the residual stream entering layer ``l`` as token + position (issue 11).

The method is exact about layer 0 because its heads read ``W_E[x_i] + W_pos[i]``.  At a later layer the
residual depends on the whole prefix.  attnscope approximates it as

    r_l(n) ~ E_l[x_n] + pi_l(n) (+ c_l(n))

* ``E_l [d_vocab, d_model]``: the *effective embedding*, each token's mean residual at layer ``l`` over a
  sample text kept apart from the evaluation texts;
* ``pi_l [T, d_model]``: a static positional part, centred over positions;
* ``c_l(n)`` (optional, :mod:`attnscope.later.method`): a known offset, the earlier layers' contextual bags, so
  that what they explain is not absorbed into ``E_l`` a second time.

``E`` and ``pi`` are the least-squares additive fit of ``r - c`` (alternating per-token and per-position
means, which converge to it); both are exact when the earlier layers add nothing that depends on context
(e.g. they are zeroed).  Each token's mean is shrunk towards (unseen tokens: replaced by)
their *direct-path* embedding, with an empirical-Bayes weight (:func:`shrinkage_count`): the embedding
passed through the earlier layers with each attention output replaced by its sample mean and each MLP
applied to the token itself (plus the mean offset between the two over seen tokens).  How well that
fallback predicts seen tokens is reported.

Layer 0 with learned positions is the model's own ``W_E`` and ``W_pos`` (no estimate).  Every estimate
carries its approximation error (:func:`approximation_error`): the share of the residual's variance,
after the normalisation the next heads apply, that token + position leave unexplained.

:func:`layer_view` turns an estimate into a :class:`~attnscope.models.ModelWeights` whose layer 0 *is*
layer ``l`` and whose embeddings are the effective ones, so the layer-0 circuit code applies unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, TypedDict

import torch
from torch import Tensor

from attnscope.core.errors import AttnscopeError, check_index
from attnscope.exact.forward import activation, iter_layers, norm
from attnscope.models import ModelWeights


class ApproximationError(TypedDict):
    """What :func:`approximation_error` measures (the fields of :class:`attnscope.later.result.Approximation`)."""

    fvu: float
    fvu_token_only: float
    unseen_share: float
    n_positions: int


@dataclass
class EffectiveEmbedding:
    """The token + position approximation of the residual entering one layer (tensors in comments)."""

    layer: int
    E: Tensor  # [d_vocab, d_model] effective embeddings (fallback rows for unseen tokens)
    pi: Tensor  # [T, d_model] positional part, centred over positions
    counts: Tensor  # [d_vocab] occurrences of each token in the sample
    exact: bool  # True at layer 0 with learned positions (the model's own embeddings)
    n_sample_positions: int
    fit_fvu: float  # residual variance unexplained on the sample itself (normalised vectors)
    fallback_r2: float | None  # R^2 of the direct-path fallback on seen tokens (count-weighted)
    n_iterations: int
    prior_count: float  # weight of the direct-path prior in each token's mean (empirical Bayes by default)
    offset_removed: bool = False  # True when a known contextual offset c_l was subtracted before the fit

    @property
    def n_seen(self) -> int:
        return int((self.counts > 0).sum())

    def residual(self, tokens: Tensor) -> Tensor:
        """Approximate residual ``[..., pos, d_model]`` of token windows ``tokens [..., pos]``."""
        return self.E[tokens] + self.pi[: tokens.shape[-1]]

    def to_json(self) -> dict:
        return {"layer": self.layer, "exact": self.exact, "n_seen_tokens": self.n_seen,
                "n_vocab": int(self.counts.numel()), "n_sample_positions": self.n_sample_positions,
                "fit_fvu": self.fit_fvu, "fallback_r2": self.fallback_r2, "n_iterations": self.n_iterations,
                "prior_count": self.prior_count,
                "offset_removed": self.offset_removed}


@dataclass
class SampleActivations:
    """What the sample run records per layer (flattened over windows and positions where noted)."""

    tokens: Tensor  # [N, T]
    resid: dict[int, Tensor]  # layer -> [N, T, d_model] residual entering the layer
    mean_attn_out: dict[int, Tensor]  # layer -> [d_model] mean attention output (positions >= 1)
    attn_scale: dict[int, float]  # layer -> median scale of the norm in front of the heads (positions >= 1)
    mlp_scale: dict[int, float]  # layer -> median scale of the norm in front of the MLP
    slope: dict[int, Tensor]  # layer -> [d_mlp] mean d act / d pre (gated: mean act'(gate) * up)
    gate_mean: dict[int, Tensor | None]  # layer -> [d_mlp] mean act(gate) (gated MLPs), else None
    keep: dict[int, Tensor]  # layer -> [n_heads] mean attention not on the first (BOS) position
    direct: dict[int, Tensor] = field(default_factory=dict, repr=False)  # memo of direct_path per layer


def _check_model(w: ModelWeights, layer: int) -> None:
    check_index("layer", layer, w.n_layers)
    if w.norm_placement != "pre":
        raise AttnscopeError(f"later-layer circuits need a pre-norm model; {w.name} normalises after each block "
                             "(post-LN): analyse layer 0 only (--layer 0)")


def _scale(w: ModelWeights, x: Tensor) -> Tensor:
    if w.norm == "layernorm":
        x = x - x.mean(-1, keepdim=True)
    return (x.float().pow(2).mean(-1) + w.eps).sqrt()


def _act_slope(w: ModelWeights, a, l: int) -> tuple[Tensor, Tensor | None]:
    """Sums over positions >= 1 of the MLP's diagonal input derivative factors."""
    with torch.enable_grad():
        g = a.mlp_pre[:, 1:].detach().float().requires_grad_(True)
        y = activation(w.act, g)
        (d,) = torch.autograd.grad(y.sum(), g)
    if w.W_gate is None:
        return d.double().sum((0, 1)).cpu(), None
    up = (a.mlp_in[:, 1:].float() @ w.W_in[l].float() + w.b_in[l].float())
    return (d * up).double().sum((0, 1)).cpu(), y.detach().double().sum((0, 1)).cpu()


@torch.no_grad()
def sample_activations(w: ModelWeights, windows: Tensor, layers: list[int], batch_size: int = 8) -> SampleActivations:
    """Run the model on ``windows [N, T]`` up to ``max(layers)``; keep the residual entering each of
    ``layers`` and, for every layer up to the deepest, the statistics the linear propagation needs."""
    top = max(layers)
    resid: dict[int, list[Tensor]] = {l: [] for l in layers}
    # per layer: sums over positions >= 1 (gate: gated MLPs only; keep: with a BOS only), and the norm scales
    sums: dict[str, dict[int, Tensor]] = {k: {} for k in ("attn", "slope", "gate", "keep")}
    scales: dict[str, dict[int, list[Tensor]]] = {k: {} for k in ("s1", "s2")}
    n = 0
    for b0 in range(0, windows.shape[0], batch_size):
        batch = windows[b0 : b0 + batch_size].to(w.device)
        for a in iter_layers(w, batch, stop_layer=top):
            l = a.layer
            if l in resid:
                resid[l].append(a.resid_pre.float().cpu())
            sl, gm = _act_slope(w, a, l)
            assert a.pattern is not None, "iter_layers keeps the patterns by default"
            keep = (1 - a.pattern[:, :, 1:, 0]).double().sum((0, 2)).cpu() if w.prepend_bos else None
            for k, v in (("attn", a.attn_out[:, 1:].double().sum((0, 1)).cpu()), ("slope", sl), ("gate", gm),
                         ("keep", keep)):
                if v is not None:
                    sums[k][l] = sums[k][l] + v if l in sums[k] else v
            m_src = a.resid_pre if w.parallel_attn_mlp else a.resid_pre + a.attn_out  # what the MLP normalises
            for k, x in (("s1", a.resid_pre), ("s2", m_src)):
                scales[k].setdefault(l, []).append(_scale(w, x[:, 1:]).reshape(-1).cpu())
        n += batch.shape[0] * (batch.shape[1] - 1)
    mean = {k: {l: (v / max(n, 1)).float() for l, v in sums[k].items()} for k in sums}
    med = {k: {l: float(torch.cat(v).median()) for l, v in scales[k].items()} for k in scales}
    layers_run = list(mean["attn"])  # 0 .. top
    gate = {l: mean["gate"].get(l) for l in layers_run}  # None without a gated MLP
    keep_mean = {l: mean["keep"][l] if l in mean["keep"] else torch.ones(w.n_heads) for l in layers_run}
    return SampleActivations(windows.cpu(), {l: torch.cat(v) for l, v in resid.items()}, mean["attn"], med["s1"],
                             med["s2"], mean["slope"], gate, keep_mean)


@torch.no_grad()
def direct_path(w: ModelWeights, layer: int, mean_attn_out: dict[int, Tensor], chunk: int = 8192, *,
                start: Tensor | None = None, start_layer: int = 0) -> Tensor:
    """Every token's embedding through layers ``< layer`` with attention replaced by its sample mean and each
    MLP applied to the token itself: ``[d_vocab, d_model]`` (at the mean position).  ``start``: the direct
    path already computed up to ``start_layer`` (the layers before it are skipped)."""
    base = w.W_pos.mean(0) if w.W_pos is not None else 0.0
    out = []
    for c0 in range(0, w.d_vocab, chunk):
        if start is None:
            x = (w.W_E[c0 : c0 + chunk] + base + (0 if w.W_type is None else w.W_type)).float()
        else:
            x = start[c0 : c0 + chunk].to(w.device).float()
        for l in range(start_layer if start is not None else 0, layer):
            mid = x + mean_attn_out[l].to(x)
            m_in = norm(w, x if w.parallel_attn_mlp else mid, w.ln2_w[l], None if w.ln2_b is None else w.ln2_b[l])
            if w.W_gate is not None:
                post = activation(w.act, m_in @ w.W_gate[l]) * (m_in @ w.W_in[l] + w.b_in[l])
            else:
                post = activation(w.act, m_in @ w.W_in[l] + w.b_in[l])
            x = mid + post @ w.W_out[l] + w.b_out[l]
        out.append(x.cpu())
    return torch.cat(out)


def cached_direct_path(w: ModelWeights, layer: int, sample: SampleActivations) -> Tensor:
    """:func:`direct_path` memoised on the sample run, each layer computed from the deepest one cached."""
    if layer not in sample.direct:
        below = [l for l in sample.direct if l < layer]
        m = max(below) if below else None
        sample.direct[layer] = direct_path(w, layer, sample.mean_attn_out,
                                           start=None if m is None else sample.direct[m], start_layer=m or 0)
    return sample.direct[layer]


def _unit(w: ModelWeights, x: Tensor) -> Tensor:
    """What a norm sees, up to its gain: centred (LayerNorm) and scaled to unit rms."""
    if w.norm == "layernorm":
        x = x - x.mean(-1, keepdim=True)
    return x / (x.pow(2).mean(-1, keepdim=True) + w.eps).sqrt()


def fvu(w: ModelWeights, r: Tensor, r_hat: Tensor) -> float:
    """Fraction of the variance of the normalised residual ``r [N, d]`` left unexplained by ``r_hat``."""
    y, yh = _unit(w, r.double()), _unit(w, r_hat.double())
    return float(((y - yh) ** 2).sum() / ((y - y.mean(0)) ** 2).sum().clamp_min(1e-30))


def _additive_fit(R: Tensor, tokens: Tensor, V: int, prior: Tensor, prior_count: float, iters: int):
    """Least-squares ``R[b, n] ~ E[tokens[b, n]] + pi[n]`` by alternating means (``R [N, T, d]``)."""
    N, T, d = R.shape
    cnt = torch.bincount(tokens.reshape(-1), minlength=V).double()
    # only the seen tokens take part (an unseen token's mean is its prior, plus the last shift): the
    # iterations run over the sample's few thousand tokens, not the whole vocabulary
    seen = torch.nonzero(cnt > 0).squeeze(1)
    local = torch.full((V,), -1, dtype=torch.long)
    local[seen] = torch.arange(len(seen))
    loc = local[tokens]  # [N, T] index into the seen tokens
    flat_loc = loc.reshape(-1)
    flat = R.reshape(-1, d).double()
    prior_seen, cnt_seen = prior[seen].double(), cnt[seen]
    pi = torch.zeros(T, d, dtype=torch.float64)
    Es = prior_seen.clone()
    shift = torch.zeros(d, dtype=torch.float64)
    for _ in range(iters):
        s = torch.zeros(len(seen), d, dtype=torch.float64).index_add_(0, flat_loc, flat - pi.repeat(N, 1))
        Es = (s + prior_count * prior_seen) / (cnt_seen + prior_count)[:, None]
        pi = (R.double() - Es[loc]).mean(0)
        shift = pi.mean(0)
        pi = pi - shift
        Es = Es + shift
    E = prior.double() + shift
    E[seen] = Es
    return E, pi, cnt


def shrinkage_count(R: Tensor, tokens: Tensor, E0: Tensor, pi0: Tensor, prior: Tensor, cnt: Tensor) -> float:
    """Empirical-Bayes prior weight ``k = sigma_within^2 / tau^2``: the per-position noise around a token's
    mean over the spread of the seen tokens' means around the prior (both measured on the sample)."""
    resid = R.double() - E0[tokens] - pi0
    n, n_seen = tokens.numel(), int((cnt > 0).sum())
    within = float(resid.pow(2).sum() / max(n - n_seen, 1))
    many = cnt >= 2
    wt = cnt[many] / cnt[many].sum()
    tau2 = float((wt * ((E0[many] - prior[many]).pow(2).sum(-1) - within / cnt[many])).sum())
    return within / max(tau2, 1e-12 * within)


@torch.no_grad()
def estimate(w: ModelWeights, layer: int, sample: SampleActivations, *, offset: Tensor | None = None,
             prior_count: float | None = None, iters: int = 60, force_estimate: bool = False) -> EffectiveEmbedding:
    """Effective embedding of ``layer`` from the sample run (``offset [N, T, d]``: known terms removed first).

    ``prior_count``: weight of the direct-path prior in each token's mean (``None``: empirical Bayes,
    :func:`shrinkage_count`)."""
    _check_model(w, layer)
    T = sample.tokens.shape[1]
    if layer == 0 and w.positional == "learned" and w.ln_emb_w is None and not force_estimate and offset is None:
        E = (w.W_E + (0 if w.W_type is None else w.W_type)).float().cpu()
        assert w.W_pos is not None, "learned positions"
        cnt = torch.bincount(sample.tokens.reshape(-1), minlength=w.d_vocab)[: w.d_vocab].double()
        return EffectiveEmbedding(0, E, w.W_pos[:T].float().cpu(), cnt, True, sample.tokens.numel(), 0.0, 1.0, 0, 0.0)
    R = sample.resid[layer] if offset is None else sample.resid[layer] - offset
    D = cached_direct_path(w, layer, sample).double()
    # first pass without a prior gives the seen tokens' means; align the direct path to them
    E0, pi0, cnt = _additive_fit(R, sample.tokens, w.d_vocab, torch.zeros_like(D), 1e-9, iters)
    seen = cnt > 0
    wt = cnt[seen] / cnt[seen].sum()
    prior = D + (wt[:, None] * (E0[seen] - D[seen])).sum(0)
    k = shrinkage_count(R, sample.tokens, E0, pi0, prior, cnt) if prior_count is None else prior_count
    E, pi, _ = _additive_fit(R, sample.tokens, w.d_vocab, prior, k, iters)
    resid = (E0[seen] - prior[seen]) ** 2
    spread = (E0[seen] - (wt[:, None] * E0[seen]).sum(0)) ** 2
    r2 = float(1 - (wt[:, None] * resid).sum() / (wt[:, None] * spread).sum().clamp_min(1e-30))
    fit = fvu(w, R[:, 1:].reshape(-1, w.d_model), (E[sample.tokens] + pi)[:, 1:].reshape(-1, w.d_model))
    return EffectiveEmbedding(layer, E.float(), pi.float(), cnt, False, sample.tokens.numel(), fit, r2, iters, k,
                              offset is not None)


@torch.no_grad()
def approximation_error(w: ModelWeights, eff: EffectiveEmbedding, windows: Tensor, *, n_min: int = 1,
                        offset: Tensor | None = None, resid: Tensor | None = None) -> ApproximationError:
    """On held-out ``windows [N, T]``: FVU of the normalised residual entering ``eff.layer`` by token +
    position (+ ``offset [N, T, d]``), over positions ``>= n_min``; and the share of positions whose token the
    sample never saw (they use the direct-path fallback).  ``resid``: the true residual, if already run."""
    if resid is None:
        resid = sample_activations(w, windows, [eff.layer]).resid[eff.layer]
    R = resid[:, n_min:].reshape(-1, w.d_model)
    win = windows.cpu()
    approx = eff.residual(win) + (0 if offset is None else offset)
    approx = approx[:, n_min:].reshape(-1, w.d_model)
    toks = win[:, n_min:].reshape(-1)
    token_only = eff.E[win][:, n_min:].reshape(-1, w.d_model)
    return {"fvu": fvu(w, R, approx), "fvu_token_only": fvu(w, R, token_only),
            "unseen_share": float((eff.counts[toks] == 0).double().mean()), "n_positions": int(R.shape[0])}


def layer_view(w: ModelWeights, eff: EffectiveEmbedding) -> ModelWeights:
    """A model whose layer 0 is ``w``'s layer ``eff.layer`` and whose embeddings are the effective ones.

    Learned positions: ``W_E = E``, ``W_pos = pi``.  Rotary: ``W_E = E`` (the rotary layer-0 circuit reads
    content only; the positional part's share of the variance is in the approximation error)."""
    l = eff.layer
    if eff.exact:
        return w
    per_layer = ("ln1_w", "ln1_b", "W_Q", "W_K", "W_V", "b_Q", "b_K", "b_V", "W_O", "b_O", "ln2_w", "ln2_b", "W_in",
                 "b_in", "W_gate", "W_out", "b_out", "attn_scale")
    # each value has its ModelWeights field's type (the tensor from layer l on, or None where the field is None);
    # the names are checked by dataclasses.replace at run time
    sliced: dict[str, Any] = {k: (getattr(w, k)[l:] if getattr(w, k) is not None else None) for k in per_layer}
    learned = w.positional == "learned"
    return replace(w, name=f"{w.name}@layer{l}", W_E=eff.E.to(w.dtype).to(w.device),
                   W_pos=eff.pi.to(w.dtype).to(w.device) if learned else None, W_type=None, ln_emb_w=None,
                   ln_emb_b=None, n_ctx=eff.pi.shape[0] if learned else w.n_ctx,
                   **{k: v for k, v in sliced.items()})
