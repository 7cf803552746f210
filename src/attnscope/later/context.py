r"""The ``hybrid`` later-layer predictor: each token's mean MLP input (measured on the sample) plus what the
broad heads of the earlier layers add in a context, beyond what the token mean already holds (issue 11).

The token-mean predictor (circuit-free) is the effective embedding taken *at the MLP input*: each token's
mean true pre-activation ``M[x]`` on the sample, norm included.  It already holds, for every token, the
average output of every head over the contexts the token appeared in.  A context ``c`` moves a neuron beyond
that by what its heads read from the *other* tokens of the context:

    E_c[pre] ~ sum_x p_c(x) M[x] + sum_h ( E_c[o_h] - sum_x p_c(x) C_h[x] )

* ``h`` runs over the **broad** heads of the layers ``l < L``: the contextual bag of a layer (when one
  qualifies) and every other head whose kernel has ``N_eff >= neff_min`` (the method's broad-kernel
  threshold, 16) at the reference position; narrow heads (previous-token, local) carry n-gram structure
  that the i.i.d. context model cannot hold, so their average stays in ``M``;
* ``E_c[o_h]``: the head's expected output under the context's token frequencies ``p_c``, read by the MLP
  of ``L`` through ``G_l`` (with the fitted gain).  A non-contextual head weights each token by its content
  factor ``f_h``, so ``E_c[o_h] = p_c.(f_h V_h) / p_c.f_h`` (the exact denominator under i.i.d. tokens, no
  linearisation); the contextual bag is linear (``p_c . Ext``, calibrated denominators);
* ``C_h[x]``: the per-token mean, over the sample's positions holding ``x``, of the head's per-position
  prediction: the part of ``o_h`` already inside ``M[x]`` (each term counted once).

Layer ``L``'s own heads are left out: on the tuning half they lowered the Spearman at every layer (the
choice and the numbers are in docs/later-layers.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from attnscope.core.stats import tensor_sum
from attnscope.exact.decomposition import centre
from attnscope.later.method import LaterCircuit
from attnscope.later.truth import TruthData, token_mean
from attnscope.models import ModelWeights
from attnscope.neurons.contrast import token_frequencies


@dataclass
class BroadHead:
    layer: int
    head: str  # "bag" or "H<index>"
    n_eff: float  # kernel width at the reference position
    vectors: Tensor  # [d_vocab, d_model] token vectors at the MLP input of L (centred, through G_l)
    f: Tensor | None  # [d_vocab] content factor (None: the linear contextual bag)
    held: Tensor  # [n_groups, d_model] p_g . C_h for each token distribution g (see token_mean_weights)


def _neff(K: Tensor, n: int) -> float:
    return float(1.0 / (K[n, : n + 1].double() ** 2).sum())


def _candidates(w: ModelWeights, lc: LaterCircuit):
    """``(layer, name, n_eff, token vectors [V, d], per-position output fn, f)`` of every head of ``l < L``."""
    for l in range(lc.layer):
        circ, ex, M = lc.circuits[l], lc.explainers[l], lc.gain.get(l, 1.0) * lc.G[l]
        n_star = circ.settings.reference_position
        if circ.heads:
            yield (l, "bag", _neff(circ.kernel.cpu(), n_star), centre(circ.ext.float().cpu(), w) @ M,
                   lambda t, c=circ, M=M: c.summary(t.to(c.kernel.device)).float().cpu() @ M, None)
        for j, h in enumerate(ex.other_heads):
            def out(t: Tensor, ex=ex, j=j, M=M) -> Tensor:
                t = t.to(ex.e_val.device)
                n = t.shape[-1]
                A = ex.kernels[j, :n, :n] * ex.f[j, t][None, :]
                A = A / A.sum(-1, keepdim=True).clamp_min(1e-30)
                return (A @ ((ex.e_val[t] + ex.p_val[:n]) @ ex.W_OV[j])).float().cpu() @ M
            yield (l, f"H{h}", _neff(ex.kernels[j].cpu(), n_star), centre((ex.e_val @ ex.W_OV[j]).float().cpu(), w) @ M,
                   out, ex.f[j].double().cpu())


def token_mean_weights(sample: Tensor, n_min: int, groups: Tensor) -> Tensor:
    """Position weights ``[n_groups, N, T]`` such that ``sum_n weights[g, n] X(n) = p_g . C`` where ``C[x]`` is the
    mean of ``X`` over the sample positions ``>= n_min`` holding ``x`` (unseen there: the mean over all of them)
    and ``p_g`` the normalised token counts ``groups [n_groups, d_vocab]``: the token-mean of any per-position
    quantity under a token distribution, without a ``[d_vocab, ...]`` table."""
    V = groups.shape[1]
    body = sample[:, n_min:]
    cnt = torch.bincount(body.reshape(-1), minlength=V).double()
    p = groups.double() / groups.double().sum(1, keepdim=True)
    unseen = (p * (cnt == 0)).sum(1)  # [G] mass of tokens without a sample position: the overall mean
    wt = torch.zeros(groups.shape[0], *sample.shape, dtype=torch.float64)
    wt[:, :, n_min:] = (p / cnt.clamp_min(1))[:, body] + unseen[:, None, None] / body.numel()
    return wt


@dataclass
class HybridPositions:
    """The hybrid predictor per position: ``M[x_n] + (O(n) - C[x_n]) W_in / s`` with ``O`` the broad heads' summed
    output at the MLP input of L and ``C`` its per-token mean over the sample (tensors in comments)."""

    M: Tensor  # [d_vocab, d_mlp] each token's mean true pre-activation on the sample (unseen: _with_fallback)
    C: Tensor  # [d_vocab, d_model] per-token sample mean of O (centred)
    W: Tensor  # [d_model, d_mlp] W_in / s of the MLP of L
    outputs: list = field(repr=False, default_factory=list)  # each broad head's per-position output fn

    def parts(self, w: ModelWeights, tokens: Tensor, neurons: Tensor) -> dict[str, Tensor]:
        """``{"token mean", "broad heads"}`` ``[pos, k]`` on ``tokens [pos]`` for ``neurons [k]`` (sum: the
        prediction)."""
        t, k = tokens.cpu(), neurons.cpu()
        O = sum((centre(fn(t), w) for fn in self.outputs), torch.zeros(len(t), self.C.shape[1]))
        return {"token mean": self.M[t][:, k].float(), "broad heads": (O - self.C[t].float()) @ self.W[:, k].float()}


@torch.no_grad()
def broad_heads(w: ModelWeights, lc: LaterCircuit, neff_min: float,
                groups: Tensor) -> tuple[list[BroadHead], list, Tensor]:
    """The broad heads of the layers ``< L``, with ``p_g . C_h`` for the token distributions ``groups``; their
    per-position output functions and the per-token sample mean ``[d_vocab, d_model]`` of their summed output."""
    sample = torch.cat([x.tune for x in lc.windows])
    wt = token_mean_weights(sample, lc.n_min, groups).float()
    out, fns, total = [], [], torch.zeros(*sample.shape, w.d_model)
    for l, name, ne, vec, fn, f in _candidates(w, lc):
        if ne < neff_min:
            continue
        X = torch.stack([centre(fn(t), w) for t in sample])  # [N, T, d_model]
        total += X
        out.append(BroadHead(l, name, ne, vec, f, torch.einsum("gnt,ntd->gd", wt, X).double()))
        fns.append(fn)
    return out, fns, token_mean([total], [sample], lc.n_min, w.d_vocab)


@torch.no_grad()
def hybrid_effects(w: ModelWeights, lc: LaterCircuit, td: TruthData,
                   neff_min: float) -> tuple[dict[str, Tensor], list[BroadHead], HybridPositions]:
    """One-vs-rest predicted effects ``[n_sources, d_mlp]`` of the hybrid predictor (module docstring) per
    term: ``direct`` (the token means, less what the broad heads hold), ``contextual bag`` (the layers'
    bags) and ``other heads`` (the broad other heads); their sum is the prediction."""
    counts = torch.stack([token_frequencies(x.tune, w.d_vocab) * x.tune.numel() for x in lc.windows])
    C = counts.shape[0]
    rest = torch.stack([counts[torch.arange(C) != c].sum(0) for c in range(C)])
    groups = torch.cat([counts, rest])  # [2C, V]: each source, then all the others
    p = groups / groups.sum(1, keepdim=True)
    heads, fns, Cx = broad_heads(w, lc, neff_min, groups)
    W = lc.token_model.W_in.double().cpu() / lc.scale
    held = sum((h.held for h in heads), torch.zeros(2 * C, w.d_model, dtype=torch.float64))
    mean = {"direct": p @ td.M.double() - held @ W,
            "contextual bag": torch.zeros(2 * C, W.shape[1], dtype=torch.float64),
            "other heads": torch.zeros(2 * C, W.shape[1], dtype=torch.float64)}
    for h in heads:
        v = h.vectors.double()
        if h.f is None:
            mean["contextual bag"] += (p @ v) @ W
        else:
            mean["other heads"] += ((p * h.f) @ v / (p @ h.f)[:, None]) @ W
    parts = {k: (m[:C] - m[C:]) / td.sigma for k, m in mean.items()}
    return parts, heads, HybridPositions(_with_fallback(w, lc, td.M), Cx, W.float(), fns)


@torch.no_grad()
def _with_fallback(w: ModelWeights, lc: LaterCircuit, M: Tensor) -> Tensor:
    """``M [d_vocab, d_mlp]`` with the tokens never seen at the sample's positions ``>= n_min`` (their row is the
    overall mean) replaced by the weights-only composition's token score (direct-path fallback included), shifted
    by its count-weighted mean offset to the seen tokens' means: the per-position fallback of the hybrid."""
    sample = torch.cat([x.tune for x in lc.windows])[:, lc.n_min:]
    cnt = torch.bincount(sample.reshape(-1), minlength=w.d_vocab).double()
    seen = cnt > 0
    tm = lc.token_model
    S = (tensor_sum(tm.parts.values()) @ tm.W_in / tm.scale).double().cpu()  # [V, d_mlp]
    offset = (cnt[seen, None] * (M[seen].double() - S[seen])).sum(0) / cnt[seen].sum()
    return torch.where(seen[:, None], M.double(), S + offset)
