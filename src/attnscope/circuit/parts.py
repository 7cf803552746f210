"""Layer-0 building blocks shared by the circuit's two forms (typical query, :mod:`.build`; query-conditioned,
:mod:`.query`) and by the explanations: normalised content and positional inputs, value biases, the
extended embeddings, the MLP's input weights and norm scale, and the heads' exact summed output."""

from __future__ import annotations

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from attnscope.circuit.result import LAYER
from attnscope.exact.decomposition import centre
from attnscope.exact.forward import attn_norm_params, iter_layers, norm, static_positions
from attnscope.models import ModelWeights


def content_inputs(w: ModelWeights, T: int, n_star: int, ref_norm: float) -> tuple[
        Float[Tensor, "vocab d_model"], Float[Tensor, "ctx d_model"], Float[Tensor, "vocab d_model"]]:
    """Normalised content and positional inputs of layer 0 (method §4.3), LN gain folded.

    Returns ``e_val [V, d]`` (value content part, normalised with the reference position),
    ``p_val [T, d]`` (value positional part), ``key_content [V, d]`` (content placed at ``n_star``, exact norm).
    """
    gamma, beta = attn_norm_params(w, LAYER)
    d, eps = w.d_model, w.eps
    E = centre(w.W_E, w)  # [V, d]
    if w.positional == "learned":
        P = centre(static_positions(w, T), w)
        p_ref = P[n_star]
        e_sig = ((E.pow(2).sum(-1) + p_ref.pow(2).sum()) / d + eps).sqrt()  # sigma as if orthogonal to p_ref
        e_val = gamma * E / e_sig[:, None]
        p_val = gamma * P / ((P.pow(2).sum(-1) + ref_norm**2) / d + eps).sqrt()[:, None]
        key_content = norm(w, (E + p_ref)[None], gamma, beta)[0]  # exact LN of content placed at n_star
    else:  # rotary / no positions: layer 0 reads the token embedding alone, exactly
        e_val = norm(w, w.W_E[None], gamma, None if beta is None else 0 * beta)[0]
        p_val = torch.zeros(T, d, dtype=w.dtype, device=w.device)
        key_content = norm(w, w.W_E[None], gamma, beta)[0]
    return e_val, p_val, key_content


def value_bias(w: ModelWeights) -> Float[Tensor, "head d_head"]:
    """``c_V = beta W_V + b_V`` per head ``[H, d_head]``."""
    _, beta = attn_norm_params(w, LAYER)
    c = w.b_V[LAYER].clone()
    if beta is not None:
        c = c + torch.einsum("d,hde->he", beta, w.W_V[LAYER])
    return c


def outlier_token_mask(w: ModelWeights, z_max: float = 4.0) -> Bool[Tensor, " vocab"]:
    """False for under-trained, glitch-like tokens: embedding norm more than ``z_max`` robust standard
    deviations *below* the median (such tokens, e.g. GPT-2's " SolidGoldMagikarp", sit near the mean
    embedding; the method zeroes a hand-made list of them).  Large-norm tokens are kept."""
    nrm = centre(w.W_E.float(), w).norm(dim=-1)
    med = nrm.median()
    mad = (nrm - med).abs().median() * 1.4826 + 1e-12
    return ((med - nrm) / mad) <= z_max


def mlp_norm_scale(w: ModelWeights, mid: Float[Tensor, "*batch pos d_model"]) -> Float[Tensor, "*batch pos"]:
    """Scale of the norm in front of the MLP at each position (LayerNorm's sigma / RMSNorm's rms)."""
    x = mid.float()
    if w.norm == "layernorm":
        x = x - x.mean(-1, keepdim=True)
    return (x.pow(2).mean(-1) + w.eps).sqrt()


def mlp_input_weights(w: ModelWeights, layer: int = LAYER
                      ) -> tuple[Float[Tensor, "d_model d_mlp"], Float[Tensor, " d_mlp"]]:
    """``(W_in with the norm gain folded [d_model, d_mlp], bias [d_mlp])`` of the pre-activation attnscope
    predicts (the gate's for gated MLPs); the norm's beta is folded into the bias."""
    if w.norm_placement == "pre":
        g, b = w.ln2_w[layer], None if w.ln2_b is None else w.ln2_b[layer]
    else:
        assert w.ln1_b is not None, "post-LN (BERT) norms are LayerNorms with a bias"
        g, b = w.ln1_w[layer], w.ln1_b[layer]
    W = w.W_gate[layer] if w.W_gate is not None else w.W_in[layer]
    bias = torch.zeros(W.shape[1], dtype=W.dtype, device=W.device) if w.W_gate is not None else w.b_in[layer].clone()
    if b is not None:
        bias = bias + b @ W
    return g[:, None] * W, bias


def extended_embeddings(w: ModelWeights, hs: Int[Tensor, " chosen"], f: Float[Tensor, "head vocab"],
                        Z: Float[Tensor, " head"], e_val: Float[Tensor, "vocab d_model"],
                        p_val: Float[Tensor, "ctx d_model"],
                        Kh: Float[Tensor, "head ctx ctx"], mask: Bool[Tensor, " vocab"],
                        sink: Float[Tensor, " head"] | None = None, bos: int | None = None
                        ) -> tuple[Float[Tensor, "vocab d_model"], Float[Tensor, "ctx d_model"]]:
    """``(Ext [V, d_model], Pi(n) + C [T, d_model])`` of the chosen heads ``hs``: each token's value content
    weighted by ``f / Z`` through ``W_V W_O`` (outlier tokens zeroed), and the positional and bias terms
    through each head's own kernel.  With a sink (``sink [H]`` mass on the BOS token ``bos``), the bag carries
    ``1 - s`` and the sink's value ``s (e(BOS) + p(0)) W_V W_O`` is added to the constant."""
    keep = torch.ones(len(hs), dtype=w.dtype, device=w.device) if sink is None else (1 - sink[hs]).to(w.dtype)
    weights_tok = f[hs] / Z[hs][:, None] * keep[:, None]  # [n, V]
    n, dh = len(hs), w.d_head
    W_V, W_O = w.W_V[LAYER][hs], w.W_O[LAYER][hs]  # [n, d, dh], [n, dh, d]
    # through d_head: values of every token for the chosen heads (one [V, d] x [d, n dh] product), weighted,
    # then one [V, n dh] x [n dh, d] product through W_O (4 V d n dh FLOPs instead of 2 V d^2 per head)
    vals = (e_val @ W_V.permute(1, 0, 2).reshape(w.d_model, n * dh)).view(-1, n, dh)
    vals = vals * weights_tok.T[:, :, None]
    ext = vals.reshape(-1, n * dh) @ W_O.reshape(n * dh, w.d_model)
    ext = ext * mask[:, None].to(ext.dtype)
    const = torch.einsum("he,hed->d", value_bias(w)[hs], W_O)
    # per-head kernels for Pi(n): sum_h K_h (p_val W_V[h]) W_O[h], also through d_head
    pv = torch.einsum("id,hde->hie", p_val, W_V)  # [n, T, dh]
    posit = torch.einsum("hne,hed->nd", torch.bmm(Kh[hs] * keep[:, None, None], pv), W_O) + const
    if sink is not None and bos is not None:
        sv = torch.einsum("d,hde->he", e_val[bos] + p_val[0], W_V)  # the sink's value per head [n, dh]
        posit = posit + torch.einsum("h,he,hed->d", sink[hs].to(w.dtype), sv, W_O)
    return ext, posit


@torch.no_grad()
def true_head_output(w: ModelWeights, heads: list[int], tokens: Int[Tensor, " pos"]
                     ) -> tuple[Float[Tensor, "pos d_model"], Float[Tensor, "pos d_mlp"], Float[Tensor, " pos"]]:
    """Exact layer-0 pass: ``(sum of the heads' outputs [pos, d_model], MLP pre-activation [pos, d_mlp],
    norm scale in front of the MLP [pos])``."""
    a = next(iter_layers(w, tokens[None], stop_layer=0))
    hs = torch.tensor(heads, device=w.device)
    out = torch.einsum("hpe,hed->pd", a.z[0, hs], w.W_O[LAYER][hs])
    return out, a.mlp_pre[0], mlp_norm_scale(w, a.resid_pre + a.attn_out)[0]
