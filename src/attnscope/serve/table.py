r"""The ranked table of every layer-0 MLP neuron the page searches (by index, label or token).

Built from the JSON of a neurons result (``NeuronResult.to_json()`` or a saved ``neurons.json``).  When it
ranks every neuron itself (``neurons`` = one row per neuron, ``cards`` = the reported ones) that ranking is
used as is.  Otherwise (``neurons`` = the selected records only) every neuron is ranked here by its
weight-based effect (:func:`attnscope.neurons.score_neurons`, method §8.1).  Either way each row has the
neuron's highest- and lowest-scoring tokens ``S[:, k]``, and the reported neurons their label and held-out fit.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from ..circuit import Circuit, mlp_input_weights
from ..decomposition import centre
from ..models import ModelWeights

N_TOP_TOKENS = 8
SCORE_NAMES = {  # the ranking's score, as the page names it
    "effect": "effect: the neuron's contextual swing from the weights, in calibration standard deviations",
    "sensitivity": "sensitivity: the largest predicted one-vs-rest effect size |d| over the held-out contexts",
}


@dataclass
class NeuronRow:
    index: int
    rank: int  # 1 = first in the ranking
    score: float  # what the ranking sorts by (see SCORE_NAMES)
    swing_positive: float
    swing_negative: float
    selected: bool  # passed the selection (explained and verified)
    label: str | None
    label_negative: str | None
    r: float | None  # held-out Pearson r of the circuit's contribution (selected neurons)
    fvu: float | None
    top_positive: list[str]
    top_negative: list[str]

    def to_json(self) -> dict:
        return {k: (None if isinstance(v, float) and v != v else v) for k, v in asdict(self).items()}


def _decode(tok, ids: list[int]) -> list[str]:
    return [tok.convert_tokens_to_string([t]) for t in tok.convert_ids_to_tokens(ids)]


@torch.no_grad()
def top_tokens(w: ModelWeights, circ: Circuit, n: int = N_TOP_TOKENS, chunk: int = 512) -> tuple[list, list]:
    """Per neuron, the ``n`` highest- and lowest-scoring tokens (masked and special tokens left out)."""
    keep = circ.token_mask.clone()
    keep[[i for i in w.tokenizer.all_special_ids if i < len(keep)]] = False
    ids = torch.nonzero(keep).squeeze(1)
    W, _ = mlp_input_weights(w)
    E = centre(circ.ext, w)[ids] / circ.mlp_scale  # [V_kept, d_model]
    pos, neg = [], []
    for c0 in range(0, W.shape[1], chunk):
        S = E @ W[:, c0 : c0 + chunk]  # [V_kept, chunk]
        pos += ids[S.topk(n, dim=0).indices.T].tolist()
        neg += ids[(-S).topk(n, dim=0).indices.T].tolist()
    tok = w.tokenizer
    return [_decode(tok, p) for p in pos], [_decode(tok, q) for q in neg]


def build_table(w: ModelWeights, circ: Circuit, result: dict) -> tuple[list[NeuronRow], str]:
    """All neurons ranked, and the name of the ranking's score (a key of :data:`SCORE_NAMES`)."""
    if "cards" in result:
        return _from_ranked_rows(result), "sensitivity"
    return _from_effect(w, circ, result.get("neurons", [])), "effect"


def _from_ranked_rows(result: dict) -> list[NeuronRow]:
    cards = {int(c["index"]): c for c in result["cards"]}
    rows = []
    for r in sorted(result["neurons"], key=lambda r: r["rank"]):
        c = cards.get(int(r["index"]), {})
        rows.append(NeuronRow(int(r["index"]), int(r["rank"]), float(r["sensitivity"]), float(r["swing_positive"]),
                              float(r["swing_negative"]), bool(r["passed"]), c.get("label"), c.get("label_negative"),
                              c.get("r"), c.get("fvu"), list(r["top_positive_tokens"])[:N_TOP_TOKENS],
                              list(r["top_negative_tokens"])[:N_TOP_TOKENS]))
    return rows


def _from_effect(w: ModelWeights, circ: Circuit, records: list[dict]) -> list[NeuronRow]:
    from ..neurons import NeuronSettings, score_neurons  # the weight-only ranking (before the ranked table)

    effect, sw_pos, sw_neg, _ = score_neurons(w, circ, NeuronSettings(), progress=False)
    pos, neg = top_tokens(w, circ)
    by_index = {int(r["index"]): r for r in records}
    order = torch.argsort(effect, descending=True).tolist()
    rows = []
    for rank, k in enumerate(order, 1):
        r = by_index.get(k, {})
        rows.append(NeuronRow(k, rank, float(effect[k]), float(sw_pos[k]), float(sw_neg[k]), k in by_index,
                              r.get("label"), r.get("label_negative"), r.get("r"), r.get("fvu"), pos[k], neg[k]))
    return rows
