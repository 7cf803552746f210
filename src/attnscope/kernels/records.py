"""Classification of the estimated kernels: the saved arrays (:func:`kernel_arrays`) and one
:class:`~attnscope.kernels.result.HeadRecord` per head (:func:`head_records`: category, width, decay, sink,
and the held-out validations)."""

from __future__ import annotations

import torch
from jaxtyping import Float, Int
from torch import Tensor

from attnscope.exact.decomposition import tv_distance
from attnscope.exact.sinks import SinkStats, split_sink
from attnscope.kernels.categories import SINK_MASS, categorise, equivariance, fit_decay, offset_profile
from attnscope.kernels.estimation import KernelEstimate, KernelValidation, rotary_offset_kernels, weights_kernels
from attnscope.kernels.result import HeadRecord, ResolvedKernelSettings
from attnscope.models import ModelWeights


def _mean_tv(a: Float[Tensor, "n_query ctx"] | None, b: Float[Tensor, "n_query ctx"]) -> float | None:
    return None if a is None else float(tv_distance(a, b).mean())


def head_records(w: ModelWeights, est: KernelEstimate, val: KernelValidation, arrays: dict[str, Tensor],
                 weights_consistency: Float[Tensor, " head"] | None) -> list[HeadRecord]:
    """One :class:`HeadRecord` per analysed head, from the kernel row at the reference query position."""
    nref, dk, records = est.query_positions[-1], est.data_kernel, []
    wk, rot = arrays.get("weights_kernel_layer0"), arrays.get("rotary_offset_kernel")
    for j, l in enumerate(est.layers):
        for h in range(w.n_heads):
            full, tvd = dk[j, h, -1], val.tv_decomposition[j][h]
            row = split_sink(full)[1]  # the kernel proper: first position dropped, renormalised
            cat, m = categorise(row, nref, w.causal)
            tau, r2 = fit_decay(offset_profile(row, nref, w.causal))
            sk = SinkStats.of(val.sink[j][h]) if val.sink is not None else SinkStats(0.0, 0.0, 0.0)
            records.append(HeadRecord(
                layer=l, head=h, category=cat, n_eff=m["n_eff"], n_eff_fraction=m["n_eff_fraction"],
                decay_length=tau, decay_fit_r2=r2, median_offset=int(m["median_offset"]), mass_first=float(full[0]),
                mass_self=m["mass_self"], mass_prev=m["mass_prev"],
                query_consistency=float(val.query_consistency[j, h]),
                equivariance=equivariance(dk[j, h], est.query_positions, w.causal),
                tv_decomposition={"mean": float(tvd.mean()), "median": float(tvd.median()),
                                  "p90": float(torch.quantile(tvd, 0.9))},
                tv_kernel_vs_attention=float(tv_distance(dk[j, h], val.mean_attention[j, h]).mean()),
                tv_weights_vs_data=_mean_tv(wk[h] if wk is not None and l == 0 else None, dk[j, h]),
                weights_query_consistency=None if weights_consistency is None or l != 0
                else float(weights_consistency[h]),
                tv_rotary_offset_vs_data=_mean_tv(None if rot is None else rot[j, h], dk[j, h]),
                sink_mass=sk.median, sink_mass_cv=sk.cv, sink_dominated=sk.median >= SINK_MASS))
    if val.n_windows == 0:  # no held-out text: not run, rather than a 0.0 that reads as perfect
        for r in records:
            r.query_consistency = r.tv_decomposition = r.tv_kernel_vs_attention = None
            r.sink_mass = r.sink_mass_cv = None
    return records


def kernel_arrays(w: ModelWeights, s: ResolvedKernelSettings, est: KernelEstimate, val: KernelValidation,
                  windows: Int[Tensor, "n ctx"]) -> tuple[dict[str, Tensor], Float[Tensor, " head"] | None]:
    """The saved arrays (data kernel, mean attention, weights and rotary kernels, offset kernel) and the
    weights kernel's query consistency ``[H]`` (layer 0, learned positions; else ``None``)."""
    qp = torch.tensor(est.query_positions, device=w.device)
    arrays: dict[str, Tensor] = {"data_kernel": est.data_kernel, "mean_attention": val.mean_attention,
                                 "query_positions": qp, "layers": torch.tensor(est.layers, device=w.device)}
    if val.n_windows == 0:  # no held-out attention to average
        del arrays["mean_attention"]
    consistency = None
    if 0 in est.layers and w.positional == "learned":
        arrays["weights_kernel_layer0"], consistency = weights_kernels(w, s, windows, est.ref_norms[0],
                                                                       est.query_positions)
    if w.positional == "rotary":
        arrays["rotary_offset_kernel"] = rotary_offset_kernels(w, est)
    # offset kernel at the reference query, first position excluded and renormalised: kappa(d) = K_nref(nref - d)
    nref, dk = est.query_positions[-1], split_sink(est.data_kernel)[1]
    arrays["offset_kernel"] = torch.stack([torch.stack([offset_profile(dk[j, h, -1], nref, w.causal)
                                                        for h in range(w.n_heads)]) for j in range(len(est.layers))])
    return arrays, consistency

