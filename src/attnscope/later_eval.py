r"""Neurons of a later layer's MLP: ranked from the composed circuit, selected, verified against the TRUE
pre-activation, and scored against the true per-context effects (issue 11; method §15).

The ranking, threshold and discovery scores are :mod:`attnscope.neurons` / :mod:`attnscope.groundtruth`
applied to the token model of :mod:`attnscope.later`; only the true pre-activation comes from layer ``L``.
Predictors scored side by side (all divided by the calibration std of each neuron):

* ``full``: every term of the composed token model;
* ``heads``: the heads only (earlier layers' terms through ``G_l`` + layer ``L``'s bag and other heads);
* ``direct``: the effective embedding ``E'_L`` alone;
* ``hybrid`` (``L > 0``; ranks the neurons by default): each token's mean TRUE pre-activation on the sample plus
  what the broad heads of the layers ``< L`` add in a context beyond it (:mod:`attnscope.later_context`);
* ``token_mean``: circuit-free, each token's mean TRUE pre-activation on the sample (unseen: overall mean);
* ``shuffled``: ``full`` with the token-frequency difference permuted over the vocabulary (the null).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor

from .contrast import PreStats, token_frequencies
from .decomposition import centre
from .explain import fit_scores, other_heads_output
from .forward import iter_layers
from .groundtruth import KS, discovery_scores, random_precision, spearman
from .errors import AttnscopeError
from .later import LaterCircuit, earlier_terms
from .later_result import FitMedians, LaterCard, LaterResult, LaterVerification
from .models import ModelWeights
from .neurons import NeuronScores, Threshold, _decode, _rows, label, one_vs_rest_effects, predicted_effects, select, validated
from .texts import text_tokens

PREDICTORS = ("full", "heads", "direct", "hybrid", "token_mean", "shuffled")


@torch.no_grad()
def layer_pre(w: ModelWeights, windows: Tensor, layer: int) -> Tensor:
    """TRUE pre-activation of the MLP of ``layer`` on ``windows [N, T]``: ``[N, T, d_mlp]``."""
    out = []
    for b0 in range(0, windows.shape[0], 8):
        for a in iter_layers(w, windows[b0 : b0 + 8].to(w.device), stop_layer=layer):
            if a.layer == layer:
                out.append(a.mlp_pre.float().cpu())
    return torch.cat(out)


def _stats(pre: Tensor, n_min: int) -> PreStats:
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


def calibration_sigma(w: ModelWeights, lc: LaterCircuit, calibration: str) -> Tensor:
    T = lc.windows[0].tune.shape[1]
    bos = w.bos_token_id if w.prepend_bos else None
    cal = text_tokens(calibration, w.tokenizer, max_tokens=T, min_tokens=lc.n_min + 8, bos_token_id=bos)
    return layer_pre(w, cal[None], lc.layer)[0, lc.n_min :].double().std(0).clamp_min(1e-6)


@dataclass
class TruthData:
    """True pre-activations of the MLP of L summarised per source and half."""

    d_tune: Tensor  # [n_sources, d_mlp] one-vs-rest effect sizes, tuning half
    d_report: Tensor  # [n_sources, d_mlp] reporting half
    M: Tensor  # [d_vocab, d_mlp] token-mean predictor (tuning half)
    sigma: Tensor  # [d_mlp] calibration std


@torch.no_grad()
def truth_data(w: ModelWeights, lc: LaterCircuit, calibration: str) -> TruthData:
    n_min = lc.n_min
    tune = [layer_pre(w, x.tune, lc.layer) for x in lc.windows]
    rep = [layer_pre(w, x.report, lc.layer) for x in lc.windows]
    return TruthData(one_vs_rest_effects([_stats(p, n_min) for p in tune]),
                     one_vs_rest_effects([_stats(p, n_min) for p in rep]),
                     token_mean(tune, [x.tune for x in lc.windows], n_min, w.d_vocab),
                     calibration_sigma(w, lc, calibration))


def predictors(w: ModelWeights, lc: LaterCircuit, td: TruthData,
               neff_min: float = 16.0) -> tuple[dict[str, Tensor], dict[str, dict[str, Tensor]]]:
    """Predicted one-vs-rest effects ``[n_sources, d_mlp]`` of each predictor (module docstring), and each term's
    part of the ``full`` and the ``hybrid`` one (every such predictor is the sum of its parts)."""
    from .later_context import hybrid_effects

    tm = lc.token_model
    parts = predicted_effects(tm, lc.windows, td.sigma, w.d_vocab)
    hyb, _, hp = hybrid_effects(w, lc, td, neff_min) if lc.layer > 0 else ({}, [], None)
    out = {"full": sum(parts.values()), "heads": sum(v for k, v in parts.items() if k != "direct"),
           "direct": parts["direct"]}
    if hyb:
        out["hybrid"] = sum(hyb.values())
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
    S = sum(v for k, v in tm.parts.items() if k != "direct") @ tm.W_in / tm.scale  # [V, d_mlp]
    sample = torch.cat([x.tune for x in lc.windows])
    p = token_frequencies(sample, S.shape[0]).to(S.dtype).to(S.device)
    mean = p @ S
    m = min(top_m, S.shape[0])
    return ((S.topk(m, 0).values.mean(0) - mean).cpu().double(),
            (mean - S.topk(m, 0, largest=False).values.mean(0)).cpu().double())


@torch.no_grad()
def _fits(w: ModelWeights, lc: LaterCircuit, neurons: list[int], per_source: int = 2, predict=None):
    """Per-position prediction vs TRUE pre-activation: (r, fvu, parts) per neuron; bias fitted on the sample.
    ``predict(tokens, neurons)``: the per-term prediction (default: the weights-only composition)."""
    predict = predict or (lambda t, k: position_prediction(w, lc, t, k.to(w.device)))
    idx = torch.tensor(neurons, dtype=torch.long)
    n = lc.n_min

    def collect(attr: str):
        ys, ps = [], []
        for x in lc.windows:
            wins = getattr(x, attr)[:per_source]
            pre = layer_pre(w, wins, lc.layer)[:, n:, idx]
            for j, t in enumerate(wins):
                ys.append(pre[j])
                ps.append({k: v[n:].float().cpu() for k, v in predict(t, idx).items()})
        return torch.cat(ys).double(), {k: torch.cat([p[k] for p in ps]).double() for k in ps[0]}

    y_s, p_s = collect("tune")
    bias = (y_s - sum(p_s.values())).mean(0)
    y, parts = collect("report")
    r, fv = fit_scores(y, sum(parts.values()) + bias)
    yc = y - y.mean(0)
    var = (yc**2).sum(0).clamp_min(1e-30)
    share = {k: (((v - v.mean(0)) * yc).sum(0) / var).tolist() for k, v in parts.items()}
    return r.tolist(), fv.tolist(), share


def _cards(w: ModelWeights, lc: LaterCircuit, sc: NeuronScores, td: TruthData, neurons: list[int],
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
        tp, tn = _decode(w.tokenizer, top.indices.tolist()), _decode(w.tokenizer, bot.indices.tolist())
        td_k = {s: float(td.d_report[c, k]) for c, s in enumerate(sc.sources)}
        out.append(LaterCard(k, rank[k], float(sc.sensitivity[k]),
                             [(t, round(float(v), 4)) for t, v in zip(tp[:n_tok], top.values[:n_tok])],
                             [(t, round(-float(v), 4)) for t, v in zip(tn[:n_tok], bot.values[:n_tok])], *label(tp, tn),
                             r[j], fv[j], {t: v[j] for t, v in share.items()}, td_k,
                             {s: float(sc.predicted_d[c, k]) for c, s in enumerate(sc.sources)},
                             max(td_k, key=td_k.get), min(td_k, key=td_k.get)))
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
    return LaterVerification(
        thr.n_passed, float(ok[passed].double().mean()) if passed.any() else None, float(ok.double().mean()),
        {x: float(passed[td.d_report[c].abs().argsort(descending=True)[:20]].double().mean()) for c, x in enumerate(sc.sources)},
        thr.n_passed / len(passed), None if fc is None else FitMedians.of(*fc), FitMedians.of(*fr), rank,
        None if full[1] is None else FitMedians.of(*full[1]), None if full[0] is None else FitMedians.of(*full[0])), fc


@torch.no_grad()
def find_later_neurons(w: ModelWeights, layer: int, cs=None, s=None, *, shared=None) -> LaterResult:
    """The whole later-layer analysis of the MLP of ``layer`` (see :mod:`attnscope.later`)."""
    import time

    from .circuit import CircuitSettings
    from .later import LaterSettings, build_later

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
    sc = NeuronScores(sources=names, predicted_d=preds[rank], parts=parts[rank], sensitivity=preds[rank].abs().max(0).values,
                      swing_pos=sp, swing_neg=sn, sigma=td.sigma)
    thr = select(sc, td.d_tune, s.precision_target)
    passed = sc.sensitivity >= thr.value
    scores = {p: {n: discovery_scores(P[c], td.d_report[c], passed if p == rank else None)
                  for c, n in enumerate(names)} for p, P in preds.items()}
    rnd = {n: {str(k): random_precision(td.d_report[c], torch.sign(sc.predicted_d[c]), k) for k in KS}
           for c, n in enumerate(names)}
    ceiling = {n: spearman(td.d_tune[c], td.d_report[c]) for c, n in enumerate(names)}
    card_ids = [int(k) for k in sc.sensitivity.argsort(descending=True)[: thr.n_passed][: s.n_cards]]
    ver, fc = _verification(w, lc, sc, thr, td, s, card_ids, rank, parts["positions"])
    cards = _cards(w, lc, sc, td, card_ids, fc) if card_ids else []
    rows = _rows(w, sc, thr, td.d_tune, lc.token_model)
    t["total"] = time.perf_counter() - t0
    return LaterResult(w.info(), layer, lc.record(), {"circuit": asdict(cs), "later": asdict(s)},
                       [x.spec for x in lc.windows], scores, rnd, thr, ver, cards, rows, t, ceiling,
                       true_d_report={n: td.d_report[c] for c, n in enumerate(names)})


def find_later_layers(w: ModelWeights, layers: list[int], cs=None, s=None) -> list[LaterResult]:
    """:func:`find_later_neurons` for several layers, sharing the sample runs and each layer's circuit."""
    from .later import prepare

    sh = prepare(w, max(layers), cs, s)
    return [find_later_neurons(w, L, cs, s, shared=sh) for L in layers]


def run_later(w: ModelWeights, layer: int, cs, eval: list[str] | None, *, n_cards: int, out: Path,
              as_json: bool, command: str = "") -> None:
    """``attnscope neurons MODEL --layer L`` for ``L > 0``: run; write OUT/neurons.json, OUT/neurons.csv and
    OUT/report.html (the later-layer section); print the summary."""
    from .cache import staged_output
    from .errors import check_index
    from .later import LaterSettings
    from .report import write_report

    check_index("layer", layer, w.n_layers)
    res = find_later_neurons(w, layer, cs, LaterSettings(eval=eval or None, n_cards=n_cards))
    with staged_output(out, "neurons") as tmp:
        res.save(tmp)
        write_report(tmp, model_info=res.model, later=[res], command=command,
                     provenance={"later-layer settings": res.settings, "timings_s": res.timings})
    if as_json:
        print(json.dumps(res.to_json(), indent=1, default=str))
        return
    print_later_summary(res)
    print(f"wrote {Path(out) / 'neurons.json'}, {Path(out) / 'neurons.csv'} (one row per neuron) and "
          f"{Path(out) / 'report.html'}")


def print_later_summary(res: LaterResult) -> None:
    from rich.console import Console
    from rich.table import Table

    from .cli_show import num

    con = Console()
    t = Table(title=f"layers <= {res.layer}: effective embeddings and contextual heads")
    for c in ("layer", "approx. FVU (token+pos)", "unseen share", "contextual heads", "circuit FVU eff./true",
              "||G_l||", "limiting condition"):
        t.add_column(c)
    for p in res.circuit.pieces:
        f = p.circuit_fvu_effective
        t.add_row(str(p.layer), f"{p.approximation.fvu:.3f}", f"{p.approximation.unseen_share:.3f}", str(p.heads),
                  "-" if f is None else f"{f:.3f} / {num(p.circuit_fvu_true)}",
                  "-" if p.propagation_norm is None else f"{p.propagation_norm:.2f}", p.limiting_condition[:70])
    con.print(t)
    a = res.circuit.approximation_with_earlier_terms
    con.print(f"residual entering layer {res.layer}: FVU {a.fvu:.3f} with the earlier heads' terms; median "
              "Spearman vs the true per-context effects: " + ", ".join(f"{p} {res.median_spearman(p):.3f}" for p in res.scores))
    v = res.verification
    con.print(f"{v.n_passed} neurons pass (precision {num(v.precision)}, all neurons {v.precision_random:.3f})")
    t = Table(title="top neurons")
    for c in ("neuron", "sensitivity", "r", "FVU", "label", "top tokens", "true d (best context)"):
        t.add_column(c)
    for c in res.cards[:15]:
        t.add_row(str(c.index), f"{c.sensitivity:.2f}", f"{c.r:.2f}", f"{c.fvu:.2f}", c.label or "",
                  " ".join(repr(tok)[1:-1] for tok, _ in c.top_positive_tokens[:6]),
                  f"{c.positive_text} {c.true_d[c.positive_text]:+.2f}")
    con.print(t)
