r"""The full layer-0 explanation of an MLP-0 neuron's pre-activation, from the weights and one calibration text.

The contextual circuit (:mod:`attnscope.circuit.build`) explains what the *contextual* heads add.  A neuron's
pre-activation also reads the token and position at ``n`` itself and every other head.  With the norm in
front of the MLP replaced by its calibration scale ``s`` (one constant, method §8.1):

    pre_k(n) ~ [direct(n) + bag(n) + sum_{h not contextual} o^h(n) + b_O] W_in'[:, k] / s + b_in'[k]

* ``direct(n)``: the residual entering layer 0 (token + position embedding; BERT: after its embedding
  norm), computed exactly per token and position, centred;
* ``bag(n)``: the contextual circuit, ``sum_i K_n(i) Ext(x_i) + Pi(n) + C`` (calibrated denominators);
* ``o^h(n)``, every other head: its own positional kernel ``K^h_n(i)`` times its content factor
  ``f^h(x_i)``, normalised over the text's own tokens (``sum_i K^h_n(i) f^h(x_i)``: a sharp kernel makes
  this a local sum, so no calibration constant is used), applied to the normalised value inputs
  ``(e(x_i) + p(i)) W_V W_O`` plus the value bias.  A previous-token head thus contributes the value of
  ``x_{n-1}`` weighted by its kernel and content factor;
* biases: ``b_O`` and the MLP's own bias (norm beta folded).

Everything is computed from token ids alone, never from a forward pass.  It is scored against the TRUE
pre-activation (:func:`score_explanation`): pooled and within-text Pearson r and FVU, and the part of the
variance each term explains (``cov(term, y) / var(y)``: the parts sum to ``cov(y_hat, y) / var(y)``).
The *contextual-heads fidelity* (predicted vs true contribution of the contextual heads only) is kept
separately and called by that name: it measures the circuit, not a neuron.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from jaxtyping import Float, Int
from torch import Tensor

from attnscope.circuit.build import (
    LAYER,
    Circuit,
    Condition,
    content_inputs,
    denominator_stability,
    denominator_transfer_condition,
    layer0_kernels_and_queries,
    mlp_input_weights,
    true_head_output,
    value_bias,
)
from attnscope.circuit.query import circuit_output
from attnscope.core.stats import tensor_sum
from attnscope.exact.decomposition import centre
from attnscope.exact.forward import embed, iter_layers
from attnscope.models import ModelWeights

TERMS = ("direct", "contextual bag", "other heads", "biases")


@dataclass
class Explainer:
    """The pieces of the full explanation that do not depend on the text (tensors in comments)."""

    other_heads: list[int]  # the heads outside the contextual circuit
    kernels: Tensor  # [n_other, T, T] each other head's positional kernel K^h_n(i)
    f: Tensor  # [n_other, d_vocab] content factors (unclipped: these heads may select content)
    e_val: Tensor  # [d_vocab, d_model] normalised content part of the value input
    p_val: Tensor  # [T, d_model] normalised positional part of the value input
    W_OV: Tensor  # [n_other, d_model, d_model]
    value_bias: Tensor  # [d_model] value biases of the other heads through W_O, plus b_O
    W_in: Tensor  # [d_model, d_mlp] MLP input weights, norm gain folded
    b_in: Tensor  # [d_mlp] MLP bias, norm beta folded
    scale: float  # the calibration scale of the norm in front of the MLP

    @property
    def T(self) -> int:
        return self.kernels.shape[-1]


@torch.no_grad()
def build_explainer(w: ModelWeights, circ: Circuit) -> Explainer:
    """Kernels, content factors and value paths of every head outside ``circ``, from the weights and the
    calibration text (the same typical query and reference position the circuit used)."""
    cal = circ.calibration_tokens.to(w.device)
    T = len(cal)
    n_star = circ.settings.reference_position
    e_val, p_val, key_content = content_inputs(w, T, n_star, circ.settings.reference_norm)
    Kh, q = layer0_kernels_and_queries(w, cal)  # [H, T, T], [H, T, dh]
    others = [h for h in range(w.n_heads) if h not in circ.heads]
    hs = torch.tensor(others, dtype=torch.long, device=w.device)
    keys = torch.einsum("vd,hde->hve", key_content, w.W_K[LAYER][hs])  # [n, V, dh]
    logf = torch.einsum("he,hve->hv", q[hs, n_star], keys) / w.attn_scale[LAYER]
    logf = logf - logf.max(-1, keepdim=True).values  # f is only defined up to a factor per head
    W_OV = torch.einsum("hde,hef->hdf", w.W_V[LAYER][hs], w.W_O[LAYER][hs])
    vb = torch.einsum("he,hed->d", value_bias(w)[hs], w.W_O[LAYER][hs]) + w.b_O[LAYER]
    W, b = mlp_input_weights(w)
    return Explainer(others, Kh[hs], logf.exp(), e_val, p_val, W_OV, vb, W, b, circ.mlp_scale)


@torch.no_grad()
def other_heads_output(ex: Explainer, tokens: Int[Tensor, "*batch pos"]) -> Float[Tensor, "*batch pos d_model"]:
    """Predicted summed output ``[*batch, pos, d_model]`` of the non-contextual heads on ``tokens [*batch, pos]``
    (one window, or a batch of equal-length windows; no bias)."""
    n = tokens.shape[-1]
    out = torch.zeros(*tokens.shape, ex.e_val.shape[1], dtype=ex.e_val.dtype, device=ex.e_val.device)
    vals = ex.e_val[tokens] + ex.p_val[:n]  # [*batch, pos, d_model]
    for j in range(len(ex.other_heads)):
        A = ex.kernels[j, :n, :n] * ex.f[j, tokens][..., None, :]
        A = A / A.sum(-1, keepdim=True).clamp_min(1e-30)
        out += A @ (vals @ ex.W_OV[j])
    return out


@torch.no_grad()
def explain_terms(w: ModelWeights, circ: Circuit, ex: Explainer, tokens: Int[Tensor, "*batch pos"],
                  neurons: Tensor | None = None) -> dict[str, Float[Tensor, "*batch pos k"]]:
    """Each term's contribution ``[*batch, pos, k]`` to the pre-activation of ``neurons`` (default: all) on
    ``tokens [pos]`` (pos <= T), or on a batch of equal-length windows ``[batch, pos]``.  The prediction is the
    sum of the terms."""
    W = ex.W_in if neurons is None else ex.W_in[:, neurons]
    b = ex.b_in if neurons is None else ex.b_in[neurons]
    tokens = tokens.to(w.device)
    n = tokens.shape[-1]

    def read(v: Tensor) -> Tensor:
        return centre(v, w) @ W / ex.scale

    x0 = embed(w, tokens.reshape(-1, n)).reshape(*tokens.shape, -1)
    return {"direct": read(x0),
            "contextual bag": read(circuit_output(w, circ, tokens)),
            "other heads": read(other_heads_output(ex, tokens)),
            "biases": (read(ex.value_bias[None]) + b).expand(*tokens.shape, -1)}


@torch.no_grad()
def true_pre(w: ModelWeights, tokens: Tensor) -> Tensor:
    """The model's own MLP-0 pre-activation ``[pos, d_mlp]`` (exact forward pass)."""
    return next(iter_layers(w, tokens.to(w.device)[None], stop_layer=0)).mlp_pre[0]


def fit_scores(y: Tensor, yhat: Tensor) -> tuple[Tensor, Tensor]:
    """Pearson r and FVU per column of ``y, yhat [N, k]`` (FVU = sum (y - yhat)^2 / sum (y - mean y)^2)."""
    y, yhat = y.double(), yhat.double()
    yc, hc = y - y.mean(0), yhat - yhat.mean(0)
    r = (yc * hc).sum(0) / (yc.norm(dim=0) * hc.norm(dim=0)).clamp_min(1e-30)
    fvu = ((y - yhat) ** 2).sum(0) / (yc**2).sum(0).clamp_min(1e-30)
    return r, fvu


@dataclass
class ExplanationScores:
    """Fit of the full explanation to the true pre-activation, per neuron (lists aligned with ``neurons``)."""

    neurons: list[int]
    r: list[float]  # pooled over all positions n >= min_position of all texts
    fvu: list[float]
    r_within: list[float]  # median over texts of the within-text r
    fvu_within: list[float]  # median over texts of the within-text FVU
    parts: dict[str, list[float]]  # term -> cov(term, y) / var(y), pooled
    n_positions: int


@torch.no_grad()
def score_explanation(w: ModelWeights, circ: Circuit, ex: Explainer, texts: list[Tensor],
                      neurons: list[int]) -> ExplanationScores:
    """Score the full explanation of ``neurons`` against their true pre-activation on ``texts``
    (token windows ``[pos]``), over positions ``n >= min_position``."""
    n_min = circ.settings.min_position
    idx = torch.tensor(neurons, dtype=torch.long, device=w.device)
    ys: list[Tensor] = []
    terms: dict[str, list[Tensor]] = {t: [] for t in TERMS}
    rw: list[Tensor] = []
    fw: list[Tensor] = []
    for toks in texts:
        toks = toks[: circ.T]
        y = true_pre(w, toks)[n_min:, idx]
        parts = explain_terms(w, circ, ex, toks, idx)
        yhat = tensor_sum(p[n_min:] for p in parts.values())
        r, f = fit_scores(y, yhat)
        rw.append(r)
        fw.append(f)
        ys.append(y)
        for t in TERMS:
            terms[t].append(parts[t][n_min:])
    y = torch.cat(ys).double()
    tcat = {t: torch.cat(v).double() for t, v in terms.items()}
    r, fvu = fit_scores(y, tensor_sum(tcat.values()))
    yc = y - y.mean(0)
    var = (yc**2).sum(0).clamp_min(1e-30)
    share = {t: ((v - v.mean(0)) * yc).sum(0) / var for t, v in tcat.items()}
    return ExplanationScores(neurons=list(neurons), r=r.tolist(), fvu=fvu.tolist(),
                             r_within=torch.stack(rw).nanmedian(0).values.tolist(),
                             fvu_within=torch.stack(fw).nanmedian(0).values.tolist(),
                             parts={t: v.tolist() for t, v in share.items()}, n_positions=int(y.shape[0]))


@torch.no_grad()
def contextual_fidelity(w: ModelWeights, circ: Circuit, texts: list[Tensor],
                        neurons: list[int]) -> tuple[Tensor, Tensor]:
    """Per neuron, r and FVU of the contextual bag against the contextual heads' TRUE contribution."""
    W = mlp_input_weights(w)[0][:, neurons]
    n_min = circ.settings.min_position
    ys, yh = [], []
    for t in texts:
        t = t[: circ.T].to(w.device)
        ys.append((centre(true_head_output(w, circ.heads, t)[0], w) @ W / circ.mlp_scale)[n_min:])
        yh.append((centre(circuit_output(w, circ, t), w) @ W / circ.mlp_scale)[n_min:])
    return fit_scores(torch.cat(ys), torch.cat(yh))


@dataclass
class TextDenominators:
    """Denominator transfer on one held-out text: Z / calibration Z per contextual head."""

    text: str
    Z_median: list[float]
    ratio: list[float]
    condition: Condition  # the denominator-transfer condition on this text
    Z_trace: list[list[float]] = field(repr=False)  # [head][position]

    @property
    def in_scope(self) -> bool:
        return self.condition.ok


def denominator_transfer(w: ModelWeights, circ: Circuit, texts: dict[str, Tensor]) -> list[TextDenominators]:
    """Z of each contextual head on each text over its calibration value, as a checked condition per text
    (:func:`attnscope.circuit.build.denominator_transfer_condition`: outside 0.8-1.25, the text is out of scope)."""
    return [TextDenominators(name, v["Z_median"], v["ratio_to_calibration"],
                             denominator_transfer_condition(name, v["ratio_to_calibration"]), v["Z_trace"])
            for name, v in denominator_stability(w, circ, texts).items()]
