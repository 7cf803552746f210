"""Neurons of a later MLP layer tracked over training checkpoints (``attnscope evolution --layer L``).

The layer-0 neuron method does not apply to the layer-0 MLP of a model with parallel attention and MLP
(GPT-NeoX, Pythia): that MLP reads the block's input, not layer-0 attention.  For such models, and for any
``L >= 1``, each checkpoint's neurons come from the later-layer method (:mod:`attnscope.later_eval`), and the
ground truth from the true pre-activation of the MLP of ``L`` on the very windows that method uses (its
``true_d_report``): the tuning half ranks and sets the threshold, the reporting half scores.
"""

from __future__ import annotations

import torch

from .later import LaterSettings
from .later_eval import find_later_neurons
from .models import ModelWeights


def later_neurons(w: ModelWeights, s, layer: int, point, context_neuron, tracked: tuple[str, ...]):
    """``(n_selected, top NeuronPoints, ContextNeurons)`` of the MLP of ``layer`` at one checkpoint."""
    res = find_later_neurons(w, layer, s.circuit, LaterSettings(eval=s.neuron.eval, max_windows=s.neuron.max_windows,
                                                                n_cards=max(s.top_k, 1)))
    rank = torch.empty(len(res.rows), dtype=torch.long)
    for r in res.rows:
        rank[r.index] = r.rank
    cards = {c.index: c for c in res.cards}
    top = []
    for r in res.rows[: s.top_k]:
        c = cards.get(r.index)
        toks = [t for t, _ in c.top_positive_tokens][:8] if c else []
        top.append(point(r.index, r.rank, float(r.sensitivity), c.label if c else None, toks))
    truth = res.true_d_report
    ctx = [context_neuron(c, truth[c], rank, res.threshold.n_passed) for c in tracked if c in truth]
    return res.threshold.n_passed, top, ctx
