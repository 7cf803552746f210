"""Model adapters: one typed view of a transformer's weights, whatever the architecture.

Every analysis in attnscope reads a :class:`ModelWeights`, never a Hugging Face module, so that the
method is written once.  Names and shapes follow TransformerLens (``W_Q``, ``b_K``, ``W_pos``, ``W_E``;
per-head matrices ``[n_layers, n_heads, d_model, d_head]``).  Unlike TransformerLens nothing is folded
or centred here: the weights are exactly the model's, and :mod:`attnscope.exact.forward` recomputes the
model's own numbers from them.  Approximations (LayerNorm folding, centring, ...) live in the analysis
modules, named and measured.

Adapters (each tested against the model's own forward pass):

* ``gpt2``  - GPT-2 family (learned absolute positions, pre-LayerNorm, causal).
* ``llama`` - Llama-style models (rotary positions, RMSNorm, gated SiLU MLP, grouped-query attention
  expanded to one K/V per query head), including ``.gguf`` files.
* ``bert``  - BERT encoders (learned absolute positions, post-LayerNorm, bidirectional).
"""


from __future__ import annotations

from attnscope.models.adapters import SUPPORTED_TYPES, extract_weights
from attnscope.models.resolve import (
    MODEL_ALIASES,
    MODEL_PACKAGES,
    ResolvedModel,
    cache_dir,
    demo_model_path,
    load_hf,
    load_model,
    resolve,
)
from attnscope.models.weights import ModelWeights, Positional, parse_dtype

__all__ = ["MODEL_ALIASES", "MODEL_PACKAGES", "SUPPORTED_TYPES", "ModelWeights", "Positional", "ResolvedModel",
           "cache_dir", "demo_model_path", "extract_weights", "load_hf", "load_model", "parse_dtype", "resolve"]
