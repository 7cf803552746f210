"""Which term of the contrast's token model carries its error (issue 19, item 4): oracle swaps on the unseen
benchmark's development half.

    python bench/contrast_terms.py MODEL [--windows 8] [--half dev]

For every source of the half (its extension included), on the same windows as ``bench/unseen.py``, the mean
MLP-0 pre-activation at positions ``n >= min_position`` is predicted by the token model (source-aware
denominators, what ``contrast`` uses), and again with one of its parts replaced by the truth from a layer-0
forward pass at every position:

* ``true scale``: the norm's true scale per position instead of ``s_p(x)``;
* ``true numerator``: the true residual before the norm (every term at once);
* ``true contextual heads``: the contextual heads' true output instead of the bag's mean;
* ``true other heads``: the other heads' true output instead of their mean term;
* ``circuit summary``: the circuit's own per-position output (the query-conditioned form when the circuit
  uses it: each position's query, calibrated denominators; no forward pass beyond layer 0's queries) instead
  of the bag's mean.

Printed: per failing pair (saved run's like for like < 0.8) and as medians over the failing and the holding
pairs, the Spearman over neurons between each variant's predicted difference of means and the true one.  Reads
``bench/results/unseen/MODEL_HALF_srcz_sd.json`` for the pairs and their failure labels.  About 2 minutes for
SmolLM2 on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import statistics as st
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
VARIANTS = ("token model", "true scale", "true numerator", "true contextual heads", "true other heads",
            "circuit summary")


@torch.no_grad()
def source_means(w, circ, tm, qp, wins: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each variant's mean pre-activation ``[d_mlp]`` over the windows' positions ``n >= min_position``."""
    from attnscope.circuit.query import query_conditioned_summary
    from attnscope.core.stats import tensor_sum
    from attnscope.exact.decomposition import centre
    from attnscope.exact.forward import iter_layers
    from attnscope.neurons.verification import token_frequencies

    n_min, W, heads = circ.settings.min_position, tm.W_in.double(), circ.heads
    others = [h for h in range(w.W_O[0].shape[0]) if h not in heads]
    p = token_frequencies(torch.stack(wins), w.d_vocab).to(tm.W_in.device, tm.W_in.dtype)
    cm = tm.context_means(p)
    s_tok = tm.token_scales(p, cm).double()
    ctx = tensor_sum(cm.values()).double() + tm.norm_const.double()
    bag, oth = cm["contextual bag"].double(), cm["other heads"].double()
    acc = {k: torch.zeros(W.shape[1], dtype=torch.float64) for k in ("true", *VARIANTS)}
    n = 0
    for win in wins:
        a = next(iter_layers(w, win[None].to(w.device), stop_layer=0))
        x = win[n_min:]
        head_out = torch.einsum("hpd,hde->hpe", a.z[0, :, n_min:].double(), w.W_O[0].double())
        num_true = centre(a.resid_pre[0, n_min:].double() + a.attn_out[0, n_min:].double(), w)
        s_true = (num_true.pow(2).mean(-1) + w.eps).sqrt()[:, None]
        num = tm.parts["direct"].double()[x] + ctx
        s = s_tok[x][:, None]
        summary = centre(query_conditioned_summary(w, circ, win, qp)[n_min:].double() if circ.query_conditioned
                         else circ.summary(win.to(w.device))[n_min:].double(), w)
        acc["true"] += a.mlp_pre[0, n_min:].double().sum(0)
        for k, v in (("token model", num / s), ("true scale", num / s_true), ("true numerator", num_true / s),
                     ("true contextual heads", (num - bag + centre(head_out[heads].sum(0), w)) / s),
                     ("true other heads", (num - oth + centre(head_out[others].sum(0), w)) / s),
                     ("circuit summary", (num - bag + summary) / s)):
            acc[k] += (v @ W).sum(0)
        n += len(x)
    return {k: v / n for k, v in acc.items()}


def main() -> None:
    from attnscope.circuit.build import build_circuit
    from attnscope.circuit.query import query_parts
    from attnscope.core.texts import open_source, tokenize
    from attnscope.models import load_model
    from attnscope.neurons.contrast import build_token_model
    from attnscope.neurons.groundtruth import spearman
    from attnscope.neurons.verification import spread_windows

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--half", default="dev", choices=["dev", "report"])
    a = ap.parse_args()
    torch.set_num_threads(2)
    saved = json.loads((ROOT / "results" / "unseen" / f"{a.model.replace('/', '_')}_{a.half}_srcz_sd.json")
                       .read_text())
    pairs = [(p["a"], p["b"], p["failed"], p["verification"]["like_for_like"]["spearman"])
             for p in saved["pairs"] if p["kind"] == "natural"]
    w = load_model(a.model)
    circ = build_circuit(w)
    tm = build_token_model(w, circ, source_aware_denominators=True)
    qp = query_parts(w, circ) if circ.query_conditioned else None
    means = {}
    for name in sorted({x for p in pairs for x in p[:2]}):
        ids = torch.as_tensor(tokenize(open_source(str(ROOT / "unseen" / "texts" / f"{name}.txt")), w.tokenizer))
        means[name] = source_means(w, circ, tm, qp, spread_windows(w, ids, circ.T, a.windows))
    rows = []
    print("| pair (failing) | like for like (saved) | " + " | ".join(VARIANTS) + " |\n" + "|---" * (2 + len(VARIANTS))
          + "|")
    for x, y, failed, lfl in pairs:
        true = means[x]["true"] - means[y]["true"]
        r = {k: spearman(means[x][k] - means[y][k], true) for k in VARIANTS}
        rows.append((failed, r))
        if failed:
            print(f"| {x} vs {y} | {lfl:.3f} | " + " | ".join(f"{r[k]:.3f}" for k in VARIANTS) + " |")
    print("\nmedian Spearman of the predicted against the true difference of means, over the pairs")
    print("| pairs | n | " + " | ".join(VARIANTS) + " |\n" + "|---" * (2 + len(VARIANTS)) + "|")
    for f, label in ((True, "failing (like for like < 0.8)"), (False, "holding")):
        sel = [r for ff, r in rows if ff == f]
        if sel:
            print(f"| {label} | {len(sel)} | " + " | ".join(f"{st.median(x[k] for x in sel):.3f}" for k in VARIANTS)
                  + " |")


if __name__ == "__main__":
    main()
