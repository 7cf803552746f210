r"""The prediction the page sets beside the true pre-activation, behind one small interface.

:class:`Explanation` is what the server needs from an explanation of the layer-0 MLP neurons: the
predicted pre-activation of every neuron at every position of a window, and the evidence behind one
neuron's prediction at one position (each earlier token's contribution).  Today's implementation,
:class:`BagExplanation`, is the contextual circuit (method §7-8) plus one constant per neuron:

    pred_k(n) = sum_{i<=n} K_n(i) S[x_i, k] + pi_k(n) + c_k,     S = centre(Ext) W_in' / s

with ``pi_k(n)`` the circuit's positional and bias term through the same weights and ``c_k`` the mean
over calibration positions ``n >= min_position`` of (true pre-activation - the heads' true contribution),
i.e. everything the bag does not model (direct path, other heads, biases) replaced by its calibration
average.  The evidence terms sum exactly to the prediction.  When the full layer-0 explanation of a
neuron lands (method §15), :func:`make_explanation` returns it instead; the page shows ``kind``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from ..circuit import Circuit, mlp_input_weights, true_head_output
from ..decomposition import centre
from ..models import ModelWeights


@dataclass
class Evidence:
    """Why the explanation predicts what it does for one neuron at one window position ``n``."""

    contributions: Tensor  # [n + 1] each token's term K_n(i) * S[x_i, k], i = 0..n
    kernel: Tensor  # [n + 1] K_n(i)
    scores: Tensor  # [n + 1] S[x_i, k]
    positional: float  # pi_k(n): positional and bias terms of the circuit
    constant: float  # c_k: the terms the explanation replaces by their calibration mean
    prediction: float  # sum of the above


class Explanation(Protocol):
    kind: str  # short name shown on the page
    description: str  # one sentence: what "predicted" means

    def predict(self, tokens: Tensor) -> Tensor:
        """Predicted pre-activation ``[pos, d_mlp]`` of every layer-0 neuron on one window ``tokens [pos]``."""
        ...

    def evidence(self, tokens: Tensor, neuron: int, position: int) -> Evidence:
        """Each token's contribution to ``neuron``'s prediction at window position ``position``."""
        ...

    def token_scores(self, neuron: int) -> Tensor:
        """``S[:, neuron]``: every vocabulary item's score ``[d_vocab]`` (masked tokens score 0)."""
        ...


class BagExplanation:
    """Contextual bag of tokens (the circuit) plus a per-neuron constant measured on the calibration text."""

    kind = "contextual bag + constant"
    description = ("predicted = the contextual heads' bag of tokens (kernel-weighted token scores) plus the "
                   "positional term, plus one constant per neuron: the calibration-text mean of everything the "
                   "bag does not model (direct path, other heads, biases)")

    @torch.no_grad()
    def __init__(self, w: ModelWeights, circ: Circuit):
        self.w, self.circ = w, circ
        W, _ = mlp_input_weights(w)  # [d_model, d_mlp]
        self.W = W / circ.mlp_scale
        self.ext_c = centre(circ.ext, w)  # [V, d_model]
        self.pos_c = centre(circ.positional, w) @ self.W  # [T, d_mlp]
        n_min = circ.settings["min_position"]
        cal = circ.calibration_tokens.to(w.device)
        y_cal, pre_cal, _ = true_head_output(w, circ.heads, cal)
        self.constant = (pre_cal - centre(y_cal, w) @ self.W)[n_min:].mean(0)  # [d_mlp]

    @torch.no_grad()
    def predict(self, tokens: Tensor) -> Tensor:
        n = tokens.shape[-1]
        bag = self.circ.kernel[:n, :n] @ (self.ext_c[tokens] @ self.W)  # [n, d_mlp]
        return bag + self.pos_c[:n] + self.constant

    @torch.no_grad()
    def token_scores(self, neuron: int) -> Tensor:
        return self.ext_c @ self.W[:, neuron]

    @torch.no_grad()
    def evidence(self, tokens: Tensor, neuron: int, position: int) -> Evidence:
        toks = tokens[: position + 1]
        s = self.ext_c[toks] @ self.W[:, neuron]  # [n + 1]
        k = self.circ.kernel[position, : position + 1]
        contrib = k * s
        pos, const = float(self.pos_c[position, neuron]), float(self.constant[neuron])
        return Evidence(contrib, k, s, pos, const, float(contrib.sum()) + pos + const)


def make_explanation(w: ModelWeights, circ: Circuit) -> Explanation:
    """The fullest explanation available: the full layer-0 explanation when attnscope has one, else the bag."""
    try:
        from ..explain import serve_explanation  # type: ignore[attr-defined]  # the full explanation (method §15)
    except ImportError:
        return BagExplanation(w, circ)
    return serve_explanation(w, circ)
