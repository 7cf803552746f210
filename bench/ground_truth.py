"""Ground-truth evaluation of neuron discovery (issue 9), and neuron counts on other models.

    python bench/ground_truth.py demo [--out DIR]          # the targets table on the demo model
    python bench/ground_truth.py count MODEL [--random-gpt2-small]   # how many neurons pass the threshold

Not a timed test: it runs the demo model on every window of the eight bundled texts (about a minute on
one CPU core).  Writes DIR/ground_truth.json and prints markdown tables.
"""

from __future__ import annotations

import argparse
import json
import statistics as st
import sys
from pathlib import Path


def _fmt(x) -> str:
    return "-" if x is None else f"{x:.3f}" if isinstance(x, float) else str(x)


def like_for_like_table(lfl) -> None:
    """Each context's one-vs-rest contrast on the reporting half, like for like, with its ceiling and baselines."""
    print("Like for like (prediction from the reporting windows' own token counts), reporting half:\n")
    print("| context | like for like ρ | tuning-count ρ (the ranking's) | noise ceiling (Spearman-Brown) "
          "| token-mean ρ (calibration text) | shuffled ρ | R-precision (token-mean) | neurons \\|d\\| ≥ 1 |\n"
          "|---|---|---|---|---|---|---|---|")
    for n, v in lfl.items():
        nc = v.noise_ceiling.spearman_brown if v.noise_ceiling else None
        print(f"| {n} | {_fmt(v.like_for_like.spearman)} | {_fmt(v.whole_source.spearman)} | {_fmt(nc)} | "
              f"{_fmt(v.token_mean.spearman)} | {_fmt(v.shuffled_null.spearman)} | {_fmt(v.like_for_like.r_precision)} "
              f"({_fmt(v.token_mean.r_precision)}) | {v.n_true} |")
    med = lambda f: _fmt(st.median([f(v) for v in lfl.values()]))  # noqa: E731
    print(f"| **median** | {med(lambda v: v.like_for_like.spearman)} | {med(lambda v: v.whole_source.spearman)} | "
          f"{med(lambda v: v.noise_ceiling.spearman_brown if v.noise_ceiling else float('nan'))} | "
          f"{med(lambda v: v.token_mean.spearman)} | {med(lambda v: v.shuffled_null.spearman)} | | |\n")


def demo(out: Path, max_windows: int | None) -> None:
    from attnscope.circuit.build import build_circuit
    from attnscope.models import load_model
    from attnscope.neurons.evaluation import evaluate_ground_truth

    w = load_model("demo")
    circ = build_circuit(w)
    res = evaluate_ground_truth(w, circ, max_windows=max_windows)
    out.mkdir(parents=True, exist_ok=True)
    (out / "ground_truth.json").write_text(json.dumps(res.to_json(), indent=1))
    names, sc = res.contexts, res.scores
    print(f"windows per context (tuning, reporting): {res.n_windows}\n")
    print("| context | " + " | ".join(f"{p} ρ" for p in sc) + " | P@20 full | P@20 shuffled | P@20 token-mean"
          " | P@20 random | R@20 reported |")
    print("|---" * (len(sc) + 6) + "|")
    rep = res.reported
    for n in names:
        print(f"| {n} | " + " | ".join(_fmt(sc[p][n]["spearman"]) for p in sc)
              + f" | {_fmt(sc['full'][n]['precision']['20'])} | {_fmt(sc['shuffled'][n]['precision']['20'])}"
              f" | {_fmt(sc['token_mean'][n]['precision']['20'])} | {_fmt(res.random_precision[n]['20'])}"
              f" | {_fmt(rep['recall20'][n])} |")
    print("| **median** | " + " | ".join(_fmt(res.median_spearman(p)) for p in sc) + " | | | | | "
          f"{_fmt(st.median(rep['recall20'].values()))} |\n")
    like_for_like_table(res.like_for_like)
    print(f"neurons with |d| >= 1 per context (reporting half): {rep['n_true']}")
    print(f"passing neurons by the term carrying most of their predicted effect: {rep['dominant_term']}\n")
    for k in ("10", "50"):
        print(f"median P@{k}: " + ", ".join(f"{p} {_fmt(st.median(v[n]['precision'][k] for n in names))}"
                                           for p, v in sc.items())
              + f", random {_fmt(st.median(res.random_precision[n][k] for n in names))}; median R@{k} (top-{k} by "
              "|pred|; full: the reported set): "
              + ", ".join(f"{p} {_fmt(st.median(v[n]['recall'][k] for n in names))}" for p, v in sc.items()))
    fr, fx = rep["fvu_reported"], rep["fvu_random"]
    print(f"\nthreshold {res.threshold['value']:.3f} (tuning precision {res.threshold['tuning_precision']:.3f}); "
          f"{rep['n_passed']} of {res.model['d_mlp']} neurons pass")
    print(f"reported set precision {rep['precision']:.3f} (all neurons: {rep['precision_random']:.3f}; neurons "
          f"validated on the tuning half, an oracle: {rep['precision_oracle_tuning']:.3f}); recall@20 median "
          f"{st.median(rep['recall20'].values()):.2f} (random set of that size {rep['recall20_random']:.2f})")
    for lab, f in (("reported", fr), ("random", fx)):
        if f:
            parts = ", ".join(f"{k} {v:.2f}" for k, v in f["parts"].items())
            print(f"full explanation, {lab} ({f['n_neurons']}): pooled r {f['r']:.3f} FVU {f['fvu']:.3f}; "
                  f"within-text r {f['r_within']:.3f} FVU {f['fvu_within']:.3f}; parts {parts}; "
                  f"contextual-heads fidelity r {f['contextual_r']:.3f} FVU {f['contextual_fvu']:.3f}")
    print("\n| threshold | passing | precision | recall@20 min | recall@20 median |\n|---|---|---|---|---|")
    for t in res.tradeoff:
        print(f"| {t['threshold']} | {t['n_passed']} | {t['precision']:.3f} | {t['recall20_min']:.2f} | "
              f"{t['recall20_median']:.2f} |")
    lp = res.labels
    print(f"labels: {lp['n_correct']} of {lp['n_checked']} checkable labels correct; "
          f"not checkable: {lp['unchecked_labels']}")


def count(model: str, random_gpt2: bool, max_windows: int) -> None:
    import torch

    from attnscope.circuit.build import CircuitSettings, build_circuit
    from attnscope.models import load_model
    from attnscope.neurons.contrast import pre_stats
    from attnscope.neurons.find import NeuronSettings, held_out_windows, one_vs_rest_effects, score, select, validated

    if random_gpt2:
        import tempfile

        from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

        tmp = Path(tempfile.mkdtemp())
        torch.manual_seed(0)
        GPT2LMHeadModel(GPT2Config()).save_pretrained(tmp)  # GPT-2 Small shape, random init
        src = Path(load_model("demo").source.split(":", 1)[1])
        AutoTokenizer.from_pretrained(src).save_pretrained(tmp)  # any byte-level BPE; ids < 50257
        model = str(tmp)
    w = load_model(model)
    try:
        circ = build_circuit(w, CircuitSettings(n_ctx=256))
    except Exception as err:  # noqa: BLE001 - report the condition that failed
        print(f"{model}: no circuit ({err})")
        return
    s = NeuronSettings(max_windows=max_windows)
    win = held_out_windows(w, circ, None, max_windows)
    n_min = circ.settings.min_position
    sc = score(w, circ, win, s)
    d_t = one_vs_rest_effects([pre_stats(w, x.tune, n_min) for x in win])
    d_r = one_vs_rest_effects([pre_stats(w, x.report, n_min) for x in win])
    thr = select(sc, d_t, s.precision_target)
    ok = validated(d_r, sc.predicted_d)
    passed = sc.sensitivity >= thr.value
    print(f"{'random-init GPT-2 Small' if random_gpt2 else model}: heads {circ.heads}; {thr.n_passed} of {w.d_mlp} "
          f"neurons pass (threshold {thr.value:.3f}); reporting-half precision "
          f"{float(ok[passed].double().mean()) if passed.any() else float('nan'):.3f}, "
          f"base rate {float(ok.double().mean()):.3f}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["demo", "count"])
    ap.add_argument("model", nargs="?", default="demo")
    ap.add_argument("--random-gpt2-small", action="store_true")
    ap.add_argument("--out", type=Path, default=Path("attnscope-out/ground_truth"))
    ap.add_argument("--max-windows", type=int, default=None)
    a = ap.parse_args()
    if a.what == "demo":
        demo(a.out, a.max_windows)
    else:
        count(a.model, a.random_gpt2_small, a.max_windows or 8)
    sys.exit(0)
