"""Neurons of a later MLP layer tracked over training checkpoints (``attnscope evolution --layer L``).

The layer-0 neuron method does not apply to the layer-0 MLP of a model with parallel attention and MLP
(GPT-NeoX, Pythia): that MLP reads the block's input, not layer-0 attention.  For such models, and for any
``L >= 1``, each checkpoint's neurons come from the later-layer method (:mod:`attnscope.later_eval`), and the
ground truth from the true pre-activation of the MLP of ``L`` on the very windows that method uses: the
tuning half ranks and sets the threshold, the reporting half scores.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .contrast import PreStats
from .later import LaterSettings, sources
from .later_eval import find_later_neurons, layer_pre
from .models import ModelWeights
from .neurons import one_vs_rest_effects


def _stats(pre: Tensor, n_min: int) -> PreStats:
    y = pre[:, n_min:].reshape(-1, pre.shape[-1]).double()
    return PreStats(y.shape[0], y.sum(0), (y**2).sum(0))


def later_ground_truth(w: ModelWeights, s, layer: int) -> tuple[list[str], Tensor]:
    """``(source names, d_report [n_sources, d_mlp])``: true one-vs-rest effect sizes of every neuron of the
    MLP of ``layer`` on the reporting halves of the windows the later-layer method uses."""
    ls = LaterSettings(eval=s.neuron.eval, max_windows=s.neuron.max_windows)
    T = min(w.n_ctx, 256) if s.circuit.n_ctx is None else s.circuit.n_ctx
    wins = sources(w, s.circuit, ls, T)
    n_min = s.circuit.min_position if s.circuit.min_position is not None else s.circuit.window // 4
    return [x.name for x in wins], one_vs_rest_effects([_stats(layer_pre(w, x.report, layer), n_min) for x in wins])


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
    names, d_report = later_ground_truth(w, s, layer)
    ctx = [context_neuron(c, d_report[names.index(c)], rank, res.threshold.n_passed) for c in tracked if c in names]
    return res.threshold.n_passed, top, ctx
