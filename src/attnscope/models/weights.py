"""The one typed view of a transformer's weights (:class:`ModelWeights`), whatever the architecture."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from jaxtyping import Float
from torch import Tensor

from attnscope.core.cache import weights_fingerprint

Positional = Literal["learned", "rotary", "none"]


@dataclass
class ModelWeights:
    """Weights of a transformer in one architecture-independent layout (nothing folded, nothing centred).

    Conventions: ``x @ W`` (row vectors); per-head matrices are split and grouped-query K/V heads are
    expanded so every query head ``h`` has its own ``W_K[l, h]``.  For post-LN models (BERT) ``ln1`` is
    the LayerNorm applied *after* the attention residual sum and ``ln2`` the one after the MLP sum; the
    input of layer 0 is then ``ln_emb(W_E[x] + W_pos[i] + W_type)``.
    """

    name: str
    model_type: str  # "gpt2" | "llama" | "bert" | "gpt_neox"
    positional: Positional
    causal: bool
    norm: Literal["layernorm", "rmsnorm"]
    norm_placement: Literal["pre", "post"]
    eps: float
    act: str  # "gelu_new" | "gelu" | "silu"
    n_ctx: int
    W_E: Float[Tensor, "d_vocab d_model"]
    W_pos: Float[Tensor, "n_ctx d_model"] | None  # (learned positions only)
    W_type: Float[Tensor, " d_model"] | None  # token-type-0 embedding (BERT), added at every position
    ln_emb_w: Float[Tensor, " d_model"] | None  # embedding LayerNorm (BERT)
    ln_emb_b: Float[Tensor, " d_model"] | None
    ln1_w: Float[Tensor, "n_layers d_model"]
    ln1_b: Float[Tensor, "n_layers d_model"] | None  # (None for RMSNorm)
    W_Q: Float[Tensor, "n_layers n_heads d_model d_head"]
    W_K: Float[Tensor, "n_layers n_heads d_model d_head"]
    W_V: Float[Tensor, "n_layers n_heads d_model d_head"]
    b_Q: Float[Tensor, "n_layers n_heads d_head"]
    b_K: Float[Tensor, "n_layers n_heads d_head"]
    b_V: Float[Tensor, "n_layers n_heads d_head"]
    W_O: Float[Tensor, "n_layers n_heads d_head d_model"]
    b_O: Float[Tensor, "n_layers d_model"]
    ln2_w: Float[Tensor, "n_layers d_model"]
    ln2_b: Float[Tensor, "n_layers d_model"] | None
    W_in: Float[Tensor, "n_layers d_model d_mlp"]  # (the "up" projection for gated MLPs)
    b_in: Float[Tensor, "n_layers d_mlp"]
    W_gate: Float[Tensor, "n_layers d_model d_mlp"] | None  # gated MLPs: act(x W_gate) * (x W_in)
    W_out: Float[Tensor, "n_layers d_mlp d_model"]
    b_out: Float[Tensor, "n_layers d_model"]
    ln_f_w: Float[Tensor, " d_model"] | None  # final norm (decoders)
    ln_f_b: Float[Tensor, " d_model"] | None
    attn_scale: Float[Tensor, " n_layers"]  # scores are divided by this
    W_U: Float[Tensor, "d_model d_vocab"] | None = None  # unembedding (None: no output head, e.g. BERT encoders)
    b_U: Float[Tensor, " d_vocab"] | None = None  # its bias, where the head has one
    rope_theta: float | None = None
    rotary_dim: int | None = None
    n_kv_heads: int | None = None
    n_params: int = 0
    source: str = ""
    revision: str | None = None
    tokenizer: Any = field(default=None, repr=False)
    bos_token_id: int | None = None
    prepend_bos: bool = False  # whether texts are analysed with a BOS/CLS token in front
    parallel_attn_mlp: bool = False  # GPT-NeoX: the MLP reads ln2(layer input), not ln2(input + attention)

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

    @property
    def analysis_bos(self) -> int | None:
        """The token put in front of every analysed text (BOS/CLS), or ``None`` when texts are analysed bare."""
        return self.bos_token_id if self.prepend_bos else None

    def tensors(self) -> dict[str, Tensor]:
        """Every tensor by field name; a tied ``W_U`` (a view of ``W_E``, no data of its own) is left out, so the
        fingerprint of a tied model is what it was before the unembedding was kept."""
        tied = self.tied_unembedding
        return {k: v for k, v in vars(self).items() if isinstance(v, Tensor) and not (tied and k == "W_U")}

    @property
    def tied_unembedding(self) -> bool:
        """Whether ``W_U`` is the token embedding itself (``W_E.T``, tied weights: one storage)."""
        U = self.W_U
        return U is not None and U.data_ptr() == self.W_E.data_ptr() and U.shape == self.W_E.T.shape

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> ModelWeights:
        """Move/cast every tensor (in place) and return self (a tied unembedding stays a view of ``W_E``)."""
        tied = self.tied_unembedding
        for k, v in self.tensors().items():
            setattr(self, k, v.to(device=device, dtype=dtype if v.is_floating_point() else None))
        if tied:
            self.W_U = self.W_E.T
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
            # only when set, so fingerprints (cache keys) of the other architectures stay as they were
            **({"parallel_attn_mlp": True} if self.parallel_attn_mlp else {}),
        }

    def fingerprint(self) -> str:
        """Full-content hash of the weights (16 hex digits), the cache key of every derived artefact.

        See :func:`attnscope.core.cache.weights_fingerprint`: file hashes (memoised) for weights as loaded,
        a hash of every tensor byte for weights edited in memory."""
        return weights_fingerprint(self)


def parse_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    table = {"float32": torch.float32, "fp32": torch.float32, "float64": torch.float64, "fp64": torch.float64,
             "float16": torch.float16, "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    if dtype not in table:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {', '.join(table)}")
    return table[dtype]
