"""Print a markdown summary of a neurons.json: heads, conditions, counts, r/FVU and the top neurons.

Usage: python scripts/summarise_neurons.py OUT/neurons.json [N_TOP]
"""

import json
import statistics as st
import sys

d = json.load(open(sys.argv[1]))
n_top = int(sys.argv[2]) if len(sys.argv) > 2 else 10
s, c = d["summary"], d["circuit"]
print(f"- contextual heads: {s['heads']} ({s['n_heads']} of {len(c['decisions'])})")
print(f"- neurons found: {s['n_neurons_found']} of {s['n_neurons_scored']}; verified {s['n_verified']}; "
      f"{s['n_not_fired_on_calibration']} never fired on the calibration text")
rs = [n["r_per_text_median"] for n in d["neurons"] if n["r_per_text_median"] == n["r_per_text_median"]]
print(f"- median r = {s['median_r']:.3f}, median FVU = {s['median_fvu']:.3f} (pooled over held-out texts); "
      f"median within-text r = {st.median(rs):.3f}")
f = d["circuit_fidelity"]
print(f"- linear summary vs the heads' true summed output: FVU {f['fvu']:.3f}, median per-dimension r "
      f"{f['median_r_per_dimension']:.3f} over {f['n_positions']} held-out positions")
print("- conditions: " + "; ".join(f"{x['name']} {x['measured']:.3f} ({'ok' if x['ok'] else 'FAILED'})"
                                     for x in c["conditions"]))
print()
print("| neuron | effect | r | FVU | label (+) | label (-) | fires most on | top positive tokens |")
print("|---|---|---|---|---|---|---|---|")
for n in d["neurons"][:n_top]:
    toks = " ".join(repr(t)[1:-1].replace("|", "\\|") for t, _ in n["top_positive_tokens"][:8])
    print(f"| {n['index']} | {n['effect']:.1f} | {n['r']:.2f} | {n['fvu']:.2f} | {n['label'] or ''} | "
          f"{n['label_negative'] or ''} | {n['positive_text']} | `{toks}` |")
