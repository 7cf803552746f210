"""Print a markdown summary of a neurons.json: heads, conditions, counts, fits with random baselines, top neurons.

Usage: python scripts/summarise_neurons.py OUT/neurons.json [N_TOP]
"""

import json
import sys

d = json.load(open(sys.argv[1]))
n_top = int(sys.argv[2]) if len(sys.argv) > 2 else 10
s, c, v = d["summary"], d["circuit"], d["verification"]
rep, rnd = v["reported"], v["random"]
print(f"- contextual heads: {s['heads']} ({s['n_heads']} of {len(c['decisions'])})")
print(f"- {s['n_neurons_found']} of {s['n_neurons_scored']} neurons pass the measured threshold "
      f"{s['threshold']:.3f} (tuning precision {s['tuning_precision']:.3f}); reporting-half precision "
      f"{s['precision']:.3f} (all neurons {s['precision_random']:.3f}); median recall@20 {s['median_recall20']:.2f} "
      f"(random set of that size {s['recall20_random']:.2f})")
if rep:
    print(f"- full explanation vs true pre-activation, {rep['n_neurons']} reported neurons: pooled r {rep['r']:.3f} "
          f"FVU {rep['fvu']:.3f}, within-text r {rep['r_within']:.3f} FVU {rep['fvu_within']:.3f}; "
          f"{rnd['n_neurons']} random neurons: FVU {rnd['fvu']:.3f}, within-text {rnd['fvu_within']:.3f}")
    print(f"- contextual-heads fidelity (circuit, not selection): reported r {rep['contextual_r']:.3f} FVU "
          f"{rep['contextual_fvu']:.3f}; random r {rnd['contextual_r']:.3f} FVU {rnd['contextual_fvu']:.3f}")
f = v["circuit_fidelity"]
print(f"- linear summary vs the heads' true summed output: FVU {f['fvu']:.3f}, median per-dimension r "
      f"{f['median_r_per_dimension']:.3f} over {f['n_positions']} held-out positions")
print("- conditions: " + "; ".join(f"{x['name']} {x['measured']:.3f} ({'ok' if x['ok'] else 'FAILED'})"
                                     for x in c["conditions"]))
print(f"- denominator transfer out of scope (Z ratio outside 0.8-1.25): {', '.join(s['texts_out_of_scope']) or 'none'}")
print()
print("| rank | neuron | predicted \\|d\\| | highest true d on | label (evidence) | FVU | within-text FVU "
      "| top positive tokens |")
print("|---|---|---|---|---|---|---|---|")
for n in d["cards"][:n_top]:
    toks = " ".join(repr(t)[1:-1].replace("|", "\\|") for t, _ in n["top_positive_tokens"][:8])
    lab = f"{n['label']} ({n['label_evidence']})" if n["label"] else ""
    print(f"| {n['rank']} | {n['index']} | {n['sensitivity']:.2f} | {n['positive_text']} | {lab} | {n['fvu']:.2f} | "
          f"{n['fvu_within']:.2f} | `{toks}` |")
