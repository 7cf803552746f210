r"""Decomposition of attention scores into a content part and a positional part (method §4-5).

Learned absolute positions (GPT-2, BERT, the demo model).  The heads of a layer read
``LN(r_i)`` with ``r_i = u_i + \pi_i``: a content part and a static positional part (layer 0:
``u_i = W_E[x_i]``, ``\pi_i = W_pos[i]`` (+ BERT's token-type row), exactly as the method writes it;
later layers: ``\pi`` is the mean residual at position ``i`` over sample texts, centred over positions,
and ``u_i = r_i - \pi_i``).  With ``\tilde W_K = diag(\gamma) W_K`` and centred vectors, the method's
approximate key for query position ``n`` (the reference position) is

    k(n, i) = E[n, u_i] + P[n, i] + c_K
    E[n, u] = (u + \pi_n) \tilde W_K / \sigma(u + \pi_n)                 (content placed at n, exact norm)
    P[n, i] = (\pi_i - \pi_n) \tilde W_K / \sqrt{(|\pi_i|^2 + c^2)/d + \epsilon}   (positional displacement)

where ``\sigma(v) = \sqrt{|v|^2/d + \epsilon}`` is LayerNorm's scale, ``c`` the reference norm of a
typical content vector (the method's 3.5 for GPT-2; here measured, see :func:`reference_norm`) and
``c_K = \beta W_K + b_K``.  It is exact at ``i = n`` and when ``u \perp \pi``, ``|u| = c`` and
``|\pi_i| = |\pi_n|``.  Queries, scale and mask stay exact.  Everything is computed through dot products
(``T^2 d_head`` per head), never by materialising a key per (n, i) pair.

Rotary positions (Llama).  There is no additive positional embedding; the score is
``q_n R_{i-n} k_i``.  With ``\bar k_i`` the mean (pre-rotation) key at position ``i`` over sample texts,
the attnscope extension writes

    s(n, i) ~ q_n . (k_i - \bar k_i)            content, evaluated at zero offset (rotation-free)
            + (R_n q_n) . (R_i \bar k_i)        positional: the static key through the rotation

i.e. content is assumed translation-invariant (as the method assumes for learned positions) and all
offset dependence is carried by the static key.  The same TV distance measures how well this holds.
"""

from __future__ import annotations

import torch
from jaxtyping import Float, Int
from torch import Tensor

from .forward import (LayerActivations, apply_rotary, attn_norm_params, mask_scores, project, qk_scores, rotary_cos_sin,
                      static_positions)
from .models import ModelWeights


def centre(x: Float[Tensor, "*batch d_model"], weights: ModelWeights) -> Float[Tensor, "*batch d_model"]:
    """Subtract the mean over ``d_model`` for LayerNorm models (RMSNorm does not centre)."""
    return x - x.mean(-1, keepdim=True) if weights.norm == "layernorm" else x


def reference_norm(weights: ModelWeights, tokens: Int[Tensor, "*shape"] | None = None) -> float:
    """Median norm of the (centred) token embeddings: the method's typical content norm ``c`` (3.5 in GPT-2).

    Over the whole vocabulary, or over ``tokens`` (e.g. a calibration text) when given.
    """
    E = weights.W_E if tokens is None else weights.W_E[tokens.reshape(-1)]
    return float(centre(E.float(), weights).norm(dim=-1).median())


def tv_distance(a: Float[Tensor, "*#batch n"], b: Float[Tensor, "*#batch n"]) -> Float[Tensor, "..."]:
    """Total-variation distance between distributions along the last axis: ``0.5 * sum |a - b|``."""
    return 0.5 * (a - b).abs().sum(-1)


def learned_score_parts(weights: ModelWeights, layer: int, norm_in: Float[Tensor, "batch pos d_model"],
                        pi: Float[Tensor, "pos d_model"], q: Float[Tensor, "batch head pos d_head"], ref_norm: float
                        ) -> tuple[Float[Tensor, "batch head pos pos"], Float[Tensor, "batch head pos pos"],
                                   Float[Tensor, "batch head pos"]]:
    """Content and positional parts of the approximate scores (learned positions), unscaled, unmasked.

    norm_in: ``[batch, pos, d_model]`` input of the attention's norm; pi: ``[pos, d_model]`` static
    positional part; q: ``[batch, head, pos, d_head]`` exact queries.
    Returns ``content [b, h, n, i]`` (``q_n . E[n, u_i]``), ``positional [b, h, n, i]``
    (``q_n . P[n, i]``) and ``bias [b, h, n]`` (``q_n . c_K``, constant in ``i``).
    """
    gamma, beta = attn_norm_params(weights, layer)
    d = weights.d_model
    eps = weights.eps
    Wk = gamma[None, :, None] * weights.W_K[layer]  # [h, d, dh]
    cK = weights.b_K[layer] + (0 if beta is None else torch.einsum("d,hde->he", beta, weights.W_K[layer]))
    pic = centre(pi, weights)  # [T, d]
    u = centre(norm_in, weights) - pic  # [b, T, d]
    EK = torch.einsum("btd,hde->bhte", u, Wk)  # content keys before normalisation
    PK = torch.einsum("td,hde->hte", pic, Wk)  # positional keys before normalisation
    QE = qk_scores(q, EK)
    QP = qk_scores(q, PK)
    QPnn = QP.diagonal(dim1=-2, dim2=-1)  # [b, h, n]
    # sigma(u_i + pi_n)^2 = (|u_i|^2 + 2 u_i.pi_n + |pi_n|^2)/d + eps, as a [b, n, i] matrix
    uu = (u * u).sum(-1)  # [b, i]
    pp = (pic * pic).sum(-1)  # [n]
    up = torch.einsum("bid,nd->bni", u, pic)
    sigma_ni = ((uu[:, None, :] + 2 * up + pp[None, :, None]) / d + eps).sqrt()  # [b, n, i]
    sigma_ref = ((pp + ref_norm**2) / d + eps).sqrt()  # [i]
    content = (QE + QPnn[..., None]) / sigma_ni[:, None]
    positional = (QP - QPnn[..., None]) / sigma_ref
    bias = torch.einsum("bhne,he->bhn", q, cK)
    return content, positional, bias


def rotary_score_parts(weights: ModelWeights, layer: int, attn_in: Float[Tensor, "batch pos d_model"],
                       k_bar: Float[Tensor, "head ctx d_head"]
                       ) -> tuple[Float[Tensor, "batch head pos pos"], Float[Tensor, "batch head pos pos"]]:
    """Content (zero-offset) and positional (static key through the rotation) parts, unscaled, unmasked.

    attn_in: ``[batch, pos, d_model]``; k_bar: ``[head, pos, d_head]`` mean pre-rotation key per position.
    """
    l = layer
    q = project(attn_in, weights.W_Q[l], weights.b_Q[l])
    k = project(attn_in, weights.W_K[l], weights.b_K[l])
    T = attn_in.shape[1]
    k_static = k_bar[:, :T]
    content = qk_scores(q, k - k_static[None])
    cos, sin = rotary_cos_sin(weights, torch.arange(T, device=attn_in.device))
    positional = qk_scores(apply_rotary(q, cos, sin), apply_rotary(k_static, cos, sin))
    return content, positional


def approximate_pattern(weights: ModelWeights, layer: int, acts: LayerActivations,
                        static: Float[Tensor, "pos d_model"] | Float[Tensor, "head ctx d_head"], ref_norm: float
                        ) -> Float[Tensor, "batch head pos pos"]:
    """Attention pattern ``[batch, head, n, i]`` implied by the content/position split of the keys.

    ``acts``: the layer's :class:`~attnscope.forward.LayerActivations`; ``static``: ``pi [pos, d_model]``
    for learned positions, ``k_bar [head, pos, d_head]`` for rotary.
    """
    scale = weights.attn_scale[layer]
    if weights.positional == "rotary":
        content, positional = rotary_score_parts(weights, layer, acts.attn_in, static)
        s = content + positional
    else:
        content, positional, bias = learned_score_parts(weights, layer, acts.norm_in, static, acts.q, ref_norm)
        s = content + positional + bias[..., None]
    return mask_scores(weights, s / scale).softmax(-1)


def positional_kernel_rows(weights: ModelWeights, layer: int, scores_pos: Float[Tensor, "*batch n i"]
                           ) -> Float[Tensor, "*batch n i"]:
    """Softmax over keys of positional scores (``[..., n, i]``, unscaled): the kernel ``K_n(i)``."""
    return mask_scores(weights, scores_pos / weights.attn_scale[layer]).softmax(-1)


def layer0_weight_kernels(weights: ModelWeights, query: Float[Tensor, " d_model"], n_ctx: int, ref_norm: float
                          ) -> Float[Tensor, "head n_ctx n_ctx"]:
    r"""Layer-0 positional kernels from the weights alone (learned positions), ``[head, n, i]``.

    The query at position ``n`` is the exact LayerNorm'd ``query + W_pos[n]`` for a content vector
    ``query [d_model]`` (a generic token's embedding, or the mean embedding of a text: method §5.2a),
    and the keys are ``P[n, i]`` (method §4.2).
    """
    from .forward import norm

    if weights.positional != "learned":
        raise ValueError("weights-only kernels need learned absolute positions; use data kernels for rotary models")
    pi = static_positions(weights, n_ctx)
    raw = (query[None, :] + pi)[None]  # [1, n, d]
    gamma, beta = attn_norm_params(weights, 0)
    x = norm(weights, raw, gamma, beta)
    q = project(x, weights.W_Q[0], weights.b_Q[0])
    _, positional, _ = learned_score_parts(weights, 0, raw, pi, q, ref_norm)
    return positional_kernel_rows(weights, 0, positional)[0]
