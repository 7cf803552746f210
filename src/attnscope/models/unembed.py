r"""The direct effect of a residual-stream direction on the output logits, through the unembedding.

Adding ``v`` to the final residual stream changes the logits by

    Delta logits = N_frozen(v) @ W_U,   N_frozen(v) = (centre(v) * g) / s

with the final norm *frozen* at the position's own values: ``centre`` subtracts the mean for a LayerNorm
(nothing for an RMSNorm), ``g`` is the norm's gain, and ``s`` its per-position scale (the standard deviation
or RMS of the residual it normalises, which ``v`` would also change a little: the freezing is the
approximation).  The norm's bias and ``b_U`` cancel in a difference.  This is the *direct* effect only: what
later layers do with ``v`` is left out.
"""

from __future__ import annotations

from jaxtyping import Float
from torch import Tensor

from attnscope.core.errors import AttnscopeError
from attnscope.models.weights import ModelWeights

NO_OUTPUT_HEAD = "no output head in this model"


def has_output_head(w: ModelWeights) -> bool:
    return w.W_U is not None


def direct_logit_effect(w: ModelWeights, v: Float[Tensor, "*batch d_model"],
                        scale: float | Tensor = 1.0) -> Float[Tensor, "*batch d_vocab"]:
    """Change of the logits when ``v`` is added to the final residual stream, the final norm frozen with scale
    ``scale`` (a number, or one per row of ``v``); see the module docstring."""
    if w.W_U is None:
        raise AttnscopeError(f"{w.name or 'this model'}: {NO_OUTPUT_HEAD}, so it has no logits to read")
    v = v.to(w.W_U.dtype)
    if w.ln_f_w is not None:
        if w.norm == "layernorm":
            v = v - v.mean(-1, keepdim=True)
        v = v * w.ln_f_w
    if isinstance(scale, Tensor):
        scale = scale.to(v)[..., None] if scale.dim() == v.dim() - 1 else scale.to(v)
    return (v / scale) @ w.W_U


def final_norm_scale(w: ModelWeights, resid: Float[Tensor, "*batch d_model"]) -> Float[Tensor, " *batch"]:
    """The final norm's per-position scale ``s`` on the residual ``resid`` (1 where the model has no final
    norm): ``sqrt(var + eps)`` for a LayerNorm, ``sqrt(mean(x^2) + eps)`` for an RMSNorm."""
    if w.ln_f_w is None:
        return resid.new_ones(resid.shape[:-1])
    x = resid.double()
    if w.norm == "layernorm":
        return (x.var(-1, unbiased=False) + w.eps).sqrt().to(resid.dtype)
    return (x.pow(2).mean(-1) + w.eps).sqrt().to(resid.dtype)
