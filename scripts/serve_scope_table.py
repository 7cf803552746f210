#!/usr/bin/env python
"""Does the page's "inside / outside the explanation's scope" verdict track how well the prediction does?

For every bundled text (its first ``--tokens`` tokens, in windows as the page analyses them) prints the
conditions `attnscope serve` measures, the verdict, and the fit of the page's prediction (the explanation
the server uses) to the true pre-activation at positions n >= min_position: median Pearson r over the
selected neurons, and beside it the same over as many random unselected neurons (the baseline).

    .venv/bin/python scripts/serve_scope_table.py [--model demo] [--tokens 1024] [--seed 0]
"""

from __future__ import annotations

import argparse
import statistics

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="demo")
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    from attnscope.models import load_model
    from attnscope.serve import load_serve_model
    from attnscope.serve.analysis import fit_stats
    from attnscope.texts import bundled_texts, open_source, tokenize

    w = load_model(a.model)
    m = load_serve_model(w, log=lambda *_: None)
    sel = [r.index for r in m.table if r.selected]
    rest = [r.index for r in m.table if not r.selected]
    g = torch.Generator().manual_seed(a.seed)
    rnd = [rest[i] for i in torch.randperm(len(rest), generator=g)[: len(sel)].tolist()]
    print(f"model {a.model}; explanation: {m.explanation.kind}; calibration {m.circ.settings['calibration']}; "
          f"{len(sel)} selected neurons vs {len(rnd)} random unselected (seed {a.seed})\n")
    names = [c for c in ("denominators", "sink", "clipped", "glitch", "norm CV", "norm ratio")]
    print("| text | tokens | " + " | ".join(names) + " | in scope | median r selected | median r random |")
    print("|---" * (len(names) + 5) + "|")
    means_true, means_pred = [], []
    for name in bundled_texts():
        ids = tokenize(open_source(f"bundled:{name}"), w.tokenizer)[: a.tokens]
        an = m.analyser.analyse(w.tokenizer.decode(ids))
        keep = ~an.early
        means_true.append(an.true[keep].mean(0))
        means_pred.append(an.pred[keep].mean(0))

        def med_r(ks):
            rs = [fit_stats(an.true[:, k], an.pred[:, k], keep)["r"] for k in ks]
            return statistics.median([r for r in rs if r is not None])

        cells = [f"{c.measured:.3f}{'' if c.ok else ' ✗'}" for c in an.conditions]
        print(f"| {name} | {len(an.tokens.strings)} | " + " | ".join(cells) +
              f" | {'yes' if an.in_scope else 'no'} | {med_r(sel):.3f} | {med_r(rnd):.3f} |")
    mt, mp = torch.stack(means_true).double(), torch.stack(means_pred).double()  # [texts, d_mlp]

    def between(ks):  # per neuron: Pearson r across texts of the per-text mean, true vs predicted
        return statistics.median(float(torch.corrcoef(torch.stack([mt[:, k], mp[:, k]]))[0, 1]) for k in ks)

    print(f"\nbetween texts (per-text mean pre-activation, true vs predicted, r across the {len(mt)} texts): "
          f"median over selected neurons {between(sel):.3f}, over random unselected neurons {between(rnd):.3f}")
    th = m.analyser.scope
    print(f"\nthresholds: denominator ratio within 1/{th.denominator_ratio_max:g}..{th.denominator_ratio_max:g}; "
          f"|sink - calibration| <= {th.sink_mass_delta_max:g}; clipped share <= max({th.clipped_share_max:g}, "
          f"{th.clipped_share_cal_factor:g} x calibration {m.analyser.cal.clipped_share:.3f}); glitch share <= "
          f"{th.masked_share_max:g}; norm CV <= {th.norm_cv_max:g}; norm ratio within 1/{th.norm_ratio_max:g}.."
          f"{th.norm_ratio_max:g} (✗ = fails)")


if __name__ == "__main__":
    main()
