r"""The ground-truth evaluation on the demo model, whose contexts are known (method §15, issue 9).

Contexts: the eight bundled texts (held out from the demo's training).  Each text's windows are split in
two: the first half *tunes* (token frequencies for the predictions, the threshold, the token-mean
predictor), the second half *reports*.  The calibration text is the first window of ``en_moby_dick``; that
context's windows start after it, so the calibration window is in neither half.

For each context ``c`` (one against the pooled other seven), on the reporting half:

* true effect ``d`` per neuron (:func:`attnscope.neurons.contrast.effect_sizes`);
* predictors, all scaled by the calibration std: the full explanation's expected difference (``full``),
  the contextual bag alone (``contextual``: the method's ``(p_A - p_B)^T S``), the circuit-free token-mean
  predictor (``token_mean``: each token's mean true pre-activation on the tuning half; unseen tokens get
  the overall mean) and the token-shuffled null (``shuffled``);
* Spearman, precision@k and recall@k (k = 10, 20, 50), and random neurons' precision;
* the reported set (threshold tuned on the tuning half): its precision and recall@20, with random sets
  of the same size beside them; the full explanation's FVU against the true pre-activation for the
  reported and for random neurons; label precision against the contexts.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from attnscope.circuit.build import Circuit, mlp_input_weights
from attnscope.core.executor import Executor
from attnscope.exact.decomposition import centre
from attnscope.models import ModelWeights
from attnscope.neurons.contrast import SourceWindows, build_token_model, pre_stats, token_frequencies
from attnscope.neurons.explain import build_explainer, true_pre
from attnscope.neurons.find import (
    NeuronSettings,
    held_out_windows,
    like_for_like,
    neuron_cards,
    one_vs_rest_effects,
    score,
    select,
    validated,
    verify,
)
from attnscope.neurons.groundtruth import KS, discovery_scores, random_precision
from attnscope.neurons.labels import LABEL_CONTEXTS
from attnscope.neurons.verification import ContrastVerification, window_stats


@dataclass
class GroundTruthResult:
    model: dict
    contexts: list[str]
    n_windows: dict[str, list[int]]  # context -> [tuning, reporting]
    scores: dict[str, dict[str, dict]]  # predictor -> context -> DiscoveryScores json
    random_precision: dict[str, dict[str, float]]  # context -> k -> precision of k random neurons
    threshold: dict
    reported: dict  # precision, recall20 per context, random baselines, FVU (reported and random)
    labels: dict  # label precision
    tradeoff: list[dict]  # fixed thresholds: n passed, reporting-half precision and recall@20 per context
    # per context, the one-vs-rest contrast verified like for like on the reporting half (noise ceiling,
    # token-mean fitted on the calibration text, null, R-precision; the tuning-count prediction beside it)
    like_for_like: dict[str, ContrastVerification]

    def median_spearman(self, predictor: str) -> float:
        return float(torch.tensor([v["spearman"] for v in self.scores[predictor].values()]).median())

    def to_json(self) -> dict:
        return {**asdict(self), "median_spearman": {p: self.median_spearman(p) for p in self.scores}}


def _token_mean(w: ModelWeights, windows: list[SourceWindows], n_min: int) -> Tensor:
    """Each token's mean true pre-activation ``[d_vocab, d_mlp]`` over the tuning halves (positions >= n_min)."""
    M = torch.zeros(w.d_vocab, w.d_mlp, dtype=torch.float64)
    cnt = torch.zeros(w.d_vocab, dtype=torch.float64)
    for s in windows:
        for win in s.tune:
            ids = win[n_min:]
            M.index_add_(0, ids, true_pre(w, win)[n_min:].double().cpu())
            cnt.index_add_(0, ids, torch.ones(len(ids), dtype=torch.float64))
    mean = M.sum(0) / cnt.sum()
    return torch.where(cnt[:, None] > 0, M / cnt.clamp_min(1)[:, None], mean[None])


def _predictors(w, circ, windows, scores, n_min) -> dict[str, Tensor]:
    """Predicted one-vs-rest effects ``[n_ctx, d_mlp]`` of every predictor."""
    V = w.d_vocab
    counts = torch.stack([token_frequencies(s.tune, V) * s.tune.numel() for s in windows])
    S = (centre(circ.ext, w) @ mlp_input_weights(w)[0] / circ.mlp_scale).cpu().double()  # [V, d_mlp]
    M = _token_mean(w, windows, n_min)
    tm = build_token_model(w, circ)
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(V, generator=g)
    out = {"full": scores.predicted_d, "contextual": [], "token_mean": [], "shuffled": []}
    for c in range(len(windows)):
        rest = torch.arange(len(windows)) != c
        q = counts[c] / counts[c].sum() - counts[rest].sum(0) / counts[rest].sum()
        out["contextual"].append(q @ S / scores.sigma)
        out["token_mean"].append(q @ M / scores.sigma)
        pa, pb = counts[c] / counts[c].sum(), counts[rest].sum(0) / counts[rest].sum()
        null = tm.expected(pa[perm].to(tm.W_in.device)) - tm.expected(pb[perm].to(tm.W_in.device))  # not linear in p
        out["shuffled"].append(null.cpu().double() / scores.sigma)
    return {k: v if isinstance(v, Tensor) else torch.stack(v) for k, v in out.items()}


def _dominant_terms(sc, passed: Tensor) -> dict[str, int]:
    """Passed neurons by the term that carries most of the predicted effect in their strongest contrast."""
    best = sc.predicted_d.abs().argmax(0)
    parts = torch.stack([p.gather(0, best[None])[0] for p in sc.parts.values()])  # [terms, d_mlp]
    top = parts.abs().argmax(0)
    return {t: int(((top == i) & passed).sum()) for i, t in enumerate(sc.parts)}


def _tradeoff(sc, d_rep: Tensor, names: list[str]) -> list[dict]:
    ok = validated(d_rep, sc.predicted_d)
    out = []
    for t in (0.5, 0.75, 1.0, 1.25, 1.5, 2.0):
        p = sc.sensitivity >= t
        rec = [float(p[d_rep[c].abs().argsort(descending=True)[:20]].double().mean()) for c in range(len(names))]
        out.append({"threshold": t, "n_passed": int(p.sum()), "precision": float(ok[p].double().mean()),
                    "recall20_min": min(rec), "recall20_median": float(torch.tensor(rec).median())})
    return out


def _label_precision(cards, names: list[str], d: Tensor) -> dict:
    """Share of labelled reported neurons whose label's context has |d| >= 1 with the label's sign."""
    hits = []
    for card in cards:
        for lab, sign in ((card.label, 1), (card.label_negative, -1)):
            if lab in LABEL_CONTEXTS:
                cs = [names.index(c) for c in LABEL_CONTEXTS[lab] if c in names]
                ok = any(sign * float(d[c, card.index]) >= 1.0 for c in cs)
                hits.append({"neuron": card.index, "label": lab, "sign": sign, "correct": ok})
    others = sorted({c.label for c in cards if c.label and c.label not in LABEL_CONTEXTS}
                    | {c.label_negative for c in cards if c.label_negative and c.label_negative not in LABEL_CONTEXTS})
    n_ok = sum(h["correct"] for h in hits)
    return {"n_checked": len(hits), "n_correct": n_ok, "precision": n_ok / len(hits) if hits else None,
            "unchecked_labels": others, "checked": hits}


@torch.no_grad()
def evaluate_ground_truth(w: ModelWeights, circ: Circuit, *, max_windows: int | None = None,
                          precision_target: float = 0.9, n_random: int = 64,
                          executor: Executor | None = None) -> GroundTruthResult:
    """The evaluation of the module docstring (every bundled text a context); ``executor`` shards the true
    pre-activations (default: this process)."""
    # the windows are chosen here (held_out_windows below, up to max_windows); the settings' own max_windows is unused
    s = NeuronSettings(precision_target=precision_target, n_random=n_random, max_neurons=10**6)
    windows = held_out_windows(w, circ, None, max_windows)
    names = [x.name for x in windows]
    n_min = circ.settings.min_position
    ex = build_explainer(w, circ)
    tm = build_token_model(w, circ, ex)
    sc = score(w, circ, windows, s, tm)
    d_tune = one_vs_rest_effects([pre_stats(w, x.tune, n_min, executor) for x in windows])
    rep_stats = [window_stats(w, list(x.report), n_min, executor) for x in windows]  # per window: split-half ceiling
    d_rep = one_vs_rest_effects([sum(st[1:], st[0]) for st in rep_stats])
    thr = select(sc, d_tune, precision_target)
    ver, cards, rep = verify(w, circ, sc, thr, d_rep, windows, s, ex)
    preds = _predictors(w, circ, windows, sc, n_min)
    passed = sc.sensitivity >= thr.value
    scores = {p: {n: discovery_scores(P[c], d_rep[c], passed if p == "full" else None).to_json()
                  for c, n in enumerate(names)} for p, P in preds.items()}
    rnd = {n: {str(k): random_precision(d_rep[c], torch.sign(sc.predicted_d[c]), k) for k in KS}
           for c, n in enumerate(names)}
    card_list, _ = neuron_cards(w, circ, ex, tm, sc, cards[:200], rep, d_rep, windows, s) if cards else ([], [])
    reported = {"n_passed": thr.n_passed, "precision": ver.precision, "precision_random": ver.precision_random,
                "precision_oracle_tuning": float(validated(d_rep, sc.predicted_d)[validated(d_tune, sc.predicted_d)]
                                                 .double().mean()),
                "recall20": ver.recall20, "recall20_random": ver.recall20_random,
                "fvu_reported": asdict(ver.reported) if ver.reported else None, "fvu_random": asdict(ver.random),
                "n_positions": ver.n_positions,
                "n_true": {n: int((d_rep[c].abs() >= 1).sum()) for c, n in enumerate(names)},
                "dominant_term": _dominant_terms(sc, passed)}
    return GroundTruthResult(w.info(), names, {x.name: [len(x.tune), len(x.report)] for x in windows}, scores, rnd,
                             asdict(thr), reported, _label_precision(card_list, names, d_rep),
                             _tradeoff(sc, d_rep, names), like_for_like(w, circ, tm, sc, windows, rep_stats))
