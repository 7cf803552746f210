"""Human-readable summaries that the CLI prints (rich tables, imported when printing: the CLI starts fast); the
JSON output is each result's ``to_json``."""

from __future__ import annotations

import json
from collections import Counter
from typing import TYPE_CHECKING

import typer

from attnscope.evolution.timeline import Timeline
from attnscope.kernels.categories import CATEGORIES, CATEGORY_SHORT
from attnscope.later.result import LaterResult
from attnscope.serve.contrast_scope import ContrastScope, in_flag

if TYPE_CHECKING:
    from attnscope.kernels.analysis import KernelResult
    from attnscope.neurons.contrast import ContrastResult
    from attnscope.neurons.find import NeuronResult


def print_table(d: dict, title: str) -> None:
    """A two-column table of ``d``'s keys and values."""
    from rich.console import Console
    from rich.table import Table

    t = Table(title=title, show_header=False)
    for k, v in d.items():
        t.add_row(str(k), str(v))
    Console().print(t)


def median_or_not_run(xs: list[float | None]) -> str:
    """Upper median of ``xs`` to three decimals, or "not run" when the validation produced no value."""
    vals = sorted(x for x in xs if x is not None)
    return f"{vals[len(vals) // 2]:.3f}" if vals else "not run"


def num(v: float | None) -> str:
    """Three decimals, or "n/a" for a missing (None or NaN) value."""
    return "n/a" if v is None or v != v else f"{v:.3f}"


def print_neuron_summary(res: NeuronResult) -> None:
    """The summary line (with each number's baseline), the circuit's conditions and the top cards."""
    from rich.console import Console
    from rich.table import Table

    s = res.summary()
    con = Console()
    con.print(f"contextual heads {s['heads']}; {s['n_neurons_found']} of {s['n_neurons_scored']} neurons pass the "
              f"measured threshold {s['threshold']:.3f} (reporting-half precision {num(s['precision'])}, all neurons "
              f"{num(s['precision_random'])}); {s['n_verified']} with an explanation card: median r = "
              f"{num(s['median_r'])}, median FVU = {num(s['median_fvu'])} (random neurons "
              f"{num(s['median_fvu_random'])}); circuit FVU = {res.fidelity['fvu']:.3f} on held-out text "
              f"({'query-conditioned' if res.circuit.query_conditioned else 'typical-query'} summary)")
    t = Table(title="conditions")
    for col in ("condition", "measured", "threshold", "ok"):
        t.add_column(col)
    for c in res.circuit.conditions:
        t.add_row(c.name, f"{c.measured:.3f}", f"{c.threshold:g}", "yes" if c.ok else "NO")
    con.print(t)
    t = Table(title="top neurons with an explanation card (predicted |d|: max over contrasts of the predicted "
                    "effect size)")
    for col in ("neuron", "predicted |d|", "r", "FVU", "label", "top tokens", "fired on cal."):
        t.add_column(col)
    for r in res.records[:15]:
        top = " ".join(repr(tok)[1:-1] for tok, _ in r.top_positive_tokens[:6])
        t.add_row(str(r.index), f"{r.sensitivity:.2f}", f"{r.r:.2f}", f"{r.fvu:.2f}", r.label or "", top,
                  "yes" if r.fired_on_calibration else "no")
    con.print(t)


def print_contrast(res: ContrastResult, top: int, scope: ContrastScope | None = None) -> None:
    """The ``top`` neurons each way of a two-source contrast, and its verification if one was run."""
    from rich.console import Console
    from rich.table import Table

    con = Console()
    sd = ("the predicted pooled sd, each side's from its own token counts" if res.settings.get("per_source_sd")
          else "calibration std")
    for sign, name in ((1, res.a), (-1, res.b)):
        t = Table(title=f"neurons higher on {name} (predicted d = predicted difference / {sd})")
        for col in ("neuron", "predicted d", "true d", "bag / direct / other heads", "token evidence"):
            t.add_column(col)
        for r in res.top(top, sign):
            ev = r.evidence_a if sign > 0 else r.evidence_b
            t.add_row(str(r.index), f"{r.predicted_d:+.2f}", "" if r.true_d is None else f"{r.true_d:+.2f}",
                      " / ".join(f"{r.parts[k]:+.2f}" for k in ("contextual bag", "direct", "other heads")),
                      " ".join(repr(tok)[1:-1] for tok, _ in ev[:6]))
        con.print(t)
    if res.verification:
        print_verification(res.verification)
    if scope is not None:
        print_scope(scope)


def print_scope(scope: ContrastScope) -> None:
    """Each scope condition with its measured value and threshold; the flag's verdict (serve.contrast_scope)."""
    print(("OUT OF SCOPE" if scope.out_of_scope else "in scope") + " (the flag's conditions: any failing one puts "
          "the input out of scope; the others are measured only)")
    for c in scope.conditions:
        status = ("ok" if c.ok else "FAILED") if in_flag(c) else ("measured: ok" if c.ok else "measured: outside")
        print(f"  {c.name}: {c.measured:.3g} (threshold {c.threshold:.3g}) {status}; {c.holds_when}")


def print_verification(v) -> None:
    """Every score of a verified contrast with its noise ceiling and baselines
    (:mod:`attnscope.neurons.verification`)."""
    from rich.console import Console
    from rich.table import Table

    f = lambda x: "-" if x is None else f"{x:.3f}"  # noqa: E731
    nc = v.noise_ceiling
    t = Table(title=f"verified on {v.n_windows_a} + {v.n_windows_b} windows ({v.n_positions_a} + {v.n_positions_b} "
                    f"positions; {v.windows}); {v.n_true} neurons with true |d| >= 1; noise ceiling (Spearman-Brown "
                    f"corrected split-half Spearman of the true d) "
                    + ("-" if nc is None else f"{nc.spearman_brown:.3f} (split half {nc.split_half:.3f})"))
    for col in ("predictor", "Spearman", "R-precision", "precision@10/20/50", "recall@10/20/50"):
        t.add_column(col)
    for s in (v.like_for_like, v.whole_source, v.token_mean, v.shuffled_null):
        t.add_row(s.predictor, f(s.spearman), f(s.r_precision), "/".join(f"{x:.2f}" for x in s.precision.values()),
                  "/".join(f"{x:.2f}" for x in s.recall.values()))
    Console().print(t)
    print("like for like: predicted from the verified windows' own token counts (the headline); whole source: "
          "predicted from all of each source's tokens (what contrast without --verify gives), same truth")
    print(f"token-mean predictor (circuit-free) fitted on: {', '.join(v.token_mean_fitted_on)}")


def print_kernel_summary(res: KernelResult) -> None:
    """Category counts, sink mass and the validations' TV per layer, with notes on what was not run."""
    from rich.console import Console
    from rich.table import Table


    t = Table(title="kernel categories per layer (first position excluded); sink = heads with sink mass >= 0.5, "
                    "then the median sink mass; median TV of the decomposition and of kernel vs attention")
    t.add_column("layer")
    for c in CATEGORIES:
        t.add_column(CATEGORY_SHORT[c], justify="right")
    t.add_column("sink mass", justify="right")
    t.add_column("TV dec", justify="right")
    t.add_column("TV kern", justify="right")
    for l in sorted({r.layer for r in res.records}):
        recs = [r for r in res.records if r.layer == l]
        cnt: dict[str, int | str] = dict(Counter(r.category for r in recs))
        cnt["first-token sink"] = sum(r.sink_dominated for r in recs) or ""
        sink = median_or_not_run([r.sink_mass for r in recs])
        tvd = median_or_not_run([None if r.tv_decomposition is None else r.tv_decomposition["median"] for r in recs])
        tvk = median_or_not_run([r.tv_kernel_vs_attention for r in recs])
        t.add_row(str(l), *[str(cnt.get(c, "")) for c in CATEGORIES], sink, tvd, tvk)
    Console().print(t)
    if res.records and res.records[0].tv_kernel_vs_attention is None:
        print("note: no held-out windows (n_heldout=0): the decomposition and kernel-vs-attention checks were not run")
    if res.provenance.get("windows_overlap"):
        print("note: the samples were too short for disjoint windows; held-out windows overlap estimation text")


def print_timeline(tl: Timeline) -> None:
    """The formation timeline of `attnscope evolution`, one line per head and context."""
    for h, v in tl.layer0_heads.items():
        print(f"layer-0 head {h}: uniform at {v.first_uniform_step}, leaves uniform at "
              f"{v.leaves_uniform_step}, final {v.final_category}")
    print(f"all circuit conditions first pass at step {tl.all_conditions_first_pass}, hold from "
          f"{tl.all_conditions_hold_from}; never passing: {', '.join(tl.never_passing_conditions) or 'none'}")
    for name, ct in tl.context_neurons.items():
        print(f"{name}: true neuron from step {ct.first_true_step}, reported by the method from step "
              f"{ct.first_found_step}")


def print_later_summary(res: LaterResult) -> None:
    from rich.console import Console
    from rich.table import Table


    con = Console()
    t = Table(title=f"layers <= {res.layer}: effective embeddings and contextual heads")
    for col in ("layer", "approx. FVU (token+pos)", "unseen share", "contextual heads", "circuit FVU eff./true",
                "||G_l||", "limiting condition"):
        t.add_column(col)
    for p in res.circuit.pieces:
        f = p.circuit_fvu_effective
        t.add_row(str(p.layer), f"{p.approximation.fvu:.3f}", f"{p.approximation.unseen_share:.3f}", str(p.heads),
                  "-" if f is None else f"{f:.3f} / {num(p.circuit_fvu_true)}",
                  "-" if p.propagation_norm is None else f"{p.propagation_norm:.2f}", p.limiting_condition[:70])
    con.print(t)
    a = res.circuit.approximation_with_earlier_terms
    spearman = ", ".join(f"{p} {num(res.median_spearman(p))}" for p in res.scores)
    con.print(f"residual entering layer {res.layer}: FVU {a.fvu:.3f} with the earlier heads' terms; median "
              "Spearman vs the true per-context effects: " + spearman)
    v = res.verification
    con.print(f"{v.n_passed} neurons pass (precision {num(v.precision)}, all neurons {v.precision_random:.3f})")
    t = Table(title="top neurons")
    for col in ("neuron", "sensitivity", "r", "FVU", "label", "top tokens", "true d (best context)"):
        t.add_column(col)
    for c in res.cards[:15]:
        t.add_row(str(c.index), f"{c.sensitivity:.2f}", f"{c.r:.2f}", f"{c.fvu:.2f}", c.label or "",
                  " ".join(repr(tok)[1:-1] for tok, _ in c.top_positive_tokens[:6]),
                  f"{c.positive_text} {c.true_d[c.positive_text]:+.2f}")
    con.print(t)


def emit(obj, as_json: bool, human) -> None:
    """``obj`` as JSON on stdout, or through ``human`` (a table printer)."""
    if as_json:
        typer.echo(json.dumps(obj, indent=2, default=str))
    else:
        human(obj)
