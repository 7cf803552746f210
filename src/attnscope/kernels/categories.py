"""Kernel categories (method §5.3): one table of names, short names, colours and descriptions, the
thresholds that assign them, and the per-row kernel properties they are computed from.

Every figure, table and command reads the category metadata from :data:`CATEGORY_TABLE`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from attnscope.exact.decomposition import tv_distance

# Category thresholds (documented in docs/kernels.md and drawn on the figures).
SINK_MASS = 0.5  # K_n(0) >= this: first-token sink
SELF_MASS = 0.5  # K_n(n) >= this: current token
PREV_MASS = 0.5  # K_n(n-1) >= this: previous token
LOCAL_NEFF = 10.0  # N_eff <= this and half the mass within LOCAL_MEDIAN tokens: sharp local decay
LOCAL_MEDIAN = 10
UNIFORM_FRAC = 0.5  # N_eff >= this * (number of visible keys): uniform
SLOW_MEDIAN_FRAC = 0.25  # otherwise, median offset <= this * visible keys: slow decay


@dataclass(frozen=True)
class Category:
    """One kernel category: its name (as stored in ``kernels.json``), a short column name, the colour of
    the figures and the report, and the rule that assigns it."""

    name: str
    short: str
    colour: str
    description: str


CATEGORY_TABLE: tuple[Category, ...] = (
    Category("sharp local decay", "local", "#d62728",
             f"N_eff <= {LOCAL_NEFF:g} and half the mass within {LOCAL_MEDIAN} tokens of the query"),
    Category("slow decay", "slow", "#ff7f0e",
             f"median offset <= {SLOW_MEDIAN_FRAC} x the visible keys (and not local or uniform)"),
    Category("uniform", "uniform", "#2ca02c", f"N_eff >= {UNIFORM_FRAC} x the visible keys"),
    Category("previous token", "prev", "#9467bd", f"K_n(n-1) >= {PREV_MASS}"),
    Category("current token", "self", "#8c564b", f"K_n(n) >= {SELF_MASS}"),
    Category("first-token sink", "sink", "#7f7f7f", f"K_n(0) >= {SINK_MASS}"),
    Category("other", "other", "#17becf", "none of the above"),
)
CATEGORIES = tuple(c.name for c in CATEGORY_TABLE)
#: colour of each category on the figures and in the HTML report
CAT_COLORS = {c.name: c.colour for c in CATEGORY_TABLE}
CATEGORY_SHORT = {c.name: c.short for c in CATEGORY_TABLE}


def thresholds() -> dict[str, float | int]:
    return {"sink_mass": SINK_MASS, "self_mass": SELF_MASS, "prev_mass": PREV_MASS, "local_n_eff": LOCAL_NEFF,
            "local_median_offset": LOCAL_MEDIAN, "uniform_n_eff_fraction": UNIFORM_FRAC,
            "slow_median_offset_fraction": SLOW_MEDIAN_FRAC}


def n_eff(k: Float[Tensor, "*batch n"]) -> Float[Tensor, "*batch"]:
    """Collision (Renyi-2) effective width ``1 / sum K^2`` along the last axis."""
    return 1.0 / (k.double() ** 2).sum(-1)


def offset_profile(row: Float[Tensor, " n_ctx"], n: int, causal: bool) -> Float[Tensor, " n_offsets"]:
    """Kernel mass by distance ``|i - n|`` from the query (``[max distance + 1]``)."""
    T = row.shape[-1]
    dist = (torch.arange(T, device=row.device) - n).abs()
    if causal:
        dist = dist[: n + 1]
        row = row[: n + 1]
    out = torch.zeros(int(dist.max()) + 1, dtype=row.dtype, device=row.device)
    return out.index_add_(0, dist, row)


def fit_decay(profile: Float[Tensor, " n_offsets"], mass: float = 0.95) -> tuple[float | None, float | None]:
    """Exponential fit ``K(d) ~ A exp(-d / tau)`` over ``1 <= d <= d_mass`` (weighted least squares of
    log K, weights K).  Returns ``(tau, weighted R^2)``; ``(None, None)`` with fewer than 4 points."""
    p = profile.double().cpu().numpy()
    cum = np.cumsum(p)
    d_max = int(np.searchsorted(cum, mass * cum[-1])) + 1
    d = np.arange(1, min(d_max, len(p) - 1) + 1)
    d = d[p[d] > 1e-12]
    if len(d) < 4:
        return None, None
    y, wts = np.log(p[d]), p[d] / p[d].sum()
    X = np.stack([np.ones_like(d, dtype=float), d.astype(float)], 1)
    W = np.diag(wts)
    beta = np.linalg.lstsq(X.T @ W @ X, X.T @ W @ y, rcond=None)[0]
    resid = y - X @ beta
    ybar = (wts * y).sum()
    ss_tot = (wts * (y - ybar) ** 2).sum()
    r2 = float(1 - (wts * resid**2).sum() / ss_tot) if ss_tot > 0 else 0.0
    slope = beta[1]
    tau = float(-1.0 / slope) if slope < 0 else None  # no decay: undefined
    return tau, r2


def categorise(row: Float[Tensor, " n_ctx"], n: int, causal: bool) -> tuple[str, dict[str, float | int]]:
    """Category of a kernel row ``K_n`` (thresholds above), with the measured quantities."""
    row = row.double()
    visible = n + 1 if causal else row.shape[-1]
    ne = float(n_eff(row[:visible] if causal else row))
    prof = offset_profile(row, n, causal)
    med = int(torch.searchsorted(prof.cumsum(0), torch.tensor(0.5 * float(prof.sum()), dtype=prof.dtype)))
    m = {"n_eff": ne, "n_eff_fraction": ne / visible, "median_offset": med, "mass_first": float(row[0]),
         "mass_self": float(row[n]), "mass_prev": float(row[n - 1]) if n >= 1 else 0.0}
    if m["mass_first"] >= SINK_MASS and n > 0:
        cat = "first-token sink"
    elif m["mass_self"] >= SELF_MASS:
        cat = "current token"
    elif causal and m["mass_prev"] >= PREV_MASS:
        cat = "previous token"
    elif ne <= LOCAL_NEFF and med <= LOCAL_MEDIAN:
        cat = "sharp local decay"
    elif ne >= UNIFORM_FRAC * visible:
        cat = "uniform"
    elif med <= SLOW_MEDIAN_FRAC * visible:
        cat = "slow decay"
    else:
        cat = "other"
    return cat, m


def equivariance(rows: Float[Tensor, "n_query n_ctx"], qpos: list[int], causal: bool) -> float:
    """Max TV between the reference row and each other row, compared on their common offsets.

    rows: ``[n_query, n_ctx]`` kernel rows at ``qpos``; for causal kernels offsets ``0..n_min``.
    """
    ref = len(qpos) - 1
    nr = qpos[ref]
    worst = 0.0
    T = rows.shape[-1]
    for j, n in enumerate(qpos[:-1]):
        lo = -min(n, nr)
        hi = 0 if causal else min(T - 1 - n, T - 1 - nr)
        offs = torch.arange(lo, hi + 1)
        a = rows[j, n + offs]
        b = rows[ref, nr + offs]
        if a.sum() <= 0 or b.sum() <= 0:
            continue
        worst = max(worst, float(tv_distance(a / a.sum(), b / b.sum())))
    return worst
