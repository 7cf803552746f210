"""The ground truth of a later MLP layer: its true pre-activations on the sample's windows, summarised per source
and half (one-vs-rest effect sizes), and the circuit-free token-mean predictor fitted on the tuning half."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from attnscope.core.texts import text_tokens
from attnscope.exact.forward import iter_layers
from attnscope.later.method import LaterCircuit
from attnscope.models import ModelWeights
from attnscope.neurons.contrast import PreStats
from attnscope.neurons.find import one_vs_rest_effects
from attnscope.neurons.verification import TokenMean, token_mean_on_calibration


@torch.no_grad()
def layer_pre(w: ModelWeights, windows: Tensor, layer: int) -> Tensor:
    """TRUE pre-activation of the MLP of ``layer`` on ``windows [N, T]``: ``[N, T, d_mlp]``."""
    out = []
    for b0 in range(0, windows.shape[0], 8):
        for a in iter_layers(w, windows[b0 : b0 + 8].to(w.device), stop_layer=layer):
            if a.layer == layer:
                out.append(a.mlp_pre.float().cpu())
    return torch.cat(out)


def mlp_pre_stats(pre: Tensor, n_min: int) -> PreStats:
    y = pre[:, n_min:].reshape(-1, pre.shape[-1]).double()
    return PreStats(y.shape[0], y.sum(0), (y**2).sum(0))


def token_mean(pres: list[Tensor], toks: list[Tensor], n_min: int, V: int) -> Tensor:
    """Each token's mean true pre-activation ``[V, d_mlp]`` (positions >= n_min); unseen: the overall mean."""
    d = pres[0].shape[-1]
    M, cnt = torch.zeros(V, d, dtype=torch.float64), torch.zeros(V, dtype=torch.float64)
    for p, t in zip(pres, toks):
        ids = t[:, n_min:].reshape(-1)
        M.index_add_(0, ids, p[:, n_min:].reshape(-1, d).double())
        cnt.index_add_(0, ids, torch.ones(len(ids), dtype=torch.float64))
    return torch.where(cnt[:, None] > 0, M / cnt.clamp_min(1)[:, None], (M.sum(0) / cnt.sum())[None])


def calibration_tokens(w: ModelWeights, lc: LaterCircuit, calibration: str) -> Tensor:
    T = lc.windows[0].tune.shape[1]
    bos = w.bos_token_id if w.prepend_bos else None
    return text_tokens(calibration, w.tokenizer, max_tokens=T, min_tokens=lc.n_min + 8, bos_token_id=bos)


def calibration_sigma(w: ModelWeights, lc: LaterCircuit, calibration: str) -> Tensor:
    cal = calibration_tokens(w, lc, calibration)
    return layer_pre(w, cal[None], lc.layer)[0, lc.n_min :].double().std(0).clamp_min(1e-6)


@dataclass
class TruthData:
    """True pre-activations of the MLP of L summarised per source and half."""

    d_tune: Tensor  # [n_sources, d_mlp] one-vs-rest effect sizes, tuning half
    d_report: Tensor  # [n_sources, d_mlp] reporting half
    M: Tensor  # [d_vocab, d_mlp] token-mean predictor (tuning half)
    sigma: Tensor  # [d_mlp] calibration std
    report_stats: list[list[PreStats]]  # per source, per reporting-half window (the like-for-like verification)
    cal_token_mean: TokenMean  # the token-mean predictor fitted on the calibration text (like for like)


@torch.no_grad()
def truth_data(w: ModelWeights, lc: LaterCircuit, calibration: str) -> TruthData:
    n_min = lc.n_min
    tune = [layer_pre(w, x.tune, lc.layer) for x in lc.windows]
    rep = [layer_pre(w, x.report, lc.layer) for x in lc.windows]
    cal = calibration_tokens(w, lc, calibration)
    tmean = token_mean_on_calibration(w, cal, n_min, calibration, pre=lambda t: layer_pre(w, t[None], lc.layer)[0])
    return TruthData(one_vs_rest_effects([mlp_pre_stats(p, n_min) for p in tune]),
                     one_vs_rest_effects([mlp_pre_stats(p, n_min) for p in rep]),
                     token_mean(tune, [x.tune for x in lc.windows], n_min, w.d_vocab),
                     calibration_sigma(w, lc, calibration),
                     [[mlp_pre_stats(p[i : i + 1], n_min) for i in range(len(p))] for p in rep], tmean)
