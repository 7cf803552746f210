"""Figures and the HTML page of ``attnscope evolution`` (typed :class:`~attnscope.evolution.run.EvolutionResult` in)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.artist import Artist  # noqa: E402

from attnscope.evolution.run import CRITERIA, D_MIN, TRACKED_CONTEXTS, EvolutionResult  # noqa: E402
from attnscope.kernels.categories import CAT_COLORS, CATEGORIES  # noqa: E402
from attnscope.report.html import badge_html, data_table, data_uri
from attnscope.report.html import esc as html_esc
from attnscope.report.write import asset


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def _x(res: EvolutionResult) -> tuple[np.ndarray, str]:
    steps = [c.step for c in res.checkpoints]
    if all(s is not None for s in steps):
        return np.array(steps, dtype=float), "training step"
    return np.arange(len(steps), dtype=float), "checkpoint"


def neff_over_steps(res: EvolutionResult, out: Path) -> Path:
    """N_eff (log) of every head over steps, one panel per layer, coloured by the final category; and the
    held-out loss where the checkpoints record it."""
    x, xl = _x(res)
    layers = sorted({h.layer for h in res.checkpoints[0].heads})
    cols = min(4, len(layers)) + 1
    fig, axes = plt.subplots(1, cols, figsize=(3.4 * cols, 3.0), squeeze=False)
    top = max(h.n_eff for c in res.checkpoints for h in c.heads)
    for ax, l in zip(axes[0], layers):
        heads = sorted({h.head for h in res.checkpoints[0].heads if h.layer == l})
        for h in heads:
            pts = [next(p for p in c.heads if p.layer == l and p.head == h) for c in res.checkpoints]
            ax.plot(x, [p.n_eff for p in pts], "-o", ms=2.5, lw=1, color=CAT_COLORS[pts[-1].category])
        ax.set_yscale("log")
        ax.set_ylim(0.8, 1.3 * top)
        ax.set_title(f"layer {l}")
        ax.set_xlabel(xl)
    axes[0, 0].set_ylabel("N_eff at the reference query")
    loss = [c.heldout_loss for c in res.checkpoints]
    ax = axes[0, -1]
    if any(v is not None for v in loss):
        ax.plot(x, [np.nan if v is None else v for v in loss], "-o", ms=3, color="k")
    ax.set_title("held-out loss (nats/token)")
    ax.set_xlabel(xl)
    handles = [plt.Line2D([], [], color=CAT_COLORS[k], label=k) for k in CATEGORIES]
    fig.legend(handles=handles, loc="upper center", ncol=4, fontsize=8, bbox_to_anchor=(0.5, 0.0),
               title="colour: category at the last checkpoint", title_fontsize=8)
    fig.tight_layout()
    return _save(fig, out)


def categories_over_steps(res: EvolutionResult, out: Path) -> Path:
    """The category of every head (rows) at every checkpoint (columns); contextual heads marked."""
    cks = res.checkpoints
    rows = sorted({(h.layer, h.head) for h in cks[0].heads})
    idx = {c: i for i, c in enumerate(CATEGORIES)}
    M = np.array([[idx[next(p.category for p in c.heads if (p.layer, p.head) == r)] for c in cks] for r in rows])
    cmap = matplotlib.colors.ListedColormap([CAT_COLORS[c] for c in CATEGORIES])
    fig, ax = plt.subplots(figsize=(0.5 * len(cks) + 3, 0.2 * len(rows) + 1.6))
    ax.imshow(M, aspect="auto", cmap=cmap, vmin=-0.5, vmax=len(CATEGORIES) - 0.5, interpolation="nearest")
    for j, c in enumerate(cks):
        for h in c.contextual_heads:
            ax.plot(j, rows.index((0, h)), marker="o", ms=3, color="k")
    ax.set_yticks(range(len(rows)), [f"{l}.{h}" for l, h in rows], fontsize=7)
    ax.set_xticks(range(len(cks)), [str(c.step) for c in cks], rotation=90, fontsize=7)
    ax.set_xlabel("training step")
    ax.set_ylabel("layer.head")
    handles: list[Artist] = [matplotlib.patches.Patch(color=CAT_COLORS[k], label=k) for k in CATEGORIES]
    handles.append(plt.Line2D([], [], marker="o", ls="", color="k", ms=3, label="contextual head (layer 0)"))
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=7)
    ax.set_title("kernel category of every head over training")
    return _save(fig, out)


def neuron_persistence(res: EvolutionResult, out: Path) -> Path:
    """Left: the method's rank of every neuron that was ever in a checkpoint's top list (rows) over steps.
    Right: the tracked context neurons' ground-truth effect size d over steps."""
    cks = res.checkpoints
    ever = sorted({n.index for c in cks for n in c.top_neurons}, key=lambda k: min(
        (n.rank for c in cks for n in c.top_neurons if n.index == k)))
    top_k = max((len(c.top_neurons) for c in cks), default=1)
    M = np.full((len(ever), len(cks)), np.nan)
    for j, c in enumerate(cks):
        for n in c.top_neurons:
            M[ever.index(n.index), j] = n.rank
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(0.45 * len(cks) + 9, max(3.0, 0.14 * len(ever) + 1.5)),
                                 gridspec_kw={"width_ratios": [1.2, 1]})
    im = a1.imshow(M, aspect="auto", cmap="viridis_r", vmin=1, vmax=top_k, interpolation="nearest")
    a1.set_yticks(range(len(ever)), [str(k) for k in ever], fontsize=6)
    a1.set_xticks(range(len(cks)), [str(c.step) for c in cks], rotation=90, fontsize=7)
    a1.set_xlabel("training step")
    a1.set_ylabel("neuron (layer-0 MLP)")
    fig.colorbar(im, ax=a1).set_label(f"rank in the method's ranking (blank: not in the top {top_k})")
    a1.set_title("top neurons: persist / appear / disappear")
    x, xl = _x(res)
    for name in TRACKED_CONTEXTS:
        d = (res.timeline.context_neurons[name].d if name in res.timeline.context_neurons else [])
        if d:
            a2.plot(x, [np.nan if v is None else v for v in d], "-o", ms=3, label=name)
    a2.axhline(D_MIN, color="grey", lw=0.8, ls="--")
    a2.set_xlabel(xl)
    a2.set_ylabel("largest one-vs-rest effect size d")
    a2.legend(fontsize=8)
    a2.set_title("context neurons (ground truth)")
    fig.tight_layout()
    return _save(fig, out)


def evolution_figures(res: EvolutionResult, out_dir: str | Path) -> dict[str, Path]:
    out = Path(out_dir)
    return {"neff": neff_over_steps(res, out / "evolution_neff.png"),
            "categories": categories_over_steps(res, out / "evolution_categories.png"),
            "neurons": neuron_persistence(res, out / "evolution_neurons.png")}


# --------------------------------------------------------------------------------------------------
# HTML page (the report's stylesheet and helpers)
# --------------------------------------------------------------------------------------------------


def _report_css() -> str:
    return asset("report.css")


def esc(x) -> str:
    """:func:`attnscope.report.html.esc`, with an empty cell for a missing value."""
    return html_esc("" if x is None else x)


def _number(v, nd: int = 3) -> str:
    if v is None:
        return "–"
    return f"{v:.{nd}f}" if isinstance(v, float) else esc(v)


def _mark(ok: bool | None) -> str:
    return badge_html(ok, "pass", "fail", "–")


def _img(path: Path, caption: str) -> str:
    return (f'<figure class="fig wide"><img alt="{esc(Path(path).stem)}" src="{data_uri(path)}">'
            f"<figcaption>{esc(caption)}</figcaption></figure>")


def _never(v):
    return "never" if v is None else v


def _timeline_section(res: EvolutionResult) -> str:
    tl = res.timeline
    heads = [[esc(h), esc(v.first_uniform_step), esc(v.leaves_uniform_step if v.leaves_uniform_step
                                                            is not None else "stays uniform"), esc(v.final_category)]
             for h, v in tl.layer0_heads.items()]
    conds = [[esc(n), esc(_never(s)), esc(_never(tl.conditions_hold_from[n]))]
             for n, s in tl.conditions_first_pass.items()]
    conds.append(["<b>all conditions</b>", esc(_never(tl.all_conditions_first_pass)),
                  esc(_never(tl.all_conditions_hold_from))])
    ctx = []
    for name, v in tl.context_neurons.items():
        ctx.append([esc(name), esc(_never(v.first_true_step)), esc(_never(v.first_found_step)),
                    " ".join(f"{s}:{'n' if k is None else k}/{'–' if r is None else r}"
                             for s, k, r in zip(tl.steps, v.index, v.rank))])
    return ("<section id='timeline'><h2>Formation timeline</h2>"
            "<h3>Layer-0 heads: when each leaves the uniform category</h3>"
            + data_table(["head", "uniform at step", "leaves uniform at step", "final category"], heads)
            + "<h3>Conditions of the contextual circuit over training</h3>"
            + data_table(["condition", "first passes at step", "holds from step to the last checkpoint"], conds)
            + f"<h3>Context neurons (ground truth: one-vs-rest effect size d ≥ {D_MIN:g})</h3>"
            + data_table(["context", "a true neuron exists from step", "the method reports it from step",
                      "step: neuron / its rank in the method's ranking"], ctx) + "</section>")


def _checkpoint_section(res: EvolutionResult) -> str:
    rows = []
    for c in res.checkpoints:
        ok = sum(x.ok for x in c.conditions)
        rows.append([esc(c.step), esc(c.tokens_seen), _number(c.heldout_loss), esc(c.contextual_heads or "none"),
                     f"{ok}/{len(c.conditions)}" if c.conditions else "no circuit", esc(c.n_neurons_selected),
                     _number(c.seconds, 1), f"<code>{esc(c.spec)}</code>"])
    crit = []
    for c in res.checkpoints:
        for h in c.head_criteria:
            crit.append([esc(c.step), esc(h.head), _mark(h.chosen)]
                        + [f"{_mark(h.criteria.get(k))} {_number(h.measured.get(k), 3)}" for k in CRITERIA])
    notes = sorted({n for c in res.checkpoints for n in c.notes} | {c.circuit_error for c in res.checkpoints
                                                                     if c.circuit_error})
    note_html = "".join(f'<p class="note">{esc(n)}</p>' for n in notes)
    return ("<section id='checkpoints'><h2>Checkpoints</h2>" + note_html
            + data_table(["step", "tokens seen", "held-out loss", "contextual heads", "conditions passing",
                      "neurons reported", "analysis s", "checkpoint"], rows)
            + "<details><summary>Every layer-0 head's detection criteria at every step</summary>"
            + data_table(["step", "head", "chosen"] + list(CRITERIA), crit) + "</details></section>")


def _persistence_section(res: EvolutionResult) -> str:
    rows = [[f"{esc(p.from_step)} → {esc(p.to_step)}", esc(len(p.kept)), esc(p.appeared),
             esc(p.disappeared), _number(p.token_overlap_kept, 2),
             esc(", ".join(f"{m.appeared}≈{m.disappeared}" for m in p.matched_by_tokens) or "–")]
            for p in res.timeline.neuron_persistence]
    return ("<section id='persistence'><h2>Top neurons between checkpoints</h2>"
            + data_table(["steps", "kept (same index)", "appeared", "disappeared", "top-token overlap of kept",
                      "appeared ≈ disappeared (same top tokens)"], rows)
            + "</section>")


def write_evolution_page(res: EvolutionResult, out_dir: str | Path, figures: dict[str, Path],
                         command: str = "") -> Path:
    """One self-contained ``out_dir/evolution.html`` in the report's style."""
    out = Path(out_dir)
    caps = {"neff": "N_eff of every head over training (log scale), coloured by its final category; "
                    "right: held-out loss.",
            "categories": "Kernel category of every head (rows) at every checkpoint (columns); "
                          "dots: layer-0 contextual heads.",
            "neurons": "Left: rank of each top neuron in the method's ranking (predicted sensitivity) over training "
                       "(blank: outside the top list). "
                       "Right: the largest ground-truth one-vs-rest effect size per tracked context."}
    figs = "".join(_img(p, caps.get(k, k)) for k, p in figures.items())
    meta = ('<p class="meta">how positional kernels, contextual heads and context neurons form over training · '
            f"<code>{esc(command)}</code></p>")
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>attnscope evolution</title><link rel="icon" href="data:,"><style>{_report_css()}</style></head>
<body><header><h1>attnscope evolution: {len(res.checkpoints)} checkpoints</h1>
{meta}</header>
<main>{_timeline_section(res)}<section id="figures"><h2>Figures</h2><div class="figs">{figs}</div></section>
{_checkpoint_section(res)}{_persistence_section(res)}</main>
<footer>Written by attnscope. Self-contained: figures and data are embedded.</footer></body></html>
"""
    path = out / "evolution.html"
    path.write_text(page, encoding="utf-8", errors="backslashreplace")  # a file name that is not UTF-8
    return path
