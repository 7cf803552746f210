"""Figures (matplotlib, Agg backend).  Each function takes a result object and returns the saved path."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from attnscope.circuit.result import Circuit  # noqa: E402
from attnscope.exact.sinks import SINK_SHOW  # noqa: E402
from attnscope.kernels import analysis as K  # noqa: E402
from attnscope.kernels.categories import CAT_COLORS, LOCAL_NEFF, SINK_MASS, thresholds  # noqa: E402
from attnscope.neurons.find import NeuronResult  # noqa: E402


def _save(fig, path: Path, tight: bool = True) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight" if tight else None)  # "tight" draws the figure twice
    plt.close(fig)
    return path


def _grid(res: K.KernelResult):
    layers = sorted({r.layer for r in res.records})
    heads = sorted({r.head for r in res.records})
    return layers, heads


_SUPERSCRIPT = str.maketrans("-0123456789", "\u207b\u2070\u00b9\u00b2\u00b3\u2074\u2075\u2076\u2077\u2078\u2079")


def _decade(v: float, _pos=None) -> str:
    """Tick label ``10^k`` of a log10 coordinate, in plain text (mathtext layout is slow)."""
    return "10" + str(int(round(v))).translate(_SUPERSCRIPT)


def _fixed_layout(fig, rows: int, cols: int) -> float:
    """Margins in inches for a grid of panels with titles, x labels and shared y tick labels, plus a band of
    0.5 in for the suptitle and 0.6 in for a legend below.  Replaces tight_layout + bbox_inches="tight",
    which lay out and draw the figure two extra times.  Returns the new figure height in inches."""
    W, H = fig.get_figwidth(), fig.get_figheight() + 1.1
    fig.set_figheight(H)
    left, right, top, bottom, gap_w, gap_h = 0.8, 0.15, 0.85, 1.15, 0.2, 0.9
    a_w = (W - left - right - (cols - 1) * gap_w) / cols
    a_h = (H - top - bottom - (rows - 1) * gap_h) / rows
    fig.subplots_adjust(left=left / W, right=1 - right / W, top=1 - top / H, bottom=bottom / H,
                        wspace=gap_w / a_w, hspace=gap_h / a_h)
    return H


def kernel_curves(res: K.KernelResult, out: Path, max_layers: int = 12) -> Path:
    """Offset kernel kappa(d) = K_nref(nref - d) of every head, one panel per layer, log-log axes.

    Drawn in log10 coordinates on linear axes with fixed decade ticks, one line collection per panel and a
    fixed layout: the same picture as matplotlib's log scales, without their per-tick layout cost and the
    extra draws of tight_layout / bbox_inches="tight" (12 x 12 heads at n_ctx 1024: 12.3 s -> 1.3 s of CPU)."""
    from matplotlib.collections import LineCollection
    from matplotlib.ticker import FixedLocator, NullLocator

    layers, heads = _grid(res)
    layers = layers[:max_layers]
    cols = min(4, len(layers))
    rows = int(np.ceil(len(layers) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3 * rows), squeeze=False, sharey=True)
    ok = res.arrays["offset_kernel"].float().numpy()
    all_layers = res.arrays["layers"].tolist()
    ymin = -5.0
    x = np.log10(np.arange(1, ok.shape[-1] + 1))
    for ax, l in zip(axes.flat, layers):
        j = all_layers.index(l)
        ys = np.log10(np.maximum(ok[j, heads], 1e-8))  # [heads, offsets]
        segs = np.stack([np.broadcast_to(x, ys.shape), ys], -1)
        # matplotlib's stubs declare a sequence of segments; a [n_segments, n_points, 2] array is what its
        # documentation also accepts (and what it converts a sequence to)
        colors = [CAT_COLORS[res.record(l, h).category] for h in heads]
        ax.add_collection(LineCollection(segs, colors=colors, linewidths=1, alpha=0.85))  # type: ignore[arg-type]
        ax.set_title(f"layer {l}")
        ax.set_xlabel("|n - i| + 1")
    xmax = max(float(x[-1]), 1.0)
    for ax in axes.flat:
        ax.set_xlim(-0.05 * xmax, 1.05 * xmax)
        ax.set_ylim(ymin, np.log10(1.1))
        # matplotlib's stubs declare Sequence[float]; FixedLocator takes any array (it calls np.asarray)
        ax.xaxis.set_major_locator(FixedLocator(np.arange(0, int(np.floor(xmax)) + 1)))  # type: ignore[arg-type]
        ax.yaxis.set_major_locator(FixedLocator(np.arange(ymin, 1)))  # type: ignore[arg-type]
        ax.xaxis.set_minor_locator(NullLocator())
        ax.yaxis.set_minor_locator(NullLocator())
        ax.xaxis.set_major_formatter(_decade)
        ax.yaxis.set_major_formatter(_decade)
    for ax in axes.flat[len(layers):]:
        ax.axis("off")
    axes[0, 0].set_ylabel("kernel mass")
    H_in = _fixed_layout(fig, rows, cols)
    handles = [plt.Line2D([], [], color=c, label=k) for k, c in CAT_COLORS.items()]
    fig.legend(handles=handles, loc="lower center", ncol=4, fontsize=8, bbox_to_anchor=(0.5, 0.0))
    fig.suptitle(f"positional kernels at query n = {res.query_positions[-1]} (data estimate)", y=1 - 0.1 / H_in)
    return _save(fig, out, tight=False)


def neff_heatmap(res: K.KernelResult, out: Path) -> Path:
    """Heat map of log10 N_eff over layers x heads."""
    layers, heads = _grid(res)
    M = np.array([[res.record(l, h).n_eff for h in heads] for l in layers])
    fig, ax = plt.subplots(figsize=(0.45 * len(heads) + 2, 0.3 * len(layers) + 1.5))
    im = ax.imshow(np.log10(M), aspect="auto", cmap="viridis")
    ax.set_xticks(range(len(heads)), heads)
    ax.set_yticks(range(len(layers)), layers)
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    cb = fig.colorbar(im, ax=ax)
    cb.set_label("log10 N_eff = log10(1 / sum K^2)")
    cb.ax.axhline(np.log10(LOCAL_NEFF), color="w", lw=1)
    ax.set_title(f"effective kernel width (local if N_eff <= {LOCAL_NEFF:g})")
    return _save(fig, out)


def category_map(res: K.KernelResult, out: Path) -> Path:
    """Category of every head, with the thresholds printed under the map."""
    layers, heads = _grid(res)
    cats = list(CAT_COLORS)
    M = np.array([[cats.index(res.record(l, h).category) for h in heads] for l in layers])
    from matplotlib.colors import ListedColormap

    fig, ax = plt.subplots(figsize=(0.45 * len(heads) + 3, 0.3 * len(layers) + 2))
    ax.imshow(M, aspect="auto", cmap=ListedColormap(list(CAT_COLORS.values())), vmin=-0.5, vmax=len(cats) - 0.5)
    ax.set_xticks(range(len(heads)), heads)
    ax.set_yticks(range(len(layers)), layers)
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    handles = [plt.Rectangle((0, 0), 1, 1, color=c, label=k) for k, c in CAT_COLORS.items() if k != "first-token sink"]
    handles.append(plt.Rectangle((0, 0), 1, 1, fill=False, hatch="///", label=f"sink mass >= {SINK_MASS}"))
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.02, 1), fontsize=8)
    _sink_marks(ax, res, layers, heads)
    t = thresholds()
    ax.set_title(f"kernel categories (the sink split off; number: sink mass >= {SINK_SHOW})")
    fig.text(0.01, -0.1, f"sink mass: median held-out attention on the first position (BOS/[CLS]); the category "
             f"describes the kernel over the other positions.\ncurrent/previous: K(n)/K(n-1)>={t['self_mass']}; "
             f"local: N_eff<={t['local_n_eff']:g} and median offset<={t['local_median_offset']}; "
             f"uniform: N_eff>={t['uniform_n_eff_fraction']}*(n+1); slow: median offset<="
             f"{t['slow_median_offset_fraction']}*(n+1)", fontsize=7)
    return _save(fig, out)


def _sink_marks(ax, res: K.KernelResult, layers: list[int], heads: list[int]) -> list[tuple[int, int, str, bool]]:
    """Each head's sink mass written in its cell when >= SINK_SHOW, the cell hatched when sink-dominated.
    Returns the marks ``(layer, head, text, hatched)``."""
    marks = []
    for y, l in enumerate(layers):
        for x, h in enumerate(heads):
            m = res.record(l, h).sink_mass
            if m is None or m < SINK_SHOW:
                continue
            marks.append((l, h, f"{m:.2f}", m >= SINK_MASS))
            ax.text(x, y, marks[-1][2], ha="center", va="center", fontsize=6, color="k", zorder=3,
                    bbox={"facecolor": "white", "alpha": 0.8, "lw": 0, "pad": 0.6})
            if m >= SINK_MASS:
                ax.add_patch(plt.Rectangle((x - 0.5, y - 0.5), 1, 1, fill=False, hatch="///", lw=0))
    return marks


def tv_per_head(res: K.KernelResult, out: Path) -> Path:
    """Per head: TV of the content/position decomposition (median, p90 bar) and TV kernel vs attention."""
    recs = sorted(res.records, key=lambda r: (r.layer, r.head))
    x = np.arange(len(recs))
    nan = {"median": np.nan, "p90": np.nan}  # validation not run (no held-out windows): nothing drawn
    med = np.array([(r.tv_decomposition or nan)["median"] for r in recs], dtype=float)
    p90 = np.array([(r.tv_decomposition or nan)["p90"] for r in recs], dtype=float)
    kv = np.array([np.nan if r.tv_kernel_vs_attention is None else r.tv_kernel_vs_attention for r in recs])
    fig, ax = plt.subplots(figsize=(max(6, 0.12 * len(recs) + 2), 3.5))
    if np.isnan(med).all() and np.isnan(kv).all():
        ax.text(0.5, 0.5, "not run: no held-out windows (n_heldout=0)", ha="center", va="center",
                transform=ax.transAxes)
    ax.vlines(x, med, p90, color="#1f77b4", alpha=0.4, lw=2)
    ax.plot(x, med, "o", ms=3, color="#1f77b4", label="decomposition TV (median, bar to p90)")
    ax.plot(x, kv, "s", ms=3, color="#d62728", label="TV(kernel, mean held-out attention)")
    ax.axhline(0.05, color="k", ls=":", lw=1, label="0.05 (the method's GPT-2 value)")
    layers = sorted({r.layer for r in recs})
    starts = [next(i for i, r in enumerate(recs) if r.layer == l) for l in layers]
    ax.set_xticks(starts, [f"L{l}" for l in layers])
    ax.set_ylim(0, 1)
    ax.set_ylabel("total variation distance")
    ax.legend(fontsize=7, loc="upper left")
    ax.set_title("how well content + position explains each head")
    return _save(fig, out)


def kernel_figures(res: K.KernelResult, out_dir: str | Path) -> dict[str, Path]:
    out_dir = Path(out_dir)
    return {
        "kernel_curves": kernel_curves(res, out_dir / "kernel_curves.png"),
        "n_eff_heatmap": neff_heatmap(res, out_dir / "n_eff_heatmap.png"),
        "categories": category_map(res, out_dir / "categories.png"),
        "tv_per_head": tv_per_head(res, out_dir / "tv_per_head.png"),
    }


# --------------------------------------------------------------------------------------------------
# Neuron figures
# --------------------------------------------------------------------------------------------------


def neuron_traces(res: NeuronResult, out: Path, n: int = 6) -> Path:
    """The full explanation vs the TRUE pre-activation (and the contextual heads' true and predicted
    contribution, faint) for the top neurons, on the neuron's most positive and most negative held-out text."""
    recs = res.records[:n]
    fig, axes = plt.subplots(max(1, len(recs)), 2, figsize=(10, 2.2 * max(1, len(recs))), squeeze=False)
    for row, rec in zip(axes, recs):
        for ax, name, kind in ((row[0], rec.positive_text, "positive"), (row[1], rec.negative_text, "negative")):
            t = res.trace(rec.index, name)
            if t is None:
                ax.axis("off")
                continue
            x = np.arange(len(t.true_pre))
            ax.plot(x, t.true_contextual, color="0.75", lw=0.8, label="true contribution of contextual heads")
            ax.plot(x, t.predicted_contextual, color="0.6", lw=0.8, ls=":", label="contextual bag (predicted)")
            ax.plot(x, t.true_pre, color="k", lw=1.0, label="true pre-activation")
            ax.plot(x, t.predicted_pre, color="#d62728", lw=1.0, ls="--", label="full explanation from weights")
            ax.set_title(f"neuron {rec.index} ({rec.label or 'unlabelled'}) on {name} [{kind}]", fontsize=8)
            ax.tick_params(labelsize=7)
    axes[0, 0].legend(fontsize=6, loc="upper left")
    axes[-1, 0].set_xlabel("position (from min_position)")
    axes[-1, 1].set_xlabel("position (from min_position)")
    fig.tight_layout()
    return _save(fig, out)


def r_fvu_distribution(res: NeuronResult, out: Path) -> Path:
    """Distribution over the reported neurons of r and FVU of the full explanation against the true
    pre-activation, with the random neurons' medians beside them."""
    r = np.array([x.r for x in res.records]) if res.records else np.zeros(0)
    f = np.array([x.fvu for x in res.records]) if res.records else np.zeros(0)
    rnd = res.verification.random
    fig, (a, b) = plt.subplots(1, 2, figsize=(8, 2.8))
    a.hist(r, bins=20, range=(-0.2, 1), color="#1f77b4")
    a.axvline(np.median(r) if len(r) else 0, color="k", ls="--",
              label=f"median {np.median(r) if len(r) else float('nan'):.2f}")
    a.axvline(rnd.r, color="#7f7f7f", ls=":", label=f"random neurons {rnd.r:.2f}")
    a.set_xlabel("Pearson r (full explanation vs true pre-activation)")
    a.legend(fontsize=7)
    b.hist(np.clip(f, 0, 2), bins=20, range=(0, 2), color="#ff7f0e")
    b.axvline(np.median(f) if len(f) else 0, color="k", ls="--",
              label=f"median {np.median(f) if len(f) else float('nan'):.2f}")
    b.axvline(rnd.fvu, color="#7f7f7f", ls=":", label=f"random neurons {rnd.fvu:.2f}")
    b.set_xlabel("FVU (clipped at 2)")
    b.legend(fontsize=7)
    fig.tight_layout()
    fig.suptitle(f"{len(r)} reported neurons with a card", y=1.04)
    return _save(fig, out)


def denominator_stability_plot(res: NeuronResult, circ: Circuit, out: Path) -> Path:
    """Kernel-weighted denominators Z_n / Z_calibration against position, per contextual head, per text."""
    den = {d.text: d.Z_trace for d in res.denominators}  # per text: [n_heads][positions]
    heads = circ.heads
    Zcal = [float(z) for z in circ.Z]
    k = len(heads)
    cols = min(4, max(1, k))
    rows = int(np.ceil(max(1, k) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(max(6.0, 3.2 * cols), 2.6 * rows), squeeze=False, sharey=True)
    colors = plt.cm.tab10(np.linspace(0, 1, max(1, len(den))))
    for j, h in enumerate(heads):
        ax = axes.flat[j]
        for c, (name, Z) in zip(colors, den.items()):
            ax.plot(np.array(Z[j]) / Zcal[j], color=c, lw=0.8, label=name)
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_title(f"head {h}", fontsize=8)
        ax.set_ylim(0, 3)
    for ax in axes.flat[k:]:
        ax.axis("off")
    axes.flat[0].set_ylabel("Z_n / Z_calibration")
    axes.flat[0].legend(fontsize=5)
    fig.tight_layout()
    fig.suptitle("softmax denominators on held-out texts (1 = calibration value)", y=1.04)
    return _save(fig, out)


def neuron_figures(res: NeuronResult, circ: Circuit, out_dir: str | Path) -> dict[str, Path]:
    out_dir = Path(out_dir)
    figs = {"r_fvu": r_fvu_distribution(res, out_dir / "r_fvu.png"),
            "denominators": denominator_stability_plot(res, circ, out_dir / "denominators.png")}
    if res.records:
        figs["neuron_traces"] = neuron_traces(res, out_dir / "neuron_traces.png")
    return figs
