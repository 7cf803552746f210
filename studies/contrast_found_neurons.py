"""The found neurons of a `neurons` run in a verified `contrast` run: each neuron's predicted and true effect size
d between the two sources, and the contrast's ranking scores with the token-shuffled null beside them.

    python studies/contrast_found_neurons.py OUT/neurons.json CONTRAST/contrast.json [N]
"""

from __future__ import annotations

import json
import statistics
import sys

nj, cj = json.load(open(sys.argv[1])), json.load(open(sys.argv[2]))
n = int(sys.argv[3]) if len(sys.argv) > 3 else 10
found = [r["index"] for r in nj["neurons"] if r["passed"]]
rec = {r["index"]: r for r in cj["neurons"]}
v = cj["verification"]
nc = v["noise_ceiling"]
print(f"{cj['a']} vs {cj['b']}: {len(found)} found neurons; Spearman(predicted d, true d) over all neurons, like for "
      f"like {v['like_for_like']['spearman']:.3f} (whole source {v['whole_source']['spearman']:.3f}; noise ceiling "
      f"{'-' if nc is None else format(nc['spearman_brown'], '.3f')}; token-mean {v['token_mean']['spearman']:.3f}; "
      f"token-shuffled null {v['shuffled_null']['spearman']:.3f}); precision@10/20/50 "
      + "/".join(f"{x:.2f}" for x in v["like_for_like"]["precision"].values())
      + f"; {v['n_true']} neurons with |d| >= 1")
d = [rec[k]["true_d"] for k in found]
agree = sum(1 for k in found if rec[k]["true_d"] * rec[k]["predicted_d"] > 0 and abs(rec[k]["true_d"]) >= 1)
print(f"found neurons: median |true d| {statistics.median(abs(x) for x in d):.2f}; {agree} of {len(found)} with "
      f"|true d| >= 1 and the predicted sign; all neurons' median |true d| "
      f"{statistics.median(abs(r['true_d']) for r in cj['neurons']):.2f}")
print("| neuron | predicted d | true d |")
print("|---|---|---|")
for k in found[:n]:
    print(f"| {k} | {rec[k]['predicted_d']:+.2f} | {rec[k]['true_d']:+.2f} |")
