r"""Contrasts between two text sources: the predicted and the true difference of every MLP-0 neuron (method §15).

**Predicted, from the weights and token counts only.**  Averaged over positions, the full layer-0
explanation (:mod:`attnscope.neurons.explain`) of neuron ``k`` under i.i.d. tokens with frequencies ``p`` is

    mu_k(p) = p^T U W_in'[:, k] / s + (terms that do not depend on p),
    U(x) = centre(direct(x) + Ext(x) + sum_{h not contextual} e(x) W_V^h W_O^h)      [d_vocab, d_model]

(direct path at the reference position; the contextual bag's expectation, calibrated denominators; each
other head's value of a token, its attention averaging over the tokens it reads).  That is the method's form;
``contrast`` by default takes the bag's denominators from the source's own counts, per head and query token
(:class:`attnscope.neurons.bag.QueryBag`), and the norm's scale per token (:class:`TokenModel`).  The predicted
difference between sources ``A`` and ``B`` is ``Delta_k = mu_k(p_A) - mu_k(p_B)``: no forward pass over
either source.  ``predicted_d`` puts it on the scale of the effect size the truth uses, ``Delta /
sqrt((var_A + var_B) / 2)``, each side's variance predicted from its own token counts (:class:`EffectModel`:
the variance over the source's tokens of each token's predicted pre-activation, times the calibration text's
ratio of the true variance to that; on the calibration text it is the measured one).  ``EffectModel(...,
per_source_sd=False)`` gives the method's ``Delta / sigma_cal`` with one calibration std per neuron.

**True (``--verify``).**  ``d = (mean_A - mean_B) / sqrt((var_A + var_B) / 2)`` over positions
``n >= min_position`` of windows spread over each whole source (:func:`effect_sizes`); the headline score
predicts from those windows' own token counts, the whole-source prediction is scored beside it, with the
noise ceiling and the baselines (:mod:`attnscope.neurons.verification`).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from attnscope.circuit.build import Circuit
from attnscope.core.errors import AttnscopeError, TextTooShortError
from attnscope.core.executor import Executor
from attnscope.core.serialize import from_dict, read_versioned
from attnscope.core.stats import cohens_d, tensor_sum
from attnscope.core.texts import decode_tokens, open_source, tokenize
from attnscope.exact.decomposition import centre
from attnscope.exact.forward import iter_layers
from attnscope.models import ModelWeights
from attnscope.neurons.bag import BagHeads, QueryBag, bag_heads, query_bag  # noqa: F401  (re-exported)
from attnscope.neurons.explain import Explainer, build_explainer, true_pre
from attnscope.neurons.verification import (  # noqa: F401  (PreStats, pre_stats, effect_sizes: re-exported)
    ContrastVerification,
    PreStats,
    calibration_frequencies,
    effect_sizes,
    fit_token_mean,
    pre_stats,
    spread_windows,
    token_frequencies,
    verify_contrast,
    window_stats,
)

TOKEN_TERMS = ("direct", "contextual bag", "other heads")
SCHEMA_VERSION = 1  # of contrast.json (1: first loadable version)


# --------------------------------------------------------------------------------------------------
# Windows of a source
# --------------------------------------------------------------------------------------------------


@dataclass
class SourceWindows:
    """Consecutive, non-overlapping windows of one source, split in a tuning and a reporting half."""

    name: str
    spec: str
    tune: Tensor  # [n_tune, T] the first half of the windows
    report: Tensor  # [n_report, T] the second half
    skipped_tokens: int  # tokens skipped at the start (the calibration window, when the source holds it)


def source_name(spec: str) -> str:
    return spec.split(":", 1)[1] if spec.startswith("bundled:") else Path(spec).stem


def source_windows(w: ModelWeights, spec: str, T: int, *, max_windows: int | None = None,
                   skip_tokens: int = 0) -> SourceWindows:
    """Windows of ``T`` tokens (BOS first when the model takes one) from ``spec``, first half for tuning,
    second half for reporting.  Needs at least two windows."""
    stream = torch.as_tensor(tokenize(open_source(spec), w.tokenizer))[skip_tokens:]
    bos = w.bos_token_id if w.prepend_bos else None
    body = T - (1 if bos is not None else 0)
    n = len(stream) // body if body > 0 else 0
    if max_windows is not None:
        n = min(n, max_windows)
    if n < 2:
        raise TextTooShortError(f"{spec} has {len(stream)} tokens; at least {2 * body} are needed for two "
                                f"windows of {T} (one to tune, one to report); pass a longer text or a smaller --n-ctx")
    win = stream[: n * body].reshape(n, body)
    if bos is not None:
        win = torch.cat([torch.full((n, 1), bos, dtype=win.dtype), win], 1)
    h = (n + 1) // 2
    return SourceWindows(source_name(spec), spec, win[:h], win[h:], skip_tokens)


# --------------------------------------------------------------------------------------------------
# Expected pre-activation under a token distribution, from the weights
# --------------------------------------------------------------------------------------------------


#: the one token-score quantity the report's cards and the page's neuron card show (TokenModel.token_scores)
TOKEN_SCORE_DEFINITION = ("token score: how far one more occurrence of the token in the context moves the neuron's "
                          "expected pre-activation, summed over every term of the full layer-0 explanation "
                          "(pre-activation units; TokenModel.token_scores)")


@dataclass
class TokenModel:
    """Each token's vector in each term of the explanation (``[d_vocab, d_model]`` per term) and the readout.

    With ``norm_const`` set (what :func:`build_token_model` does), the norm in front of the MLP is not one
    calibration constant: each token ``x`` at the position read gets the scale of its own predicted residual,
    ``s_p(x) = norm scale(direct(x) + E_p[context] + c)``, where ``E_p[context]`` is the other terms' mean under
    the source's token frequencies ``p`` and ``c`` the calibration residual's mean minus its token terms' (so
    ``s`` matches the measured scale on calibration).  Then ``mu(p) = sum_x p(x) (direct(x) + E_p[context] + c)
    W / s_p(x)``: still token counts only, no forward pass (issue 19: a source whose tokens shift the norm's
    scale, e.g. Czech fortunes on the demo, was mispredicted with one constant).  The part ``c W sum_x
    p(x)/s_p(x)`` is reported as the term ``"norm scale"``."""

    parts: dict[str, Tensor]  # term -> [d_vocab, d_model], centred
    W_in: Tensor  # [d_model, d_mlp]
    scale: float
    norm_const: Tensor | None = None  # [d_model] c above; None: one constant scale (the method's, §8.1)
    norm: str = "layernorm"
    eps: float = 1e-5
    bag: BagHeads | QueryBag | None = None  # set: source-aware denominators (each head's / query's Z from the counts)

    def context_means(self, p: Tensor) -> dict[str, Tensor]:
        """Each context term's mean ``[d_model]`` under ``p`` (the bag with source-aware denominators when set)."""
        out = {t: p @ v for t, v in self.parts.items() if t != "direct"}
        if self.bag is not None:
            out["contextual bag"] = self._centre(self.bag.mean(p)).to(out["contextual bag"].dtype)
        return out

    def _centre(self, x: Tensor) -> Tensor:
        return x - x.mean(-1, keepdim=True) if self.norm == "layernorm" else x

    def token_scales(self, p: Tensor, ctx_means: dict[str, Tensor] | None = None) -> Tensor:
        """``s_p(x)`` for every token ``[d_vocab]`` under frequencies ``p``."""
        assert self.norm_const is not None, "token scales only with a per-token norm scale (expected_parts)"
        cm = ctx_means if ctx_means is not None else self.context_means(p)
        ctx = tensor_sum(cm.values()) + self.norm_const
        x = self.parts["direct"] + ctx
        if self.norm == "layernorm":
            x = x - x.mean(-1, keepdim=True)
        return (x.pow(2).mean(-1) + self.eps).sqrt()

    def expected_parts(self, p: Tensor) -> dict[str, Tensor]:
        """Each term's expected contribution ``[d_mlp]`` under token frequencies ``p [d_vocab]``."""
        p = p.to(self.W_in.device, self.W_in.dtype)
        cm = self.context_means(p)
        if self.norm_const is None:
            return {"direct": (p @ self.parts["direct"]) @ self.W_in / self.scale,
                    **{t: m @ self.W_in / self.scale for t, m in cm.items()}}
        ps = p / self.token_scales(p, cm)
        tot = ps.sum()
        out = {t: tot * (m @ self.W_in) for t, m in cm.items()}
        out["direct"] = (ps @ self.parts["direct"]) @ self.W_in
        out["norm scale"] = tot * (self.norm_const @ self.W_in)
        return out

    def expected(self, p: Tensor) -> Tensor:
        return tensor_sum(self.expected_parts(p).values())

    def token_values(self, p: Tensor) -> tuple[Tensor, Tensor]:
        """Each token present under ``p``: its share ``[n]`` and its predicted pre-activation ``[n, d_mlp]``
        (its own direct term, the context terms' means under ``p``, its own norm scale); their ``p``-weighted
        mean is :meth:`expected` (float64)."""
        p = p.to(self.W_in.device, self.W_in.dtype)
        idx = (p > 0).nonzero().squeeze(1)
        cm = self.context_means(p)
        x = self.parts["direct"][idx] + tensor_sum(cm.values())
        if self.norm_const is None:
            a = (x @ self.W_in) / self.scale
        else:
            a = ((x + self.norm_const) @ self.W_in) / self.token_scales(p, cm)[idx, None]
        q = p[idx].double()
        return q / q.sum().clamp_min(1e-30), a.double()

    def token_scores(self, neurons: Tensor) -> Tensor:
        """Every token's total score ``[d_vocab, k]`` for ``neurons`` (how much one more occurrence moves the mean)."""
        return tensor_sum(self.parts.values()) @ self.W_in[:, neurons] / self.scale


@dataclass
class EffectModel:
    """Every neuron's predicted effect size ``d [d_mlp]`` between two token-frequency vectors (no forward pass).

    ``per_source_sd``: ``d = (mu_A - mu_B) / sqrt((var_A + var_B) / 2)`` (:func:`attnscope.core.stats.cohens_d`,
    the truth's formula), ``var_p = kappa * Var_{x ~ p}[a_p(x)]`` with ``a_p(x)`` the token model's pre-activation
    of a position holding ``x`` (:meth:`TokenModel.token_values`) and ``kappa = sigma_cal^2 / Var_{x ~ p_cal}
    [a(x)]`` per neuron, what the token model leaves out of the variance on the calibration text (context
    variation, positions, local heads), assumed to scale with it.  On the calibration text ``var = sigma_cal^2``.
    Otherwise ``d = (mu_A - mu_B) / sigma_cal``.  Issue 19, chosen on the benchmark's development half: the demo's
    R-precision, with ``sigma_cal`` 12 of 16 pairs >= 0.75, with the per-source sd 15 of 16."""

    tm: TokenModel
    sigma: Tensor  # [d_mlp] std of each neuron's true pre-activation over the calibration text (float64, cpu)
    kappa: Tensor | None  # [d_mlp] None: one calibration std per neuron
    bos: int | None = None  # left out of the variance (its own, often outlying, embedding; one position a window)

    @property
    def per_source_sd(self) -> bool:
        return self.kappa is not None

    def variance(self, p: Tensor) -> Tensor:
        """Predicted variance ``[d_mlp]`` of each neuron's pre-activation over a source with frequencies ``p``."""
        assert self.kappa is not None, "variance needs the per-source sd (per_source_sd=True)"
        return self.kappa * _token_variance(self.tm, p, self.bos)

    def predict_d(self, p_a: Tensor, p_b: Tensor) -> Tensor:
        """Predicted ``d [d_mlp]`` (float64, cpu) of source A against B."""
        diff = self.tm.expected(p_a).cpu().double() - self.tm.expected(p_b).cpu().double()
        if self.kappa is None:
            return diff / self.sigma
        return cohens_d(diff, self.variance(p_a), torch.zeros_like(diff), self.variance(p_b), min_std=1e-9)


def _token_variance(tm: TokenModel, p: Tensor, bos: int | None) -> Tensor:
    if bos is not None and float(p[bos]) > 0:
        p = p.clone()
        p[bos] = 0
    q, a = tm.token_values(p)
    return (q @ (a - q @ a).pow(2)).cpu()


@torch.no_grad()
def effect_model(w: ModelWeights, circ: Circuit, tm: TokenModel, per_source_sd: bool = True) -> EffectModel:
    """:class:`EffectModel` of ``tm`` (``kappa`` from the calibration positions ``n >= min_position``, the ones
    :func:`calibration_std` measures)."""
    sigma = calibration_std(w, circ).cpu()
    bos = w.bos_token_id if w.prepend_bos else None
    if not per_source_sd:
        return EffectModel(tm, sigma, None, bos)
    cal = circ.calibration_tokens[circ.settings.min_position:].cpu()
    v = _token_variance(tm, token_frequencies(cal[None], w.d_vocab), bos)
    return EffectModel(tm, sigma, sigma.pow(2) / v.clamp_min(1e-12), bos)


@torch.no_grad()
def build_token_model(w: ModelWeights, circ: Circuit, ex: Explainer | None = None,
                      per_token_scale: bool = True, source_aware_denominators: bool = False,
                      query_aware: bool = True) -> TokenModel:
    """The token model of ``circ``.  ``source_aware_denominators``: the bag's denominators from each source's own
    counts, per head and query token (:class:`QueryBag`, ``query_aware``) or per head (:class:`BagHeads`); the
    constant ``c`` absorbs the bag's change on the calibration text, so there the prediction is the calibrated
    one."""
    ex = ex or build_explainer(w, circ)
    n_star = circ.settings.reference_position
    raw = w.W_E + (w.W_pos[n_star] if w.W_pos is not None else 0) + (w.W_type if w.W_type is not None else 0)
    if w.ln_emb_w is not None:
        raw = torch.nn.functional.layer_norm(raw, raw.shape[-1:], w.ln_emb_w, w.ln_emb_b, w.eps)
    other = torch.zeros_like(ex.e_val)
    for j in range(len(ex.other_heads)):
        other += ex.e_val @ ex.W_OV[j]
    parts = {"direct": centre(raw, w), "contextual bag": centre(circ.ext, w), "other heads": centre(other, w)}
    tm = TokenModel(parts, ex.W_in, ex.scale, norm=w.norm, eps=w.eps)
    if per_token_scale:
        tm.norm_const = _calibration_residual_const(w, circ, parts)
    if source_aware_denominators:  # after the constant: on calibration every ratio is 1 by construction
        tm.bag = query_bag(w, circ, ex.e_val) if query_aware else bag_heads(w, circ, ex.e_val)
        if query_aware and tm.norm_const is not None:  # c absorbs the bag's change on the calibration text
            p_cal = calibration_frequencies(w, circ)
            plain = p_cal.to(parts["contextual bag"].dtype) @ parts["contextual bag"].cpu()
            tm.norm_const = tm.norm_const + (plain.to(tm.norm_const.device)
                                             - tm.context_means(p_cal.to(tm.W_in.device, tm.W_in.dtype))[
                                                 "contextual bag"]).to(tm.norm_const.dtype)
    return tm


@torch.no_grad()
def _calibration_residual_const(w: ModelWeights, circ: Circuit, parts: dict[str, Tensor]) -> Tensor:
    """The calibration residual before the MLP norm (mean over n >= min_position) minus its token terms'
    expectation under the calibration text's frequencies: what the token model leaves out (positions, biases)."""
    cal = circ.calibration_tokens.to(w.device)
    acts = next(iter_layers(w, cal[None], stop_layer=0, patterns=False))
    n_min = circ.settings.min_position
    mid = centre((acts.resid_pre + acts.attn_out)[0, n_min:].to(parts["direct"].dtype), w).mean(0)
    p = calibration_frequencies(w, circ).to(mid.device, mid.dtype)
    return mid - sum(p @ v for v in parts.values())


@torch.no_grad()
def calibration_std(w: ModelWeights, circ: Circuit) -> Tensor:
    """Std ``[d_mlp]`` of each neuron's true pre-activation over the calibration text (n >= min_position)."""
    return true_pre(w, circ.calibration_tokens)[circ.settings.min_position:].double().std(0).clamp_min(1e-6)


# --------------------------------------------------------------------------------------------------
# True effect sizes
# --------------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------------
# The contrast query
# --------------------------------------------------------------------------------------------------


@dataclass
class NeuronContrast:
    index: int
    predicted_diff: float  # mu(p_A) - mu(p_B), pre-activation units
    predicted_d: float  # predicted_diff over the predicted pooled sd (EffectModel; settings: per_source_sd)
    parts: dict[str, float]  # term -> its share of predicted_diff
    evidence_a: list[tuple[str, float]]  # tokens pushing towards A: (token, (p_A - p_B) x score)
    evidence_b: list[tuple[str, float]]
    true_d: float | None = None
    true_diff: float | None = None
    predicted_d_windows: float | None = None  # --verify: predicted from the verified windows' own counts


@dataclass
class ContrastResult:
    model: dict
    a: str
    b: str
    n_tokens_a: int
    n_tokens_b: int
    records: list[NeuronContrast]  # every neuron, by |predicted_d| descending
    verification: ContrastVerification | None = None
    settings: dict = field(default_factory=dict)

    def top(self, n: int, sign: int) -> list[NeuronContrast]:
        return [r for r in self.records if sign * r.predicted_d > 0][:n]

    def to_json(self, extra: dict | None = None) -> dict:
        """Everything; ``extra`` (e.g. the scope conditions the CLI adds) is merged in."""
        return {**(extra or {}), "schema_version": SCHEMA_VERSION, "model": self.model, "a": self.a, "b": self.b,
                "n_tokens_a": self.n_tokens_a,
                "n_tokens_b": self.n_tokens_b, "settings": self.settings,
                "verification": None if self.verification is None else asdict(self.verification),
                "neurons": [asdict(r) for r in self.records]}

    def save(self, out: str | Path, extra: dict | None = None) -> Path:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "contrast.json").write_text(json.dumps(self.to_json(extra), indent=1))
        return out

    @classmethod
    def load(cls, out: str | Path) -> ContrastResult:
        """The result :meth:`save` wrote to ``out`` (the scope conditions saved beside it are not part of it)."""
        d = read_versioned(Path(out) / "contrast.json", SCHEMA_VERSION, "contrast.json (`attnscope contrast --out`)")
        v = d["verification"]
        return cls(d["model"], d["a"], d["b"], d["n_tokens_a"], d["n_tokens_b"],
                   [from_dict(NeuronContrast, r) for r in d["neurons"]],
                   None if v is None else from_dict(ContrastVerification, v), d["settings"])


def _evidence(w: ModelWeights, tm: TokenModel, q: Tensor, idx: list[int], n: int = 8):
    """Top tokens each way for each neuron in ``idx``: ``q(x) * score(x)`` with ``q = p_A - p_B``."""
    contrib = q[:, None].to(tm.W_in.dtype) * tm.token_scores(torch.tensor(idx, device=tm.W_in.device)).cpu().to(q.dtype)
    out = []
    for j in range(len(idx)):
        c = contrib[:, j]
        pos, neg = c.topk(n), (-c).topk(n)
        toks_pos = decode_tokens(w.tokenizer, pos.indices.tolist())
        toks_neg = decode_tokens(w.tokenizer, neg.indices.tolist())
        out.append((list(zip(toks_pos, [round(float(v), 5) for v in pos.values])),
                    list(zip(toks_neg, [round(-float(v), 5) for v in neg.values]))))
    return out


@torch.no_grad()
def run_contrast(w: ModelWeights, circ: Circuit, a: str, b: str, *, verify: bool = False,
                 max_windows: int = 16, n_evidence: int = 40, executor: Executor | None = None,
                 source_aware_denominators: bool = True, per_source_sd: bool = True,
                 query_aware: bool = True) -> ContrastResult:
    """Predict every neuron's difference between sources ``a`` and ``b`` from their token counts (and, with
    ``verify``, measure it on up to ``max_windows`` windows of each).  ``source_aware_denominators``: each
    contextual head's denominator from each source's own token counts (:class:`BagHeads`; issue 19: on the
    benchmark's development half it lifts SmolLM2's median like-for-like Spearman from 0.872 to 0.922).
    ``query_aware``: those denominators per head and query token (:class:`QueryBag`; issue 19, step 10), else
    per head.  ``per_source_sd``: each side's sd predicted from its own token counts (:class:`EffectModel`), else one
    calibration std per neuron.  ``executor`` shards the verification's true pre-activations, kept per window for
    the split-half noise ceiling (default: this process)."""
    if a == b or open_source(a).content_sha256 == open_source(b).content_sha256:
        raise AttnscopeError(f"--a {a} and --b {b} hold the same text (same content hash); pass two different text "
                             "sources")

    tm = build_token_model(w, circ, source_aware_denominators=source_aware_denominators, query_aware=query_aware)
    ids = {s: torch.as_tensor(tokenize(open_source(s), w.tokenizer)) for s in (a, b)}
    for s, t in ids.items():
        if len(t) < 1:
            raise TextTooShortError(f"{s} holds no tokens; pass a non-empty text")
    p_a, p_b = (token_frequencies(ids[s][None], w.d_vocab) for s in (a, b))
    e_a, e_b = tm.expected_parts(p_a), tm.expected_parts(p_b)
    parts = {t: (e_a[t] - e_b[t]).cpu() for t in e_a}
    diff = tensor_sum(parts.values())
    em = effect_model(w, circ, tm, per_source_sd)
    pd = em.predict_d(p_a, p_b).to(diff.dtype)
    order = pd.abs().argsort(descending=True).tolist()
    ev = dict(zip(order[:n_evidence], _evidence(w, tm, (p_a - p_b), order[:n_evidence])))
    recs = [NeuronContrast(k, float(diff[k]), float(pd[k]), {t: float(v[k]) for t, v in parts.items()},
                           *(ev.get(k, ([], [])))) for k in order]
    res = ContrastResult(w.info(), a, b, len(ids[a]), len(ids[b]), recs,
                         settings={"max_windows": max_windows, "calibration": circ.settings.calibration,
                                   "min_position": circ.settings.min_position, "n_ctx": circ.T,
                                   "query_conditioned": circ.query_conditioned, "prepend_bos": w.prepend_bos,
                                   "source_aware_denominators": source_aware_denominators,
                                   "query_aware_bag": source_aware_denominators and query_aware,
                                   "per_source_sd": per_source_sd})
    if verify:
        n_min = circ.settings.min_position
        wa, wb = (spread_windows(w, ids[s], circ.T, max_windows) for s in (a, b))
        if min(len(wa), len(wb)) < 2:
            short = a if len(wa) < 2 else b
            raise TextTooShortError(f"{short} has {len(ids[short])} tokens: fewer than two windows of {circ.T} to "
                                    "verify on; pass a longer text or a smaller --n-ctx")
        tmean = fit_token_mean(w, n_min, circ.T, exclude=(a, b))
        sa, sb = (window_stats(w, x, n_min, executor) for x in (wa, wb))  # per window: the split-half ceiling
        v, d, diff_true, lfl = verify_contrast(w, em.predict_d, em.sigma, n_min, wa, wb, p_a, p_b, tmean, sa, sb,
                                               windows_note=f"up to {max_windows} windows of {circ.T} tokens per "
                                                            "source, evenly spread over the whole source")
        for r in recs:
            r.true_d, r.true_diff = float(d[r.index]), float(diff_true[r.index])
            r.predicted_d_windows = float(lfl[r.index])
        res.verification = v
    return res
