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
from jaxtyping import Complex, Float, Int
from torch import Tensor

from attnscope.exact.forward import (
    LayerActivations,
    apply_rotary,
    attn_norm_params,
    mask_scores,
    norm,
    project,
    qk_scores,
    rotary_cos_sin,
    static_positions,
)
from attnscope.models import ModelWeights


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
                        static: Float[Tensor, "pos d_model"] | Float[Tensor, "head ctx d_head"], ref_norm: float,
                        pair_weights: Complex[Tensor, "head pairs"] | Complex[Tensor, "head ctx pairs"] | None = None
                        ) -> Float[Tensor, "batch head pos pos"]:
    """Attention pattern ``[batch, head, n, i]`` implied by the content/position split of the keys.

    ``acts``: the layer's :class:`~attnscope.exact.forward.LayerActivations`; ``static``: ``pi [pos, d_model]``
    for learned positions, ``k_bar [head, pos, d_head]`` for rotary; ``pair_weights [head, D/2]`` (or per query
    row, ``[head, pos, D/2]``): the separable rotary split (:func:`separable_rotary_score_parts`), else content at
    zero offset.
    """
    scale = weights.attn_scale[layer]
    if weights.positional == "rotary" and pair_weights is not None:
        content, positional = separable_rotary_score_parts(weights, pre_rotation(weights, acts.q),
                                                           pre_rotation(weights, acts.k), static, pair_weights)
        s = content + positional
    elif weights.positional == "rotary":
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


def layer0_weight_kernels(weights: ModelWeights, query: Float[Tensor, " d_model"], n_ctx: int, ref_norm: float,
                          rows: Int[Tensor, " n_rows"] | None = None) -> Float[Tensor, "head n_rows n_ctx"]:
    r"""Layer-0 positional kernels from the weights alone (learned positions), ``[head, n, i]`` for the query
    positions ``rows`` (default: all ``n_ctx``).

    The query at position ``n`` is the exact LayerNorm'd ``query + W_pos[n]`` for a content vector
    ``query [d_model]`` (a generic token's embedding, or the mean embedding of a text: method §5.2a),
    and the keys are ``P[n, i]`` (method §4.2): ``K_n(i) = softmax_i(q_n . (P~_i - P~_n) / sigma_ref(i) / scale)``
    with ``P~ = centre(pi) diag(gamma) W_K``.  Only this positional part is computed (the content part and
    the bias of :func:`learned_score_parts` do not enter the kernel), and only for ``rows``: ``[H, rows, T]``.
    """
    if weights.positional != "learned":
        raise ValueError("weights-only kernels need learned absolute positions; use data kernels for rotary models")
    rows = torch.arange(n_ctx, device=weights.device) if rows is None else rows.to(weights.device)
    pi = static_positions(weights, n_ctx)
    gamma, beta = attn_norm_params(weights, 0)
    x = norm(weights, (query[None, :] + pi[rows])[None], gamma, beta)
    q = project(x, weights.W_Q[0], weights.b_Q[0])[0]  # [H, rows, dh]
    pic = centre(pi, weights)  # [T, d]
    PK = torch.einsum("td,hde->hte", pic, gamma[None, :, None] * weights.W_K[0])  # [H, T, dh]
    QP = qk_scores(q, PK)  # [H, rows, T]
    QPnn = QP.gather(2, rows[None, :, None].expand(QP.shape[0], -1, 1))  # q_n . P~_n
    sigma_ref = (((pic * pic).sum(-1) + ref_norm**2) / weights.d_model + weights.eps).sqrt()  # [T]
    positional = (QP - QPnn) / sigma_ref / weights.attn_scale[0]
    return mask_scores(weights, positional, rows).softmax(-1)


def approximate_tv(weights: ModelWeights, layer: int, acts: LayerActivations,
                   static: Float[Tensor, "pos d_model"] | Float[Tensor, "head ctx d_head"], ref_norm: float,
                   pair_weights: Complex[Tensor, "head pairs"] | Complex[Tensor, "head ctx pairs"] | None = None,
                   chunk: int = 256) -> Float[Tensor, "batch head pos"]:
    """``TV(approximate pattern, true pattern)`` at every query position, ``[batch, head, n]``: the same
    numbers as ``tv_distance(approximate_pattern(...), acts.pattern)``, computed ``chunk`` query rows at a
    time (learned positions; causal models only over the visible keys), so that no ``[b, H, T, T]`` array
    is built beyond the true pattern.  Rotary models use :func:`approximate_pattern` directly."""
    assert acts.pattern is not None, "the true pattern is needed: run the layer with patterns=True"
    if weights.positional == "rotary":
        return tv_distance(approximate_pattern(weights, layer, acts, static, ref_norm, pair_weights), acts.pattern)
    gamma, beta = attn_norm_params(weights, layer)
    d, eps = weights.d_model, weights.eps
    Wk = gamma[None, :, None] * weights.W_K[layer]  # [h, d, dh]
    cK = weights.b_K[layer] + (0 if beta is None else torch.einsum("d,hde->he", beta, weights.W_K[layer]))
    pic = centre(static, weights)  # [T, d]
    u = centre(acts.norm_in, weights) - pic  # [b, T, d]
    EK = torch.einsum("btd,hde->bhte", u, Wk)  # [b, h, T, dh]
    PK = torch.einsum("td,hde->hte", pic, Wk)  # [h, T, dh]
    q = acts.q / weights.attn_scale[layer]  # the scale folded into the queries
    uu, pp = (u * u).sum(-1), (pic * pic).sum(-1)  # [b, i], [n]
    inv_sigma_ref = ((pp + ref_norm**2) / d + eps).rsqrt()  # [i]
    bias = torch.einsum("bhne,he->bhn", q, cK)[..., None]  # [b, h, n, 1]
    b, H, T, _ = q.shape
    out = torch.empty(b, H, T, dtype=q.dtype, device=q.device)
    for r0 in range(0, T, chunk):
        r1 = min(T, r0 + chunk)
        k = r1 if weights.causal else T  # keys past the chunk's last query are masked for every row
        qc = q[:, :, r0:r1]
        s = qk_scores(qc, EK[:, :, :k])  # content q_n . E[n, u_i] before normalisation, [b, h, c, k]
        qp = qk_scores(qc, PK[:, :k])  # positional q_n . P[n, i] before normalisation
        qp_nn = qp.diagonal(offset=r0, dim1=-2, dim2=-1)[..., None]  # q_n . P~_n
        up = torch.einsum("bid,nd->bni", u[:, :k], pic[r0:r1])
        inv_sigma = ((uu[:, None, :k] + 2 * up + pp[r0:r1, None]) / d + eps).rsqrt()  # [b, c, k]
        s.add_(qp_nn).mul_(inv_sigma[:, None])
        s.add_(qp.sub_(qp_nn).mul_(inv_sigma_ref[:k])).add_(bias[:, :, r0:r1])
        s = mask_scores(weights, s, torch.arange(r0, r1, device=q.device)).softmax(-1)
        out[:, :, r0:r1] = 0.5 * s.sub_(acts.pattern[:, :, r0:r1, :k]).abs_().sum(-1)
    return out


# --------------------------------------------------------------------------------------------------
# Rotary positions: a separable split that keeps the rotation (docs/rotary-split.md)
# --------------------------------------------------------------------------------------------------
#
# In the rotate-half layout, dimensions ``j`` and ``j + D/2`` (``D`` the rotary dimension) form the complex
# number ``z_j = x_j + i x_{j+D/2}``, rotated by ``e^{i pos theta_j}``.  The score of query ``n`` and key
# ``i`` (offset ``d = n - i``) is then, pair by pair, ``Re(zq_j conj(zk_j) e^{i d theta_j})`` (plus the
# unrotated tail of a partial rotary).  Writing the pre-rotation key as its static part and a content
# part, ``zk = zk_static + dzk``, the static part gives the positional score exactly and the content part
# is the only one mixed with the offset.  The separable form replaces ``e^{i d theta_j}`` in the content
# part by one complex number per frequency pair, ``c_j``: an amplitude and a phase.  Least squares over the
# offsets with weights ``w(d)`` gives ``c_j = sum_d w(d) e^{i d theta_j}`` (the offset profile's
# characteristic function at ``theta_j``); ``c_j = 1`` is the zero-offset split above.


def rotary_frequencies(weights: ModelWeights) -> Tensor:
    """``theta_j`` of each rotary frequency pair ``[D/2]`` (float64)."""
    assert weights.rope_theta is not None, "rotary models record rope_theta"
    rd = weights.rotary_dim or weights.d_head
    return 1.0 / (weights.rope_theta ** (torch.arange(0, rd, 2, dtype=torch.float64) / rd))


def pair_weights_from_profile(weights: ModelWeights, profile: Tensor) -> Tensor:
    """Least-squares ``c_j = sum_d w(d) e^{i d theta_j} / sum_d w(d)`` for offset weights ``profile [..., n_off]``
    (offset ``d = 0, 1, ...``).  Returns complex ``[..., D/2]``; ``|c_j| <= 1``, ``c_j -> 1`` for slow pairs."""
    theta = rotary_frequencies(weights).to(profile.device)
    d = torch.arange(profile.shape[-1], dtype=torch.float64, device=profile.device)
    phase = torch.polar(torch.ones(len(d), len(theta), dtype=torch.float64, device=profile.device), d[:, None] * theta)
    p = profile.to(torch.float64)
    return (p.to(torch.complex128) @ phase) / p.sum(-1, keepdim=True)


def apply_pair_weights(weights: ModelWeights, x: Tensor, c: Tensor) -> Tensor:
    """Multiply each rotary pair of ``x [..., h, pos, d_head]`` by the complex ``c [h, D/2]``, or per position
    by ``c [h, >= pos, D/2]`` (row ``n`` of ``x`` by ``c[:, n]``); the tail is unchanged.

    ``(c . zq)`` then dotted with ``zk`` equals ``Re(zq conj(zk) c)``: the pair-averaged rotation."""
    rd = weights.rotary_dim or weights.d_head
    half = rd // 2
    c = c[:, None] if c.dim() == 2 else c[:, : x.shape[-2]]
    re, im = c.real.to(x.dtype), c.imag.to(x.dtype)  # [h, 1 or pos, D/2]
    x1, x2 = x[..., :half], x[..., half:rd]
    out = torch.cat([x1 * re - x2 * im, x1 * im + x2 * re], -1)
    return torch.cat([out, x[..., rd:]], -1) if x.shape[-1] > rd else out


def separable_rotary_score_parts(weights: ModelWeights, q_pre: Tensor, k_pre: Tensor, k_static: Tensor,
                                 c: Tensor) -> tuple[Tensor, Tensor]:
    """Separable rotary split, unscaled and unmasked: ``content [b, h, n, i]`` and ``positional [b, h, n, i]``.

    q_pre: ``[b, h, n, d_head]`` pre-rotation queries (exact, or a typical query broadcast);
    k_pre: ``[b, h, i, d_head]`` pre-rotation keys; k_static: ``[h, i, d_head]`` static (mean) pre-rotation key;
    c: ``[h, D/2]`` complex pair weights.  ``content(n, i) = sum_j Re(zq_n conj(zk_i - zk_static_i) c_j)``
    depends on the key's content only; ``positional(n, i) = (R_n q_n) . (R_i k_static_i)`` is exact.
    ``c = 1`` gives :func:`rotary_score_parts`' zero-offset content.
    """
    T = k_pre.shape[-2]
    content = torch.einsum("bhne,bhie->bhni", apply_pair_weights(weights, q_pre, c), k_pre - k_static[None, :, :T])
    cos, sin = rotary_cos_sin(weights, torch.arange(T, device=k_pre.device))
    positional = torch.einsum("bhne,hie->bhni", apply_rotary(q_pre, cos, sin), apply_rotary(k_static[:, :T], cos, sin))
    return content, positional


def pre_rotation(weights: ModelWeights, x: Tensor) -> Tensor:
    """Undo the rotation of rotated queries or keys ``[..., pos, d_head]`` (positions ``0..pos-1``)."""
    cos, sin = rotary_cos_sin(weights, torch.arange(x.shape[-2], device=x.device))
    return apply_rotary(x, cos, -sin)


def pair_weights_of_kernel(weights: ModelWeights, kernel_rows: Tensor, skip_first: bool,
                           per_row: bool = False) -> Tensor:
    """Pair weights ``c [H, D/2]`` from each head's own kernel at the last query position (``kernel_rows [H, T]``,
    offset ``d = T - 1 - i``); with ``skip_first`` the first position (the sink) is left out of the profile.

    ``per_row``: ``c [H, T, D/2]``, row ``n`` the same closed form over the offsets that exist at query position
    ``n`` (``d = 0 .. n``, the sink's offset left out): the least-squares weights of that row
    (docs/rotary-split.md, "Per-row pair weights")."""
    prof = kernel_rows.double().clone()
    if skip_first:
        prof[:, 0] = 0
    prof = prof.flip(-1)  # [H, offset]
    if not per_row:
        return pair_weights_from_profile(weights, prof)
    theta = rotary_frequencies(weights).to(prof.device)
    d = torch.arange(prof.shape[-1], dtype=torch.float64, device=prof.device)
    phase = torch.polar(torch.ones(len(d), len(theta), dtype=torch.float64, device=prof.device), d[:, None] * theta)
    num = torch.cumsum(prof[..., None].to(torch.complex128) * phase, 1)  # [H, offset, D/2]
    den = torch.cumsum(prof, 1)[..., None].clamp(min=1e-300)
    last = (torch.arange(prof.shape[-1], device=prof.device) - int(skip_first)).clamp(min=0)  # row n: d <= n - skip
    return (num / den)[:, last]


def pooled_static_keys(k_pre: Tensor, bos: bool) -> Tensor:
    """Layer-0 static pre-rotation keys ``[H, T, d_head]`` of one text's keys ``k_pre [H, T, d_head]``: positions are
    exchangeable at layer 0, so one mean key for every position (the BOS keeps its own key at position 0)."""
    start = 1 if bos else 0
    out = k_pre[:, start:].mean(1, keepdim=True).expand(-1, k_pre.shape[1], -1).clone()
    if bos:
        out[:, 0] = k_pre[:, 0]
    return out
