r"""The ranked table of every layer-0 MLP neuron the page searches (by index, label or token).

Read from the JSON of a neurons result (``NeuronResult.to_json()`` or a saved ``neurons.json``): ``neurons``
holds one row per neuron in rank order (ranked by sensitivity, the largest predicted one-vs-rest effect
size), ``cards`` the reported neurons with their label and the full explanation's held-out fit.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from attnscope.core.errors import AttnscopeError

N_TOP_TOKENS = 8
SCORE_NAMES = {  # the ranking's score, as the page names it
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


def build_table(result: dict, source: str = "the neurons result") -> tuple[list[NeuronRow], str]:
    """All neurons ranked, and the name of the ranking's score (a key of :data:`SCORE_NAMES`)."""
    if "cards" not in result or not result.get("neurons"):
        raise AttnscopeError(f"{source} has no ranked table of the neurons (an older attnscope wrote it); re-run "
                             "`attnscope report` or `attnscope neurons` and pass its folder")
    return _from_ranked_rows(result), "sensitivity"


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
