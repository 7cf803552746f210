r"""The ranked table of every layer-0 MLP neuron the page searches (by index, label or token).

Every neuron gets its weight-based effect (:func:`attnscope.neurons.score_neurons`, method §8.1) and its
highest- and lowest-scoring tokens ``S[:, k]``; neurons that passed the selection also carry the label and
the held-out verification (``r``, FVU) of :func:`attnscope.neurons.find_neurons` or of a saved analysis.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from ..circuit import Circuit, mlp_input_weights
from ..decomposition import centre
from ..models import ModelWeights
from ..neurons import NeuronSettings, score_neurons

N_TOP_TOKENS = 8


@dataclass
class NeuronRow:
    index: int
    rank: int  # 1 = largest effect
    effect: float
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


def build_table(w: ModelWeights, circ: Circuit, records: list[dict]) -> list[NeuronRow]:
    """All neurons ranked by effect; ``records``: the selected neurons' records (``NeuronRecord`` as dicts)."""
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
