r"""Query-token-conditioned contextual circuit: the next variant when one typical query is not enough (issue 10).

The circuit of :mod:`attnscope.circuit` uses one typical query for every position, so each head's content
factor ``f(x)`` depends on the key token only.  In SmolLM2 and MiniLM the content score depends on the query
token too (measured: the typical-query separable TV is 0.16-0.34 per head where the exact-query split is
0.01-0.13).  This variant keeps everything else of the circuit (the chosen heads, their kernels without the
sink, the separable rotary split, the sink term, the values) and conditions the content factor on the query:

    A_h(n, i) ~ K_h(n, i) f_h(x_n, x_i) / Z_h(x_n, n),    log f_h(q, x) = q_h(n) . E_h(x) / scale
    Z_h(q, n) = sum_j K_h(n, j) f_h(q, x^cal_j)                     (calibrated on the calibration text)

``f`` is clipped at ``f_clip`` times its median over the calibration tokens, per query, as the method clips
it.  For a fixed query token the output is still linear in the bag of tokens (a per-query-token extended
embedding); the denominator still comes from the calibration text only, never from the input.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .circuit import _content_inputs, _value_bias, true_head_output
from .circuit_result import LAYER, Circuit
from .decomposition import apply_pair_weights, centre, pair_weights_of_kernel, pooled_static_keys, pre_rotation
from .forward import iter_layers, project
from .models import ModelWeights


def _content_keys(w: ModelWeights, circ: Circuit, hs: Tensor, tokens: Tensor, cal_keys: Tensor | None
                  ) -> Tensor:
    """Content keys ``[h, pos, d_head]`` the content factor reads: rotary, the pre-rotation key minus the static key
    of the calibration text; learned, the key of the token's content placed at the reference position."""
    if w.positional == "rotary":
        k = pre_rotation(w, next(iter_layers(w, tokens[None], stop_layer=0)).k)[0, hs]
        return k - pooled_static_keys(cal_keys, circ.settings["bos"] is not None)[:, 1:2]
    _, _, key_content = _content_inputs(w, circ.T, circ.settings["reference_position"], circ.settings["reference_norm"])
    return project(key_content[tokens][None], w.W_K[LAYER][hs], torch.zeros_like(w.b_K[LAYER][hs]))[0]


@torch.no_grad()
def query_conditioned_summary(w: ModelWeights, circ: Circuit, tokens: Tensor) -> Tensor:
    """Summed output ``[pos, d_model]`` of the circuit's heads on ``tokens [pos]`` (pos <= circ.T) with
    query-conditioned content factors and calibrated per-query denominators (module docstring)."""
    hs = torch.tensor(circ.heads, device=w.device)
    n = tokens.shape[-1]
    cal = circ.calibration_tokens.to(w.device)
    scale = float(w.attn_scale[LAYER])
    K = circ.head_kernels[:, :n, :n].double()
    a = next(iter_layers(w, tokens[None], stop_layer=0))
    q = a.q[0, hs] if w.positional == "learned" else pre_rotation(w, a.q)[0, hs]  # exact queries [h, n, e]
    cal_keys = None
    if w.positional == "rotary":
        cal_keys = pre_rotation(w, next(iter_layers(w, cal[None], stop_layer=0)).k)[0, hs]
        c = pair_weights_of_kernel(w, circ.head_kernels[:, -1], circ.settings["bos"] is not None)
        q = apply_pair_weights(w, q, c)
    k_in = _content_keys(w, circ, hs, tokens, cal_keys)
    k_cal = _content_keys(w, circ, hs, cal, cal_keys)[:, :n]
    lf = torch.einsum("hne,hie->hni", q, k_in).double() / scale
    lz = torch.einsum("hne,hie->hni", q, k_cal).double() / scale
    start = 1 if circ.settings["bos"] is not None else 0
    cap = lz[..., start:].median(-1, keepdim=True).values + math.log(circ.settings["f_clip"])
    lf, lz = torch.minimum(lf, cap), torch.minimum(lz, cap)
    logK = torch.log(K.clamp(min=1e-300))
    A = torch.exp(logK + lf - torch.logsumexp(logK + lz, -1, keepdim=True)) * (K > 0)  # [h, n, i]
    e_val, p_val, _ = _content_inputs(w, circ.T, circ.settings["reference_position"], circ.settings["reference_norm"])
    WOV = torch.einsum("hde,hef->hdf", w.W_V[LAYER][hs], w.W_O[LAYER][hs]).double()
    sink = torch.tensor([d.sink_mass for d in circ.decisions if d.chosen], dtype=torch.float64, device=w.device)
    vals = (e_val[tokens].double() + p_val[:n].double())  # [n, d] value inputs at each key position
    out = torch.einsum("hni,id,hdf->nf", A * (1 - sink)[:, None, None], vals, WOV)
    const = torch.einsum("he,hed->d", _value_bias(w)[hs], w.W_O[LAYER][hs]).double()
    bos = circ.settings["bos"]
    if bos is not None:
        out = out + torch.einsum("h,hf->f", sink, (e_val[bos].double() + p_val[0].double()) @ WOV)
    return (out + const).to(w.dtype)


def query_conditioned_fidelity(w: ModelWeights, circ: Circuit, texts: dict[str, Tensor]) -> dict[str, float]:
    """FVU of the query-conditioned summary against the heads' true summed output on held-out ``texts``
    (positions ``>= min_position``, centred vectors), as :func:`attnscope.circuit.circuit_fidelity` measures it."""
    ys, yh = [], []
    n_min = circ.settings["min_position"]
    for toks in texts.values():
        toks = toks[: circ.T].to(w.device)
        ys.append(centre(true_head_output(w, circ.heads, toks)[0], w)[n_min:])
        yh.append(centre(query_conditioned_summary(w, circ, toks), w)[n_min:])
    y, yhat = torch.cat(ys).double(), torch.cat(yh).double()
    return {"fvu": float(((y - yhat) ** 2).sum() / ((y - y.mean(0)) ** 2).sum()), "n_positions": int(y.shape[0])}
