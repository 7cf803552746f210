#!/usr/bin/env python
"""Does the page's "inside / outside the explanation's scope" verdict track how well the prediction does?

For every bundled text (its first ``--tokens`` tokens, in windows as the page analyses them) prints the
conditions `attnscope serve` measures, the verdict, and the within-text fit of the page's prediction to the
true pre-activation at positions n >= min_position: median Pearson r over the 12 top-ranked neurons, beside
it the bag + constant (the baseline the full explanation replaced) for the same neurons, and the page's
prediction for 12 random neurons ranked below them.

    .venv/bin/python studies/serve_scope_table.py [--model demo] [--tokens 1024] [--seed 0] [--top 12]
"""

from __future__ import annotations

import argparse
import statistics

import torch


def _median_r(an, pred, ks: list[int]) -> float:
    from attnscope.serve.analysis import fit_stats

    rs = [fit_stats(an.true[:, k], pred[:, k], ~an.early)["r"] for k in ks]
    return statistics.median([r for r in rs if r is not None])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="demo")
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--top", type=int, default=12)
    a = ap.parse_args()
    from attnscope.core.texts import bundled_texts, open_source, tokenize
    from attnscope.models import load_model
    from attnscope.serve import load_serve_model
    from attnscope.serve.analysis import plan_windows
    from attnscope.serve.explanation import BagExplanation

    w = load_model(a.model)
    m = load_serve_model(w, log=lambda *_: None)
    bag = BagExplanation(w, m.circ)
    top = [r.index for r in m.table[: a.top]]
    rest = [r.index for r in m.table[a.top :]]
    g = torch.Generator().manual_seed(a.seed)
    rnd = [rest[i] for i in torch.randperm(len(rest), generator=g)[: a.top].tolist()]
    print(f"model {a.model}; the page's prediction: {m.explanation.kind}; calibration {m.circ.settings.calibration}; "
          f"{a.top} top-ranked neurons vs {a.top} random lower-ranked (seed {a.seed})\n")
    names = ["denominators", "sink", "clipped", "glitch", "norm CV", "norm ratio"]
    print("| text | tokens | " + " | ".join(names)
          + " | in scope | median r, top | bag + constant, top | median r, random |")
    print("|---" * (len(names) + 6) + "|")
    for name in bundled_texts():
        ids = tokenize(open_source(f"bundled:{name}"), w.tokenizer)[: a.tokens]
        an = m.analyser.analyse(w.tokenizer.decode(ids))
        bag_pred = torch.empty_like(an.pred)
        windows = plan_windows(len(an.tokens.strings), m.analyser.capacity,
                               min(m.analyser.n_min, m.analyser.capacity // 2))
        for win in windows:
            wt = m.analyser.window_tokens(an.tokens.ids, win)
            off = win.report_from - win.start + (1 if m.analyser.bos is not None else 0)
            bag_pred[win.report_from : win.stop] = bag.predict(wt)[off:]
        cells = [f"{c.measured:.3f}{'' if c.ok else ' ✗'}" for c in an.conditions]
        print(f"| {name} | {len(an.tokens.strings)} | " + " | ".join(cells) + f" | {'yes' if an.in_scope else 'no'} | "
              f"{_median_r(an, an.pred, top):.3f} | {_median_r(an, bag_pred, top):.3f} | "
              f"{_median_r(an, an.pred, rnd):.3f} |")
    th = m.analyser.scope
    (zl, zh), (nl, nh) = th.denominator_ratio_range, th.norm_ratio_range
    print(f"\nthresholds: denominator ratio within {zl:g}..{zh:g}; |sink - calibration| <= {th.sink_mass_delta_max:g}; "
          f"clipped share <= max({th.clipped_share_max:g}, {th.clipped_share_cal_factor:g} x calibration "
          f"{m.analyser.cal.clipped_share:.3f}); glitch share <= {th.masked_share_max:g}; "
          f"norm CV <= {th.norm_cv_max:g}; norm ratio within {nl:g}..{nh:g} (✗ = fails)")


if __name__ == "__main__":
    main()
