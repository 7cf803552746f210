"""The two passes over the sample windows (method §5.2): the estimation (mean rotated queries and keys per
position -> data kernels, static positional part, reference norms) and the held-out validation (the
content/position decomposition's TV, mean attention, query consistency, sink statistics), each a sum over
shards of windows (:mod:`attnscope.core.executor`); and the kernels computed from the estimate alone (layer-0
weights kernels, rotary offset kernels)."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from torch import Tensor

from attnscope.core.accumulators import EstimationSums, ValidationSums
from attnscope.core.errors import AttnscopeError
from attnscope.core.executor import LOCAL, Executor
from attnscope.exact.decomposition import (
    approximate_tv,
    centre,
    layer0_weight_kernels,
    pair_weights_of_kernel,
    pooled_static_keys,
    reference_norm,
    tv_distance,
)
from attnscope.exact.forward import LayerActivations, apply_rotary, iter_layers, mask_scores, qk_scores, rotary_cos_sin
from attnscope.kernels.result import ResolvedKernelSettings, query_positions
from attnscope.models import ModelWeights


@dataclass
class KernelEstimate:
    """What the estimation pass measures (means over the estimation windows); input of the validation."""

    layers: list[int]
    query_positions: list[int]
    mean_q: Float[Tensor, "layer head ctx d_head"]  # mean (rotated) query per position
    mean_k: Float[Tensor, "layer head ctx d_head"]  # mean (rotated) key per position
    # static positional part (learned) or the mean pre-rotation keys (rotary)
    static: Float[Tensor, "layer ctx d_model"] | Float[Tensor, "layer head ctx d_head"]
    ref_norms: dict[int, float]  # reference norm c per layer
    data_kernel: Float[Tensor, "layer head n_query ctx"]


@dataclass
class KernelValidation:
    """What the held-out pass measures."""

    tv_decomposition: list[Float[Tensor, "head _n"]]  # per layer, over held-out positions: TV(true, content+position)
    mean_attention: Float[Tensor, "layer head n_query ctx"]  # mean held-out attention rows
    query_consistency: Float[Tensor, "layer head"]  # mean TV of per-text query kernels to the data kernel
    sink: list[Float[Tensor, "head _n"]] | None = None  # per layer: true attention on position 0 at n >= n_sink
    n_windows: int = 0  # held-out windows analysed; 0: the validations were not run


def estimation_shard(w: ModelWeights, windows: Int[Tensor, "n ctx"], first_window: int, s: ResolvedKernelSettings,
                     bar=None) -> EstimationSums:
    """Partial sums over one shard of estimation ``windows`` (every estimation statistic is a sum)."""
    li = {l: j for j, l in enumerate(s.layers)}
    sums = EstimationSums.zeros(len(li), w.n_heads, s.n_ctx, w.d_head, w.d_model, w.device)
    for j, a in _stream_layers(w, windows, s.batch_size, li, bar or _NoBar(), patterns=False):  # fused attention
        sums.add(j, a.q, a.k, a.norm_in, (centre(a.norm_in.to(torch.float64), w) ** 2).sum())
    sums.count(windows.shape[0])
    return sums


def _static_part(w: ModelWeights, s: ResolvedKernelSettings, mean_resid: Float[Tensor, "layer ctx d_model"],
                 sum_sq: Float[Tensor, " layer"], n_seen: int
                 ) -> tuple[Float[Tensor, "layer ctx d_model"], dict[int, float]]:
    """Static positional part of the residual (mean over texts, centred over positions; layer 0 with learned
    positions: the method's exact split ``W_pos`` (+ token type)) and the reference norm of each layer."""
    T = s.n_ctx
    pi = (mean_resid - mean_resid.mean(1, keepdim=True)).to(w.dtype)
    ref_norms: dict[int, float] = {}
    for j, l in enumerate(s.layers):
        if l == 0 and w.W_pos is not None:
            pi[j] = (w.W_pos[:T] + (0 if w.W_type is None else w.W_type)).to(w.dtype)
            ref_norms[l] = s.ref_norm if s.ref_norm is not None else reference_norm(w)
        else:
            ms = float(sum_sq[j]) / (n_seen * T) - float((centre(pi[j].double(), w) ** 2).sum(-1).mean())
            ref_norms[l] = s.ref_norm if s.ref_norm is not None else math.sqrt(max(ms, 1e-12))
    return pi, ref_norms


@torch.no_grad()
def estimate_kernels(w: ModelWeights, s: ResolvedKernelSettings, windows: Int[Tensor, "n ctx"], *, bar=None,
                     executor: Executor | None = None) -> KernelEstimate:
    """Data kernels of the layers ``s.layers`` (resolved settings) from the estimation ``windows [n, T]``
    (sharded by ``executor``; default: this process)."""
    sums = (executor or LOCAL).map_windows(w, estimation_shard, windows, s, bar=bar, shard_size=s.batch_size)
    qpos = query_positions(s.n_ctx, w.causal)
    mean_q, mean_k, mean_resid, sum_sq = sums.finalise(w.dtype)
    pi, ref_norms = _static_part(w, s, mean_resid, sum_sq, sums.n)
    qp = torch.tensor(qpos, device=w.device)
    data_kernel = positional_kernel_rows_batch(w, s.layers, mean_q[:, :, qp], mean_k)  # [L, H, nq, T]
    static = pi
    if w.positional == "rotary":  # static pre-rotation keys for the decomposition
        cos, sin = rotary_cos_sin(w, torch.arange(s.n_ctx, device=w.device))
        static = apply_rotary(mean_k, cos, -sin)
    return KernelEstimate(s.layers, qpos, mean_q, mean_k, static, ref_norms, data_kernel)


@torch.no_grad()
def validate_kernels(w: ModelWeights, s: ResolvedKernelSettings, est: KernelEstimate, windows: Int[Tensor, "n ctx"], *,
                     bar=None, executor: Executor | None = None) -> KernelValidation:
    """Held-out checks on ``windows`` (sharded by ``executor``): the decomposition's TV, mean attention, consistency."""
    sums = (executor or LOCAL).map_windows(w, validation_shard, windows, s, est, bar=bar, shard_size=s.batch_size)
    tvs, mean_attention, consistency, sinks = sums.finalise(w.dtype, w.n_heads)
    return KernelValidation(tvs, mean_attention, consistency, sinks, sums.n)


@torch.no_grad()
def validation_shard(w: ModelWeights, windows: Int[Tensor, "n ctx"], first_window: int, s: ResolvedKernelSettings,
                     est: KernelEstimate, bar=None) -> ValidationSums:
    """Partial held-out sums over one shard of ``windows`` whose first is held-out window ``first_window``."""
    li = {l: j for j, l in enumerate(est.layers)}
    H, qpos = w.n_heads, est.query_positions
    qp = torch.tensor(qpos, device=w.device)
    n_sink = qpos[0]  # sink statistics from the first kept query position on (early rows see few keys)
    sums = ValidationSums.zeros(len(li), H, len(qpos), s.n_ctx, w.device)
    pairs, statics = _rotary_split_inputs(w, est)
    b0 = first_window - s.batch_size  # index of the current batch's first window (layers come in order: j = 0 first)
    for j, a in _stream_layers(w, windows, s.batch_size, li, bar or _NoBar()):
        b0 += s.batch_size if j == 0 else 0
        tv = approximate_tv(w, a.layer, a, statics[j], est.ref_norms[a.layer], pairs[j])  # [b, H, T], in row chunks
        # query consistency: each text's own query at n with the static keys
        per_text = kernel_softmax(w, a.layer, qk_scores(a.q[:, :, qp], est.mean_k[j]), qpos)
        pattern = a.pattern
        assert pattern is not None  # streamed with patterns
        sums.add(j, b0, pattern[:, :, qp], tv_distance(per_text, est.data_kernel[j][None]).mean(-1),
                 tv[:, :, 1:].permute(1, 0, 2).reshape(H, -1).float(),
                 pattern[:, :, n_sink:, 0].permute(1, 0, 2).reshape(H, -1).float())
    sums.count(windows.shape[0])
    return sums


def _rotary_split_inputs(w: ModelWeights, est: KernelEstimate) -> tuple[list, list]:
    """Per analysed layer: the separable rotary split's pair weights (from the data kernel at the reference
    query, first position excluded; ``None`` for learned positions) and the static part (layer 0 of a rotary
    model: one pooled key for every position after the BOS, positions being exchangeable there)."""
    bos = w.analysis_bos is not None
    if w.positional != "rotary":
        return [None] * len(est.layers), [est.static[j] for j in range(len(est.layers))]
    pairs = [pair_weights_of_kernel(w, est.data_kernel[j, :, -1], True, per_row=True) for j in range(len(est.layers))]
    statics = [pooled_static_keys(est.static[j], bos) if l == 0 else est.static[j] for j, l in enumerate(est.layers)]
    return pairs, statics


def weights_kernels(w: ModelWeights, s: ResolvedKernelSettings, windows: Int[Tensor, "n ctx"], ref_norm: float,
                    qpos: list[int]) -> tuple[Float[Tensor, "head n_query ctx"], Float[Tensor, " head"]]:
    """Layer-0 weights kernels ``[H, nq, T]`` (learned positions) with the query of ``s.weights_query``, and
    their consistency ``[H]`` across generic query tokens (the samples' most frequent tokens; method §5.2c)."""
    T, qp = s.n_ctx, torch.tensor(qpos, device=w.device)
    flat = windows.reshape(-1)
    if s.weights_query == "mean":
        query = w.W_E[flat].mean(0)
    else:
        ids = w.tokenizer(s.weights_query, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            raise AttnscopeError(f"--weights-query {s.weights_query!r} is {len(ids)} tokens; give one token or 'mean'")
        query = w.W_E[ids[0]]
    kernel = layer0_weight_kernels(w, query, T, ref_norm, rows=qp)  # [H, nq, T]: only the kept query rows
    common = torch.bincount(flat).topk(min(s.n_query_tokens, int((torch.bincount(flat) > 0).sum()))).indices
    per_tok = torch.stack([layer0_weight_kernels(w, w.W_E[t], T, ref_norm, rows=qp) for t in common])
    return kernel, tv_distance(per_tok, kernel[None]).mean(-1).mean(0)


def rotary_offset_kernels(w: ModelWeights, est: KernelEstimate) -> Float[Tensor, "layer head n_query ctx"]:
    """The attnscope extension for rotary models ``[L, H, nq, T]``: position-averaged pre-rotation query and
    key through the rotation, so ``K_n(i)`` depends on the offset ``i - n`` only (translation-equivariant by
    construction)."""
    T = est.mean_q.shape[2]
    cos, sin = rotary_cos_sin(w, torch.arange(T, device=w.device))
    start = 1 if w.analysis_bos is not None else 0
    q_pre = apply_rotary(est.mean_q, cos, -sin)[:, :, start:].mean(2, keepdim=True).expand(-1, -1, T, -1)
    k_pre = est.static[:, :, start:].mean(2, keepdim=True).expand(-1, -1, T, -1)
    qp = torch.tensor(est.query_positions, device=w.device)
    return positional_kernel_rows_batch(w, est.layers, apply_rotary(q_pre, cos, sin)[:, :, qp],
                                        apply_rotary(k_pre, cos, sin))



class _NoBar:
    def update(self, n: int) -> None:
        pass


def _stream_layers(w: ModelWeights, windows: Int[Tensor, "n ctx"], batch_size: int, li: dict[int, int], bar,
                   patterns: bool = True) -> Iterator[tuple[int, LayerActivations]]:
    """Yield ``(index of the layer in the analysis, LayerActivations)`` for every batch of ``windows`` and every
    analysed layer, running each batch only up to the deepest analysed layer (memory: one batch, one layer).
    ``patterns=False``: fused attention, no scores or patterns (the estimation needs only q, k and the input)."""
    last = max(li)
    for b0 in range(0, windows.shape[0], batch_size):
        batch = windows[b0 : b0 + batch_size]
        for a in iter_layers(w, batch, stop_layer=last, patterns=patterns):
            if a.layer in li:
                yield li[a.layer], a
        bar.update(batch.shape[0])


def kernel_softmax(w: ModelWeights, layer: int, scores: Float[Tensor, "*batch n_query ctx"], qpos: list[int]
                   ) -> Float[Tensor, "*batch n_query ctx"]:
    """``softmax_i(scores / scale)`` for query rows at ``qpos`` (``scores [..., nq, T]``), causal mask applied."""
    s = scores / w.attn_scale[layer]
    return mask_scores(w, s, torch.tensor(qpos, device=s.device)).softmax(-1)


def positional_kernel_rows_batch(w: ModelWeights, layers: list[int], q: Float[Tensor, "layer head n_query d_head"],
                                 k: Float[Tensor, "layer head ctx d_head"]) -> Float[Tensor, "layer head n_query ctx"]:
    """Data kernels ``[L, H, nq, T]`` from mean queries ``q [L, H, nq, dh]`` at :func:`query_positions` and
    mean keys ``k [L, H, T, dh]``."""
    qpos = query_positions(k.shape[2], w.causal)
    return torch.stack([kernel_softmax(w, l, qk_scores(q[j], k[j]), qpos)
                        for j, l in enumerate(layers)])
