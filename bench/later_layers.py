"""Later-layer context neurons (issue 11): per-layer table on the demo model or another model.

    python bench/later_layers.py demo --layers 0,1,2,3 [--probe] [--out DIR]
    python bench/later_layers.py smollm2 --layers 1,2,3,4,5 --max-windows 4

For each layer L: the effective-embedding approximation error of every layer <= L (held-out FVU, unseen
share), contextual heads, circuit FVU against the heads on effective inputs and against the true heads, the
ground-truth scores (median over the one-vs-rest contrasts of the bundled texts: Spearman of each predictor,
precision of the reported set) and timings; then, per layer, each one-vs-rest contrast verified like for like
(issue 19: the prediction from the reporting windows' own token counts against their truth, with the tuning-half
prediction, the Spearman-Brown noise ceiling, the token-mean predictor fitted on the calibration text and the
shuffled null beside it).  ``--probe`` adds the linear context probe per layer.
Writes DIR/later_L{L}.json.  Not a test: minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import statistics as st
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--layers", default="1,2,3")
    ap.add_argument("--max-windows", type=int, default=8)
    ap.add_argument("--probe", action="store_true")
    ap.add_argument("--out", type=Path, default=Path("bench/results/later"))
    a = ap.parse_args()
    from attnscope.later.evaluate import PREDICTORS, find_later_neurons
    from attnscope.later.method import LaterSettings, prepare
    from attnscope.models import load_model

    w = load_model(a.model)
    a.out.mkdir(parents=True, exist_ok=True)
    print("| L | approx. FVU (token+pos) | FVU with earlier heads | unseen | contextual heads | circuit FVU eff./true "
          "| passed | precision (all) | Spearman: " + " | ".join(PREDICTORS) + " | ceiling | s |")
    print("|---" * (9 + len(PREDICTORS)) + "|")
    layers = [int(x) for x in a.layers.split(",")]
    t_all = time.perf_counter()
    s = LaterSettings(max_windows=a.max_windows)
    shared = prepare(w, max(layers), s=s)
    print(f"sample runs: {time.perf_counter() - t_all:.1f} s")
    for L in layers:
        t0 = time.perf_counter()
        r = find_later_neurons(w, L, s=s, shared=shared)
        dt = time.perf_counter() - t0
        r.save(a.out / f"{a.model}_L{L}")
        p = r.circuit.pieces[L]
        fv = "-" if p.circuit_fvu_effective is None else f"{p.circuit_fvu_effective:.3f} / {p.circuit_fvu_true:.3f}"
        v = r.verification
        ms = {k: r.median_spearman(k) for k in r.scores}
        print(f"| {L} | {p.approximation.fvu:.3f} | {r.circuit.approximation_with_earlier_terms.fvu:.3f} | "
              f"{p.approximation.unseen_share:.3f} | {p.heads or '-'} | {fv} | {v.n_passed} | "
              f"{v.precision if v.precision is None else round(v.precision, 3)} ({v.precision_random:.3f}) | "
              + " | ".join(f"{ms[k]:.3f}" if k in ms else "-" for k in PREDICTORS)
              + f" | {r.median_ceiling:.3f} | {dt:.0f} |", flush=True)
        for q in r.circuit.pieces[:L]:
            print(f"|   layer {q.layer} (<= L) | {q.approximation.fvu:.3f} | | | {q.heads or '-'} | "
                  f"{q.limiting_condition[:90]} | ||G||={q.propagation_norm:.2f}, gain {q.propagation_gain:.2f} |",
                  flush=True)
        print_like_for_like(L, r.like_for_like)
        if a.probe:
            from attnscope.neurons.probe import context_probe

            pr = context_probe(w, layer=L)
            print(f"probe layer {L}: test accuracy {pr.test_accuracy:.3f}; separated {len(pr.separated)}/8: "
                  + ", ".join(f"{k} {v:.2f}" for k, v in pr.recall.items()), flush=True)
        print(f"elapsed {time.perf_counter() - t_all:.1f} s", flush=True)
        lfl = {k: v.headline for k, v in r.like_for_like.items()}
        (a.out / f"{a.model}_L{L}_table.json").write_text(json.dumps({"seconds": dt, "median_spearman": ms,
                                                                      "like_for_like": lfl,
                                                                      "timings": r.timings}, indent=1))


def print_like_for_like(layer: int, vs: dict) -> None:
    """One row per one-vs-rest contrast (ContrastVerification), then the medians."""
    def f(x) -> str:
        return "-" if x is None or x != x else f"{x:.3f}"

    print(f"\nlayer {layer}, like for like (reporting-half windows; token-mean fitted on "
          f"{next(iter(vs.values())).token_mean_fitted_on if vs else '-'})")
    print("| source vs rest | like for like ρ | tuning-half counts ρ | noise ceiling (S-B) | token-mean ρ | shuffled ρ "
          "| R-precision | n \\|d\\|≥1 |\n|---|---|---|---|---|---|---|---|")
    rows = []
    for k, v in vs.items():
        nc = v.noise_ceiling.spearman_brown if v.noise_ceiling is not None else None
        rows.append((v.headline, v.whole_source.spearman, nc, v.token_mean.spearman, v.shuffled_null.spearman))
        print(f"| {k} | {f(rows[-1][0])} | {f(rows[-1][1])} | {f(nc)} | {f(rows[-1][3])} | {f(rows[-1][4])} | "
              f"{f(v.like_for_like.r_precision)} | {v.n_true} |")
    med = [st.median(x for x in col if x is not None) if any(x is not None for x in col) else None
           for col in zip(*rows)]
    print("| **median** | " + " | ".join(f(x) for x in med) + " | | |\n", flush=True)


if __name__ == "__main__":
    main()
