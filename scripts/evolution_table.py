"""Print the formation-timeline table of docs/evolution.md from an ``evolution.json``.

    python scripts/evolution_table.py docs/data/evolution-demo-series.json

One row per checkpoint: step, tokens seen, held-out loss, the layer-0 N_eff range and categories, the
contextual heads, the conditions passing (with the failing ones), the neurons reported, and for each
tracked context the strongest true neuron (index, one-vs-rest d, rank in the method's ranking).
"""

from __future__ import annotations

import json
import sys
from collections import Counter

from attnscope.evolution.timeline import Timeline


def _tokens(n: int | None) -> str:
    if n is None:
        return "-"
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.0f}k" if n else "0"


def _categories(heads: list[dict]) -> str:
    c = Counter(h["category"] for h in heads if h["layer"] == 0)
    return ", ".join(f"{n} {k}" for k, n in c.most_common())


def _conditions(c: dict) -> str:
    if c["circuit_error"]:
        return "no circuit"
    bad = [f"{x['name']} {x['measured']:.3g}" for x in c["conditions"] if not x["ok"]]
    n = len(c["conditions"])
    return f"{n - len(bad)}/{n}" + (f" ({'; '.join(bad)})" if bad else "")


def _neuron(x: dict) -> str:
    rank = "-" if x["rank"] is None else str(x["rank"])
    s = f"{x['index']}, {x['d']:.2f}, {rank}"
    return f"**{s}**" if x["d"] >= 1 and x["selected"] else s


def row(c: dict, contexts: list[str]) -> str:
    n_eff = [h["n_eff"] for h in c["heads"] if h["layer"] == 0]
    heads = ", ".join(map(str, c["contextual_heads"])) or "none"
    ctx = {x["context"]: x for x in c["context_neurons"]}
    loss = "-" if c["heldout_loss"] is None else f"{c['heldout_loss']:.3f}"
    cells = [str(c["step"]), _tokens(c["tokens_seen"]), loss, f"{min(n_eff):.1f}-{max(n_eff):.1f}",
             _categories(c["heads"]), heads, _conditions(c), str(c["n_neurons_selected"])]
    return "| " + " | ".join(cells + [_neuron(ctx[k]) if k in ctx else "-" for k in contexts]) + " |"


def main(path: str) -> None:
    d = json.load(open(path))
    contexts = list(d["timeline"]["context_neurons"])
    print("| step | tokens seen | held-out loss | layer-0 N_eff (min-max) | layer-0 categories | contextual heads "
          "| conditions passing | neurons reported | " + " | ".join(f"{k}: index, d, rank" for k in contexts) + " |")
    print("|" + "---:|" * 3 + "---|" * 4 + "---:|" + "---|" * len(contexts))
    for c in d["checkpoints"]:
        print(row(c, contexts))
    tl = Timeline.from_json(d["timeline"])
    print()
    for h, x in tl.layer0_heads.items():
        print(f"layer-0 head {h}: categories {x.categories}, leaves uniform at step {x.leaves_uniform_step}")
    print("all conditions first pass:", tl.all_conditions_first_pass, "; hold from:", tl.all_conditions_hold_from)
    for k, x in tl.context_neurons.items():
        print(f"{k}: first true (d >= 1) {x.first_true_step}, first found {x.first_found_step}, "
              f"found from {x.found_from_step}, ranks {x.rank}")


if __name__ == "__main__":
    main(sys.argv[1])
