"""The contextual bag's mean under a source's token frequencies, with each head's denominator from the source's own
token counts (issue 19): :class:`BagHeads` (one denominator per head) and :class:`QueryBag` (one per head and query
token).  Token counts and weights only, no forward pass; :class:`attnscope.neurons.contrast.TokenModel` reads
either as its ``bag``."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import torch
from torch import Tensor

from attnscope.circuit.build import Circuit
from attnscope.circuit.parts import content_inputs
from attnscope.circuit.query import QueryParts, key_shares, query_averaged_factors, query_parts
from attnscope.circuit.result import LAYER
from attnscope.models import ModelWeights
from attnscope.neurons.verification import calibration_frequencies

MEMO = 64  # QueryBag means kept per bag (each [d_model])


@dataclass
class BagHeads:
    """Each contextual head's share of the contextual bag, for **source-aware denominators** (issue 19).

    The bag divides every head's kernel-weighted content by one calibrated denominator ``Z_cal``.  Under the
    i.i.d. token model a source with frequencies ``p`` has ``Z_p ~ Z_cal E_p[g] / E_cal[g]`` per head (``g``:
    the head's token weight in the bag, ``f / Z`` or the query-averaged ``E_q[f(q, x) / Z(q)]``; the kernel's
    mass cancels in the ratio), so the source-aware bag is ``sum_h E_p[ext_h] / r_h(p)`` with
    ``r_h(p) = E_p[g_h] / E_cal[g_h]``: still token counts only, no forward pass.  ``E`` over the text tokens
    (the BOS, the sink the kernel splits off, is left out of the ratio)."""

    weights: Tensor  # [H, d_vocab] each head's token weight in the bag: g x (1 - sink mass) x outlier mask
    g: Tensor  # [H, d_vocab] the denominator's content factor (unmasked)
    g_cal: Tensor  # [H] its mean under the calibration text's frequencies
    e_val: Tensor  # [d_vocab, d_model] the value input's content part
    W_OV: Tensor  # [H, d_model, d_model]
    bos: int | None

    def ratios(self, p: Tensor) -> Tensor:
        """``r_h(p) = E_p[g_h] / E_cal[g_h]`` per head ``[H]`` (the source's denominator over the calibrated one)."""
        p = p.to(self.g.device, self.g.dtype)
        if self.bos is not None:
            p = p.clone()
            p[self.bos] = 0
        return (self.g @ p) / (p.sum().clamp_min(1e-30) * self.g_cal)

    def head_means(self, p: Tensor) -> Tensor:
        """``E_p[ext_h]`` per head ``[H, d_model]`` (uncentred; their sum is ``p @ Circuit.ext``)."""
        p = p.to(self.e_val.device, self.e_val.dtype)
        return torch.einsum("hd,hdf->hf", (self.weights * p[None]) @ self.e_val, self.W_OV)

    def mean(self, p: Tensor, source_aware: bool = True) -> Tensor:
        """The bag's mean ``[d_model]`` under ``p`` with each head's denominator from ``p`` (or calibration)."""
        m = self.head_means(p)
        if source_aware:
            m = m / self.ratios(p).to(m.dtype)[:, None]
        return m.sum(0)


def _head_readout(w: ModelWeights, circ: Circuit, e_val: Tensor) -> tuple[Tensor, Tensor, int | None]:
    """What both bags read per contextual head: the share it keeps off the sink ``[H]`` (1 - sink mass; 1 without
    a BOS), its ``W_OV [H, d_model, d_model]``, and the BOS token the bags leave out (``None`` without one)."""
    hs = torch.tensor(circ.heads, device=e_val.device)
    keep = torch.ones(len(hs), dtype=e_val.dtype, device=e_val.device)
    if circ.settings.bos is not None:
        keep = 1 - torch.tensor([circ.decisions[h].sink_mass for h in circ.heads], dtype=e_val.dtype,
                                device=e_val.device)
    W_OV = torch.einsum("hde,hef->hdf", w.W_V[LAYER][hs], w.W_O[LAYER][hs]).to(e_val.dtype)
    return keep, W_OV, circ.settings.bos if w.prepend_bos else None


@torch.no_grad()
def bag_heads(w: ModelWeights, circ: Circuit, e_val: Tensor) -> BagHeads:
    """:class:`BagHeads` of ``circ`` (``e_val``: :attr:`attnscope.neurons.explain.Explainer.e_val`)."""
    if circ.query_conditioned:
        g = query_averaged_factors(w, circ).to(e_val.dtype)
    else:
        g = (circ.f / circ.Z[:, None]).to(e_val.dtype)
    keep, W_OV, bos = _head_readout(w, circ, e_val)
    weights = g * keep[:, None] * circ.token_mask.to(e_val.device, e_val.dtype)[None]
    p_cal = calibration_frequencies(w, circ).to(g.device, g.dtype)
    return BagHeads(weights, g, g @ p_cal, e_val, W_OV, bos)


@dataclass
class QueryBag:
    """The bag with **each query token's own denominator** under the source's frequencies (issue 19, step 10).

    :class:`BagHeads` scales each head's bag by one ratio per source, and its token weights ``g`` average the
    content factor over the *calibration text's* queries.  Here the queries are the source's own: under i.i.d.
    tokens with frequencies ``p`` a contextual head attends to key token ``x`` with the expected share
    ``a_h(x) = p(x) E_{y ~ p}[f_h(y, x) / sum_x' p(x') f_h(y, x')]``
    (:func:`attnscope.circuit.query.key_shares`), and the bag's mean is ``sum_h (1 - s_h) sum_x a_h(x) m(x)
    e(x) W_OV^h`` (``s_h`` the head's sink mass, ``m`` the outlier mask).  On the development half of the unseen
    benchmark it lifted SmolLM2's 12 failing pairs (English against another language) from a median 0.754 to
    0.940 like for like, where the per-source denominators had left them."""

    parts: QueryParts
    key_content: Tensor  # [d_vocab, d_model] layer 0's content input of every token (circuit.parts.content_inputs)
    keep: Tensor  # [H] 1 - each head's sink mass (1 without a BOS)
    mask: Tensor  # [d_vocab] the circuit's outlier-token mask
    e_val: Tensor  # [d_vocab, d_model] the value input's content part
    W_OV: Tensor  # [H, d_model, d_model]
    bos: int | None
    w: ModelWeights
    _memo: dict[bytes, Tensor] = field(default_factory=dict, repr=False)  # last means, keyed by p's bytes

    def mean(self, p: Tensor) -> Tensor:
        """The bag's mean ``[d_model]`` under ``p`` (always source-aware).  The last :data:`MEMO` results are kept:
        a contrast asks for the same source's mean several times."""
        p = p.double().cpu().clone()
        if self.bos is not None:
            p[self.bos] = 0
        p = p / p.sum().clamp_min(1e-30)
        key = hashlib.sha256(p.numpy().tobytes()).digest()
        if key not in self._memo:
            a = key_shares(self.w, self.parts, self.key_content, p).to(self.e_val.device, self.e_val.dtype)
            a = a * self.keep[:, None] * self.mask[None]
            if len(self._memo) >= MEMO:
                self._memo.pop(next(iter(self._memo)))
            self._memo[key] = torch.einsum("hd,hdf->hf", a @ self.e_val, self.W_OV).sum(0)
        return self._memo[key]


@torch.no_grad()
def query_bag(w: ModelWeights, circ: Circuit, e_val: Tensor) -> QueryBag:
    """:class:`QueryBag` of ``circ`` (``e_val``: :attr:`attnscope.neurons.explain.Explainer.e_val`)."""
    keep, W_OV, bos = _head_readout(w, circ, e_val)
    key_content = content_inputs(w, circ.T, circ.settings.reference_position, circ.settings.reference_norm)[2]
    return QueryBag(query_parts(w, circ), key_content, keep, circ.token_mask.to(e_val.device, e_val.dtype), e_val,
                    W_OV, bos, w)
