r"""Discovery scored against truth (method §15): rank correlation, precision@k, recall@k, and their baselines.

For one contrast (source ``A`` against ``B``), ``pred [d_mlp]`` is the predicted effect of every neuron and
``d [d_mlp]`` its true effect size:

* ``spearman``: rank correlation of ``pred`` and ``d`` over all neurons;
* ``precision@k``: share of the top-``k`` neurons by ``|pred|`` whose true ``|d| >= 1`` with the sign of ``pred``;
* ``recall@k``: share of the top-``k`` neurons by ``|d|`` found among the *reported* neurons (a boolean
  mask), or, without a reported set, among the top-``k`` by ``|pred|``.

Baselines (:func:`shuffled_null`, :func:`random_precision`) sit beside every score.  The full evaluation
on the demo model is :func:`attnscope.neurons.evaluation.evaluate_ground_truth`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

KS = (10, 20, 50)
D_MIN = 1.0  # a true context neuron of a contrast: |d| >= this


def ranks(x: Tensor) -> Tensor:
    """Ranks 0..N-1 (ties broken by position)."""
    r = torch.empty(len(x), dtype=torch.float64)
    r[x.double().argsort()] = torch.arange(len(x), dtype=torch.float64)
    return r


def spearman(a: Tensor, b: Tensor) -> float:
    return float(torch.corrcoef(torch.stack([ranks(a), ranks(b)]))[0, 1])


def precision_at(pred: Tensor, d: Tensor, k: int) -> float:
    top = pred.abs().argsort(descending=True)[:k]
    hit = (d[top].abs() >= D_MIN) & (torch.sign(d[top]) == torch.sign(pred[top]))
    return float(hit.double().mean())


def recall_at(pred: Tensor, d: Tensor, k: int, reported: Tensor | None = None) -> float:
    top_true = d.abs().argsort(descending=True)[:k]
    if reported is None:
        reported = torch.zeros(len(d), dtype=torch.bool)
        reported[pred.abs().argsort(descending=True)[:k]] = True
    return float(reported[top_true].double().mean())


@dataclass
class DiscoveryScores:
    """Scores of one predictor on one contrast."""

    spearman: float
    precision: dict[int, float]  # k -> precision@k
    recall: dict[int, float]  # k -> recall@k

    def to_json(self) -> dict:
        return {"spearman": self.spearman, "precision": {str(k): v for k, v in self.precision.items()},
                "recall": {str(k): v for k, v in self.recall.items()}}


def discovery_scores(pred: Tensor, d: Tensor, reported: Tensor | None = None, ks=KS) -> DiscoveryScores:
    return DiscoveryScores(spearman(pred, d), {k: precision_at(pred, d, k) for k in ks},
                           {k: recall_at(pred, d, k, reported) for k in ks})


def shuffled_null(token_scores_diff, p_a: Tensor, p_b: Tensor, seed: int = 0) -> Tensor:
    """The null ranking: predicted differences with the tokens' scores permuted over the vocabulary.

    ``token_scores_diff(q)`` maps a token-frequency difference ``q [d_vocab]`` to ``[d_mlp]``; permuting
    ``q`` is the same as permuting the rows of the score matrix.  Each neuron keeps its score
    distribution; only which tokens carry which score is lost."""
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(p_a), generator=g)
    return token_scores_diff((p_a - p_b)[perm])


def random_precision(d: Tensor, pred_sign: Tensor, k: int, draws: int = 200, seed: int = 0) -> float:
    """Expected precision@k of ``k`` random neurons (the base rate of ``|d| >= 1`` with the predicted sign)."""
    g = torch.Generator().manual_seed(seed)
    hit = ((d.abs() >= D_MIN) & (torch.sign(d) == pred_sign)).double()
    return float(torch.stack([hit[torch.randperm(len(d), generator=g)[:k]].mean() for _ in range(draws)]).mean())


def random_recall(n_reported: int, d_mlp: int) -> float:
    """Expected recall@k of a random reported set of ``n_reported`` neurons (any k): its share of the layer."""
    return n_reported / d_mlp
