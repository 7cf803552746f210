r"""Neurons of a later layer's MLP: ranked from the composed circuit, selected, verified against the TRUE
pre-activation, and scored against the true per-context effects (issue 11; method §15).

The ranking, threshold and discovery scores are :mod:`attnscope.neurons.find` / :mod:`attnscope.neurons.groundtruth`
applied to the token model of :mod:`attnscope.later.method`; only the true pre-activation comes from layer ``L``.
Predictors scored side by side (all divided by the calibration std of each neuron):

* ``full``: every term of the composed token model;
* ``heads``: the heads only (earlier layers' terms through ``G_l`` + layer ``L``'s bag and other heads);
* ``direct``: the effective embedding ``E'_L`` alone;
* ``hybrid`` (``L > 0``; ranks the neurons by default): each token's mean TRUE pre-activation on the sample plus
  what the broad heads of the layers ``< L`` add in a context beyond it (:mod:`attnscope.later.context`);
* ``token_mean``: circuit-free, each token's mean TRUE pre-activation on the sample (unseen: overall mean);
* ``shuffled``: ``full`` with the token-frequency difference permuted over the vocabulary (the null).
"""

from __future__ import annotations

import time
from dataclasses import asdict
from typing import TypedDict

import torch
from torch import Tensor

from attnscope.circuit.build import CircuitSettings
from attnscope.core.errors import AttnscopeError
from attnscope.core.stats import tensor_sum
from attnscope.core.texts import decode_tokens
from attnscope.exact.decomposition import centre
from attnscope.later.context import HybridPositions, hybrid_effects
from attnscope.later.method import LaterCircuit, LaterSettings, build_later, earlier_terms, prepare
from attnscope.later.result import FitMedians, LaterCard, LaterResult, LaterVerification
from attnscope.later.truth import TruthData, layer_pre, truth_data
from attnscope.models import ModelWeights
from attnscope.neurons.contrast import token_frequencies
from attnscope.neurons.evidence import (
    EXAMPLES_FROM,
    NeuronEvidence,
    WindowRun,
    direct_logits,
    examples_from_runs,
)
from attnscope.neurons.explain import fit_scores, other_heads_output
from attnscope.neurons.find import (
    NeuronScores,
    Threshold,
    label,
    neuron_rows,
    predicted_effects,
    select,
    validated,
)
from attnscope.neurons.groundtruth import KS, discovery_scores, random_precision, spearman
from attnscope.neurons.verification import one_vs_rest_verification

PREDICTORS = ("full", "heads", "direct", "hybrid", "token_mean", "shuffled")














class PredictorParts(TypedDict):
    """Each term's part of the ``full`` and the ``hybrid`` predictor, and the hybrid per position (layer 0: no
    hybrid, so ``{}`` and ``None``)."""

    full: dict[str, Tensor]
    hybrid: dict[str, Tensor]
    positions: HybridPositions | None


def predictors(w: ModelWeights, lc: LaterCircuit, td: TruthData,
               neff_min: float = 16.0) -> tuple[dict[str, Tensor], PredictorParts]:
    """Predicted one-vs-rest effects ``[n_sources, d_mlp]`` of each predictor (module docstring), and each term's
    part of the ``full`` and the ``hybrid`` one (every such predictor is the sum of its parts)."""
    tm = lc.token_model
    parts = predicted_effects(tm, lc.windows, td.sigma, w.d_vocab)
    hyb, _, hp = hybrid_effects(w, lc, td, neff_min) if lc.layer > 0 else ({}, [], None)
    out = {"full": tensor_sum(parts.values()), "heads": tensor_sum(v for k, v in parts.items() if k != "direct"),
           "direct": parts["direct"]}
    if hyb:
        out["hybrid"] = tensor_sum(hyb.values())
    counts = torch.stack([token_frequencies(x.tune, w.d_vocab) * x.tune.numel() for x in lc.windows])
    perm = torch.randperm(w.d_vocab, generator=torch.Generator().manual_seed(0))
    tmv, sh = [], []
    for c in range(len(lc.windows)):
        rest = torch.arange(len(lc.windows)) != c
        q = counts[c] / counts[c].sum() - counts[rest].sum(0) / counts[rest].sum()
        tmv.append(q @ td.M / td.sigma)
        sh.append(tm.expected(q[perm].to(tm.W_in.device)).cpu().double() / td.sigma)
    out["token_mean"], out["shuffled"] = torch.stack(tmv), torch.stack(sh)
    return out, {"full": parts, "hybrid": hyb, "positions": hp}


@torch.no_grad()
def position_prediction(w: ModelWeights, lc: LaterCircuit, tokens: Tensor, neurons: Tensor) -> dict[str, Tensor]:
    """Each term's contribution ``[pos, k]`` to the pre-activation of ``neurons`` on ``tokens [pos]`` (no bias)."""
    L = lc.layer
    W = lc.token_model.W_in[:, neurons].float().cpu()

    def read(v: Tensor) -> Tensor:
        return centre(v.float().cpu(), w) @ W / lc.scale

    parts = {"direct": read(lc.direct.residual(tokens)), "earlier layers": read(earlier_terms(lc, tokens))}
    if L in lc.circuits and not w.parallel_attn_mlp:  # parallel attention: the MLP of L reads no layer-L head
        dev = lc.circuits[L].kernel.device
        parts["contextual bag"] = read(lc.circuits[L].summary(tokens.to(dev)))
        parts["other heads"] = read(other_heads_output(lc.explainers[L], tokens.to(dev)))
    return parts


def _swings(lc: LaterCircuit, top_m: int) -> tuple[Tensor, Tensor]:
    """The heads-only terms' swings: mean of the top-m token scores minus the sample mean (and the negative)."""
    tm = lc.token_model
    S = tensor_sum(v for k, v in tm.parts.items() if k != "direct") @ tm.W_in / tm.scale  # [V, d_mlp]
    sample = torch.cat([x.tune for x in lc.windows])
    p = token_frequencies(sample, S.shape[0]).to(S.dtype).to(S.device)
    mean = p @ S
    m = min(top_m, S.shape[0])
    return ((S.topk(m, 0).values.mean(0) - mean).cpu().double(),
            (mean - S.topk(m, 0, largest=False).values.mean(0)).cpu().double())


def _collect(w: ModelWeights, lc: LaterCircuit, idx: Tensor, predict, attr: str, per_source: int | None):
    """TRUE pre-activation ``[positions, k]`` and the per-term prediction at positions ``>= n_min`` of the first
    ``per_source`` windows (``None``: all) of each source's ``attr`` half."""
    n = lc.n_min
    ys, ps = [], []
    for x in lc.windows:
        wins = getattr(x, attr)[:per_source]
        pre = layer_pre(w, wins, lc.layer)[:, n:, idx]
        for j, t in enumerate(wins):
            ys.append(pre[j])
            ps.append({k: v[n:].float().cpu() for k, v in predict(t, idx).items()})
    return torch.cat(ys).double(), {k: torch.cat([p[k] for p in ps]).double() for k in ps[0]}


def _predictor(w: ModelWeights, lc: LaterCircuit, predict=None):
    """``predict(tokens, neurons)``: the per-term prediction (default: the weights-only composition)."""
    return predict or (lambda t, k: position_prediction(w, lc, t, k.to(w.device)))


@torch.no_grad()
def _fits(w: ModelWeights, lc: LaterCircuit, neurons: list[int], per_source: int = 2, predict=None):
    """Per-position prediction vs TRUE pre-activation: (r, fvu, parts) per neuron; bias fitted on the sample.
    ``predict(tokens, neurons)``: the per-term prediction (default: the weights-only composition)."""
    predict = _predictor(w, lc, predict)
    idx = torch.tensor(neurons, dtype=torch.long)
    y_s, p_s = _collect(w, lc, idx, predict, "tune", per_source)
    bias = (y_s - sum(p_s.values())).mean(0)
    y, parts = _collect(w, lc, idx, predict, "report", per_source)
    r, fv = fit_scores(y, sum(parts.values()) + bias)
    yc = y - y.mean(0)
    var = (yc**2).sum(0).clamp_min(1e-30)
    share = {k: (((v - v.mean(0)) * yc).sum(0) / var).tolist() for k, v in parts.items()}
    return r.tolist(), fv.tolist(), share


@torch.no_grad()
def card_evidence(w: ModelWeights, lc: LaterCircuit, neurons: list[int], predict=None,
                  per_source: int = 2) -> NeuronEvidence:
    """The cards' top windows and histograms on every reporting window (the prediction beside the truth is the
    cards' fit: the per-term prediction plus the bias fitted on the tuning windows, as :func:`_fits`) and their
    direct effect on output tokens."""
    predict = _predictor(w, lc, predict)
    idx = torch.tensor(neurons, dtype=torch.long)
    runs: list[WindowRun] = []
    if neurons:
        y_s, p_s = _collect(w, lc, idx, predict, "tune", per_source)
        bias = (y_s - sum(p_s.values())).mean(0)
        for x in lc.windows:
            pre = layer_pre(w, x.report, lc.layer)[:, :, idx].double()
            runs += [WindowRun(x.name, j, t, pre[j], sum(v.float().cpu().double() for v in predict(t, idx).values())
                               + bias) for j, t in enumerate(x.report)]
    logits = direct_logits(w, neurons, [x.tune[0] for x in lc.windows], lc.n_min,
                           "the first tuning window of each held-out text", lc.layer)
    return NeuronEvidence([x.spec for x in lc.windows], EXAMPLES_FROM, examples_from_runs(w, neurons, runs, lc.n_min),
                          logits, None)


def later_cards(w: ModelWeights, lc: LaterCircuit, sc: NeuronScores, td: TruthData, neurons: list[int],
           fits, n_tok: int = 20) -> list[LaterCard]:
    tm = lc.token_model
    ts = tm.token_scores(torch.tensor(neurons, device=tm.W_in.device)).float().cpu()
    special = [i for i in w.tokenizer.all_special_ids if i < ts.shape[0]]
    ts[special] = 0.0
    rank = {int(k): i + 1 for i, k in enumerate(sc.sensitivity.argsort(descending=True))}
    r, fv, share = fits
    out = []
    for j, k in enumerate(neurons):
        top, bot = ts[:, j].topk(50), (-ts[:, j]).topk(50)
        tp, tn = decode_tokens(w.tokenizer, top.indices.tolist()), decode_tokens(w.tokenizer, bot.indices.tolist())
        td_k = {s: float(td.d_report[c, k]) for c, s in enumerate(sc.sources)}
        pos_label, pos_evidence, neg_label, neg_evidence = label(tp, tn)
        out.append(LaterCard(k, rank[k], float(sc.sensitivity[k]),
                             [(t, round(float(v), 4)) for t, v in zip(tp[:n_tok], top.values[:n_tok])],
                             [(t, round(-float(v), 4)) for t, v in zip(tn[:n_tok], bot.values[:n_tok])],
                             pos_label, pos_evidence, neg_label, neg_evidence,
                             r[j], fv[j], {t: v[j] for t, v in share.items()}, td_k,
                             {s: float(sc.predicted_d[c, k]) for c, s in enumerate(sc.sources)},
                             max(td_k, key=td_k.__getitem__), min(td_k, key=td_k.__getitem__)))
    return out


def _verification(w, lc, sc: NeuronScores, thr: Threshold, td: TruthData, s, cards: list[int], rank: str, hp):
    """Precision, recall and the per-position fits of the ranking predictor (and, when that is the hybrid, of
    the weights-only composition beside it)."""
    passed = sc.sensitivity >= thr.value
    ok = validated(td.d_report, sc.predicted_d)
    rand = torch.randperm(len(passed), generator=torch.Generator().manual_seed(s.seed))[: s.n_random].tolist()
    hyb = (lambda t, k: hp.parts(w, t, k)) if rank == "hybrid" else None
    fr, fc = _fits(w, lc, rand, predict=hyb), _fits(w, lc, cards, predict=hyb) if cards else None
    full = (_fits(w, lc, rand), _fits(w, lc, cards) if cards else None) if hyb else (None, None)
    top20 = {x: float(passed[td.d_report[c].abs().argsort(descending=True)[:20]].double().mean())
             for c, x in enumerate(sc.sources)}
    return LaterVerification(
        thr.n_passed, float(ok[passed].double().mean()) if passed.any() else None, float(ok.double().mean()), top20,
        thr.n_passed / len(passed), None if fc is None else FitMedians.of(*fc), FitMedians.of(*fr), rank,
        None if full[1] is None else FitMedians.of(*full[1]), None if full[0] is None else FitMedians.of(*full[0])), fc


@torch.no_grad()
def find_later_neurons(w: ModelWeights, layer: int, cs=None, s=None, *, shared=None) -> LaterResult:
    """The whole later-layer analysis of the MLP of ``layer`` (see :mod:`attnscope.later.method`)."""

    cs, s = cs or CircuitSettings(), s or LaterSettings()
    if s.rank_by not in ("hybrid", "full"):
        raise AttnscopeError(f"rank_by {s.rank_by!r} is not a ranking predictor; use 'hybrid' or 'full'")
    t = {}
    t0 = time.perf_counter()
    lc = build_later(w, layer, cs, s, shared=shared)
    t["circuits"] = time.perf_counter() - t0
    td = truth_data(w, lc, cs.calibration)
    preds, parts = predictors(w, lc, td, cs.neff_min)
    t["truth_and_predictions"] = time.perf_counter() - t0 - t["circuits"]
    names = [x.name for x in lc.windows]
    sp, sn = _swings(lc, s.top_m)
    rank = s.rank_by if s.rank_by in preds else "full"  # layer 0 has no hybrid (nothing before it)
    rank_parts = parts["hybrid"] if rank == "hybrid" else parts["full"]  # rank_by is hybrid or full (checked above)
    sc = NeuronScores(sources=names, predicted_d=preds[rank], parts=rank_parts,
                      sensitivity=preds[rank].abs().max(0).values, swing_pos=sp, swing_neg=sn, sigma=td.sigma)
    thr = select(sc, td.d_tune, s.precision_target)
    passed = sc.sensitivity >= thr.value
    scores = {p: {n: discovery_scores(P[c], td.d_report[c], passed if p == rank else None)
                  for c, n in enumerate(names)} for p, P in preds.items()}
    rnd = {n: {str(k): random_precision(td.d_report[c], torch.sign(sc.predicted_d[c]), k) for k in KS}
           for c, n in enumerate(names)}
    ceiling = {n: spearman(td.d_tune[c], td.d_report[c]) for c, n in enumerate(names)}
    card_ids = [int(k) for k in sc.sensitivity.argsort(descending=True)[: thr.n_passed][: s.n_cards]]
    ver, fc = _verification(w, lc, sc, thr, td, s, card_ids, rank, parts["positions"])
    cards = later_cards(w, lc, sc, td, card_ids, fc) if card_ids else []
    rows = neuron_rows(w, sc, thr, td.d_tune, lc.token_model)
    hp = parts["positions"]
    hyb = (lambda tok, k: hp.parts(w, tok, k)) if rank == "hybrid" and hp is not None else None
    evidence = card_evidence(w, lc, [c.index for c in cards], hyb)
    lfl = one_vs_rest_verification(w, lc.token_model.expected, td.sigma, lc.n_min, [list(x.report) for x in lc.windows],
                                   names, td.cal_token_mean,
                                   [token_frequencies(x.tune, w.d_vocab) * x.tune.numel() for x in lc.windows],
                                   "tuning-half counts (the ranking's)", td.report_stats)
    t["total"] = time.perf_counter() - t0
    return LaterResult(w.info(), layer, lc.record(), {"circuit": asdict(cs), "later": asdict(s)},
                       [x.spec for x in lc.windows], scores, rnd, thr, ver, cards, rows, t, ceiling,
                       true_d_report={n: td.d_report[c] for c, n in enumerate(names)}, evidence=evidence,
                       like_for_like=lfl)


def find_later_layers(w: ModelWeights, layers: list[int], cs=None, s=None) -> list[LaterResult]:
    """:func:`find_later_neurons` for several layers, sharing the sample runs and each layer's circuit."""
    sh = prepare(w, max(layers), cs, s)
    return [find_later_neurons(w, L, cs, s, shared=sh) for L in layers]




