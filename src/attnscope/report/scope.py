"""Report section on the scope of each explanation: every approximation with its stated conditions and what
was measured on this model.  Circuit conditions are placed by their own :attr:`Condition.group`."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from attnscope.report.html import badge_html, esc, fmt, median_of, worst_of

if TYPE_CHECKING:
    from attnscope.circuit.build import Circuit
    from attnscope.kernels.analysis import KernelResult
    from attnscope.neurons.find import NeuronResult

#: the approximations, keyed by :data:`attnscope.circuit.build.ConditionGroup`: (title, claim)
SCOPE_GROUPS: dict[str, tuple[str, str]] = {
    "split": ("Content + position split of attention scores",
              "attention ≈ K<sub>n</sub>(i) f(x<sub>i</sub>) / Z, with keys split into a static positional "
              "part and a content part (method §4–5.1)"),
    "static": ("Static positional kernel",
               "one kernel per head, estimated from mean queries and keys, describes where the head looks "
               "independently of content (method §5.2–5.3)"),
    "denom": ("Stable softmax denominators",
              "for the contextual heads, Z<sub>n</sub> ≈ the calibration value for any text (method §6)"),
    "summary": ("Linear bag-of-tokens summary",
                "the contextual heads' summed output = kernel-weighted sum of extended embeddings (method §7)"),
    "neuron": ("Neuron pre-activations from the weights",
               "a neuron's contextual input = Σ<sub>i</sub> K<sub>n</sub>(i) S[x<sub>i</sub>, k] (method §8)"),
}

Add = Callable[[str, str, str, "bool | None"], None]


def _held_out_rows(recs: list, add: Add) -> None:
    """The three checks on held-out windows, or "not run" when the analysis had none (``n_heldout=0``)."""
    rows = [("split", "TV(true attention, content + position pattern) is small on held-out text "
                      "(the method reports ≈ 0.05 on GPT-2 Small)"),
            ("static", "the kernel matches the mean held-out attention (independence of content and position)"),
            ("static", "the kernel is consistent across query vectors (texts)")]
    if recs[0].tv_decomposition is None:
        for group, claim in rows:
            add(group, claim, "not run: no held-out windows (n_heldout=0)", None)
        return
    tvm = [r.tv_decomposition.get("median") for r in recs]
    w, wh = worst_of(recs, lambda r: r.tv_decomposition.get("p90"))
    add(*rows[0], f"median over heads of the median TV {fmt(median_of(tvm))}; worst 90th percentile {fmt(w)} ({wh})",
        None)
    w, wh = worst_of(recs, lambda r: r.tv_kernel_vs_attention)
    add(*rows[1], f"TV median {fmt(median_of([r.tv_kernel_vs_attention for r in recs]))}, worst {fmt(w)} ({wh})",
        None)
    w, wh = worst_of(recs, lambda r: r.query_consistency)
    add(*rows[2], f"TV median {fmt(median_of([r.query_consistency for r in recs]))}, worst {fmt(w)} ({wh})", None)


def _kernel_rows(res: KernelResult, add: Add) -> None:
    recs = res.records
    if not recs:
        return
    _held_out_rows(recs, add)
    w, wh = worst_of(recs, lambda r: r.equivariance)
    add("static", "translation equivariance: K<sub>n</sub>(n − d) depends on the offset d only",
        f"TV median {fmt(median_of([r.equivariance for r in recs]))}, worst {fmt(w)} ({wh})", None)
    wd = [r.tv_weights_vs_data for r in recs if r.tv_weights_vs_data is not None]
    if wd:
        add("static", "layer 0: the weights-only kernel agrees with the data kernel",
            f"TV median {fmt(median_of(wd))}, worst {fmt(max(wd))}", None)
    slow = [r.decay_fit_r2 for r in recs if r.category == "slow decay"]
    if slow:
        add("static", "slowly decaying kernels are exponential (decay length τ is meaningful)",
            f"fit R² median {fmt(median_of(slow))} over {len(slow)} slow-decay heads", None)


def _circuit_rows(circ: Circuit | None, neurons: NeuronResult | None, add: Add) -> None:
    for c in circ.conditions if circ is not None else []:
        add(c.group, f"{esc(c.name)}: {esc(c.holds_when)} (threshold {fmt(c.threshold)})", f"{fmt(c.measured)}",
            c.ok)
    if neurons is None:
        return
    for d in neurons.denominators:  # the denominator-transfer condition, per held-out text
        c = d.condition
        add(c.group, f"{esc(c.name)}: {esc(c.holds_when)}", f"{fmt(c.measured)}"
            + ("" if c.ok else " (outside the explanation's scope)"), c.ok)
    fid = neurons.fidelity
    if fid:
        add("summary", "the summary reproduces the heads' summed output on held-out texts",
            f"FVU {fmt(fid.get('fvu'))}, median per-dimension r {fmt(fid.get('median_r_per_dimension'))} "
            f"over {fmt(fid.get('n_positions'))} positions", None)
    recs = neurons.records
    if recs:
        mp = circ.settings.min_position if circ is not None else None
        add("neuron", "the full layer-0 explanation matches the true pre-activation on held-out texts"
                      + (f" (positions n ≥ {mp})" if mp is not None else ""),
            f"median r {fmt(median_of([r.r for r in recs]))}, median FVU "
            f"{fmt(median_of([r.fvu for r in recs]))} over {len(recs)} neurons", None)


def scope_section(kernels: KernelResult | None, circuit: Circuit | None, neurons: NeuronResult | None) -> str:
    """One block per approximation with rows (stated condition, measured value, status)."""
    rows: dict[str, list[tuple[str, str, bool | None]]] = {g: [] for g in SCOPE_GROUPS}

    def add(group: str, cond: str, measured: str, ok: bool | None) -> None:
        rows[group].append((cond, measured, ok))

    if kernels is not None:
        _kernel_rows(kernels, add)
    _circuit_rows(circuit, neurons, add)
    blocks = []
    for g, (name, claim) in SCOPE_GROUPS.items():
        if not rows[g]:
            continue
        body = "".join(f"<tr><td>{cond}</td><td>{meas}</td><td>{badge_html(ok, none='measured')}</td></tr>"
                       for cond, meas, ok in rows[g])
        blocks.append(f'<div class="scope-item"><h3>{esc(name)}</h3><p class="claim">{claim}</p><table class="data">'
                      f"<thead><tr><th>stated condition</th><th>measured on this model</th><th>status</th></tr>"
                      f"</thead><tbody>{body}</tbody></table></div>")
    if not blocks:
        return '<p class="omitted">Scope: nothing to report (no kernel or neuron results given).</p>'
    return f"""
<section id="scope">
<h2>Scope of each explanation</h2>
<p>Every explanation in this report holds only where its approximations hold. Each approximation is listed
with the conditions it needs and what was measured on this model; “measured” rows have no pass/fail threshold
and are for the reader to judge. Conditions measured on the calibration text need not hold on other texts.</p>
{"".join(blocks)}
</section>"""
