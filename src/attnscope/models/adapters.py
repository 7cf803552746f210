"""Weight extraction from loaded Hugging Face models, one function per architecture."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from attnscope.core.errors import UnsupportedModelError
from attnscope.models.weights import ModelWeights

SUPPORTED_TYPES = ("gpt2", "llama", "bert", "gpt_neox")



def _heads_in(w: Tensor, n_heads: int) -> Tensor:
    """``[d_model, n_heads*d_head]`` -> ``[n_heads, d_model, d_head]``."""
    d, hd = w.shape
    return w.reshape(d, n_heads, hd // n_heads).permute(1, 0, 2)


def _heads_out(w: Tensor, n_heads: int) -> Tensor:
    """``[n_heads*d_head, d_model]`` -> ``[n_heads, d_head, d_model]``."""
    hd, d = w.shape
    return w.reshape(n_heads, hd // n_heads, d)


def _stack(xs: list[Tensor]) -> Tensor:
    return torch.stack([x.detach() for x in xs])


def _from_gpt2(model, cfg) -> dict[str, Any]:
    tr = model.transformer
    H, L = cfg.n_head, cfg.n_layer
    d = cfg.n_embd
    blocks = tr.h
    qkv_w = [b.attn.c_attn.weight for b in blocks]  # Conv1D: [d, 3d]
    qkv_b = [b.attn.c_attn.bias for b in blocks]
    scale = torch.full((L,), float(d // H) ** 0.5 if cfg.scale_attn_weights else 1.0)
    if getattr(cfg, "scale_attn_by_inverse_layer_idx", False):
        scale = scale * torch.arange(1, L + 1)
    return dict(
        model_type="gpt2",
        positional="learned",
        causal=True,
        norm="layernorm",
        norm_placement="pre",
        eps=cfg.layer_norm_epsilon,
        act=cfg.activation_function,
        n_ctx=cfg.n_positions,
        W_E=tr.wte.weight.detach(),
        W_pos=tr.wpe.weight.detach(),
        W_type=None,
        ln_emb_w=None,
        ln_emb_b=None,
        ln1_w=_stack([b.ln_1.weight for b in blocks]),
        ln1_b=_stack([b.ln_1.bias for b in blocks]),
        W_Q=_stack([_heads_in(w[:, :d], H) for w in qkv_w]),
        W_K=_stack([_heads_in(w[:, d : 2 * d], H) for w in qkv_w]),
        W_V=_stack([_heads_in(w[:, 2 * d :], H) for w in qkv_w]),
        b_Q=_stack([b[:d].reshape(H, -1) for b in qkv_b]),
        b_K=_stack([b[d : 2 * d].reshape(H, -1) for b in qkv_b]),
        b_V=_stack([b[2 * d :].reshape(H, -1) for b in qkv_b]),
        W_O=_stack([_heads_out(b.attn.c_proj.weight, H) for b in blocks]),
        b_O=_stack([b.attn.c_proj.bias for b in blocks]),
        ln2_w=_stack([b.ln_2.weight for b in blocks]),
        ln2_b=_stack([b.ln_2.bias for b in blocks]),
        W_in=_stack([b.mlp.c_fc.weight for b in blocks]),
        b_in=_stack([b.mlp.c_fc.bias for b in blocks]),
        W_gate=None,
        W_out=_stack([b.mlp.c_proj.weight for b in blocks]),
        b_out=_stack([b.mlp.c_proj.bias for b in blocks]),
        ln_f_w=tr.ln_f.weight.detach(),
        ln_f_b=tr.ln_f.bias.detach(),
        attn_scale=scale,
        bos_token_id=cfg.bos_token_id,
        prepend_bos=False,  # load_model decides: hub GPT-2 follows TransformerLens (BOS), local models their training
    )


def _linear_bias(lin, n: int, like: Tensor) -> Tensor:
    return lin.bias.detach() if getattr(lin, "bias", None) is not None else torch.zeros(n, dtype=like.dtype)


def _default_rope(cfg, theta_attr: str = "rope_theta", partial_attr: str | None = None) -> tuple[float, float]:
    """``(rope_theta, partial_rotary_factor)`` of a config with plain RoPE (older configs name them
    ``theta_attr`` / ``partial_attr``); scaled variants are refused."""
    rope = getattr(cfg, "rope_parameters", None) or {}
    rope_type = rope.get("rope_type", "default")
    if rope_type != "default":
        raise UnsupportedModelError(f"rotary scaling {rope_type!r} is not supported yet (only default RoPE)")
    partial = rope.get("partial_rotary_factor", getattr(cfg, partial_attr, 1.0) if partial_attr else 1.0)
    return rope.get("rope_theta", getattr(cfg, theta_attr, 10000.0)), float(partial)


def _from_llama(model, cfg) -> dict[str, Any]:
    base = model.model
    H, L, d = cfg.num_attention_heads, cfg.num_hidden_layers, cfg.hidden_size
    dh = getattr(cfg, "head_dim", None) or d // H
    n_kv = cfg.num_key_value_heads or H
    rep = H // n_kv
    theta, partial = _default_rope(cfg)
    layers = base.layers
    W_E = base.embed_tokens.weight.detach()

    def kv(lin) -> Tensor:  # [d, n_kv*dh] -> [H, d, dh], each KV head repeated for its query group
        return _heads_in(lin.weight.detach().T, n_kv).repeat_interleave(rep, dim=0)

    def kv_bias(lin) -> Tensor:
        return _linear_bias(lin, n_kv * dh, W_E).reshape(n_kv, dh).repeat_interleave(rep, dim=0)

    return dict(
        model_type="llama",
        positional="rotary",
        causal=True,
        norm="rmsnorm",
        norm_placement="pre",
        eps=cfg.rms_norm_eps,
        act=cfg.hidden_act,
        n_ctx=cfg.max_position_embeddings,
        W_E=W_E,
        W_pos=None,
        W_type=None,
        ln_emb_w=None,
        ln_emb_b=None,
        ln1_w=_stack([b.input_layernorm.weight for b in layers]),
        ln1_b=None,
        W_Q=_stack([_heads_in(b.self_attn.q_proj.weight.detach().T, H) for b in layers]),
        W_K=_stack([kv(b.self_attn.k_proj) for b in layers]),
        W_V=_stack([kv(b.self_attn.v_proj) for b in layers]),
        b_Q=_stack([_linear_bias(b.self_attn.q_proj, H * dh, W_E).reshape(H, dh) for b in layers]),
        b_K=_stack([kv_bias(b.self_attn.k_proj) for b in layers]),
        b_V=_stack([kv_bias(b.self_attn.v_proj) for b in layers]),
        W_O=_stack([_heads_out(b.self_attn.o_proj.weight.detach().T, H) for b in layers]),
        b_O=_stack([_linear_bias(b.self_attn.o_proj, d, W_E) for b in layers]),
        ln2_w=_stack([b.post_attention_layernorm.weight for b in layers]),
        ln2_b=None,
        W_in=_stack([b.mlp.up_proj.weight.detach().T for b in layers]),
        b_in=_stack([_linear_bias(b.mlp.up_proj, cfg.intermediate_size, W_E) for b in layers]),
        W_gate=_stack([b.mlp.gate_proj.weight.detach().T for b in layers]),
        W_out=_stack([b.mlp.down_proj.weight.detach().T for b in layers]),
        b_out=_stack([_linear_bias(b.mlp.down_proj, d, W_E) for b in layers]),
        ln_f_w=base.norm.weight.detach(),
        ln_f_b=None,
        attn_scale=torch.full((L,), float(dh) ** 0.5),
        rope_theta=float(theta),
        rotary_dim=int(dh * partial),
        n_kv_heads=n_kv,
        bos_token_id=cfg.bos_token_id,
        prepend_bos=cfg.bos_token_id is not None,
    )


def _from_bert(model, cfg) -> dict[str, Any]:
    if getattr(cfg, "position_embedding_type", "absolute") != "absolute":
        raise UnsupportedModelError("only BERT models with absolute position embeddings are supported")
    emb, layers = model.embeddings, model.encoder.layer
    H, L, d = cfg.num_attention_heads, cfg.num_hidden_layers, cfg.hidden_size

    def lin_in(lin) -> Tensor:
        return _heads_in(lin.weight.detach().T, H)

    return dict(
        model_type="bert",
        positional="learned",
        causal=False,
        norm="layernorm",
        norm_placement="post",
        eps=cfg.layer_norm_eps,
        act=cfg.hidden_act,
        n_ctx=cfg.max_position_embeddings,
        W_E=emb.word_embeddings.weight.detach(),
        W_pos=emb.position_embeddings.weight.detach(),
        W_type=emb.token_type_embeddings.weight.detach()[0],
        ln_emb_w=emb.LayerNorm.weight.detach(),
        ln_emb_b=emb.LayerNorm.bias.detach(),
        ln1_w=_stack([b.attention.output.LayerNorm.weight for b in layers]),
        ln1_b=_stack([b.attention.output.LayerNorm.bias for b in layers]),
        W_Q=_stack([lin_in(b.attention.self.query) for b in layers]),
        W_K=_stack([lin_in(b.attention.self.key) for b in layers]),
        W_V=_stack([lin_in(b.attention.self.value) for b in layers]),
        b_Q=_stack([b.attention.self.query.bias.reshape(H, -1) for b in layers]),
        b_K=_stack([b.attention.self.key.bias.reshape(H, -1) for b in layers]),
        b_V=_stack([b.attention.self.value.bias.reshape(H, -1) for b in layers]),
        W_O=_stack([_heads_out(b.attention.output.dense.weight.detach().T, H) for b in layers]),
        b_O=_stack([b.attention.output.dense.bias for b in layers]),
        ln2_w=_stack([b.output.LayerNorm.weight for b in layers]),
        ln2_b=_stack([b.output.LayerNorm.bias for b in layers]),
        W_in=_stack([b.intermediate.dense.weight.detach().T for b in layers]),
        b_in=_stack([b.intermediate.dense.bias for b in layers]),
        W_gate=None,
        W_out=_stack([b.output.dense.weight.detach().T for b in layers]),
        b_out=_stack([b.output.dense.bias for b in layers]),
        ln_f_w=None,
        ln_f_b=None,
        attn_scale=torch.full((L,), float(d // H) ** 0.5),
        bos_token_id=cfg.cls_token_id if hasattr(cfg, "cls_token_id") else None,
        prepend_bos=True,
    )


def _from_gpt_neox(model, cfg) -> dict[str, Any]:
    """GPT-NeoX / Pythia: partial rotary (``rotary_pct``), LayerNorm, and (``use_parallel_residual``) the
    attention and the MLP both reading the layer's input: ``x + attn(ln1(x)) + mlp(ln2(x))``."""
    base = model.gpt_neox
    H, L, d = cfg.num_attention_heads, cfg.num_hidden_layers, cfg.hidden_size
    dh = d // H
    theta, partial = _default_rope(cfg, "rotary_emb_base", "rotary_pct")
    layers = base.layers
    W_E = base.embed_in.weight.detach()

    def qkv(b, j: int) -> tuple[Tensor, Tensor]:  # fused rows are [head, (q|k|v), d_head]
        lin = b.attention.query_key_value
        w = lin.weight.detach().reshape(H, 3, dh, d)[:, j]  # [H, dh, d]
        bias = _linear_bias(lin, 3 * d, W_E).reshape(H, 3, dh)[:, j]
        return w.transpose(1, 2), bias

    return dict(
        model_type="gpt_neox", positional="rotary", causal=True, norm="layernorm", norm_placement="pre",
        eps=cfg.layer_norm_eps, act=cfg.hidden_act, n_ctx=cfg.max_position_embeddings,
        W_E=W_E, W_pos=None, W_type=None, ln_emb_w=None, ln_emb_b=None,
        ln1_w=_stack([b.input_layernorm.weight for b in layers]),
        ln1_b=_stack([b.input_layernorm.bias for b in layers]),
        W_Q=_stack([qkv(b, 0)[0] for b in layers]), W_K=_stack([qkv(b, 1)[0] for b in layers]),
        W_V=_stack([qkv(b, 2)[0] for b in layers]),
        b_Q=_stack([qkv(b, 0)[1] for b in layers]), b_K=_stack([qkv(b, 1)[1] for b in layers]),
        b_V=_stack([qkv(b, 2)[1] for b in layers]),
        W_O=_stack([_heads_out(b.attention.dense.weight.detach().T, H) for b in layers]),
        b_O=_stack([_linear_bias(b.attention.dense, d, W_E) for b in layers]),
        ln2_w=_stack([b.post_attention_layernorm.weight for b in layers]),
        ln2_b=_stack([b.post_attention_layernorm.bias for b in layers]),
        W_in=_stack([b.mlp.dense_h_to_4h.weight.detach().T for b in layers]),
        b_in=_stack([b.mlp.dense_h_to_4h.bias for b in layers]),
        W_gate=None,
        W_out=_stack([b.mlp.dense_4h_to_h.weight.detach().T for b in layers]),
        b_out=_stack([b.mlp.dense_4h_to_h.bias for b in layers]),
        ln_f_w=base.final_layer_norm.weight.detach(), ln_f_b=base.final_layer_norm.bias.detach(),
        attn_scale=torch.full((L,), float(dh) ** 0.5),
        rope_theta=float(theta), rotary_dim=int(dh * partial),
        parallel_attn_mlp=bool(getattr(cfg, "use_parallel_residual", True)),
        bos_token_id=cfg.bos_token_id, prepend_bos=False,
    )


def _unembedding(model, W_E: Tensor) -> dict[str, Tensor | None]:
    """``W_U [d_model, d_vocab]`` and ``b_U`` of the model's output head (``lm_head``, GPT-NeoX ``embed_out``):
    a view of ``W_E`` where the checkpoint ties them.  An encoder loaded without a head (BERT / MiniLM: its
    masked-LM head, where a checkpoint has one, is a transform + norm, not a plain unembedding) has none."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if get is not None else None
    if head is None or getattr(head, "weight", None) is None or model.config.model_type == "bert":
        return {"W_U": None, "b_U": None}
    Wt = head.weight.detach()
    W_U = W_E.T if Wt.data_ptr() == W_E.data_ptr() else Wt.T
    b = getattr(head, "bias", None)
    return {"W_U": W_U, "b_U": b.detach() if b is not None else None}


_EXTRACTORS = {"gpt2": _from_gpt2, "llama": _from_llama, "bert": _from_bert, "gpt_neox": _from_gpt_neox}


def extract_weights(model, *, name: str = "", source: str = "", revision: str | None = None, tokenizer=None,
                    prepend_bos: bool | None = None) -> ModelWeights:
    """Build a :class:`ModelWeights` view of a loaded Hugging Face model (no copy where a view suffices).

    ``prepend_bos``: analyse texts with the BOS token in front (``None``: the adapter's default)."""
    cfg = model.config
    fn = _EXTRACTORS.get(cfg.model_type)
    if fn is None:
        raise UnsupportedModelError(
            f"no adapter for model type {cfg.model_type!r}; supported: {', '.join(SUPPORTED_TYPES)}"
        )
    with torch.no_grad():
        fields = fn(model, cfg)
        fields.update(_unembedding(model, fields["W_E"]))
    if cfg.model_type == "bert" and tokenizer is not None:
        fields["bos_token_id"] = tokenizer.cls_token_id
    if prepend_bos is not None:
        if prepend_bos and fields.get("bos_token_id") is None:
            raise UnsupportedModelError(f"{name or cfg.model_type} has no BOS token id; analyse it without BOS")
        fields["prepend_bos"] = prepend_bos
    n_params = sum(p.numel() for p in model.parameters())
    return ModelWeights(name=name or getattr(cfg, "name_or_path", ""), source=source, revision=revision,
                        tokenizer=tokenizer, n_params=n_params, **fields)
