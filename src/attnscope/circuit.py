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
the offset), and ``f(x)`` is the zero-offset content score.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor

from .decomposition import approximate_pattern, centre, layer0_weight_kernels, reference_norm, tv_distance
from .errors import AttnscopeError, ConditionFailedError, check_index
from .forward import apply_rotary, attn_norm_params, embed_raw, iter_layers, norm, rotary_cos_sin
from .models import ModelWeights
from .texts import text_tokens

LAYER = 0  # the method is exact about layer 0: its heads read token and position embeddings only


@dataclass
class CircuitSettings:
    """Choices that determine the circuit (recorded in the output)."""

    calibration: str = "bundled:en_moby_dick"
    n_ctx: int | None = None  # calibration tokens used (default min(context, 256))
    window: int = 100  # windowed-denominator width (the method's 100)
    min_position: int | None = None  # positions n < this are excluded from statistics (default window // 4)
    heads: list[int] | None = None  # force the contextual heads (skip detection)
    neff_min: float = 16.0  # broad kernel: N_eff >= this
    logit_std_max: float = 1.0  # weak content dependence: std of log f over calibration tokens <= this
    denominator_cv_max: float = 0.15  # stable denominator: CV of Z_n over calibration positions <= this
    share_tv_max: float = 0.3  # shared kernel: TV(head kernel, shared kernel) <= this
    decomposition_tv_max: float = 0.2  # the content/position split holds: median TV <= this
    f_clip: float = 3.0  # f is clipped at f_clip * median f (the method clips f at 3)


@dataclass
class HeadDecision:
    head: int
    chosen: bool
    reasons: list[str]
    n_eff: float
    logit_std: float
    denominator: float  # kernel-weighted Z on the calibration text (median over positions)
    denominator_windowed: float
    denominator_cv: float  # measured CV of Z_n over calibration positions
    denominator_cv_predicted: float  # std f / (mean f sqrt(N_eff)), the concentration bound's scale
    share_tv: float
    decomposition_tv: float


@dataclass
class Condition:
    """One stated input condition of an approximation, with its measured value."""

    name: str
    holds_when: str
    measured: float
    threshold: float
    ok: bool


@dataclass
class Circuit:
    """The contextual circuit of layer 0 (tensors in comments)."""

    settings: dict
    heads: list[int]
    decisions: list[HeadDecision]
    conditions: list[Condition]
    kernel: Tensor  # [T, T] shared kernel K_n(i) (rows: query n)
    head_kernels: Tensor  # [n_chosen, T, T] each chosen head's own kernel
    f: Tensor  # [n_chosen, d_vocab] clipped content factors
    Z: Tensor  # [n_chosen] calibrated denominators
    ext: Tensor  # [d_vocab, d_model] extended embeddings
    positional: Tensor  # [T, d_model] Pi(n) + C: positional and bias terms of the summed output
    mlp_scale: float  # constant scale replacing the next norm (LN2), measured on the calibration text
    mlp_scale_cv: float
    calibration_tokens: Tensor  # [T]
    calibration_sha: str
    token_mask: Tensor  # [d_vocab] bool, False for outlier-norm (glitch-like) tokens
    extra: dict = field(default_factory=dict)

    @property
    def T(self) -> int:
        return self.kernel.shape[0]

    def summary(self, tokens: Tensor) -> Tensor:
        """Linear bag-of-tokens summary ``[pos, d_model]`` of a text ``tokens [pos]`` (pos <= T)."""
        n = tokens.shape[-1]
        return self.kernel[:n, :n] @ self.ext[tokens] + self.positional[:n]

    def to_json(self) -> dict:
        return {"settings": self.settings, "heads": self.heads, "decisions": [asdict(d) for d in self.decisions],
                "conditions": [asdict(c) for c in self.conditions], "mlp_scale": self.mlp_scale,
                "mlp_scale_cv": self.mlp_scale_cv, "calibration_sha256": self.calibration_sha,
                "n_calibration_tokens": int(self.calibration_tokens.numel()),
                "n_masked_tokens": int((~self.token_mask).sum()), **self.extra}


# --------------------------------------------------------------------------------------------------


def _content_inputs(w: ModelWeights, T: int, n_star: int, ref_norm: float):
    """Normalised content and positional inputs of layer 0 (method §4.3), LN gain folded.

    Returns ``e_val [V, d]`` (value content part, normalised with the reference position),
    ``p_val [T, d]`` (value positional part), ``key_content [V, d]`` (content placed at ``n_star``, exact norm).
    """
    gamma, beta = attn_norm_params(w, LAYER)
    d, eps = w.d_model, w.eps
    E = centre(w.W_E, w)  # [V, d]
    if w.positional == "learned":
        P = centre(embed_raw(w, torch.zeros(1, T, dtype=torch.long, device=w.device))[0] - w.W_E[0], w)
        p_ref = P[n_star]
        e_sig = ((E.pow(2).sum(-1) + p_ref.pow(2).sum()) / d + eps).sqrt()  # sigma as if orthogonal to p_ref
        e_val = gamma * E / e_sig[:, None]
        p_val = gamma * P / ((P.pow(2).sum(-1) + ref_norm**2) / d + eps).sqrt()[:, None]
        key_content = norm(w, (E + p_ref)[None], gamma, beta)[0]  # exact LN of content placed at n_star
    else:  # rotary / no positions: layer 0 reads the token embedding alone, exactly
        e_val = norm(w, w.W_E[None], gamma, None if beta is None else 0 * beta)[0]
        p_val = torch.zeros(T, d, dtype=w.dtype, device=w.device)
        key_content = norm(w, w.W_E[None], gamma, beta)[0]
    return e_val, p_val, key_content


def _value_bias(w: ModelWeights) -> Tensor:
    """``c_V = beta W_V + b_V`` per head ``[H, d_head]``."""
    _, beta = attn_norm_params(w, LAYER)
    c = w.b_V[LAYER].clone()
    if beta is not None:
        c = c + torch.einsum("d,hde->he", beta, w.W_V[LAYER])
    return c


def outlier_token_mask(w: ModelWeights, z_max: float = 4.0) -> Tensor:
    """False for under-trained, glitch-like tokens: embedding norm more than ``z_max`` robust standard
    deviations *below* the median (such tokens, e.g. GPT-2's " SolidGoldMagikarp", sit near the mean
    embedding; the method zeroes a hand-made list of them).  Large-norm tokens are kept."""
    nrm = centre(w.W_E.float(), w).norm(dim=-1)
    med = nrm.median()
    mad = (nrm - med).abs().median() * 1.4826 + 1e-12
    return ((med - nrm) / mad) <= z_max


@torch.no_grad()
def layer0_kernels_and_queries(w: ModelWeights, cal: Tensor) -> tuple[Tensor, Tensor]:
    """Per-head kernel rows ``[H, T, T]`` on the calibration positions and the typical query ``[H, T, d_head]``
    (mean calibration content at each position; rotary: the mean pre-rotation query)."""
    T = cal.shape[0]
    gamma, beta = attn_norm_params(w, LAYER)
    body = cal[1:] if w.prepend_bos and len(cal) > 1 else cal
    if w.positional == "learned":
        query = w.W_E[body].mean(0)
        K = layer0_weight_kernels(w, query, T, reference_norm(w))
        P = embed_raw(w, torch.zeros(1, T, dtype=torch.long, device=w.device))[0] - w.W_E[0]
        x = norm(w, (query + P)[None], gamma, beta)
        q = torch.einsum("bpd,hde->bhpe", x, w.W_Q[LAYER])[0] + w.b_Q[LAYER][:, None]
        return K, q
    if w.positional != "rotary":
        raise AttnscopeError("layer-0 kernels need learned or rotary positions")
    x = norm(w, w.W_E[body][None], gamma, beta)[0]
    q_bar = (x @ w.W_Q[LAYER]).mean(1) + w.b_Q[LAYER]  # [H, dh]
    k_bar = (x @ w.W_K[LAYER]).mean(1) + w.b_K[LAYER]
    cos, sin = rotary_cos_sin(w, torch.arange(T, device=w.device))
    qr = apply_rotary(q_bar[:, None].expand(-1, T, -1), cos, sin)
    kr = apply_rotary(k_bar[:, None].expand(-1, T, -1), cos, sin)
    s = torch.einsum("hne,hie->hni", qr, kr) / w.attn_scale[LAYER]
    if w.causal:
        s = s.masked_fill(~torch.ones(T, T, dtype=torch.bool, device=w.device).tril(), float("-inf"))
    return s.softmax(-1), q_bar[:, None].expand(-1, T, -1)


def _mlp_norm_scale(w: ModelWeights, mid: Tensor) -> Tensor:
    """Scale of the norm in front of the MLP at each position (LayerNorm's sigma / RMSNorm's rms)."""
    x = mid.float()
    if w.norm == "layernorm":
        x = x - x.mean(-1, keepdim=True)
    return (x.pow(2).mean(-1) + w.eps).sqrt()


def mlp_input_weights(w: ModelWeights, layer: int = LAYER) -> tuple[Tensor, Tensor]:
    """``(W_in with the norm gain folded [d_model, d_mlp], bias [d_mlp])`` of the pre-activation attnscope
    predicts (the gate's for gated MLPs); the norm's beta is folded into the bias."""
    if w.norm_placement == "pre":
        g, b = w.ln2_w[layer], None if w.ln2_b is None else w.ln2_b[layer]
    else:
        g, b = w.ln1_w[layer], w.ln1_b[layer]
    W = w.W_gate[layer] if w.W_gate is not None else w.W_in[layer]
    bias = torch.zeros(W.shape[1], dtype=W.dtype, device=W.device) if w.W_gate is not None else w.b_in[layer].clone()
    if b is not None:
        bias = bias + b @ W
    return g[:, None] * W, bias


@torch.no_grad()
def build_circuit(w: ModelWeights, settings: CircuitSettings | None = None) -> Circuit:
    """Detect the contextual heads of layer 0, calibrate their denominators, build the extended embeddings."""
    s = settings or CircuitSettings()
    T = min(w.n_ctx, 256) if s.n_ctx is None else s.n_ctx
    if T > w.n_ctx:
        raise AttnscopeError(f"--n-ctx {T} exceeds the model's context of {w.n_ctx}")
    bos = w.bos_token_id if w.prepend_bos else None
    need = max(s.window + 1, 2 * (s.min_position or s.window // 4) + 1)
    cal = text_tokens(s.calibration, w.tokenizer, max_tokens=T, min_tokens=need, bos_token_id=bos).to(w.device)
    from .texts import open_source

    cal_sha = open_source(s.calibration).sha256
    T = len(cal)
    n_min = s.min_position if s.min_position is not None else s.window // 4
    H = w.n_heads
    scale = w.attn_scale[LAYER]
    gamma, beta = attn_norm_params(w, LAYER)
    n_star = min(T - 1, max(n_min, T // 2))
    ref = reference_norm(w)
    e_val, p_val, key_content = _content_inputs(w, T, n_star, ref)
    Kh, q = layer0_kernels_and_queries(w, cal)  # [H, T, T], [H, T, dh]
    # content factor of every vocabulary item: log f^h(x) = q_{n*} . E[n*, x] / scale (bias in q . c_K cancels)
    keys = torch.einsum("vd,hde->hve", key_content, w.W_K[LAYER])  # [H, V, dh]
    logf = torch.einsum("he,hve->hv", q[:, n_star], keys) / scale
    mask = outlier_token_mask(w)
    body = cal[1:] if bos is not None else cal
    logf = logf - logf[:, body].median(-1, keepdim=True).values  # f = 1 for the median calibration token
    f = logf.exp().clamp(max=s.f_clip)
    if bos is not None:  # the BOS token's own factor is measured, not clipped (it is a sink, not content)
        f[:, bos] = logf[:, bos].exp()
    # exact layer-0 pass on the calibration text: true attention (for the decomposition TV) and LN2 scales
    acts = next(iter_layers(w, cal[None], stop_layer=0))
    if w.positional == "learned":
        static = embed_raw(w, torch.zeros(1, T, dtype=torch.long, device=w.device))[0] - w.W_E[0]
    else:
        kk = torch.einsum("bpd,hde->bhpe", acts.attn_in, w.W_K[LAYER]) + w.b_K[LAYER][None, :, None]
        static = kk[0, :, 1 if bos is not None else 0 :].mean(1, keepdim=True).expand(-1, T, -1)
    approx = approximate_pattern(w, LAYER, acts, static, ref)
    dec_tv = tv_distance(approx, acts.pattern)[0, :, n_min:].median(-1).values  # [H]
    # denominators: kernel-weighted Z_n = sum_j K_n(j) f(x_j), and the windowed mean of f
    fx = f[:, cal]  # [H, T]
    Zn = torch.einsum("hnj,hj->hn", Kh, fx)[:, n_min:]
    Zk = Zn.median(-1).values
    Zcv = Zn.std(-1) / Zn.mean(-1)
    win = torch.stack([fx[:, max(0, n - s.window) : n].mean(-1) for n in range(max(s.window, n_min), T)], -1)
    Zw = win.median(-1).values
    neff = (1.0 / Kh[:, n_min:].pow(2).sum(-1)).median(-1).values  # [H]
    fb = fx[:, 1:] if bos is not None else fx
    cv_pred = fb.std(-1) / (fb.mean(-1) * neff.sqrt())
    logit_std = logf[:, body].std(-1)
    # detection
    broad = neff >= s.neff_min
    weak = logit_std <= s.logit_std_max
    split_ok = dec_tv <= s.decomposition_tv_max
    stable = Zcv <= s.denominator_cv_max
    cand = broad & weak & split_ok & stable
    if s.heads is not None:
        for h in s.heads:
            check_index("head", h, H)
        cand = torch.zeros(H, dtype=torch.bool)
        cand[s.heads] = True
    shared = Kh[cand].mean(0) if cand.any() else Kh.mean(0)
    share_tv = tv_distance(Kh[:, n_min:], shared[None, n_min:]).mean(-1)
    chosen = cand & (share_tv <= s.share_tv_max) if s.heads is None else cand
    if s.heads is None and chosen.any() and not torch.equal(chosen, cand):  # recompute with the agreeing heads
        shared = Kh[chosen].mean(0)
        share_tv = tv_distance(Kh[:, n_min:], shared[None, n_min:]).mean(-1)
    decisions = []
    for h in range(H):
        reasons = []
        reasons.append(f"N_eff={neff[h]:.1f} {'>=' if broad[h] else '<'} {s.neff_min:g}")
        reasons.append(f"std log f={logit_std[h]:.2f} {'<=' if weak[h] else '>'} {s.logit_std_max:g}")
        reasons.append(f"decomposition TV={dec_tv[h]:.3f} {'<=' if split_ok[h] else '>'} {s.decomposition_tv_max:g}")
        reasons.append(f"CV(Z_n)={Zcv[h]:.3f} {'<=' if stable[h] else '>'} {s.denominator_cv_max:g}")
        reasons.append(f"TV to shared kernel={share_tv[h]:.3f} {'<=' if share_tv[h] <= s.share_tv_max else '>'} "
                       f"{s.share_tv_max:g}")
        if s.heads is not None:
            reasons.append("chosen by the user" if chosen[h] else "not in --heads")
        decisions.append(HeadDecision(h, bool(chosen[h]), reasons, float(neff[h]), float(logit_std[h]), float(Zk[h]),
                                      float(Zw[h]), float(Zcv[h]), float(cv_pred[h]), float(share_tv[h]),
                                      float(dec_tv[h])))
    heads = [h for h in range(H) if chosen[h]]
    if not heads:
        worst = min(decisions, key=lambda d: d.share_tv + (0 if d.n_eff >= s.neff_min else 1) + d.logit_std)
        raise ConditionFailedError(
            f"no contextual heads in layer 0 of {w.name}: none has a broad kernel, weak content dependence, a "
            f"valid content/position split and a stable denominator (closest, head {worst.head}: "
            f"{'; '.join(worst.reasons[:4])}); pass --heads to force some"
        )
    hs = torch.tensor(heads, device=w.device)
    # extended embeddings and positional term
    WOV = torch.einsum("hde,hef->hdf", w.W_V[LAYER][hs], w.W_O[LAYER][hs])  # [n, d, d]
    weights_tok = f[hs] / Zk[hs][:, None]  # [n, V]
    ext = torch.zeros(w.d_vocab, w.d_model, dtype=w.dtype, device=w.device)
    for j in range(len(heads)):
        ext += weights_tok[j][:, None] * (e_val @ WOV[j])
    ext = ext * mask[:, None].to(ext.dtype)
    cV = _value_bias(w)[hs]
    const = torch.einsum("he,hed->d", cV, w.W_O[LAYER][hs])
    posit = torch.einsum("hni,id,hdf->nf", Kh[hs], p_val, WOV) + const  # per-head kernels for Pi(n)
    # LN2: constant scale measured on the calibration text
    mid_scale = _mlp_norm_scale(w, acts.resid_pre + acts.attn_out)[0, n_min:]
    mlp_scale = float(mid_scale.median())
    mlp_cv = float(mid_scale.std() / mid_scale.mean())
    conds = [
        Condition("broad kernel", "N_eff of the shared kernel is large (concentration needs many tokens)",
                  float((1.0 / shared[n_min:].pow(2).sum(-1)).median()), s.neff_min,
                  bool((1.0 / shared[n_min:].pow(2).sum(-1)).median() >= s.neff_min)),
        Condition("weak content dependence", "max over chosen heads of std log f on the calibration text",
                  float(logit_std[hs].max()), s.logit_std_max, bool(logit_std[hs].max() <= s.logit_std_max)),
        Condition("stable denominators", "max over chosen heads of CV of Z_n over calibration positions",
                  float(Zcv[hs].max()), s.denominator_cv_max, bool(Zcv[hs].max() <= s.denominator_cv_max)),
        Condition("shared kernel", "max TV between a chosen head's kernel and the shared kernel",
                  float(share_tv[hs].max()), s.share_tv_max, bool(share_tv[hs].max() <= s.share_tv_max)),
        Condition("content/position split", "max over chosen heads of the median decomposition TV",
                  float(dec_tv[hs].max()), s.decomposition_tv_max, bool(dec_tv[hs].max() <= s.decomposition_tv_max)),
        Condition("constant MLP-norm scale", "CV over calibration positions of the scale of the norm before the MLP",
                  mlp_cv, 0.2, mlp_cv <= 0.2),
        Condition("no outlier tokens", "fraction of calibration tokens whose f was clipped at f_clip x median",
                  float((logf[hs][:, body].exp() > s.f_clip).float().mean()), 0.01,
                  bool((logf[hs][:, body].exp() > s.f_clip).float().mean() <= 0.01)),
    ]
    return Circuit(settings={**asdict(s), "n_ctx": T, "reference_position": n_star, "reference_norm": ref,
                             "min_position": n_min},
                   heads=heads, decisions=decisions, conditions=conds, kernel=shared, head_kernels=Kh[hs], f=f[hs], Z=Zk[hs], ext=ext,
                   positional=posit, mlp_scale=mlp_scale, mlp_scale_cv=mlp_cv, calibration_tokens=cal.cpu(),
                   calibration_sha=cal_sha, token_mask=mask,
                   extra={"denominators_windowed": [float(Zw[h]) for h in heads]})


@torch.no_grad()
def true_head_output(w: ModelWeights, heads: list[int], tokens: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Exact layer-0 pass: ``(sum of the heads' outputs [pos, d_model], MLP pre-activation [pos, d_mlp],
    norm scale in front of the MLP [pos])``."""
    a = next(iter_layers(w, tokens[None], stop_layer=0))
    hs = torch.tensor(heads, device=w.device)
    out = torch.einsum("hpe,hed->pd", a.z[0, hs], w.W_O[LAYER][hs])
    return out, a.mlp_pre[0], _mlp_norm_scale(w, a.resid_pre + a.attn_out)[0]


def circuit_fidelity(w: ModelWeights, circ: Circuit, texts: dict[str, Tensor],
                     true_outputs: dict[str, Tensor] | None = None) -> dict[str, float]:
    """How close the linear summary is to the heads' true summed output on held-out texts: FVU of the
    (centred) vector, and the median over dimensions of the per-dimension correlation.

    ``true_outputs``: the heads' true summed outputs per text, if already computed (:func:`true_head_output`)."""
    ys, yh = [], []
    n_min = circ.settings["min_position"]
    for name, toks in texts.items():
        toks = toks[: circ.T].to(w.device)
        y = true_outputs[name] if true_outputs is not None else true_head_output(w, circ.heads, toks)[0]
        ys.append(centre(y, w)[n_min:])
        yh.append(centre(circ.summary(toks), w)[n_min:])
    y, yhat = torch.cat(ys).double(), torch.cat(yh).double()
    fvu = float(((y - yhat) ** 2).sum() / ((y - y.mean(0)) ** 2).sum())
    yc, hc = y - y.mean(0), yhat - yhat.mean(0)
    r_dim = (yc * hc).sum(0) / (yc.norm(dim=0) * hc.norm(dim=0) + 1e-12)
    return {"fvu": fvu, "median_r_per_dimension": float(r_dim.median()), "n_positions": int(y.shape[0])}


def denominator_stability(w: ModelWeights, circ: Circuit, texts: dict[str, Tensor]) -> dict[str, dict]:
    """Kernel-weighted denominators on other texts: per head, median Z per text and its ratio to the
    calibration value (the per-head scale error of reusing the calibration denominator)."""
    n_min = circ.settings["min_position"]
    out: dict[str, dict] = {}
    for name, toks in texts.items():
        toks = toks[: circ.T].to(w.device)
        n = len(toks)
        Zn = torch.einsum("hnj,hj->hn", circ.head_kernels[:, :n, :n], circ.f[:, toks])[:, n_min:]
        out[name] = {"Z_median": Zn.median(-1).values.tolist(), "ratio_to_calibration": (Zn.median(-1).values / circ.Z).tolist(),
                     "Z_trace": Zn.tolist()}
    return out
