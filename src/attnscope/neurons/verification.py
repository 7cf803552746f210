r"""Like-for-like verification of a two-source contrast, with its noise ceiling and baselines (issue 19).

A contrast predicts every MLP-0 neuron's effect size ``d`` between sources A and B from token counts
(:mod:`attnscope.neurons.contrast`).  Verifying it takes the true ``d`` on windows of each source.  Comparing a
prediction made from the *whole* sources' token counts with a truth measured on a *few* windows mixes two
things: how well the circuit predicts, and how far those windows' token mix is from the whole source's.
So every verification here reports

* **like for like** (the headline): the prediction from the token counts of exactly the windows the truth
  was measured on;
* **whole source** (what a user of ``contrast`` without ``--verify`` gets), scored separately against the
  same truth, the windows being spread over each whole source;
* the **noise ceiling**: Spearman between the true ``d`` of two equal, disjoint draws of those windows
  (even and odd windows), corrected to the full sample by Spearman-Brown ``2r / (1 + r)``;
* the **token-shuffled null** (the prediction with token scores permuted over the vocabulary);
* the **token-mean predictor** (each token's mean true pre-activation, fitted on texts other than the two
  compared: the bundled texts, the compared ones left out), a circuit-free baseline;
* beside each Spearman, precision@k, recall@k (k = 10, 20, 50) and **R-precision** (precision at
  ``k =`` the number of neurons with true ``|d| >= 1``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from torch import Tensor

from attnscope.circuit.result import Circuit
from attnscope.core.accumulators import Moments, PerWindow
from attnscope.core.errors import TextTooShortError
from attnscope.core.executor import LOCAL, Executor
from attnscope.core.stats import cohens_d, tensor_sum
from attnscope.core.texts import bundled_texts, open_source, tokenize
from attnscope.models import ModelWeights
from attnscope.neurons.explain import true_pre
from attnscope.neurons.groundtruth import D_MIN, KS, precision_at, recall_at, spearman

LIKE_FOR_LIKE = "like for like"  # the prediction from the verified windows' own token counts
WHOLE_SOURCE = "whole source"  # the prediction from all of each source's tokens, scored on the same truth
SHUFFLED = "token-shuffled null"


# --------------------------------------------------------------------------------------------------
# Token frequencies and true effect sizes (attnscope.neurons.contrast re-exports these)
# --------------------------------------------------------------------------------------------------


def token_frequencies(windows: Tensor, d_vocab: int) -> Tensor:
    """Token frequencies ``[d_vocab]`` of a set of windows ``[n, T]`` (sums to 1)."""
    c = torch.bincount(windows.reshape(-1), minlength=d_vocab)[:d_vocab].double()
    return c / c.sum().clamp_min(1)


def calibration_frequencies(w: ModelWeights, circ: Circuit) -> Tensor:
    """Token frequencies ``[d_vocab]`` (float64, cpu) of the circuit's calibration text, its BOS left out."""
    cal = circ.calibration_tokens
    return token_frequencies((cal[1:] if w.prepend_bos else cal)[None].cpu(), w.d_vocab)


#: Per-neuron count, sum and sum of squares over positions n >= min_position of a set of windows (mergeable).
PreStats = Moments
PRE_SHARD = 4  # windows per shard of the true pre-activations under a distributed executor


def pre_stats_shard(w: ModelWeights, windows: Tensor, first_window: int, n_min: int, bar=None) -> PreStats:
    """:class:`PreStats` of one shard of ``windows [n, T]`` (a window task, :mod:`attnscope.core.executor`)."""
    out = Moments.zeros(w.d_mlp)
    for win in windows:
        out.add(true_pre(w, win)[n_min:])
        if bar is not None:
            bar.update(1)
    return out


@torch.no_grad()
def pre_stats(w: ModelWeights, windows: Tensor, n_min: int, executor: Executor | None = None) -> PreStats:
    """Per-neuron moments of the true pre-activation over positions ``>= n_min`` of ``windows [n, T]``
    (sharded by ``executor``; default: this process)."""
    return (executor or LOCAL).map_windows(w, pre_stats_shard, windows, n_min, shard_size=PRE_SHARD)


def effect_sizes(a: PreStats, b: PreStats) -> Tensor:
    """``d = (mean_A - mean_B) / sqrt((var_A + var_B) / 2)`` per neuron ``[d_mlp]`` (``core.stats.cohens_d``)."""
    return cohens_d(a.mean, a.var, b.mean, b.var)


# --------------------------------------------------------------------------------------------------
# Windows spread over a whole source
# --------------------------------------------------------------------------------------------------


def spread_windows(w: ModelWeights, ids: Int[Tensor, " n_tokens"], T: int, n: int) -> list[Int[Tensor, " T"]]:
    """Up to ``n`` non-overlapping windows of ``T`` tokens (BOS first when the model takes one), evenly spread
    over the whole token stream ``ids``; a stream shorter than one window gives one window of all of it."""
    bos = w.bos_token_id if w.prepend_bos else None
    body = T - (1 if bos is not None else 0)
    n_all = len(ids) // body
    if n_all == 0:
        if len(ids) == 0:
            raise TextTooShortError("the text holds no tokens; pass a non-empty text")
        chunks = [ids]
    else:
        idx = torch.linspace(0, n_all - 1, min(n, n_all)).round().long().unique().tolist()
        chunks = [ids[i * body : (i + 1) * body] for i in idx]
    if bos is None:
        return list(chunks)
    return [torch.cat([torch.tensor([bos], dtype=c.dtype), c]) for c in chunks]


def per_window_shard(w: ModelWeights, windows: Tensor, first_window: int, n_min: int, bar=None) -> PerWindow:
    """One :class:`PreStats` per window of one shard ``windows [n, T]`` (a window task), keyed by window index."""
    out = PerWindow()
    for i, win in enumerate(windows):
        out.add(first_window + i, pre_stats_shard(w, win[None], 0, n_min))
        if bar is not None:
            bar.update(1)
    return out


def window_stats(w: ModelWeights, windows: list[Tensor], n_min: int, executor: Executor | None = None
                 ) -> list[PreStats]:
    """True pre-activation sums per window (positions ``n >= n_min``), kept apart for the split halves; sharded by
    ``executor`` when the windows have one length (default: this process)."""
    if not windows:
        return []
    if len({len(x) for x in windows}) > 1:
        return [pre_stats(w, win[None], n_min) for win in windows]
    ex = executor or LOCAL
    return ex.map_windows(w, per_window_shard, torch.stack(windows), n_min, shard_size=PRE_SHARD).finalise()


def _sum(stats: list[PreStats]) -> PreStats:
    return sum(stats[1:], stats[0])


# --------------------------------------------------------------------------------------------------
# The token-mean predictor (circuit-free baseline)
# --------------------------------------------------------------------------------------------------


@dataclass
class TokenMean:
    """Each seen token's mean true pre-activation (positions ``n >= n_min``) over the fitting texts."""

    fitted_on: list[str]
    ids: Int[Tensor, " n_seen"]
    mean: Float[Tensor, "n_seen d_mlp"]
    overall: Float[Tensor, " d_mlp"]  # for tokens the fitting texts never hold

    def expected(self, q: Float[Tensor, " d_vocab"]) -> Float[Tensor, " d_mlp"]:
        """``q^T M`` for a token-frequency difference ``q`` (unseen tokens take the overall mean)."""
        q = q.double()
        seen = q[self.ids]
        return seen @ self.mean + (q.sum() - seen.sum()) * self.overall


@torch.no_grad()
def fit_token_mean(w: ModelWeights, n_min: int, T: int, exclude: tuple[str, ...] = (),
                   windows_per_text: int = 4) -> TokenMean:
    """The token-mean predictor fitted on the bundled texts other than ``exclude`` (``bundled:NAME`` specs),
    ``windows_per_text`` windows spread over each."""
    names = [n for n in bundled_texts() if f"bundled:{n}" not in exclude]
    sums = torch.zeros(w.d_vocab, w.d_mlp, dtype=torch.float32)
    cnt = torch.zeros(w.d_vocab, dtype=torch.float64)
    for n in names:
        ids = torch.as_tensor(tokenize(open_source(f"bundled:{n}"), w.tokenizer))
        for win in spread_windows(w, ids, T, windows_per_text):
            y = true_pre(w, win)[n_min:].float().cpu()
            t = win[n_min:]
            sums.index_add_(0, t, y)
            cnt.index_add_(0, t, torch.ones(len(t), dtype=torch.float64))
    seen = torch.nonzero(cnt > 0).squeeze(1)
    overall = sums.sum(0).double() / cnt.sum()
    return TokenMean([f"bundled:{n}" for n in names], seen, sums[seen].double() / cnt[seen, None], overall)


def position_frequencies(windows: list[Tensor], n_min: int, d_vocab: int) -> Float[Tensor, " d_vocab"]:
    """Token frequencies at the verified positions ``n >= n_min`` (what the token-mean predictor sums over)."""
    return token_frequencies(torch.cat([win[n_min:] for win in windows])[None], d_vocab)


# --------------------------------------------------------------------------------------------------
# Scores
# --------------------------------------------------------------------------------------------------


@dataclass
class PredictorScores:
    """One predictor's predicted ``d`` against the true ``d`` of one contrast, over all neurons."""

    predictor: str
    spearman: float
    precision: dict[str, float]  # k -> share of the top-k by |pred| with |d| >= 1 and the predicted sign
    recall: dict[str, float]  # k -> share of the top-k by |d| among the top-k by |pred|
    r_precision: float | None  # precision at k = n_true (None when no neuron has |d| >= 1)


def score_predictor(name: str, pred: Tensor, d: Tensor) -> PredictorScores:
    k = int((d.abs() >= D_MIN).sum())
    return PredictorScores(name, spearman(pred, d), {str(k_): precision_at(pred, d, k_) for k_ in KS},
                           {str(k_): recall_at(pred, d, k_) for k_ in KS}, precision_at(pred, d, k) if k else None)


@dataclass
class NoiseCeiling:
    """How well the truth agrees with itself: two equal, disjoint draws of the verified windows."""

    split_half: float  # Spearman(true d on the even windows, true d on the odd windows)
    spearman_brown: float  # 2r / (1 + r): the split-half agreement corrected to the full sample
    n_windows_per_draw: int  # windows per source in each draw
    # R-precision of one draw's true d against the other's (k = the other's neurons with |d| >= 1), averaged both
    # ways: what a perfect predictor of one half-sample reaches on the other (None: no neuron at |d| >= 1);
    # a half-sample's ceiling, so a lower bound on the full sample's
    r_precision: float | None = None

    @property
    def value(self) -> float:
        return self.spearman_brown


def noise_ceiling(stats_a: list[PreStats], stats_b: list[PreStats]) -> NoiseCeiling | None:
    """``None`` when either source has fewer than two windows."""
    m = min(len(stats_a), len(stats_b)) // 2
    if m < 1:
        return None
    d1 = effect_sizes(_sum(stats_a[0::2][:m]), _sum(stats_b[0::2][:m]))
    d2 = effect_sizes(_sum(stats_a[1::2][:m]), _sum(stats_b[1::2][:m]))
    r = spearman(d1, d2)
    rp = [precision_at(x, y, int((y.abs() >= D_MIN).sum())) for x, y in ((d1, d2), (d2, d1))
          if (y.abs() >= D_MIN).any()]
    return NoiseCeiling(r, 2 * r / (1 + r) if r > -1 else float("nan"), m, sum(rp) / len(rp) if rp else None)


@dataclass
class ContrastVerification:
    """``contrast --verify``: the prediction against the true effect sizes, with the noise ceiling and baselines."""

    n_windows_a: int
    n_windows_b: int
    n_positions_a: int
    n_positions_b: int
    windows: str  # how the verified windows were drawn
    like_for_like: PredictorScores  # the headline
    whole_source: PredictorScores  # what contrast without --verify predicts, scored on the same truth
    shuffled_null: PredictorScores
    token_mean: PredictorScores
    token_mean_fitted_on: list[str]
    noise_ceiling: NoiseCeiling | None
    n_true: int  # neurons with true |d| >= 1

    @property
    def headline(self) -> float:
        return self.like_for_like.spearman


@torch.no_grad()
def verify_contrast(w: ModelWeights, predict_d: Callable[[Tensor, Tensor], Tensor], sigma: Tensor, n_min: int,
                    wins_a: list[Tensor], wins_b: list[Tensor], p_whole_a: Tensor | None, p_whole_b: Tensor | None,
                    tmean: TokenMean,
                    stats_a: list[PreStats] | None = None, stats_b: list[PreStats] | None = None,
                    windows_note: str = "") -> tuple[ContrastVerification, Tensor, Tensor, Tensor]:
    """Score the contrast A vs B on the given windows; ``predict_d`` maps two token-frequency vectors ``[d_vocab]``
    to the predicted ``d [d_mlp]`` (:meth:`attnscope.neurons.contrast.EffectModel.predict_d`); ``sigma [d_mlp]``
    puts the token-mean baseline's difference on the scale of ``d``.  Returns the verification, the true ``d``,
    the true difference of means and the like-for-like predicted ``d`` (each ``[d_mlp]``)."""
    sa = stats_a if stats_a is not None else window_stats(w, wins_a, n_min)
    sb = stats_b if stats_b is not None else window_stats(w, wins_b, n_min)
    A, B = _sum(sa), _sum(sb)
    d = effect_sizes(A, B)
    V = w.d_vocab
    pd = lambda a, b: predict_d(a, b).cpu().double()  # noqa: E731  (the token model is not linear in p)
    p_a, p_b = (token_frequencies(torch.cat([x.reshape(-1) for x in ws])[None], V) for ws in (wins_a, wins_b))
    lfl = pd(p_a, p_b)
    whole = lfl if p_whole_a is None or p_whole_b is None else pd(p_whole_a, p_whole_b)
    perm = torch.randperm(V, generator=torch.Generator().manual_seed(0))  # the null: token identities permuted
    null = pd(p_a[perm], p_b[perm])
    q_pos = position_frequencies(wins_a, n_min, V) - position_frequencies(wins_b, n_min, V)
    tmp = tmean.expected(q_pos) / sigma
    v = ContrastVerification(len(wins_a), len(wins_b), A.n, B.n, windows_note,
                             score_predictor(LIKE_FOR_LIKE, lfl, d), score_predictor(WHOLE_SOURCE, whole, d),
                             score_predictor(SHUFFLED, null, d),
                             score_predictor("token-mean", tmp, d),
                             tmean.fitted_on, noise_ceiling(sa, sb), int((d.abs() >= D_MIN).sum()))
    return v, d, A.mean - B.mean, lfl


# --------------------------------------------------------------------------------------------------
# One source against the pooled others (the neuron stage and the ground-truth bench)
# --------------------------------------------------------------------------------------------------


@torch.no_grad()
def token_mean_on_calibration(w: ModelWeights, cal_tokens: Tensor, n_min: int, name: str,
                              pre: Callable[[Tensor], Tensor] | None = None) -> TokenMean:
    """The token-mean predictor fitted on the calibration text alone (for one-vs-rest contrasts, where
    every held-out text is one of the compared).  ``pre`` maps a window ``[T]`` to the true pre-activations
    ``[T, d_mlp]`` (default: MLP 0's, :func:`attnscope.neurons.explain.true_pre`; a later layer passes its own)."""
    y = (pre(cal_tokens) if pre is not None else true_pre(w, cal_tokens))[n_min:].float().cpu()
    t = cal_tokens[n_min:].cpu()
    ids, inv = t.unique(return_inverse=True)
    sums = torch.zeros(len(ids), y.shape[1], dtype=torch.float64).index_add_(0, inv, y.double())
    cnt = torch.bincount(inv, minlength=len(ids)).double()
    return TokenMean([name], ids, sums / cnt[:, None], y.double().mean(0))


@torch.no_grad()
def one_vs_rest_verification(w: ModelWeights, expected: Callable[[Tensor], Tensor], sigma: Tensor, n_min: int,
                             windows: list[list[Tensor]], names: list[str], tmean: TokenMean,
                             other_counts: list[Tensor] | None = None, other_name: str = WHOLE_SOURCE,
                             stats: list[list[PreStats]] | None = None) -> dict[str, ContrastVerification]:
    """Each source's windows against the pooled windows of the others, verified like for like.
    ``other_counts`` (token counts ``[d_vocab]`` per source) give the second prediction scored beside it,
    named ``other_name`` (the neuron stage: the tuning half's counts, which its ranking uses)."""
    stats = stats or [window_stats(w, ws, n_min) for ws in windows]

    def calibrated_d(p_a: Tensor, p_b: Tensor) -> Tensor:  # the neuron stage's d: one calibration std per neuron
        return (expected(p_a).cpu().double() - expected(p_b).cpu().double()) / sigma

    out = {}
    for c, name in enumerate(names):
        rest_w = [x for j, ws in enumerate(windows) if j != c for x in ws]
        rest_s = [x for j, ss in enumerate(stats) if j != c for x in ss]
        pa: Tensor | None = None
        pb: Tensor | None = None
        if other_counts is not None:
            pa = other_counts[c] / other_counts[c].sum()
            rest = tensor_sum(x for j, x in enumerate(other_counts) if j != c)
            pb = rest / rest.sum()
        v, _, _, _ = verify_contrast(w, calibrated_d, sigma, n_min, windows[c], rest_w, pa, pb, tmean, stats[c],
                                     rest_s)
        if other_counts is None:
            v.whole_source = v.like_for_like
        else:
            v.whole_source.predictor = other_name
        out[name] = v
    return out
