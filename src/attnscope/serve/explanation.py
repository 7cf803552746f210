r"""The prediction the page sets beside the true pre-activation, behind one small interface.

:class:`Explanation` is what the server needs from an explanation of the layer-0 MLP neurons: the
predicted pre-activation of every neuron at every position of a window, and the evidence behind one
neuron's prediction at one position (each earlier token's contribution).  Today's implementation,
:class:`BagExplanation`, is the contextual circuit (method §7-8) plus one constant per neuron:

    pred_k(n) = sum_{i<=n} K_n(i) S[x_i, k] + pi_k(n) + c_k,     S = centre(Ext) W_in' / s

with ``pi_k(n)`` the circuit's positional and bias term through the same weights and ``c_k`` the mean
over calibration positions ``n >= min_position`` of (true pre-activation - the heads' true contribution),
i.e. everything the bag does not model (direct path, other heads, biases) replaced by its calibration
average.  :class:`FullExplanation` wraps the full layer-0 explanation (method §15, ``attnscope.neurons.explain``):
the same bag plus the direct path, every other head and the biases, computed per text instead of a constant;
:func:`make_explanation` returns it, and the page shows ``kind``; the bag + constant stays as the
baseline the tests compare it with.  In both, the
per-token evidence is the bag's ``K_n(i) S[x_i, k]`` and the named terms make up the rest: they sum exactly
to the prediction.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
from jaxtyping import Float, Int
from torch import Tensor

from attnscope.circuit.build import Circuit, mlp_input_weights, true_head_output
from attnscope.exact.decomposition import centre
from attnscope.models import ModelWeights
from attnscope.neurons.explain import build_explainer, explain_terms


@dataclass
class Evidence:
    """Why the explanation predicts what it does for one neuron at one window position ``n``."""

    contributions: Float[Tensor, " n"]  # each token's term K_n(i) * S[x_i, k], i = 0..position
    kernel: Float[Tensor, " n"]  # K_n(i)
    scores: Float[Tensor, " n"]  # S[x_i, k]
    terms: list[tuple[str, float]]  # the rest of the prediction at n, by name (not split per token)
    prediction: float  # sum(contributions) + the terms


@runtime_checkable
class Explanation(Protocol):
    kind: str  # short name shown on the page
    description: str  # one sentence: what "predicted" means

    def predict(self, tokens: Int[Tensor, "*batch pos"], neurons: Int[Tensor, " k"] | None = None
                ) -> Float[Tensor, "*batch pos k"]:
        """Predicted pre-activation of ``neurons`` (default: every layer-0 neuron) on one window of tokens, or on
        each of a batch of equal-length windows ``[batch, pos]``."""
        ...

    def evidence(self, tokens: Int[Tensor, " pos"], neuron: int, position: int) -> Evidence:
        """Each token's contribution to ``neuron``'s prediction at window position ``position``."""
        ...

    def token_scores(self, neuron: int) -> Float[Tensor, " d_vocab"]:
        """``S[:, neuron]``: every vocabulary item's score (masked tokens score 0)."""
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
        n_min = circ.settings.min_position
        cal = circ.calibration_tokens.to(w.device)
        y_cal, pre_cal, _ = true_head_output(w, circ.heads, cal)
        self.constant = (pre_cal - centre(y_cal, w) @ self.W)[n_min:].mean(0)  # [d_mlp]

    @torch.no_grad()
    def predict(self, tokens: Int[Tensor, "*batch pos"], neurons: Int[Tensor, " k"] | None = None
                ) -> Float[Tensor, "*batch pos k"]:
        n = tokens.shape[-1]
        sel = slice(None) if neurons is None else neurons
        bag = self.circ.kernel[:n, :n] @ (self.ext_c[tokens] @ self.W[:, sel])  # [n, k]
        return bag + self.pos_c[:n, sel] + self.constant[sel]

    @torch.no_grad()
    def token_scores(self, neuron: int) -> Float[Tensor, " d_vocab"]:
        return self.ext_c @ self.W[:, neuron]

    @torch.no_grad()
    def bag_evidence(self, tokens: Int[Tensor, " pos"], neuron: int, position: int
                     ) -> tuple[Float[Tensor, " n"], Float[Tensor, " n"], Float[Tensor, " n"]]:
        """``(K_n(i) S[x_i, k], K_n(i), S[x_i, k])`` for ``i = 0..position``."""
        s = self.ext_c[tokens[: position + 1]] @ self.W[:, neuron]  # [n + 1]
        k = self.circ.kernel[position, : position + 1]
        return k * s, k, s

    @torch.no_grad()
    def evidence(self, tokens: Int[Tensor, " pos"], neuron: int, position: int) -> Evidence:
        contrib, k, s = self.bag_evidence(tokens, neuron, position)
        terms = [("positional term of the bag", float(self.pos_c[position, neuron])),
                 ("constant (calibration mean of the rest)", float(self.constant[neuron]))]
        return Evidence(contrib, k, s, terms, float(contrib.sum()) + sum(v for _, v in terms))


class FullExplanation(BagExplanation):
    """The full layer-0 explanation (method §15, :mod:`attnscope.neurons.explain`): direct path + contextual bag +
    every other head through its own kernel and content factor + biases, from token ids alone."""

    kind = "full layer-0 explanation"
    description = ("predicted = the direct path (this token and position) + the contextual heads' bag of tokens + "
                   "every other layer-0 head through its own kernel and content factor + biases, all from the "
                   "weights and the calibration text (no forward pass)")

    @torch.no_grad()
    def __init__(self, w: ModelWeights, circ: Circuit, build_explainer, explain_terms):
        super().__init__(w, circ)
        self.ex = build_explainer(w, circ)
        self._terms = explain_terms

    @torch.no_grad()
    def predict(self, tokens: Int[Tensor, "*batch pos"], neurons: Int[Tensor, " k"] | None = None
                ) -> Float[Tensor, "*batch pos k"]:
        return sum(self._terms(self.w, self.circ, self.ex, tokens, neurons).values())

    @torch.no_grad()
    def evidence(self, tokens: Int[Tensor, " pos"], neuron: int, position: int) -> Evidence:
        contrib, k, s = self.bag_evidence(tokens, neuron, position)
        t = self._terms(self.w, self.circ, self.ex, tokens[: position + 1], torch.tensor([neuron]))
        bag_rest = ("positional term of the bag and its query conditioning (the per-token terms are the "
                    "query-averaged bag)" if self.circ.query_conditioned else "positional term of the bag")
        names = {"contextual bag": bag_rest, "direct": "direct path (this token and position)"}
        terms = [(names.get(n, n), float(v[position, 0]) - (float(contrib.sum()) if n == "contextual bag" else 0.0))
                 for n, v in t.items()]
        return Evidence(contrib, k, s, terms, float(contrib.sum()) + sum(v for _, v in terms))


def make_explanation(w: ModelWeights, circ: Circuit) -> Explanation:
    """The explanation the page serves: the full layer-0 explanation (:mod:`attnscope.neurons.explain`)."""
    return FullExplanation(w, circ, build_explainer, explain_terms)
