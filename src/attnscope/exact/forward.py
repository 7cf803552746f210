"""Exact recomputation of a model's forward pass from :class:`~attnscope.models.ModelWeights` alone.

This is the reference every approximation of the method is measured against, so it reproduces the
model's own numbers (LayerNorm/RMSNorm, rotary, biases, scale, mask, GQA) to float precision; the tests
compare it head by head with Hugging Face ``output_attentions`` and hooked MLP activations.

:func:`iter_layers` is a generator: it yields one :class:`LayerActivations` per layer and can stop at
any depth, so analyses stream samples and never hold more than one layer's activations.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int
from torch import Tensor

from attnscope.core.errors import AttnscopeError
from attnscope.models import ModelWeights


def layer_norm(x: Float[Tensor, "*batch d"], w: Float[Tensor, " d"] | None, b: Float[Tensor, " d"] | None,
               eps: float) -> Float[Tensor, "*batch d"]:
    """LayerNorm over the last dimension: ``(x - mean) / sqrt(var + eps) * w + b``."""
    return F.layer_norm(x, x.shape[-1:], w, b, eps)


def rms_norm(x: Float[Tensor, "*batch d"], w: Float[Tensor, " d"], eps: float) -> Float[Tensor, "*batch d"]:
    """RMSNorm as Llama computes it (in float32, then cast back)."""
    dt = x.dtype
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return w * x32.to(dt)


def norm(weights: ModelWeights, x: Float[Tensor, "*batch d"], w: Float[Tensor, " d"], b: Float[Tensor, " d"] | None
         ) -> Float[Tensor, "*batch d"]:
    """The model's norm (LayerNorm or RMSNorm) with gain ``w`` and bias ``b``."""
    if weights.norm == "rmsnorm":
        return rms_norm(x, w, weights.eps)
    return layer_norm(x, w, b, weights.eps)


def activation(name: str, x: Float[Tensor, "*shape"]) -> Float[Tensor, "*shape"]:
    """The MLP's activation function by its Hugging Face name."""
    if name in ("gelu_new", "gelu_pytorch_tanh", "gelu_fast"):
        return F.gelu(x, approximate="tanh")
    if name == "gelu":
        return F.gelu(x)
    if name in ("silu", "swish"):
        return F.silu(x)
    if name == "relu":
        return F.relu(x)
    raise ValueError(f"unsupported activation {name!r}")


def rotary_cos_sin(weights: ModelWeights, positions: Int[Tensor, " pos"]
                   ) -> tuple[Float[Tensor, "pos rot"], Float[Tensor, "pos rot"]]:
    """``cos, sin``: ``[n_pos, rotary_dim]`` in the rotate-half layout Hugging Face Llama uses."""
    assert weights.rope_theta is not None, "rotary models record rope_theta"
    rd = weights.rotary_dim or weights.d_head
    dims = torch.arange(0, rd, 2, dtype=torch.int64, device=positions.device).float()
    inv_freq = 1.0 / (weights.rope_theta ** (dims / rd))
    freqs = positions.float()[:, None] * inv_freq[None, :]
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), emb.sin()


def apply_rotary(x: Float[Tensor, "*batch pos d_head"], cos: Float[Tensor, "pos rot"], sin: Float[Tensor, "pos rot"]
                 ) -> Float[Tensor, "*batch pos d_head"]:
    """Rotate ``x [..., n_pos, d_head]`` (rotate-half convention; partial rotary leaves the tail alone)."""
    rd = cos.shape[-1]
    xr, xp = x[..., :rd], x[..., rd:]
    x1, x2 = xr[..., : rd // 2], xr[..., rd // 2 :]
    rot = torch.cat([-x2, x1], dim=-1)
    out = xr * cos.to(x.dtype) + rot * sin.to(x.dtype)
    return torch.cat([out, xp], dim=-1) if xp.shape[-1] else out


def embed(weights: ModelWeights, tokens: Int[Tensor, "batch pos"]) -> Float[Tensor, "batch pos d_model"]:
    """Residual stream entering layer 0: ``[batch, pos, d_model]`` (after the embedding LayerNorm, if any)."""
    x = embed_raw(weights, tokens)
    if weights.ln_emb_w is not None:
        x = layer_norm(x, weights.ln_emb_w, weights.ln_emb_b, weights.eps)
    return x


def embed_raw(weights: ModelWeights, tokens: Int[Tensor, "batch pos"]) -> Float[Tensor, "batch pos d_model"]:
    """Token + position (+ token-type) embedding before any embedding LayerNorm: ``[batch, pos, d_model]``."""
    x = weights.W_E[tokens]
    if weights.W_pos is not None:
        T = tokens.shape[-1]
        if T > weights.W_pos.shape[0]:
            raise AttnscopeError(
                f"{T} tokens exceed the model's context of {weights.W_pos.shape[0]}; pass at most that many (--n-ctx)"
            )
        x = x + weights.W_pos[:T]
    if weights.W_type is not None:
        x = x + weights.W_type
    return x


@dataclass
class LayerActivations:
    """What one layer computes on a batch (shapes in comments)."""

    layer: int
    resid_pre: Float[Tensor, "batch pos d_model"]  # residual entering the layer
    norm_in: Float[Tensor, "batch pos d_model"]  # input of the norm that produces attn_in (see attn_norm_params)
    attn_in: Float[Tensor, "batch pos d_model"]  # normalised input the heads read (== resid_pre for post-LN)
    q: Float[Tensor, "batch head pos d_head"]  # after rotary
    k: Float[Tensor, "batch head pos d_head"]  # after rotary
    v: Float[Tensor, "batch head pos d_head"]
    # [query_pos, key_pos] scaled, masked (-inf); None without patterns
    scores: Float[Tensor, "batch head pos pos"] | None
    pattern: Float[Tensor, "batch head pos pos"] | None  # [query_pos, key_pos]; None when run with patterns=False
    z: Float[Tensor, "batch head pos d_head"]  # pattern-weighted values
    attn_out: Float[Tensor, "batch pos d_model"]  # sum of head outputs + b_O
    mlp_in: Float[Tensor, "batch pos d_model"]  # normalised input of the MLP
    mlp_pre: Float[Tensor, "batch pos d_mlp"]  # pre-activation (the gate's, for gated MLPs)
    mlp_post: Float[Tensor, "batch pos d_mlp"]  # activation (act(gate) * up for gated MLPs)
    resid_post: Float[Tensor, "batch pos d_model"]


def causal_mask(n_query: int, n_key: int, device: torch.device | str | None = None,
                query_positions: Int[Tensor, " n_query"] | None = None) -> Bool[Tensor, "n_query n_key"]:
    """``[n_query, n_key]`` bool, True where key ``i`` is visible from the query (``i <= n``).

    The queries sit at ``query_positions`` when given, else at the last ``n_query`` key positions."""
    if query_positions is None:
        return torch.ones(n_query, n_key, dtype=torch.bool, device=device).tril(n_key - n_query)
    return torch.arange(n_key, device=device)[None, :] <= query_positions.to(device)[:, None]


def mask_scores(weights: ModelWeights, scores: Float[Tensor, "*batch n_query n_key"],
                query_positions: Int[Tensor, " n_query"] | None = None) -> Float[Tensor, "*batch n_query n_key"]:
    """``scores [..., n_query, n_key]`` with invisible keys set to ``-inf`` (causal models; else unchanged)."""
    if not weights.causal:
        return scores
    Tq, Tk = scores.shape[-2:]
    return scores.masked_fill(~causal_mask(Tq, Tk, scores.device, query_positions), float("-inf"))


def project(x: Float[Tensor, "batch pos d_model"], W: Float[Tensor, "head d_model d_head"],
            b: Float[Tensor, "head d_head"]) -> Float[Tensor, "batch head pos d_head"]:
    """Per-head projection ``x W + b``: ``x [batch, pos, d_model]``, ``W [head, d_model, d_head]``,
    ``b [head, d_head]`` -> ``[batch, head, pos, d_head]`` (queries, keys or values before rotary)."""
    return torch.einsum("bpd,hde->bhpe", x, W) + b[None, :, None]


_QK = {(4, 4): "bhne,bhie->bhni", (4, 3): "bhne,hie->bhni", (3, 3): "hne,hie->hni"}


def qk_scores(q: Float[Tensor, "*batch n d_head"], k: Float[Tensor, "*#batch i d_head"]) -> Float[Tensor, "*batch n i"]:
    """Unscaled, unmasked dot products ``q_n . k_i`` -> ``[..., n, i]``.

    ``q [batch, head, n, d_head]`` with ``k [batch, head, i, d_head]`` or ``k [head, i, d_head]`` (keys shared
    by the batch); or ``q, k [head, ., d_head]``."""
    return torch.einsum(_QK[q.dim(), k.dim()], q, k)


def static_positions(weights: ModelWeights, n_ctx: int) -> Float[Tensor, "n_ctx d_model"]:
    """Static positional part of the embedding ``[n_ctx, d_model]``: what the embedding adds to a token at each
    position (``W_pos`` plus BERT's token-type row), as ``embed_raw`` computes it for token 0, minus ``W_E[0]``."""
    zeros = torch.zeros(1, n_ctx, dtype=torch.long, device=weights.device)
    return embed_raw(weights, zeros)[0] - weights.W_E[0]


def attention_scores(weights: ModelWeights, layer: int, q: Float[Tensor, "batch head q_pos d_head"],
                     k: Float[Tensor, "batch head k_pos d_head"]) -> Float[Tensor, "batch head q_pos k_pos"]:
    """Scaled, masked scores ``[batch, head, q_pos, k_pos]`` from rotated ``q, k``."""
    return mask_scores(weights, qk_scores(q, k) / weights.attn_scale[layer])


def qkv(weights: ModelWeights, layer: int, x: Float[Tensor, "batch pos d_model"],
        positions: Int[Tensor, " pos"] | None = None) -> tuple[Float[Tensor, "batch head pos d_head"],
                                                             Float[Tensor, "batch head pos d_head"],
                                                             Float[Tensor, "batch head pos d_head"]]:
    """Queries, keys and values ``[batch, head, pos, d_head]`` of the normalised input ``x``."""
    l = layer
    q = project(x, weights.W_Q[l], weights.b_Q[l])
    k = project(x, weights.W_K[l], weights.b_K[l])
    v = project(x, weights.W_V[l], weights.b_V[l])
    if weights.positional == "rotary":
        if positions is None:
            positions = torch.arange(x.shape[1], device=x.device)
        cos, sin = rotary_cos_sin(weights, positions)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    return q, k, v


def attn_norm_params(weights: ModelWeights, layer: int
                     ) -> tuple[Float[Tensor, " d_model"], Float[Tensor, " d_model"] | None]:
    """``(gamma, beta)`` of the norm whose output the heads of ``layer`` read.

    Pre-LN: the layer's ``ln1``.  Post-LN (BERT): the embedding LayerNorm for layer 0, else the previous
    layer's output LayerNorm (``ln2[layer-1]``).  ``LayerActivations.norm_in`` is that norm's input.
    """
    if weights.norm_placement == "pre":
        return weights.ln1_w[layer], None if weights.ln1_b is None else weights.ln1_b[layer]
    if layer == 0:
        assert weights.ln_emb_w is not None, "post-LN (BERT) models have an embedding LayerNorm"
        return weights.ln_emb_w, weights.ln_emb_b
    assert weights.ln2_b is not None, "post-LN (BERT) norms are LayerNorms with a bias"
    return weights.ln2_w[layer - 1], weights.ln2_b[layer - 1]


def attend(weights: ModelWeights, layer: int, q: Tensor, k: Tensor, v: Tensor, patterns: bool = True
           ) -> tuple[Tensor | None, Tensor | None, Tensor]:
    """``(scores, pattern, z)`` of one layer from rotated ``q, k`` and ``v`` (``[batch, head, pos, d_head]``).

    ``patterns=False`` computes ``z`` with fused attention (``scaled_dot_product_attention``: no
    ``[batch, head, pos, pos]`` arrays, about 1.7x faster at 1024 positions) and returns ``None`` for the
    scores and the pattern; ``z`` agrees with the explicit softmax to float rounding (tests: 1e-5)."""
    if patterns:
        scores = attention_scores(weights, layer, q, k)
        pattern = scores.softmax(-1)
        return scores, pattern, pattern @ v
    z = F.scaled_dot_product_attention(q, k, v, is_causal=weights.causal,
                                       scale=1.0 / float(weights.attn_scale[layer]))
    return None, None, z


def iter_layers(weights: ModelWeights, tokens: Int[Tensor, "batch pos"] | Int[Tensor, " pos"], *,
                stop_layer: int | None = None, patterns: bool = True) -> Iterator[LayerActivations]:
    """Run the model layer by layer from its weights; yields after each layer, up to ``stop_layer``.

    ``tokens``: ``[batch, pos]`` (a 1-D tensor is treated as one sequence).  ``patterns=False``: fused
    attention, and ``scores`` / ``pattern`` are ``None`` (see :func:`attend`).
    """
    if tokens.dim() == 1:
        tokens = tokens[None]
    x = embed(weights, tokens)
    raw = embed_raw(weights, tokens) if weights.norm_placement == "post" else x
    last = weights.n_layers - 1 if stop_layer is None else stop_layer
    pre = weights.norm_placement == "pre"
    for l in range(last + 1):
        a_in = norm(weights, x, weights.ln1_w[l], None if weights.ln1_b is None else weights.ln1_b[l]) if pre else x
        q, k, v = qkv(weights, l, a_in)
        scores, pattern, z = attend(weights, l, q, k, v, patterns)
        attn_out = torch.einsum("bhpe,hed->bpd", z, weights.W_O[l]) + weights.b_O[l]
        if pre:
            mid = x + attn_out
            m_src = x if weights.parallel_attn_mlp else mid  # GPT-NeoX: attention and MLP read the same input
            m_in = norm(weights, m_src, weights.ln2_w[l], None if weights.ln2_b is None else weights.ln2_b[l])
        else:
            assert weights.ln1_b is not None, "post-LN (BERT) norms are LayerNorms with a bias"
            mid = layer_norm(x + attn_out, weights.ln1_w[l], weights.ln1_b[l], weights.eps)
            m_in = mid
        if weights.W_gate is not None:
            pre_act = m_in @ weights.W_gate[l]
            post = activation(weights.act, pre_act) * (m_in @ weights.W_in[l] + weights.b_in[l])
        else:
            pre_act = m_in @ weights.W_in[l] + weights.b_in[l]
            post = activation(weights.act, pre_act)
        mlp_out = post @ weights.W_out[l] + weights.b_out[l]
        if pre:
            out = mid + mlp_out
        else:
            assert weights.ln2_b is not None, "post-LN (BERT) norms are LayerNorms with a bias"
            out = layer_norm(mid + mlp_out, weights.ln2_w[l], weights.ln2_b[l], weights.eps)
        yield LayerActivations(l, x, raw, a_in, q, k, v, scores, pattern, z, attn_out, m_in, pre_act, post, out)
        raw = out if pre else mid + mlp_out
        x = out


@torch.no_grad()
def run(weights: ModelWeights, tokens: Int[Tensor, "batch pos"] | Int[Tensor, " pos"], *,
        stop_layer: int | None = None) -> list[LayerActivations]:
    """All layers' activations (small inputs only; use :func:`iter_layers` to stream)."""
    return list(iter_layers(weights, tokens, stop_layer=stop_layer))


def _mlp_pre_module(hf_model, layer: int):
    t = hf_model.config.model_type
    if t == "gpt2":
        return hf_model.transformer.h[layer].mlp.c_fc
    if t == "llama":
        return hf_model.model.layers[layer].mlp.gate_proj
    if t == "bert":
        return hf_model.encoder.layer[layer].intermediate.dense
    if t == "gpt_neox":
        return hf_model.gpt_neox.layers[layer].mlp.dense_h_to_4h
    raise ValueError(t)


@torch.no_grad()
def hf_activations(hf_model, tokens: Int[Tensor, "batch pos"] | Int[Tensor, " pos"]
                   ) -> tuple[list[Float[Tensor, "batch head pos pos"]], list[Float[Tensor, "batch pos d_mlp"]]]:
    """The model's own numbers: ``(patterns, mlp_pre)`` per layer from ``output_attentions`` and hooks.

    patterns: ``[batch, head, q_pos, k_pos]``; mlp_pre: ``[batch, pos, d_mlp]``.
    """
    if tokens.dim() == 1:
        tokens = tokens[None]
    n_layers = hf_model.config.num_hidden_layers
    mlp_pre: dict[int, Tensor] = {}  # layer -> its MLP pre-activation, filled by the hooks
    handles = []
    for l in range(n_layers):
        def hook(_m, _i, out, l=l):
            mlp_pre[l] = out.detach()
        handles.append(_mlp_pre_module(hf_model, l).register_forward_hook(hook))
    try:
        out = hf_model(tokens.to(hf_model.device), output_attentions=True)
    finally:
        for h in handles:
            h.remove()
    return [a.detach() for a in out.attentions], [mlp_pre[l] for l in range(n_layers)]


@torch.no_grad()
def compare_with_model(weights: ModelWeights, hf_model, tokens: Int[Tensor, "batch pos"] | Int[Tensor, " pos"]
                       ) -> dict[str, list[float]]:
    """Max abs difference per layer between :func:`run` and the model's own forward pass."""
    ours = run(weights, tokens.to(weights.device))
    pats, pres = hf_activations(hf_model, tokens)
    pattern_diff = []
    for a, p in zip(ours, pats):
        assert a.pattern is not None, "run() keeps the patterns by default"
        pattern_diff.append((a.pattern - p.to(a.pattern)).abs().max().item())
    return {
        "pattern": pattern_diff,
        "mlp_pre": [(a.mlp_pre - m.to(a.mlp_pre)).abs().max().item() for a, m in zip(ours, pres)],
        "mlp_pre_max_abs": [m.abs().max().item() for m in pres],  # the scale float32 rounding works at
    }
