"""Print a markdown table of kernel categories per layer and median TVs from a kernels.json.

Schema 2 (sink-aware): the categories describe the kernel without the first position; the "sink" column counts
the sink-dominated heads (held-out sink mass >= 0.5), which also appear in their kernel category.

Usage: python scripts/summarise_kernels.py OUT/kernels.json
"""

import json
import statistics as st
import sys
from collections import Counter

from attnscope.kernels.categories import CATEGORIES, CATEGORY_SHORT

d = json.load(open(sys.argv[1]))
short = [CATEGORY_SHORT[c] for c in CATEGORIES]
print(f"model {d['model']['name']}: n_ctx {d['settings']['n_ctx']}, {d['settings']['n_samples']} estimation + "
      f"{d['settings']['n_heldout']} held-out windows of {d['provenance']['source']} "
      f"(sha256 {d['provenance']['sha256'][:12]})\n")
print("| layer | " + " | ".join(short) + " | median TV decomposition | median TV kernel vs attention |")
print("|---" * (len(short) + 3) + "|")
allv, allk = [], []
for l in sorted({h["layer"] for h in d["heads"]}):
    hs = [h for h in d["heads"] if h["layer"] == l]
    c = Counter(h["category"] for h in hs)
    c["first-token sink"] = sum(h.get("sink_dominated", False) for h in hs) or ""  # schema 2: sink beside the category
    tv = st.median(h["tv_decomposition"]["median"] for h in hs)
    tk = st.median(h["tv_kernel_vs_attention"] for h in hs)
    allv += [h["tv_decomposition"]["median"] for h in hs]
    allk += [h["tv_kernel_vs_attention"] for h in hs]
    print(f"| {l} | " + " | ".join(str(c.get(k, "")) for k in CATEGORIES) + f" | {tv:.3f} | {tk:.3f} |")
tot = Counter(h["category"] for h in d["heads"])
tot["first-token sink"] = sum(h.get("sink_dominated", False) for h in d["heads"]) or ""
print("| all | " + " | ".join(str(tot.get(k, "")) for k in CATEGORIES)
      + f" | {st.median(allv):.3f} | {st.median(allk):.3f} |")
