r"""Contextual heads, their softmax denominators, and the contextual circuit (method §6-7).

For a head ``h`` of layer 0 with positional kernel ``K_n(i)`` and content factor
``f(x) = exp(q . E[n*, x] / scale)``, attention is ``A(n, i) = K_n(i) f(x_i) / Z_n`` with
``Z_n = sum_j K_n(j) f(x_j)``.  When the kernel is broad and ``f`` varies little, ``Z_n`` concentrates
around ``E_D[f]`` for a fixed token distribution ``D`` (relative fluctuation ~ ``std f / (mean f sqrt(N_eff))``),
so one calibration text fixes it and the heads' summed output becomes linear in the bag of tokens:

    sum_h o^h_n ~ sum_i K_n(i) Ext(x_i) + Pi(n) + C,
    Ext(x) = sum_h f^h(x) / Z^h * e(x) W_V^h W_O^h          (extended embeddings, [d_vocab, d_model])

with ``e(x)`` the normalised content part of the value input (method §4.3), ``Pi(n)`` the positional
term and ``C`` the value biases.  ``K`` is the chosen heads' shared kernel (their mean).  Every
assumption is checked on the calibration text and reported with its measured value.

Learned positions (GPT-2, BERT): layer-0 kernels from the weights with the mean calibration embedding as
the query (method §5.2a).  Rotary (Llama): layer 0 has no positional residual, so the kernel is the mean
calibration query and key through the rotation, ``K_n(i) ∝ exp(q̄ R_{i-n} k̄ / scale)`` (a function of
the offset), and ``f(x)`` is the separable content score with one complex weight per rotary frequency pair,
taken from the head's own kernel (docs/rotary-split.md).

Sinks (method §15): a BOS is split off; kernels, denominators and split TV use the other positions; the sink
adds mass x BOS value (a constant in ``Pi(n) + C``), and its CV is a stated condition.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from jaxtyping import Bool, Complex, Float, Int
from torch import Tensor

from attnscope.circuit.parts import (  # noqa: F401  (re-exported)
    content_inputs,
    extended_embeddings,
    mlp_input_weights,
    mlp_norm_scale,
    outlier_token_mask,
    true_head_output,
    value_bias,
)
from attnscope.circuit.query import choose_query_form, circuit_output, query_denominator_stability
from attnscope.circuit.result import (  # noqa: F401  (re-exported: the circuit's types live with it)
    CONDITION_GROUP,
    HEAD_CRITERIA,
    LAYER,
    SCHEMA_VERSION,
    Circuit,
    CircuitRecord,
    CircuitSettings,
    Condition,
    ConditionGroup,
    Criterion,
    HeadDecision,
)
from attnscope.core.errors import AttnscopeError, NoContextualHeadsError, check_index
from attnscope.core.texts import open_source, require_diverse, text_tokens
from attnscope.exact.decomposition import (
    apply_pair_weights,
    approximate_pattern,
    centre,
    layer0_weight_kernels,
    learned_score_parts,
    pair_weights_of_kernel,
    pooled_static_keys,
    pre_rotation,
    reference_norm,
    separable_rotary_score_parts,
    tv_distance,
)
from attnscope.exact.forward import (
    LayerActivations,
    apply_rotary,
    attn_norm_params,
    iter_layers,
    mask_scores,
    norm,
    project,
    qk_scores,
    rotary_cos_sin,
    static_positions,
)
from attnscope.exact.sinks import SINK_SHOW, drop_sink, sink_term, split_sink
from attnscope.models import ModelWeights

# --------------------------------------------------------------------------------------------------








@torch.no_grad()
def layer0_kernels_and_queries(w: ModelWeights, cal: Int[Tensor, " ctx"]
                               ) -> tuple[Float[Tensor, "head ctx ctx"], Float[Tensor, "head ctx d_head"]]:
    """Per-head kernel rows ``[H, T, T]`` on the calibration positions and the typical query ``[H, T, d_head]``
    (mean calibration content at each position; rotary: the mean pre-rotation query)."""
    T = cal.shape[0]
    gamma, beta = attn_norm_params(w, LAYER)
    body = cal[1:] if w.prepend_bos and len(cal) > 1 else cal
    if w.positional == "learned":
        query = w.W_E[body].mean(0)
        K = layer0_weight_kernels(w, query, T, reference_norm(w))
        x = norm(w, (query + static_positions(w, T))[None], gamma, beta)
        q = project(x, w.W_Q[LAYER], w.b_Q[LAYER])[0]
        return K, q
    if w.positional != "rotary":
        raise AttnscopeError("layer-0 kernels need learned or rotary positions")
    x = norm(w, w.W_E[body][None], gamma, beta)[0]
    q_bar = (x @ w.W_Q[LAYER]).mean(1) + w.b_Q[LAYER]  # [H, dh]
    k_bar = (x @ w.W_K[LAYER]).mean(1) + w.b_K[LAYER]
    cos, sin = rotary_cos_sin(w, torch.arange(T, device=w.device))
    qr = apply_rotary(q_bar[:, None].expand(-1, T, -1), cos, sin)
    kr = apply_rotary(k_bar[:, None].expand(-1, T, -1), cos, sin)
    s = mask_scores(w, qk_scores(qr, kr) / w.attn_scale[LAYER])
    return s.softmax(-1), q_bar[:, None].expand(-1, T, -1)






@dataclass
class Calibration:
    """The calibration text as the circuit uses it."""

    tokens: Int[Tensor, " ctx"]  # with the analysis BOS in front, if any
    sha256: str
    bos: int | None
    n_min: int  # positions n < n_min are left out of every statistic
    n_star: int  # the reference query position of the content factors

    @property
    def T(self) -> int:
        return len(self.tokens)

    @property
    def body(self) -> Int[Tensor, " body"]:
        """The tokens without the BOS."""
        return self.tokens[1:] if self.bos is not None else self.tokens


def load_calibration(w: ModelWeights, s: CircuitSettings) -> Calibration:
    """Tokenise the calibration text (at most ``n_ctx`` tokens, enough for the windowed denominators)."""
    T = min(w.n_ctx, 256) if s.n_ctx is None else s.n_ctx
    if T > w.n_ctx:
        raise AttnscopeError(f"--n-ctx {T} exceeds the model's context of {w.n_ctx}")
    bos = w.analysis_bos
    need = max(s.window + 1, 2 * (s.min_position or s.window // 4) + 1)
    cal = text_tokens(s.calibration, w.tokenizer, max_tokens=T, min_tokens=need, bos_token_id=bos).to(w.device)
    require_diverse(cal[1:] if bos is not None else cal, s.calibration, "calibration")
    T = len(cal)
    n_min = s.min_position if s.min_position is not None else s.window // 4
    return Calibration(cal, open_source(s.calibration).sha256, bos, n_min, min(T - 1, max(n_min, T // 2)))


def content_factors(w: ModelWeights, cal: Calibration, q: Float[Tensor, "head ctx d_head"],
                    key_content: Float[Tensor, "vocab d_model"], f_clip: float,
                    pair_weights: Complex[Tensor, "head pairs"] | None = None
                    ) -> tuple[Float[Tensor, "head vocab"], Float[Tensor, "head vocab"]]:
    """``(log f [H, V], f [H, V])``: every vocabulary item's content factor for every head,
    ``log f^h(x) = q_{n*} . E[n*, x] / scale`` (the bias in ``q . c_K`` cancels), normalised so that the
    median calibration token has ``f = 1``, and ``f`` clipped at ``f_clip`` (the BOS token's own factor is
    measured, not clipped: it is a sink, not content).  Rotary: the query's frequency pairs are weighted by
    ``pair_weights [H, D/2]`` (the separable split; ``None``: zero offset)."""
    qs = q[:, cal.n_star]
    if pair_weights is not None:
        qs = apply_pair_weights(w, qs[:, None], pair_weights)[:, 0]
    qk = torch.einsum("hde,he->hd", w.W_K[LAYER], qs)  # the query folded into W_K: [H, d]
    logf = (key_content @ qk.T).T / w.attn_scale[LAYER]  # [H, V]: 2 V d H FLOPs, not 2 V d H dh
    logf = logf - logf[:, cal.body].median(-1, keepdim=True).values
    f = logf.exp().clamp(max=f_clip)
    if cal.bos is not None:
        f[:, cal.bos] = logf[:, cal.bos].exp()
    return logf, f


@dataclass
class HeadStatistics:
    """Per-head measurements on the calibration text (each ``[n_heads]``)."""

    n_eff: Float[Tensor, " head"]  # median over positions of 1 / sum K^2
    logit_std: Float[Tensor, " head"]  # std of log f over calibration tokens
    decomposition_tv: Float[Tensor, " head"]  # median over positions of TV(true attention, content+position pattern)
    denominator: Float[Tensor, " head"]  # median over positions of the kernel-weighted Z_n
    denominator_windowed: Float[Tensor, " head"]  # median over positions of the windowed mean of f
    denominator_cv: Float[Tensor, " head"]  # CV of Z_n over positions
    denominator_cv_predicted: Float[Tensor, " head"]  # std f / (mean f sqrt(N_eff))


def split_patterns(w: ModelWeights, cal: Calibration, acts: LayerActivations, ref: float, q_typ: Tensor,
                   pair_weights: Tensor | None) -> tuple[Tensor, Tensor]:
    """Layer-0 patterns ``[H, T, T]`` of the content/position split on the calibration text: with the exact query
    at every position (method §4.4), and with the circuit's typical query ``q_typ [H, T, d_head]`` (the fully
    separable ``f(x_i) K(n - i)`` the circuit uses).  Rotary: the separable split with ``pair_weights``."""
    scale = w.attn_scale[LAYER]
    if w.positional == "learned":
        static = static_positions(w, cal.T)
        exact = approximate_pattern(w, LAYER, acts, static, ref)[0]
        cont, pos, bias = learned_score_parts(w, LAYER, acts.norm_in, static, q_typ[None], ref)
        return exact, mask_scores(w, (cont + pos + bias[..., None]) / scale).softmax(-1)[0]
    assert pair_weights is not None, "rotary: build_circuit passes the kernel's pair weights"
    qp, kp = pre_rotation(w, acts.q), pre_rotation(w, acts.k)
    static = pooled_static_keys(kp[0], cal.bos is not None)
    out = []
    for q in (qp, q_typ[None]):
        cont, pos = separable_rotary_score_parts(w, q, kp, static, pair_weights)
        out.append(mask_scores(w, (cont + pos) / scale).softmax(-1)[0])
    return out[0], out[1]


def split_tv(approx: Tensor, true: Tensor, cal: Calibration) -> Tensor:
    """Median over positions ``>= n_min`` of TV(true attention, split pattern) ``[H]``; with a BOS, on the
    positions after it (both rows renormalised): the split is judged on the non-sink part."""
    if cal.bos is not None:
        approx, true = split_sink(approx)[1], split_sink(true)[1]
    return tv_distance(approx, true)[:, cal.n_min:].median(-1).values


def head_statistics(Kh: Float[Tensor, "head ctx ctx"], logf: Float[Tensor, "head vocab"],
                    f: Float[Tensor, "head vocab"], dec_tv: Float[Tensor, " head"], cal: Calibration,
                    window: int) -> HeadStatistics:
    """Denominators (kernel-weighted ``Z_n = sum_j K_n(j) f(x_j)`` and the windowed mean of ``f``), kernel
    widths and content dependence of every head."""
    n_min, T = cal.n_min, cal.T
    fx = f[:, cal.tokens]  # [H, T]
    Zn = torch.einsum("hnj,hj->hn", Kh, fx)[:, n_min:]
    win = torch.stack([fx[:, max(0, n - window) : n].mean(-1) for n in range(max(window, n_min), T)], -1)
    neff = (1.0 / Kh[:, n_min:].pow(2).sum(-1)).median(-1).values  # [H]
    fb = fx[:, 1:] if cal.bos is not None else fx
    return HeadStatistics(n_eff=neff, logit_std=logf[:, cal.body].std(-1), decomposition_tv=dec_tv,
                          denominator=Zn.median(-1).values, denominator_windowed=win.median(-1).values,
                          denominator_cv=Zn.std(-1) / Zn.mean(-1),
                          denominator_cv_predicted=fb.std(-1) / (fb.mean(-1) * neff.sqrt()))


def _head_tests(st: HeadStatistics, share_tv: Float[Tensor, " head"] | None, s: CircuitSettings) -> list[tuple]:
    """``(criterion, label, measured [H], threshold, passes [H], digits)`` for each of :data:`HEAD_CRITERIA`
    (the shared-kernel test only once ``share_tv`` is known)."""
    tests = [(Criterion.BROAD, "N_eff", st.n_eff, s.neff_min, st.n_eff >= s.neff_min, 1),
             (Criterion.WEAK, "std log f", st.logit_std, s.logit_std_max, st.logit_std <= s.logit_std_max, 2),
             (Criterion.SPLIT, "decomposition TV", st.decomposition_tv, s.decomposition_tv_max,
              st.decomposition_tv <= s.decomposition_tv_max, 3),
             (Criterion.STABLE, "CV(Z_n)", st.denominator_cv, s.denominator_cv_max,
              st.denominator_cv <= s.denominator_cv_max, 3)]
    if share_tv is not None:
        tests.append((Criterion.SHARED, "TV to shared kernel", share_tv, s.share_tv_max, share_tv <= s.share_tv_max, 3))
    return tests


def choose_heads(Kh: Float[Tensor, "head ctx ctx"], st: HeadStatistics, s: CircuitSettings, n_min: int
                 ) -> tuple[Bool[Tensor, " head"], Float[Tensor, "ctx ctx"], Float[Tensor, " head"]]:
    """``(chosen [H] bool, shared kernel [T, T], TV of each head's kernel to it [H])``.

    Candidates pass every per-head test (or are named by ``--heads``); a detected candidate whose kernel is
    further than ``share_tv_max`` from the candidates' mean kernel is dropped and the mean recomputed."""
    H = Kh.shape[0]
    cand = torch.stack([t[4] for t in _head_tests(st, None, s)]).all(0)
    if s.heads is not None:
        for h in s.heads:
            check_index("head", h, H)
        cand = torch.zeros(H, dtype=torch.bool, device=Kh.device)
        cand[s.heads] = True
    shared = Kh[cand].mean(0) if cand.any() else Kh.mean(0)
    share_tv = tv_distance(Kh[:, n_min:], shared[None, n_min:]).mean(-1)
    chosen = cand & (share_tv <= s.share_tv_max) if s.heads is None else cand
    if s.heads is None and chosen.any() and not torch.equal(chosen, cand):  # recompute with the agreeing heads
        shared = Kh[chosen].mean(0)
        share_tv = tv_distance(Kh[:, n_min:], shared[None, n_min:]).mean(-1)
    return chosen, shared, share_tv


def _reason(c: Criterion, label: str, value: float, threshold: float, ok: bool, digits: int) -> str:
    lower_bound = c is Criterion.BROAD  # the other per-head tests are upper bounds
    sym = (">=" if ok else "<") if lower_bound else ("<=" if ok else ">")
    return f"{label}={value:.{digits}f} {sym} {threshold:g}"


def head_decisions(st: HeadStatistics, chosen: Bool[Tensor, " head"], share_tv: Float[Tensor, " head"],
                   s: CircuitSettings) -> list[HeadDecision]:
    """One :class:`HeadDecision` per head: every test with its measured value, and the failed ones."""
    tests = _head_tests(st, share_tv, s)
    decisions = []
    for h in range(len(chosen)):
        reasons = [_reason(c, label, float(v[h]), thr, bool(p[h]), dg) for c, label, v, thr, p, dg in tests]
        failed = [c for c, _, _, _, p, _ in tests if not p[h]]
        if s.heads is not None:
            reasons.append("chosen by the user" if chosen[h] else "not in --heads")
            failed += [] if chosen[h] else [Criterion.USER]
        decisions.append(HeadDecision(h, bool(chosen[h]), reasons, float(st.n_eff[h]), float(st.logit_std[h]),
                                      float(st.denominator[h]), float(st.denominator_windowed[h]),
                                      float(st.denominator_cv[h]), float(st.denominator_cv_predicted[h]),
                                      float(share_tv[h]), float(st.decomposition_tv[h]), failed))
    return decisions




_HOLDS_WHEN = {
    Criterion.BROAD: "N_eff of the shared kernel is large (concentration needs many tokens)",
    Criterion.WEAK: "max over chosen heads of std log f on the calibration text",
    Criterion.STABLE: "max over chosen heads of CV of Z_n over calibration positions",
    Criterion.SHARED: "max TV between a chosen head's kernel and the shared kernel",
    Criterion.SPLIT: "max over chosen heads of the median decomposition TV",
    Criterion.MLP_SCALE: "CV over calibration positions of the scale of the norm before the MLP",
    Criterion.NO_OUTLIERS: "fraction of calibration tokens whose f was clipped at f_clip x median",
    Criterion.SINK: f"max over chosen heads with a sink mass >= {SINK_SHOW} of the CV of the sink mass over "
                    "calibration positions (the sink term is a constant)",
}


def circuit_conditions(st: HeadStatistics, hs: Int[Tensor, " chosen"], shared: Float[Tensor, "ctx ctx"],
                       share_tv: Float[Tensor, " head"], logf: Float[Tensor, "head vocab"], mlp_cv: float,
                       cal: Calibration, s: CircuitSettings, sink: tuple[Tensor, Tensor]) -> list[Condition]:
    """The stated input conditions of the circuit over the chosen heads ``hs``, each measured once."""
    n_min = cal.n_min
    big = sink[0][hs] >= SINK_SHOW
    sink_cv = float(sink[1][hs][big].max()) if big.any() else 0.0
    neff_shared = (1.0 / shared[n_min:].pow(2).sum(-1)).median()
    clipped = (logf[hs][:, cal.body].exp() > s.f_clip).float().mean()
    # (criterion, value, threshold, holds): 0-d tensors or Python numbers
    measured: list[tuple[Criterion, Tensor | float, float, Tensor | bool]] = [
        (Criterion.BROAD, neff_shared, s.neff_min, neff_shared >= s.neff_min),
        (Criterion.WEAK, st.logit_std[hs].max(), s.logit_std_max, st.logit_std[hs].max() <= s.logit_std_max),
        (Criterion.STABLE, st.denominator_cv[hs].max(), s.denominator_cv_max,
         st.denominator_cv[hs].max() <= s.denominator_cv_max),
        (Criterion.SHARED, share_tv[hs].max(), s.share_tv_max, share_tv[hs].max() <= s.share_tv_max),
        (Criterion.SPLIT, st.decomposition_tv[hs].max(), s.decomposition_tv_max,
         st.decomposition_tv[hs].max() <= s.decomposition_tv_max),
        (Criterion.MLP_SCALE, mlp_cv, 0.2, mlp_cv <= 0.2),
        (Criterion.NO_OUTLIERS, clipped, 0.01, clipped <= 0.01),
        (Criterion.SINK, sink_cv, s.denominator_cv_max, sink_cv <= s.denominator_cv_max),
    ]
    return [Condition(c.value, _HOLDS_WHEN[c], float(v), float(thr), bool(ok), CONDITION_GROUP[c])
            for c, v, thr, ok in measured]


@torch.no_grad()
def build_circuit(w: ModelWeights, settings: CircuitSettings | None = None) -> Circuit:
    """Detect the contextual heads of layer 0, calibrate their denominators, build the extended embeddings."""
    s = settings or CircuitSettings()
    cal = load_calibration(w, s)
    ref = reference_norm(w)
    e_val, p_val, key_content = content_inputs(w, cal.T, cal.n_star, ref)
    Kh, q = layer0_kernels_and_queries(w, cal.tokens)  # [H, T, T], [H, T, dh]
    if cal.bos is not None:  # the kernel proper: the BOS (sink) split off, the rest renormalised
        Kh = drop_sink(Kh)
    c = pair_weights_of_kernel(w, Kh[:, -1], cal.bos is not None, per_row=True) if w.positional == "rotary" else None
    logf, f = content_factors(w, cal, q, key_content, s.f_clip, None if c is None else c[:, cal.n_star])
    mask = outlier_token_mask(w)
    # exact layer-0 pass on the calibration text: true attention (for the decomposition TV) and LN2 scales
    acts = next(iter_layers(w, cal.tokens[None], stop_layer=0))
    assert acts.pattern is not None, "iter_layers keeps the patterns by default"
    exact_pat, typ_pat = split_patterns(w, cal, acts, ref, q, c)
    no_sink = (torch.zeros(w.n_heads, dtype=torch.float64, device=w.device),) * 2
    sink = sink_term(acts.pattern[0, :, :, 0], cal.n_min) if cal.bos is not None else no_sink
    st = head_statistics(Kh, logf, f, split_tv(exact_pat, acts.pattern[0], cal), cal, s.window)
    chosen, shared, share_tv = choose_heads(Kh, st, s, cal.n_min)
    decisions = head_decisions(st, chosen, share_tv, s)
    sep_tv = split_tv(typ_pat, acts.pattern[0], cal)
    for d in decisions:
        d.sink_mass, d.sink_mass_cv = float(sink[0][d.head]), float(sink[1][d.head])
        d.separable_tv = float(sep_tv[d.head])
    heads = [h for h in range(w.n_heads) if chosen[h]]
    if not heads:
        worst = min(decisions, key=lambda d: d.share_tv + (0 if d.n_eff >= s.neff_min else 1) + d.logit_std)
        raise NoContextualHeadsError(
            f"no contextual heads in layer 0 of {w.name}: none has a broad kernel, weak content dependence, a "
            f"valid content/position split and a stable denominator (closest, head {worst.head}: "
            f"{'; '.join(worst.reasons[:4])}); pass --heads to force some", worst.head, list(worst.reasons[:4])
        )
    hs = torch.tensor(heads, device=w.device)
    ext, posit = extended_embeddings(w, hs, f, st.denominator, e_val, p_val, Kh, mask,
                                     sink[0] if cal.bos is not None else None, cal.bos)
    # LN2: constant scale measured on the calibration text
    mid_scale = mlp_norm_scale(w, acts.resid_pre + acts.attn_out)[0, cal.n_min:]
    mlp_scale, mlp_cv = float(mid_scale.median()), float(mid_scale.std() / mid_scale.mean())
    conds = circuit_conditions(st, hs, shared, share_tv, logf, mlp_cv, cal, s, sink)
    record = CircuitRecord(**{**asdict(s), "n_ctx": cal.T, "min_position": cal.n_min},
                           reference_position=cal.n_star, reference_norm=ref, bos=cal.bos, prepend_bos=w.prepend_bos,
                           sink_handling="BOS split off as a constant" if cal.bos is not None else "none (no BOS)",
                           rotary_pair_weights_abs=None if c is None else c[:, -1].abs().float().cpu().tolist())
    circ = Circuit(settings=record, heads=heads, decisions=decisions, conditions=conds, kernel=shared,
                   head_kernels=Kh[hs], f=f[hs], Z=st.denominator[hs], ext=ext, positional=posit, mlp_scale=mlp_scale,
                   mlp_scale_cv=mlp_cv,
                   calibration_tokens=cal.tokens, calibration_sha=cal.sha256, token_mask=mask,
                   denominators_windowed=[float(st.denominator_windowed[h]) for h in heads])
    return choose_query_form(w, circ)




def circuit_fidelity(w: ModelWeights, circ: Circuit, texts: dict[str, Int[Tensor, " _pos"]],
                     true_outputs: dict[str, Float[Tensor, "_pos d_model"]] | None = None) -> dict[str, float | int]:
    """How close the circuit's summary (:meth:`Circuit.output`: the form the circuit uses) is to the heads' true
    summed output on held-out texts: FVU of the
    (centred) vector, and the median over dimensions of the per-dimension correlation.

    ``true_outputs``: the heads' true summed outputs per text, if already computed (:func:`true_head_output`)."""
    ys, yh = [], []
    n_min = circ.settings.min_position
    for name, toks in texts.items():
        toks = toks[: circ.T].to(w.device)
        y = true_outputs[name] if true_outputs is not None else true_head_output(w, circ.heads, toks)[0]
        ys.append(centre(y, w)[n_min:])
        yh.append(centre(circuit_output(w, circ, toks), w)[n_min:])
    y, yhat = torch.cat(ys).double(), torch.cat(yh).double()
    fvu = float(((y - yhat) ** 2).sum() / ((y - y.mean(0)) ** 2).sum())
    yc, hc = y - y.mean(0), yhat - yhat.mean(0)
    r_dim = (yc * hc).sum(0) / (yc.norm(dim=0) * hc.norm(dim=0) + 1e-12)
    return {"fvu": fvu, "median_r_per_dimension": float(r_dim.median()), "n_positions": int(y.shape[0])}


def denominator_stability(w: ModelWeights, circ: Circuit, texts: dict[str, Int[Tensor, " _pos"]]) -> dict[str, dict]:
    """Kernel-weighted denominators on other texts: per head, median Z per text and its ratio to the
    calibration value (the per-head scale error of reusing the calibration denominator); a query-conditioned
    circuit compares each query's own Z (:func:`attnscope.circuit.query.query_denominator_stability`)."""
    if circ.query_conditioned:
        return query_denominator_stability(w, circ, texts)
    n_min = circ.settings.min_position
    out: dict[str, dict] = {}
    for name, toks in texts.items():
        toks = toks[: circ.T].to(w.device)
        n = len(toks)
        Zn = torch.einsum("hnj,hj->hn", circ.head_kernels[:, :n, :n], circ.f[:, toks])[:, n_min:]
        out[name] = {"Z_median": Zn.median(-1).values.tolist(),
                     "ratio_to_calibration": (Zn.median(-1).values / circ.Z).tolist(), "Z_trace": Zn.tolist()}
    return out


Z_RATIO_RANGE = (0.8, 1.25)  # a text's Z / calibration Z outside this: the text is outside the explanation's scope


def denominator_transfer_condition(text: str, ratios: list[float]) -> Condition:
    """The denominator-transfer condition on one text: every contextual head's median ``Z_n`` over its
    calibration value within :data:`Z_RATIO_RANGE` (measured: the ratio farthest from 1, on a log scale)."""
    lo, hi = Z_RATIO_RANGE
    worst = max(ratios, key=lambda r: abs(math.log(max(r, 1e-12)))) if ratios else 1.0
    return Condition(Criterion.TRANSFER.value, f"on {text}: every contextual head's Z / calibration Z within "
                     f"{lo}-{hi} (measured: the ratio farthest from 1)", float(worst), hi if worst >= 1 else lo,
                     bool(all(lo <= r <= hi for r in ratios)), CONDITION_GROUP[Criterion.TRANSFER])
