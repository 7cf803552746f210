r"""Context-sensitive neurons of the layer-0 MLP, from the weights and one calibration text (method §8-9, §15).

Four public steps, each a function with a typed result:

1. :func:`score` ranks **every** neuron.  Its predicted context sensitivity is the largest predicted effect
   size over the one-vs-rest contrasts of the held-out sources, ``max_c |Delta_c,k| / sigma_cal,k``, where
   ``Delta`` is the full layer-0 explanation's expected difference under the sources' token frequencies
   (:mod:`attnscope.neurons.contrast`: weights and token counts, no forward pass over the sources) and
   ``sigma_cal`` the std of the neuron's true pre-activation on the calibration text.  The method's swings
   (``mean(top-m S_k) - E_cal[S_k]``, the contextual bag alone) are kept in each row.
2. :func:`select` sets the threshold by measurement: on the *tuning* half of the held-out windows it
   measures each neuron's true one-vs-rest effect sizes and keeps the longest prefix of the ranking whose
   precision (share with ``|d| >= 1`` and the predicted sign in some contrast) is at least
   ``precision_target``.  A model whose weights predict nothing (random init) passes ~none.
3. :func:`verify` scores the reported neurons on the *reporting* half: precision, recall of each
   contrast's top-20 by ``|d|``, the full explanation against the TRUE pre-activation (pooled and within
   text r / FVU, the part each term explains), the contextual-heads fidelity, and the same for random
   neurons beside them; plus the denominator transfer of every held-out text.
4. :func:`label` gives labels backed by independent evidence (:mod:`attnscope.neurons.labels`).

:func:`find_neurons` runs the four; the result's ``save`` writes ``neurons.json``, ``neurons.csv`` (one
row per neuron) and ``traces.json``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from attnscope.circuit.build import Circuit, circuit_fidelity, mlp_input_weights, true_head_output
from attnscope.circuit.query import circuit_output
from attnscope.core.errors import AttnscopeError
from attnscope.core.executor import Executor
from attnscope.core.stats import median as _median
from attnscope.core.stats import tensor_sum
from attnscope.core.texts import bundled_texts, decode_tokens, require_diverse  # noqa: F401  (re-exported)
from attnscope.exact.decomposition import centre
from attnscope.models import ModelWeights
from attnscope.neurons.contrast import (
    PreStats,
    SourceWindows,
    TokenModel,
    build_token_model,
    calibration_std,
    effect_sizes,
    pre_stats,
    source_windows,
    token_frequencies,
)
from attnscope.neurons.evidence import (
    EXAMPLES_FROM,
    NeuronEvidence,
    activation_examples,
    direct_logits,
    precision_curve,
)
from attnscope.neurons.explain import (
    Explainer,
    build_explainer,
    contextual_fidelity,
    denominator_transfer,
    explain_terms,
    score_explanation,
    true_pre,
)
from attnscope.neurons.labels import auto_label
from attnscope.neurons.result import (  # noqa: F401  (re-exported: the stage's types live with it)
    D_MIN,
    ROW_TERMS,
    SCHEMA_VERSION,
    CardHead,
    FitSummary,
    NeuronCard,
    NeuronResult,
    NeuronRow,
    NeuronSettings,
    NeuronTrace,
    Threshold,
    Verification,
)
from attnscope.neurons.verification import (
    ContrastVerification,
    one_vs_rest_verification,
    token_mean_on_calibration,
    window_stats,
)

TUNING_COUNTS = "tuning-half counts (the ranking's prediction)"


@dataclass
class NeuronScores:
    """Output of :func:`score` (tensors over neurons)."""

    sources: list[str]
    predicted_d: Tensor  # [n_sources, d_mlp] one-vs-rest predicted effect sizes
    parts: dict[str, Tensor]  # term -> [n_sources, d_mlp], its part of predicted_d
    sensitivity: Tensor  # [d_mlp]
    swing_pos: Tensor  # [d_mlp]
    swing_neg: Tensor  # [d_mlp]
    sigma: Tensor  # [d_mlp]


















# --------------------------------------------------------------------------------------------------
# Held-out windows
# --------------------------------------------------------------------------------------------------


def held_out_windows(w: ModelWeights, circ: Circuit, specs: list[str] | None,
                     max_windows: int | None) -> list[SourceWindows]:
    """Windows of each held-out source (default: every bundled text); a source that holds the calibration
    text starts after the calibration window, so no held-out position was seen by the calibration."""
    cal = circ.settings.calibration
    specs = specs or [f"bundled:{n}" for n in bundled_texts()]
    if len(set(specs)) < 2:
        raise AttnscopeError("neurons need at least two held-out sources for one-vs-rest contrasts; "
                             "pass --eval twice or more")
    skip = len(circ.calibration_tokens) - (1 if w.prepend_bos else 0)
    out = [source_windows(w, s, circ.T, max_windows=max_windows, skip_tokens=skip if s == cal else 0)
           for s in dict.fromkeys(specs)]
    for sw in out:  # a degenerate held-out text would make every neuron "pass" with r = 1
        require_diverse(torch.cat([sw.tune, sw.report])[:, 1 if w.prepend_bos else 0:], sw.spec, "evaluation")
    return out


def one_vs_rest_effects(stats: list[PreStats]) -> Tensor:
    """True one-vs-rest effect sizes ``[n_sources, d_mlp]`` (B pools the windows of the other sources)."""
    out = []
    for c, a in enumerate(stats):
        rest = [s for j, s in enumerate(stats) if j != c]
        out.append(effect_sizes(a, sum(rest[1:], rest[0])))
    return torch.stack(out)


def validated(d: Tensor, pred: Tensor) -> Tensor:
    """``[d_mlp]``: |d| >= 1 with the predicted sign in at least one contrast (``d, pred [n_sources, d_mlp]``)."""
    return ((d.abs() >= D_MIN) & (torch.sign(d) == torch.sign(pred))).any(0)


# --------------------------------------------------------------------------------------------------
# 1. score
# --------------------------------------------------------------------------------------------------


def predicted_effects(tm: TokenModel, windows: list[SourceWindows], sigma: Tensor,
                      d_vocab: int) -> dict[str, Tensor]:
    """Each term's one-vs-rest predicted effect size ``[n_sources, d_mlp]`` from the tuning windows' token
    counts (their sum is the predicted effect)."""
    counts = torch.stack([token_frequencies(s.tune, d_vocab) * s.tune.numel() for s in windows])  # [C, V]
    per = [tm.expected_parts(c / c.sum()) for c in counts]
    w_c = counts.sum(1)
    out = {}
    for t in per[0]:
        mus = torch.stack([p[t].cpu().double() for p in per])  # [C, d_mlp]
        rows = []
        for c in range(len(windows)):
            rest = torch.arange(len(windows)) != c
            rows.append((mus[c] - (w_c[rest, None] * mus[rest]).sum(0) / w_c[rest].sum()) / sigma)
        out[t] = torch.stack(rows)
    return out


@torch.no_grad()
def swing_inputs(w: ModelWeights, circ: Circuit) -> tuple[Tensor, Tensor, Tensor]:
    """What the swings compare: ``W_in [d_model, d_mlp]``, the centred extended embeddings over the MLP scale
    ``[d_vocab, d_model]`` (token ``x``'s score for neuron ``k`` is ``(ext @ W_in)[x, k]``) and the scores'
    mean over the calibration text's tokens, ``E_cal[S_k]`` ``[d_mlp]``."""
    W, _ = mlp_input_weights(w)
    ext = centre(circ.ext, w) / circ.mlp_scale
    body = circ.calibration_tokens[1:] if w.prepend_bos else circ.calibration_tokens
    p_cal = torch.bincount(body.to(w.device), minlength=w.d_vocab).to(ext.dtype)
    return W, ext, ((p_cal / p_cal.sum()) @ ext) @ W


@torch.no_grad()
def swings(w: ModelWeights, circ: Circuit, top_m: int, chunk: int) -> tuple[Tensor, Tensor]:
    """The method's swings of the contextual bag alone: ``mean(top-m S_k) - E_cal[S_k]`` and the negative."""
    W, ext, mean_cal = swing_inputs(w, circ)
    ext_mT = ext[circ.token_mask].T.contiguous()  # [d_model, V'], so each chunk's top-m runs along its rows
    m = min(top_m, int(circ.token_mask.sum()))
    pos, neg = [], []
    for c0 in range(0, W.shape[1], chunk):
        S = W[:, c0 : c0 + chunk].T @ ext_mT  # [chunk, V']
        pos.append(S.topk(m, dim=1).values.mean(1) - mean_cal[c0 : c0 + chunk])
        neg.append(-(S.topk(m, dim=1, largest=False).values.mean(1)) + mean_cal[c0 : c0 + chunk])
    return torch.cat(pos).cpu().double(), torch.cat(neg).cpu().double()


def score(w: ModelWeights, circ: Circuit, windows: list[SourceWindows], settings: NeuronSettings,
          tm: TokenModel | None = None) -> NeuronScores:
    """Rank every neuron by its predicted context sensitivity (weights, calibration text, token counts)."""
    tm = tm or build_token_model(w, circ)
    sigma = calibration_std(w, circ).cpu()
    parts = predicted_effects(tm, windows, sigma, w.d_vocab)
    pred = tensor_sum(parts.values())
    sp, sn = swings(w, circ, settings.top_m, settings.chunk)
    return NeuronScores([s.name for s in windows], pred, parts, pred.abs().max(0).values, sp, sn, sigma)


# --------------------------------------------------------------------------------------------------
# 2. select
# --------------------------------------------------------------------------------------------------


def select(scores: NeuronScores, d_tune: Tensor, precision_target: float) -> Threshold:
    """The measured threshold: the longest prefix of the ranking whose tuning-half precision >= target."""
    ok = validated(d_tune, scores.predicted_d)
    order = scores.sensitivity.argsort(descending=True)
    prec = ok[order].double().cumsum(0) / torch.arange(1, len(order) + 1)
    good = torch.nonzero(prec >= precision_target).squeeze(1)
    if len(good) == 0:
        return Threshold(float("inf"), precision_target, float("nan"), 0, float(ok.double().mean()))
    k = int(good.max()) + 1
    return Threshold(float(scores.sensitivity[order[k - 1]]), precision_target, float(prec[k - 1]), k,
                     float(ok.double().mean()))


# --------------------------------------------------------------------------------------------------
# 3. verify
# --------------------------------------------------------------------------------------------------


def fit_summary(w: ModelWeights, circ: Circuit, ex: Explainer, texts: list[Tensor], neurons: list[int]):
    """The full explanation's and the contextual heads' fits for ``neurons``: (FitSummary, per-neuron scores)."""
    sc = score_explanation(w, circ, ex, texts, neurons)
    cr, cf = contextual_fidelity(w, circ, texts, neurons)
    fs = FitSummary(len(neurons), _median(sc.r), _median(sc.fvu), _median(sc.r_within), _median(sc.fvu_within),
                    {t: _median(v) for t, v in sc.parts.items()}, _median(cr.tolist()), _median(cf.tolist()))
    return fs, sc, cr.tolist(), cf.tolist()


def verify(w: ModelWeights, circ: Circuit, scores: NeuronScores, threshold: Threshold, d_report: Tensor,
           windows: list[SourceWindows], settings: NeuronSettings, ex: Explainer):
    """Score the reported set and random neurons on the reporting half.  Returns (Verification, card
    neurons, their per-neuron fits)."""
    passed = scores.sensitivity >= threshold.value
    ok = validated(d_report, scores.predicted_d)
    recall = {s: float(passed[d_report[c].abs().argsort(descending=True)[:20]].double().mean())
              for c, s in enumerate(scores.sources)}
    texts = [t for s in windows for t in s.report]
    g = torch.Generator().manual_seed(settings.seed)
    rand = torch.randperm(len(passed), generator=g)[: settings.n_random].tolist()
    cards = [int(k) for k in scores.sensitivity.argsort(descending=True)[: threshold.n_passed][: settings.max_neurons]]
    rep = fit_summary(w, circ, ex, texts, cards) if cards else None
    rnd = fit_summary(w, circ, ex, texts, rand)[0]
    fid = circuit_fidelity(w, circ, {s.name: s.report[0] for s in windows})
    v = Verification(float(ok[passed].double().mean()) if passed.any() else float("nan"), float(ok.double().mean()),
                     recall, threshold.n_passed / len(passed), rep[0] if rep else None, rnd, fid,
                     rep[1].n_positions if rep else 0)
    return v, cards, rep


# --------------------------------------------------------------------------------------------------
# 4. label, and the whole pipeline
# --------------------------------------------------------------------------------------------------


def label(tokens_pos: list[str], tokens_neg: list[str]) -> tuple[str | None, str | None, str | None, str | None]:
    """``(label, evidence, negative label, evidence)`` from the neuron's strongest tokens each way."""
    a, b = auto_label(tokens_pos), auto_label(tokens_neg)
    return (a.text if a else None, a.evidence if a else None, b.text if b else None, b.evidence if b else None)


def neuron_cards(w, circ, ex, tm, scores, cards, rep, d_report, windows,
           settings) -> tuple[list[NeuronCard], list[NeuronTrace]]:
    if not cards:
        return [], []
    _, sc, cr, cf = rep
    n_min = circ.settings.min_position
    pre_cal = true_pre(w, circ.calibration_tokens).cpu()[n_min:]
    ts = tm.token_scores(torch.tensor(cards, device=w.device)).cpu()
    keep = circ.token_mask.cpu().clone()
    keep[[i for i in w.tokenizer.all_special_ids if i < len(keep)]] = False
    ts[~keep] = 0.0
    rank = {int(k): i + 1 for i, k in enumerate(scores.sensitivity.argsort(descending=True))}
    out, traces = [], []
    for j, k in enumerate(cards):
        top, bot = ts[:, j].topk(50), (-ts[:, j]).topk(50)
        tp, tn = decode_tokens(w.tokenizer, top.indices.tolist()), decode_tokens(w.tokenizer, bot.indices.tolist())
        td = {s: float(d_report[c, k]) for c, s in enumerate(scores.sources)}
        pos_t, neg_t = max(td, key=td.__getitem__), min(td, key=td.__getitem__)
        n = settings.n_top_tokens
        lab, lab_ev, lab_neg, lab_neg_ev = label(tp, tn)
        out.append(NeuronCard(k, rank[k], float(scores.sensitivity[k]),
                              [(t, round(float(v), 4)) for t, v in zip(tp[:n], top.values[:n])],
                              [(t, round(-float(v), 4)) for t, v in zip(tn[:n], bot.values[:n])],
                              lab, lab_ev, lab_neg, lab_neg_ev, bool((pre_cal[:, k] > 0).any()),
                              sc.r[j], sc.fvu[j], sc.r_within[j], sc.fvu_within[j],
                              {t: v[j] for t, v in sc.parts.items()}, cr[j], cf[j], td, pos_t, neg_t))
        if j < 8:
            traces += [_trace(w, circ, ex, k, s.name, s.report[0]) for s in windows if s.name in (pos_t, neg_t)]
    return out, traces


@torch.no_grad()
def _trace(w, circ, ex, k: int, name: str, toks: Tensor) -> NeuronTrace:
    n_min = circ.settings.min_position
    toks = toks.to(w.device)
    Wk = mlp_input_weights(w)[0][:, k]
    y, pre, _ = true_head_output(w, circ.heads, toks)
    parts = explain_terms(w, circ, ex, toks, torch.tensor([k], device=w.device))
    return NeuronTrace(k, name, pre[n_min:, k].tolist(), tensor_sum(parts.values())[n_min:, 0].tolist(),
                       (centre(y, w) @ Wk / circ.mlp_scale)[n_min:].tolist(),
                       (centre(circuit_output(w, circ, toks), w) @ Wk / circ.mlp_scale)[n_min:].tolist())


def neuron_rows(w, scores: NeuronScores, threshold: Threshold, d_tune: Tensor, tm: TokenModel,
          n_tok: int = 5) -> list[NeuronRow]:
    order = scores.sensitivity.argsort(descending=True).tolist()
    ok = validated(d_tune, scores.predicted_d)
    best = scores.predicted_d.abs().argmax(0)
    rows = []
    for c0 in range(0, len(order), 1024):
        idx = order[c0 : c0 + 1024]
        ts = tm.token_scores(torch.tensor(idx, device=tm.W_in.device)).cpu()
        top, bot = ts.topk(n_tok, dim=0).indices, (-ts).topk(n_tok, dim=0).indices
        for j, k in enumerate(idx):
            d_bag, d_direct, d_other_heads = (float(scores.parts[t][best[k], k]) for t in ROW_TERMS)
            rows.append(NeuronRow(k, c0 + j + 1, float(scores.sensitivity[k]), scores.sources[int(best[k])],
                                  float(scores.predicted_d[best[k], k]), d_bag, d_direct, d_other_heads,
                                  float(scores.swing_pos[k]),
                                  float(scores.swing_neg[k]), float(scores.sigma[k]),
                                  bool(scores.sensitivity[k] >= threshold.value), bool(ok[k]),
                                  decode_tokens(w.tokenizer, top[:, j].tolist()),
                                  decode_tokens(w.tokenizer, bot[:, j].tolist()),
                                  float(scores.parts["norm scale"][best[k], k])
                                  if "norm scale" in scores.parts else 0.0))
    return rows


def like_for_like(w: ModelWeights, circ: Circuit, tm: TokenModel, scores: NeuronScores, windows: list[SourceWindows],
                  rep_stats: list[list[PreStats]]) -> dict[str, ContrastVerification]:
    """Each source's one-vs-rest contrast on the reporting half, predicted from those windows' own counts."""
    n_min = circ.settings.min_position
    tmean = token_mean_on_calibration(w, circ.calibration_tokens, n_min, circ.settings.calibration + " (calibration)")
    counts = [token_frequencies(x.tune, w.d_vocab) * x.tune.numel() for x in windows]
    return one_vs_rest_verification(w, tm.expected, scores.sigma, n_min, [list(x.report) for x in windows],
                                    scores.sources, tmean, counts, TUNING_COUNTS, rep_stats)


@torch.no_grad()
def find_neurons(w: ModelWeights, circ: Circuit, settings: NeuronSettings | None = None, *,
                 progress: bool = True, executor: Executor | None = None) -> NeuronResult:
    """Score, select, verify and label every neuron of the layer-0 MLP (see the module docstring);
    ``executor`` shards the ground truth's true pre-activations (default: this process)."""
    if w.parallel_attn_mlp:
        raise AttnscopeError(f"the layer-0 MLP of {w.name} does not read layer-0 attention (parallel attention + MLP, "
                             "GPT-NeoX), so it has no layer-0 context neurons; use the later-layer method: "
                             "--layer 1 or deeper")
    s = settings or NeuronSettings()
    windows = held_out_windows(w, circ, s.eval, s.max_windows)
    ex = build_explainer(w, circ)
    tm = build_token_model(w, circ, ex)
    scores = score(w, circ, windows, s, tm)
    n_min = circ.settings.min_position
    d_tune = one_vs_rest_effects([pre_stats(w, x.tune, n_min, executor) for x in windows])
    rep_stats = [window_stats(w, list(x.report), n_min, executor) for x in windows]  # per window: split-half ceiling
    d_report = one_vs_rest_effects([sum(st[1:], st[0]) for st in rep_stats])
    thr = select(scores, d_tune, s.precision_target)
    ver, cards, rep = verify(w, circ, scores, thr, d_report, windows, s, ex)
    ver.like_for_like = like_for_like(w, circ, tm, scores, windows, rep_stats)
    card_list, traces = neuron_cards(w, circ, ex, tm, scores, cards, rep, d_report, windows, s)
    shown = [c.index for c in card_list]
    evidence = NeuronEvidence([x.spec for x in windows], EXAMPLES_FROM,
                              activation_examples(w, circ, ex, shown, windows),
                              direct_logits(w, shown, [circ.calibration_tokens], circ.settings.min_position,
                                            "the calibration text"),
                              precision_curve(scores.sensitivity, validated(d_tune, scores.predicted_d),
                                              validated(d_report, scores.predicted_d), thr.value, s.precision_target))
    dens = denominator_transfer(w, circ, {x.name: x.report[0] for x in windows})
    rows = neuron_rows(w, scores, thr, d_tune, tm)
    for r in rows:  # the truth beside each prediction (the report's ranking and scatter)
        r.true_d = float(d_report[scores.sources.index(r.best_contrast), r.index])
    return NeuronResult(w.info(), circ, asdict(s), [x.spec for x in windows], rows, thr, ver, card_list, dens,
                        traces, evidence)
