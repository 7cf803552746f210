r"""Query-token-conditioned contextual circuit: the form the circuit uses when one typical query is not enough
(issue 10; derivation and numbers in docs/rotary-split.md).

The circuit of :mod:`attnscope.circuit.build` uses one typical query for every position, so each head's content
factor ``f(x)`` depends on the key token only.  In SmolLM2 and MiniLM the content score depends on the query
token too (measured: the typical-query separable TV is 0.16-0.34 per head where the exact-query split is
0.01-0.13).  This form keeps everything else of the circuit (the chosen heads, their kernels without the
sink, the separable rotary split, the sink term, the values) and conditions the content factor on the query:

    A_h(n, i) ~ K_h(n, i) f_h(q_n, x_i) / Z_h(q_n, n),    log f_h(q, x) = q . k_h(x) / scale
    Z_h(q, n) = sum_j K_h(n, j) f_h(q, x^cal_j)                     (calibrated on the calibration text)

``q_n`` is the head's exact layer-0 query at ``n`` (rotary: pre-rotation, pair-weighted), ``k_h(x)`` the
content key of token ``x``.  ``f`` is clipped at ``f_clip`` times its median over the calibration tokens, per
query, as the method clips it.  For a fixed query token the output is linear in the bag of tokens; the
denominator comes from the calibration text only, never from the input.

**Query-averaged extended embeddings** (what the neuron scores read, :attr:`Circuit.ext`).  When the query
token is independent of the tokens it reads (the i.i.d. token model of :mod:`attnscope.neurons.contrast`), the
expected attention is ``K_h(n, i) g_h(x_i)`` with ``g_h(x) = E_q[f_h(q, x) / Z_h(q)]``, estimated as the mean
over the calibration text's query positions ``n >= min_position``.  So ``Ext(x) = sum_h (1 - s_h) g_h(x)
e(x) W_V^h W_O^h`` is query-independent and ``sum_i K_n(i) Ext(x_i)`` is the expected bag.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from torch import Tensor

from attnscope.circuit.parts import content_inputs, extended_embeddings, true_head_output, value_bias
from attnscope.circuit.result import LAYER, QUERY_CONDITIONED_CHOICES, SUMMARY_FVU_MAX, Circuit, Condition, Criterion
from attnscope.core.errors import AttnscopeError
from attnscope.exact.decomposition import apply_pair_weights, centre, pair_weights_of_kernel, pre_rotation
from attnscope.exact.forward import iter_layers, project
from attnscope.models import ModelWeights


@dataclass
class QueryParts:
    """The text-independent pieces of the query-conditioned form of one circuit (tensors' shapes in comments)."""

    hs: Int[Tensor, " chosen"]
    scale: float
    K: Float[Tensor, "chosen ctx ctx"]  # each chosen head's kernel (float64)
    W_K: Float[Tensor, "chosen d_model d_head"]
    b_K: Float[Tensor, "chosen d_head"]  # rotary: b_K minus the static (mean) pre-rotation key; learned: 0
    pair_weights: Tensor | None  # [chosen, ctx, D/2] complex, per query row (rotary), else None
    k_cal: Float[Tensor, "chosen ctx d_head"]  # content keys of the calibration tokens
    start: int  # first calibration position of the f median (1 with a BOS)
    f_clip: float


def _log(K: Tensor) -> Tensor:
    return torch.log(K.clamp(min=1e-300))  # finite, so that a row without kernel mass gives 0, not nan


def _key_content(w: ModelWeights, circ: Circuit) -> Float[Tensor, "vocab d_model"]:
    return content_inputs(w, circ.T, circ.settings.reference_position, circ.settings.reference_norm)[2]


def content_keys(parts: QueryParts, key_content: Tensor, tokens: Int[Tensor, " pos"]
                 ) -> Float[Tensor, "chosen pos d_head"]:
    """Content keys ``[h, pos, d_head]`` of ``tokens``: rotary, the pre-rotation key minus the static key of the
    calibration text (at layer 0 a function of the token alone); learned, the key of the token's content placed
    at the reference position, without the bias (it cancels in the softmax)."""
    return _content_keys(parts.W_K, parts.b_K, key_content, tokens)


def _content_keys(W_K: Float[Tensor, "chosen d_model d_head"], b_K: Float[Tensor, "chosen d_head"],
                  key_content: Tensor, tokens: Int[Tensor, " pos"]) -> Float[Tensor, "chosen pos d_head"]:
    return project(key_content[tokens][None], W_K, b_K)[0].double()


@torch.no_grad()
def query_parts(w: ModelWeights, circ: Circuit) -> QueryParts:
    """:class:`QueryParts` of ``circ`` (weights and the calibration text)."""
    hs = torch.tensor(circ.heads, device=w.device)
    bos = circ.settings.bos is not None
    cal = circ.calibration_tokens.to(w.device)
    key_content = _key_content(w, circ)
    W_K = w.W_K[LAYER][hs]
    if w.positional == "rotary":
        k_pre = project(key_content[cal[1:] if bos else cal][None], W_K, w.b_K[LAYER][hs])[0]
        b_K = w.b_K[LAYER][hs] - k_pre.mean(1)  # the static key: the calibration text's mean pre-rotation key
        c = pair_weights_of_kernel(w, circ.head_kernels[:, -1], bos, per_row=True)
    else:
        b_K, c = torch.zeros_like(w.b_K[LAYER][hs]), None
    return QueryParts(hs, float(w.attn_scale[LAYER]), circ.head_kernels.double().to(w.device), W_K, b_K, c,
                      _content_keys(W_K, b_K, key_content, cal), 1 if bos else 0, float(circ.settings.f_clip))


def exact_queries(w: ModelWeights, parts: QueryParts, tokens: Int[Tensor, " pos"]
                  ) -> Float[Tensor, "chosen pos d_head"]:
    """Each chosen head's exact layer-0 query at every position of ``tokens`` (rotary: pre-rotation, weighted
    by the pair weights of the separable split), float64."""
    a = next(iter_layers(w, tokens[None], stop_layer=0))
    if w.positional != "rotary":
        return a.q[0, parts.hs].double()
    assert parts.pair_weights is not None, "query_parts sets the pair weights of rotary models"
    return apply_pair_weights(w, pre_rotation(w, a.q)[0, parts.hs], parts.pair_weights).double()


def query_normalisers(parts: QueryParts, q: Float[Tensor, "chosen pos d_head"], positions: Tensor
                      ) -> tuple[Float[Tensor, "chosen pos 1"], Float[Tensor, "chosen pos 1"]]:
    """``(log cap, log Z)`` per head and query: the clip ``log(f_clip) + median log f`` over the calibration
    tokens and ``log Z(q_n, n) = log sum_j K(n, j) f(q_n, x^cal_j)`` (``positions [pos]``: each query's ``n``)."""
    m = int(positions.max()) + 1
    lz = torch.einsum("hne,hie->hni", q, parts.k_cal[:, :m]) / parts.scale
    cap = lz[..., parts.start:].median(-1, keepdim=True).values + math.log(parts.f_clip)
    logZ = torch.logsumexp(_log(parts.K[:, positions, :m]) + torch.minimum(lz, cap), -1, keepdim=True)
    return cap, logZ


def _query_scores(w: ModelWeights, circ: Circuit, tokens: Int[Tensor, " pos"], parts: QueryParts | None
                  ) -> tuple[QueryParts, int, Float[Tensor, "chosen pos pos"], Tensor, Tensor]:
    """``(parts, n, lf, log cap, log Z_cal)`` on ``tokens``: ``lf[h, n, i] = q_n . k(x_i) / scale`` (unclipped),
    the clip and the calibrated denominator of every query (:func:`query_normalisers`)."""
    parts = parts or query_parts(w, circ)
    tokens = tokens.to(w.device)
    n = tokens.shape[-1]
    q = exact_queries(w, parts, tokens)
    cap, logZ = query_normalisers(parts, q, torch.arange(n, device=w.device))
    lf = torch.einsum("hne,hie->hni", q, content_keys(parts, _key_content(w, circ), tokens)) / parts.scale
    return parts, n, lf, cap, logZ


@torch.no_grad()
def query_conditioned_pattern(w: ModelWeights, circ: Circuit, tokens: Int[Tensor, " pos"],
                              parts: QueryParts | None = None) -> Float[Tensor, "chosen pos pos"]:
    """The attention ``A_h(n, i)`` on the non-sink positions that the query-conditioned form predicts (float64)."""
    parts, n, lf, cap, logZ = _query_scores(w, circ, tokens, parts)
    K = parts.K[:, :n, :n]
    return torch.exp(_log(K) + torch.minimum(lf, cap) - logZ) * (K > 0)


@torch.no_grad()
def query_conditioned_summary(w: ModelWeights, circ: Circuit, tokens: Int[Tensor, " pos"],
                              parts: QueryParts | None = None) -> Float[Tensor, "pos d_model"]:
    """Summed output ``[pos, d_model]`` of the circuit's heads on ``tokens [pos]`` (pos <= circ.T) with
    query-conditioned content factors and calibrated per-query denominators (module docstring)."""
    parts = parts or query_parts(w, circ)
    tokens = tokens.to(w.device)
    n, hs = tokens.shape[-1], parts.hs
    A = query_conditioned_pattern(w, circ, tokens, parts)
    e_val, p_val, _ = content_inputs(w, circ.T, circ.settings.reference_position, circ.settings.reference_norm)
    WOV = torch.einsum("hde,hef->hdf", w.W_V[LAYER][hs], w.W_O[LAYER][hs]).double()
    sink = torch.tensor([d.sink_mass for d in circ.decisions if d.chosen], dtype=torch.float64, device=w.device)
    vals = e_val[tokens].double() + p_val[:n].double()  # [n, d] value inputs at each key position
    out = torch.einsum("hni,id,hdf->nf", A * (1 - sink)[:, None, None], vals, WOV)
    out = out + torch.einsum("he,hed->d", value_bias(w)[hs], w.W_O[LAYER][hs]).double()
    bos = circ.settings.bos
    if bos is not None:
        out = out + torch.einsum("h,hf->f", sink, (e_val[bos].double() + p_val[0].double()) @ WOV)
    return out.to(w.dtype)


@torch.no_grad()
def query_denominator_stability(w: ModelWeights, circ: Circuit, texts: dict[str, Tensor]) -> dict[str, dict]:
    """Denominator transfer of the query-conditioned form: at each position ``n >= min_position`` of a text, the
    query's denominator over the text's own tokens, ``Z_text(q_n, n) = sum_j K(n, j) f(q_n, x_j)``, over the
    calibrated ``Z(q_n, n)`` the summary divides by; per head the median over positions of that ratio (and of
    ``Z_text``).  Exact model: the ratio is the predicted over the true attention at any key."""
    parts = query_parts(w, circ)
    n_min, out = circ.settings.min_position, {}
    for name, toks in texts.items():
        logZ, logZ_cal = query_log_denominators(w, circ, toks[: circ.T], parts)
        logZ, ratio = logZ[:, n_min:], torch.exp(logZ - logZ_cal)[:, n_min:]
        out[name] = {"Z_median": logZ.exp().median(-1).values.tolist(),
                     "ratio_to_calibration": ratio.median(-1).values.tolist(), "Z_trace": logZ.exp().tolist()}
    return out


@torch.no_grad()
def query_log_denominators(w: ModelWeights, circ: Circuit, tokens: Int[Tensor, " pos"], parts: QueryParts | None = None
                           ) -> tuple[Float[Tensor, "chosen pos"], Float[Tensor, "chosen pos"]]:
    """``(log Z_text(q_n, n), log Z_cal(q_n, n))`` at every position of ``tokens``: each query's denominator over
    the text's own tokens and the calibrated one the summary divides by (float64)."""
    parts, n, lf, cap, logZ_cal = _query_scores(w, circ, tokens, parts)
    return torch.logsumexp(_log(parts.K[:, :n, :n]) + torch.minimum(lf, cap), -1), logZ_cal[..., 0]


@torch.no_grad()
def query_averaged_factors(w: ModelWeights, circ: Circuit, parts: QueryParts | None = None,
                           chunk: int = 4096) -> Float[Tensor, "chosen vocab"]:
    """``g_h(x) = mean_n f_h(q_n, x) / Z_h(q_n, n)`` over the calibration text's query positions
    ``n >= min_position``, for every vocabulary item (clipped as in the summary)."""
    parts = parts or query_parts(w, circ)
    cal = circ.calibration_tokens.to(w.device)
    pos = torch.arange(circ.settings.min_position, len(cal), device=w.device)
    q = exact_queries(w, parts, cal)[:, pos]
    cap, logZ = query_normalisers(parts, q, pos)
    key_content = _key_content(w, circ)
    out = []
    for c0 in range(0, w.d_vocab, chunk):
        k = content_keys(parts, key_content, torch.arange(c0, min(c0 + chunk, w.d_vocab), device=w.device))
        lf = torch.minimum(torch.einsum("hne,hve->hnv", q, k) / parts.scale, cap)
        out.append(torch.exp(lf - logZ).mean(1))
    return torch.cat(out, -1)


def query_averaged_ext(w: ModelWeights, circ: Circuit, g: Float[Tensor, "chosen vocab"]
                       ) -> Float[Tensor, "vocab d_model"]:
    """Query-averaged extended embeddings ``[V, d_model]`` from ``g`` (module docstring; sink and outlier mask
    as :func:`attnscope.circuit.build.extended_embeddings`)."""
    H, hs = w.n_heads, torch.tensor(circ.heads, device=w.device)
    F = torch.zeros(H, w.d_vocab, dtype=w.dtype, device=w.device)
    F[hs] = g.to(w.dtype)
    Kh = torch.zeros(H, circ.T, circ.T, dtype=w.dtype, device=w.device)
    Kh[hs] = circ.head_kernels.to(w.device)
    sink = torch.tensor([d.sink_mass for d in circ.decisions], dtype=w.dtype, device=w.device)
    e_val, p_val, _ = content_inputs(w, circ.T, circ.settings.reference_position, circ.settings.reference_norm)
    ones = torch.ones(H, dtype=w.dtype, device=w.device)
    bos = circ.settings.bos
    return extended_embeddings(w, hs, F, ones, e_val, p_val, Kh, circ.token_mask.to(w.device),
                               sink if bos is not None else None, bos)[0]


def summary_fvu(w: ModelWeights, circ: Circuit, y: Float[Tensor, "pos d_model"],
                yhat: Float[Tensor, "pos d_model"]) -> float:
    """FVU of a per-position summary against the true summed output (centred, positions >= min_position), as
    :func:`attnscope.circuit.build.circuit_fidelity` measures it."""
    n_min = circ.settings.min_position
    y, yhat = centre(y, w)[n_min:].double(), centre(yhat, w)[n_min:].double()
    return float(((y - yhat) ** 2).sum() / ((y - y.mean(0)) ** 2).sum().clamp_min(1e-30))


def fidelity_condition(fvu: float, form: str) -> Condition:
    ok = fvu <= SUMMARY_FVU_MAX
    return Condition(Criterion.FIDELITY.value, f"FVU of the circuit's per-position summary ({form}) against the "
                     "chosen heads' true summed output on the calibration text, positions >= min_position (held-out "
                     "texts: the neuron stage's circuit fidelity)", fvu, SUMMARY_FVU_MAX, ok, "summary")


@torch.no_grad()
def choose_query_form(w: ModelWeights, circ: Circuit) -> Circuit:
    """Apply ``settings.query_conditioned`` to a freshly built circuit: measure both forms' FVU on the
    calibration text, pick one (``auto``: query-conditioned when the typical-query FVU exceeds
    :data:`SUMMARY_FVU_MAX` and the query-conditioned FVU is lower), and state the summary-fidelity condition
    of the form used.  A query-conditioned circuit's ``ext`` becomes the query-averaged one."""
    choice = circ.settings.query_conditioned
    if choice not in QUERY_CONDITIONED_CHOICES:
        raise AttnscopeError(f"--query-conditioned {choice!r} is not one of {', '.join(QUERY_CONDITIONED_CHOICES)}")
    cal = circ.calibration_tokens.to(w.device)
    y = true_head_output(w, circ.heads, cal)[0]
    parts = query_parts(w, circ)
    fvu = {"typical query": summary_fvu(w, circ, y, circ.summary(cal)),
           "query-conditioned": summary_fvu(w, circ, y, query_conditioned_summary(w, circ, cal, parts))}
    use = choice == "on" or (choice == "auto" and fvu["typical query"] > SUMMARY_FVU_MAX
                             and fvu["query-conditioned"] < fvu["typical query"])
    circ.query_conditioned, circ.calibration_fvu = use, fvu
    if use:
        circ.ext = query_averaged_ext(w, circ, query_averaged_factors(w, circ, parts))
    form = "query-conditioned" if use else "typical query"
    circ.conditions = [c for c in circ.conditions if c.name != Criterion.FIDELITY.value]
    circ.conditions.append(fidelity_condition(fvu[form], form))
    return circ


def circuit_output(w: ModelWeights, circ: Circuit, tokens: Int[Tensor, "*batch pos"]
                   ) -> Float[Tensor, "*batch pos d_model"]:
    """The circuit's per-position prediction ``[*batch, pos, d_model]`` of its heads' summed output on ``tokens``
    (one window ``[pos]`` or equal-length windows ``[batch, pos]``): the query-conditioned summary when
    ``circ.query_conditioned``, else :meth:`Circuit.summary`."""
    if circ.query_conditioned:
        if tokens.dim() > 1:
            parts = query_parts(w, circ)
            return torch.stack([query_conditioned_summary(w, circ, t, parts) for t in tokens])
        return query_conditioned_summary(w, circ, tokens)
    return circ.summary(tokens.to(circ.ext.device))


@torch.no_grad()
def token_queries(w: ModelWeights, parts: QueryParts, key_content: Float[Tensor, "vocab d_model"],
                  tokens: Int[Tensor, " n"]) -> Float[Tensor, "chosen n d_head"]:
    """Each chosen head's layer-0 query of a token on its own (float64): its content input (learned positions:
    placed at the reference position, as the content keys are) through ``W_Q``; rotary: the pre-rotation query,
    weighted by the pair weights of the last query row (a position deep in the window)."""
    q = project(key_content[tokens][None], w.W_Q[LAYER][parts.hs], w.b_Q[LAYER][parts.hs])[0].double()
    if parts.pair_weights is not None:
        q = apply_pair_weights(w, q, parts.pair_weights[:, -1])
    return q


@torch.no_grad()
def key_shares(w: ModelWeights, parts: QueryParts, key_content: Float[Tensor, "vocab d_model"],
               p: Float[Tensor, " vocab"], chunk: int = 1024) -> Float[Tensor, "chosen vocab"]:
    """Each key token's expected share of a chosen head's (non-sink) attention when the tokens, the query's
    included, are i.i.d. with frequencies ``p [vocab]`` (sums to 1) and every query's denominator is its own
    over ``p`` (issue 19, step 10: source-aware, per query token):

        a_h(x) = p(x) sum_y p(y) f_h(y, x) / sum_x' p(x') f_h(y, x'),    log f_h(y, x) = q_h(y) . k_h(x) / scale

    (:func:`token_queries`, :func:`content_keys`; ``f`` clipped per query at ``f_clip`` times its median over
    the calibration text's keys, as the summary clips it).  The kernel's mass cancels in the ratio, as in the
    source-aware denominators.  ``sum_x a_h(x) = 1``; zero off the support of ``p``.  Token counts and weights
    only, no forward pass."""
    sup = (p > 0).nonzero().squeeze(1).to(w.device)
    ps = p[sup.cpu()].double().to(w.device)
    q = token_queries(w, parts, key_content, sup)
    k = content_keys(parts, key_content, sup)
    cal_keys = parts.k_cal[:, parts.start:]
    out = torch.zeros(len(parts.hs), len(sup), dtype=torch.float64, device=w.device)
    for h in range(len(parts.hs)):
        for c0 in range(0, len(sup), chunk):
            qh = q[h, c0 : c0 + chunk]
            cap = (qh @ cal_keys[h].T / parts.scale).median(-1, keepdim=True).values + math.log(parts.f_clip)
            lf = torch.minimum(qh @ k[h].T / parts.scale, cap)
            fp = torch.exp(lf - lf.max(-1, keepdim=True).values) * ps
            out[h] += (ps[c0 : c0 + chunk, None] * fp / fp.sum(-1, keepdim=True)).sum(0)
    full = torch.zeros(len(parts.hs), len(p), dtype=torch.float64, device=w.device)
    full[:, sup] = out
    return full
