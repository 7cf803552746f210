r"""Positional kernels of every head of every layer, their properties and categories (method §5).

The kernel ``K_n(i)`` is how much attention query position ``n`` gives key position ``i`` independent of
the content there.  attnscope estimates it three ways:

* **data kernel** (every layer, every positional scheme; method §5.2 b1): run the model on sample texts
  (streamed, stopping at the deepest layer asked for), average the (rotated) queries and keys per
  position, and set ``K_n(i) = softmax_i(\bar q_n . \bar k_i / scale)``.  Content enters the mean key as a
  constant and cancels in the softmax.
* **weights kernel** (layer 0, learned positions; method §5.2 a): from the weights alone, with the
  method's positional keys ``P[n, i]`` and the query of a content vector (the mean token embedding of the
  samples, or one generic token) placed at ``n``.
* **rotary offset kernel** (rotary models; attnscope's extension, method §10): the position-averaged
  pre-rotation query and key through the rotation, ``K_n(i) ∝ exp((R_n q̄) . (R_i k̄) / scale)``, a function
  of the offset ``i - n`` only; ``tv_rotary_offset_vs_data`` says how much of the data kernel it explains.
* **mean attention** (every layer; method §5.2 b2): the average attention row, used as a cross-check on
  held-out samples (``tv_kernel_vs_attention``).

**Sinks** (method §15): every head's attention on the first position (BOS, or the first token) is reported
as its own property, ``sink_mass`` (median over held-out query positions of the true attention there) and
``sink_mass_cv``; the category, ``N_eff``, decay and median offset come from the kernel over the remaining
positions, renormalised, so a head reads ``"sink 0.70 + slow decay"`` (:meth:`HeadRecord.display`).

Kernels are kept for a few query positions only (``[layers, heads, n_query, n_ctx]``), never as full
``n_ctx^2`` matrices; statistics stream over samples so memory does not grow with their number.

The analysis is split along its stages: :mod:`~attnscope.kernels.result` (settings, :class:`HeadRecord`,
:class:`KernelResult`), :mod:`~attnscope.kernels.estimation` (the estimation and held-out passes, weights and
rotary kernels), :mod:`~attnscope.kernels.records` (saved arrays and per-head records) and
:mod:`~attnscope.kernels.categories`; this module runs them (:func:`analyse_kernels`, with the cache) and
re-exports their public names, so ``from attnscope.kernels.analysis import ...`` keeps working.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict

import torch

from attnscope.core.cache import atomic_dir, cache_dir, read_or_drop
from attnscope.core.executor import Executor
from attnscope.core.texts import bundled_dir, load_windows, tokenizer_sha256
from attnscope.kernels.categories import (
    CAT_COLORS,
    CATEGORIES,
    CATEGORY_TABLE,
    LOCAL_MEDIAN,
    LOCAL_NEFF,
    PREV_MASS,
    SELF_MASS,
    SINK_MASS,
    SLOW_MEDIAN_FRAC,
    UNIFORM_FRAC,
    categorise,
    equivariance,
    fit_decay,
    n_eff,
    offset_profile,
    thresholds,
)
from attnscope.kernels.estimation import (
    KernelEstimate,
    KernelValidation,
    estimate_kernels,
    estimation_shard,
    kernel_softmax,
    positional_kernel_rows_batch,
    rotary_offset_kernels,
    validate_kernels,
    validation_shard,
    weights_kernels,
)
from attnscope.kernels.records import head_records, kernel_arrays
from attnscope.kernels.result import (
    SCHEMA_VERSION,
    HeadRecord,
    KernelResult,
    KernelSettings,
    ResolvedKernelSettings,
    query_positions,
)
from attnscope.models import ModelWeights

__all__ = [  # the analysis and, re-exported, the public names of its pieces (they used to live here)
    "analyse_kernels", "load_windows",
    "SCHEMA_VERSION", "KernelSettings", "ResolvedKernelSettings", "HeadRecord", "KernelResult", "query_positions",
    "KernelEstimate", "KernelValidation", "estimate_kernels", "estimation_shard", "validate_kernels",
    "validation_shard", "weights_kernels", "rotary_offset_kernels", "kernel_softmax", "positional_kernel_rows_batch",
    "head_records", "kernel_arrays",
    "CAT_COLORS", "CATEGORIES", "CATEGORY_TABLE", "LOCAL_MEDIAN", "LOCAL_NEFF", "PREV_MASS", "SELF_MASS", "SINK_MASS",
    "SLOW_MEDIAN_FRAC", "UNIFORM_FRAC", "categorise", "equivariance", "fit_decay", "n_eff", "offset_profile",
    "thresholds",
]


def _cache_key(w: ModelWeights, s: ResolvedKernelSettings, sha: str) -> str:
    blob = json.dumps({"model": w.fingerprint(), "settings": asdict(s), "samples": sha, "dtype": str(w.dtype),
                       "bos": w.analysis_bos, "tokenizer": tokenizer_sha256(w.tokenizer), "v": 4},
                      sort_keys=True)  # --bos/--no-bos: its own entry; an edited tokenizer.json: its own entry
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _samples_spec(spec: str) -> str:
    if spec in ("bundled:", "bundled", ""):
        return str(bundled_dir())
    return spec


@torch.no_grad()
def analyse_kernels(w: ModelWeights, settings: KernelSettings | None = None, *, cache: bool = True,
                    progress: bool = True, executor: Executor | None = None) -> KernelResult:
    """Positional kernels and their properties for the chosen layers (see module docstring):
    :func:`estimate_kernels`, :func:`validate_kernels`, :func:`kernel_arrays`, :func:`head_records`.
    ``executor`` shards the two passes over the windows (default: this process); the cache is read first."""
    from tqdm.auto import tqdm

    s = (settings or KernelSettings()).resolved(w)
    bos = w.analysis_bos
    windows, prov = load_windows(_samples_spec(s.samples), w.tokenizer, s.n_ctx, s.n_samples + s.n_heldout,
                                 seed=s.seed, bos_token_id=bos)
    key = _cache_key(w, s, prov["sha256"])
    cdir = cache_dir() / "kernels" / key
    if cache and (hit := read_or_drop(cdir, KernelResult.load)) is not None:
        return hit
    windows = windows.to(w.device)
    est_windows, held = windows[: s.n_samples], windows[s.n_samples :]
    bar = tqdm(total=s.n_samples + s.n_heldout, desc="kernels: estimate", unit="text", disable=not progress)
    est = estimate_kernels(w, s, est_windows, bar=bar, executor=executor)
    bar.set_description("kernels: validate")
    val = validate_kernels(w, s, est, held, bar=bar, executor=executor)
    bar.close()
    arrays, weights_consistency = kernel_arrays(w, s, est, val, est_windows)
    records = head_records(w, est, val, arrays, weights_consistency)
    res = KernelResult(model=w.info(), settings=asdict(s), provenance={**prov, "n_estimation": s.n_samples,
                       "n_heldout": s.n_heldout, "bos": bos, "prepend_bos": w.prepend_bos,
                       "sink_handling": "first position split off: sink_mass beside the kernel of the other positions, "
                       "renormalised", "norm_handling": "exact norm on content at the query "
                       "position; reference norm for positional displacements", "cache_key": key},
                       query_positions=est.query_positions, records=records, arrays=arrays, ref_norms=est.ref_norms)
    if cache:
        with atomic_dir(cdir) as tmp:  # the entry appears complete (data and index) or not at all
            res.save(tmp)
    return res

