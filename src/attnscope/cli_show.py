"""Human-readable summaries that the CLI prints (rich tables, imported when printing: the CLI starts fast); the
JSON output is each result's ``to_json``."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .contrast import ContrastResult
    from .neurons import NeuronResult


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
              f"{num(s['median_fvu_random'])}); circuit FVU = {res.fidelity['fvu']:.3f}")
    t = Table(title="conditions")
    for c in ("condition", "measured", "threshold", "ok"):
        t.add_column(c)
    for c in res.circuit["conditions"]:
        t.add_row(c["name"], f"{c['measured']:.3f}", f"{c['threshold']:g}", "yes" if c["ok"] else "NO")
    con.print(t)
    t = Table(title="top neurons with an explanation card (predicted |d|: max over contrasts of the predicted "
                    "effect size)")
    for c in ("neuron", "predicted |d|", "r", "FVU", "label", "top tokens", "fired on cal."):
        t.add_column(c)
    for r in res.records[:15]:
        t.add_row(str(r.index), f"{r.sensitivity:.2f}", f"{r.r:.2f}", f"{r.fvu:.2f}", r.label or "",
                  " ".join(repr(tok)[1:-1] for tok, _ in r.top_positive_tokens[:6]), "yes" if r.fired_on_calibration else "no")
    con.print(t)


def print_contrast(res: ContrastResult, top: int) -> None:
    """The ``top`` neurons each way of a two-source contrast, and its verification if one was run."""
    from rich.console import Console
    from rich.table import Table

    con = Console()
    for sign, name in ((1, res.a), (-1, res.b)):
        t = Table(title=f"neurons higher on {name} (predicted d = predicted difference / calibration std)")
        for col in ("neuron", "predicted d", "true d", "bag / direct / other heads", "token evidence"):
            t.add_column(col)
        for r in res.top(top, sign):
            ev = r.evidence_a if sign > 0 else r.evidence_b
            t.add_row(str(r.index), f"{r.predicted_d:+.2f}", "" if r.true_d is None else f"{r.true_d:+.2f}",
                      " / ".join(f"{r.parts[k]:+.2f}" for k in ("contextual bag", "direct", "other heads")),
                      " ".join(repr(tok)[1:-1] for tok, _ in ev[:6]))
        con.print(t)
    if res.verification:
        v = res.verification
        con.print(f"verified on {v.n_positions_a} + {v.n_positions_b} positions: Spearman {v.scores['spearman']:.3f} "
                  f"(token-shuffled null {v.null_scores['spearman']:.3f}); precision@10/20/50 "
                  + "/".join(f"{x:.2f}" for x in v.scores["precision"].values()) + "; recall@10/20/50 "
                  + "/".join(f"{x:.2f}" for x in v.scores["recall"].values()) + f"; {v.n_true} neurons with |d| >= 1")
