"""The fast paths of the speed work against the exact computations they replace, on tiny models, to 1e-5;
and where every stage's tensors live (the GPU path: no tensor may land on the default device).

No timing here: timings live in bench/ (``bench/run.py``)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import asdict, fields

import pytest
import torch

import attnscope.circuit.build as C
import attnscope.kernels.analysis as K
import attnscope.kernels.estimation as KE
from attnscope.exact.decomposition import (
    apply_pair_weights,
    approximate_pattern,
    approximate_tv,
    layer0_weight_kernels,
    learned_score_parts,
    positional_kernel_rows,
    reference_norm,
    tv_distance,
)
from attnscope.exact.forward import attn_norm_params, iter_layers, norm, project, static_positions

TOL = 1e-5
CAL = "tests/data/moby.txt"
KS = dict(samples="tests/data", n_samples=8, n_heldout=4, batch_size=4, n_ctx=64)


@pytest.fixture(scope="module")
def tokens(tiny_gpt2):
    w, _ = tiny_gpt2
    return torch.randint(0, w.d_vocab, (3, 64), generator=torch.Generator().manual_seed(0))


# --------------------------------------------------------------------------------------------------
# The exact paths, as they were before the speed work (references)
# --------------------------------------------------------------------------------------------------


def exact_layer0_weight_kernels(w, query, n_ctx, ref_norm):
    """Every query row through the full content/position split, then the positional part's softmax."""
    pi = static_positions(w, n_ctx)
    raw = (query[None, :] + pi)[None]
    gamma, beta = attn_norm_params(w, 0)
    q = project(norm(w, raw, gamma, beta), w.W_Q[0], w.b_Q[0])
    _, positional, _ = learned_score_parts(w, 0, raw, pi, q, ref_norm)
    return positional_kernel_rows(w, 0, positional)[0]


def exact_content_factors(w, cal, q, key_content, f_clip, pair_weights=None):
    keys = torch.einsum("vd,hde->hve", key_content, w.W_K[0])  # every token's key, then the query
    qs = q[:, cal.n_star]
    if pair_weights is not None:
        qs = apply_pair_weights(w, qs[:, None], pair_weights)[:, 0]
    logf = torch.einsum("he,hve->hv", qs, keys) / w.attn_scale[0]
    logf = logf - logf[:, cal.body].median(-1, keepdim=True).values
    f = logf.exp().clamp(max=f_clip)
    if cal.bos is not None:
        f[:, cal.bos] = logf[:, cal.bos].exp()
    return logf, f


def exact_extended_embeddings(w, hs, f, Z, e_val, p_val, Kh, mask, sink=None, bos=None):
    WOV = torch.einsum("hde,hef->hdf", w.W_V[0][hs], w.W_O[0][hs])  # [n, d, d]
    keep = torch.ones(len(hs), dtype=w.dtype) if sink is None else (1 - sink[hs]).to(w.dtype)
    ext = torch.zeros(w.d_vocab, w.d_model, dtype=w.dtype, device=w.device)
    for j in range(len(hs)):
        ext += (f[hs][j] / Z[hs][j] * keep[j])[:, None] * (e_val @ WOV[j])
    const = torch.einsum("he,hed->d", C.value_bias(w)[hs], w.W_O[0][hs])
    posit = torch.einsum("hni,id,hdf->nf", Kh[hs] * keep[:, None, None], p_val, WOV) + const
    if sink is not None and bos is not None:
        posit = posit + torch.einsum("h,hf->f", sink[hs].to(w.dtype), (e_val[bos] + p_val[0]) @ WOV)
    return ext * mask[:, None].to(ext.dtype), posit


def exact_stream(w, windows, batch_size, li, bar, patterns=True):
    """The pre-speed streaming pass: explicit patterns for the estimation too."""
    for b0 in range(0, windows.shape[0], batch_size):
        for a in iter_layers(w, windows[b0 : b0 + batch_size], stop_layer=max(li)):
            if a.layer in li:
                yield li[a.layer], a
        bar.update(min(batch_size, windows.shape[0] - b0))


def exact_tv(w, layer, acts, static, ref_norm, pair_weights=None):
    return tv_distance(approximate_pattern(w, layer, acts, static, ref_norm, pair_weights), acts.pattern)


# --------------------------------------------------------------------------------------------------
# Piece by piece
# --------------------------------------------------------------------------------------------------


def test_iter_layers_without_patterns_matches_exact(tiny_gpt2, tokens):
    w, _ = tiny_gpt2
    for a, b in zip(iter_layers(w, tokens), iter_layers(w, tokens, patterns=False), strict=True):
        assert b.pattern is None and b.scores is None
        for name in ("q", "k", "z", "norm_in", "attn_out", "resid_post"):
            torch.testing.assert_close(getattr(b, name), getattr(a, name), atol=TOL, rtol=TOL)


def test_layer0_weight_kernels_rows_match_full_kernel(tiny_gpt2):
    w, _ = tiny_gpt2
    T, ref = 64, reference_norm(w)
    query = w.W_E[5]
    full = exact_layer0_weight_kernels(w, query, T, ref)
    torch.testing.assert_close(layer0_weight_kernels(w, query, T, ref), full, atol=TOL, rtol=0)
    rows = torch.tensor([1, 7, 31, 63])
    torch.testing.assert_close(layer0_weight_kernels(w, query, T, ref, rows=rows), full[:, rows], atol=TOL, rtol=0)
    assert float(full[:, rows].std()) > 1e-3  # not a degenerate (uniform) kernel that any code would match


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("chunk", [7, 16, 64, 256])
def test_approximate_tv_in_row_chunks_matches_full_pattern(tiny_gpt2, tokens, chunk, causal):
    w, _ = tiny_gpt2
    w = dataclasses.replace(w, causal=causal)  # non-causal: every key visible (BERT-style), same weights
    for a in iter_layers(w, tokens):
        static = static_positions(w, tokens.shape[1]) if a.layer == 0 else a.norm_in.mean(0) - a.norm_in.mean((0, 1))
        ref = exact_tv(w, a.layer, a, static, 1.3)
        assert float(ref.max()) > 0.01  # the approximation is not exact here: the comparison has teeth
        torch.testing.assert_close(approximate_tv(w, a.layer, a, static, 1.3, chunk=chunk), ref, atol=TOL, rtol=0)


# --------------------------------------------------------------------------------------------------
# Whole stages: the fast path against the exact path, same inputs
# --------------------------------------------------------------------------------------------------


def _assert_close_tree(a, b, where=""):
    if isinstance(a, dict):
        assert set(a) == set(b), where
        for k in a:
            _assert_close_tree(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_close_tree(x, y, f"{where}[{i}]")
    elif isinstance(a, float) and isinstance(b, float):
        if where.endswith("decay_length"):  # tau = -1/slope is ill-conditioned for near-flat kernels: compare slopes
            a, b = 1.0 / a, 1.0 / b
        assert math.isclose(a, b, abs_tol=TOL, rel_tol=TOL) or (math.isnan(a) and math.isnan(b)), (where, a, b)
    else:
        assert a == b, (where, a, b)


def test_kernel_analysis_fast_path_matches_exact_path(tiny_gpt2, monkeypatch):
    w, _ = tiny_gpt2
    s = K.KernelSettings(**KS)
    fast = K.analyse_kernels(w, s, cache=False, progress=False)
    monkeypatch.setattr(KE, "_stream_layers", exact_stream)
    monkeypatch.setattr(KE, "approximate_tv", exact_tv)
    monkeypatch.setattr(KE, "layer0_weight_kernels",
                        lambda w, q, T, r, rows: exact_layer0_weight_kernels(w, q, T, r)[:, rows])
    exact = K.analyse_kernels(w, s, cache=False, progress=False)
    _assert_close_tree([asdict(r) for r in fast.records], [asdict(r) for r in exact.records])
    assert set(fast.arrays) == set(exact.arrays)
    for k, v in exact.arrays.items():
        torch.testing.assert_close(fast.arrays[k], v, atol=TOL, rtol=0, msg=k)


def test_circuit_fast_path_matches_exact_path(context_neuron_gpt2, monkeypatch):
    (w, _), _ = context_neuron_gpt2
    s = C.CircuitSettings(calibration=CAL, n_ctx=128, heads=[0, 1])
    fast = C.build_circuit(w, s)
    monkeypatch.setattr(C, "content_factors", exact_content_factors)
    monkeypatch.setattr(C, "extended_embeddings", exact_extended_embeddings)
    monkeypatch.setattr(C, "layer0_weight_kernels", exact_layer0_weight_kernels)
    exact = C.build_circuit(w, s)
    for f in fields(exact):
        a, b = getattr(fast, f.name), getattr(exact, f.name)
        if isinstance(b, torch.Tensor):
            scale = max(1.0, float(b.abs().max())) if b.is_floating_point() else 1
            torch.testing.assert_close(a, b, atol=TOL * scale, rtol=TOL, msg=f.name)
        elif f.name in ("decisions", "conditions"):
            _assert_close_tree([asdict(x) for x in a], [asdict(x) for x in b], f.name)
        else:
            _assert_close_tree(a, b, f.name)


def exact_swings(w, circ, top_m, chunk):
    """The swings as computed before fix 7: ``[V', chunk]`` products, top-m down the strided dimension."""
    from attnscope.neurons.find import swing_inputs

    W, ext, mean_cal = swing_inputs(w, circ)  # the same inputs; the products and the top-m as before fix 7
    ext_m = ext[circ.token_mask]
    m = min(top_m, int(circ.token_mask.sum()))
    pos, neg = [], []
    for c0 in range(0, W.shape[1], chunk):
        S = ext_m @ W[:, c0 : c0 + chunk]
        pos.append(S.topk(m, dim=0).values.mean(0) - mean_cal[c0 : c0 + chunk])
        neg.append(-(S.topk(m, dim=0, largest=False).values.mean(0)) + mean_cal[c0 : c0 + chunk])
    return torch.cat(pos).cpu().double(), torch.cat(neg).cpu().double()


@pytest.mark.parametrize("top_m,chunk", [(100, 1024), (7, 48)])  # one chunk; several, the last one partial
def test_transposed_swings_match_the_previous_formula(context_neuron_gpt2, top_m, chunk):
    from attnscope.neurons.find import swings

    (w, _), _ = context_neuron_gpt2
    circ = C.build_circuit(w, C.CircuitSettings(calibration=CAL, n_ctx=128))
    assert w.d_mlp % chunk != 0 or chunk >= w.d_mlp
    for fast, exact in zip(swings(w, circ, top_m, chunk), exact_swings(w, circ, top_m, chunk)):
        assert fast.shape == (w.d_mlp,)
        scale = max(1.0, float(exact.abs().max()))
        torch.testing.assert_close(fast, exact, atol=TOL * scale, rtol=TOL)


# --------------------------------------------------------------------------------------------------
# Where the tensors live.  No GPU here, so the test makes the CPU the "accelerator": inputs and weights are
# on the CPU, and the default device for new tensors is "meta".  A tensor created without device=w.device
# (which on a GPU would silently land on the CPU) then lands on "meta" and fails the check.
# --------------------------------------------------------------------------------------------------


def _tensors(obj, where=""):
    if isinstance(obj, torch.Tensor):
        yield where, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _tensors(v, f"{where}[{k!r}]")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _tensors(v, f"{where}[{i}]")
    elif hasattr(obj, "__dataclass_fields__"):
        for f in fields(obj):
            yield from _tensors(getattr(obj, f.name), f"{where}.{f.name}")


def test_every_stage_keeps_its_tensors_on_the_weights_device(tiny_gpt2, context_neuron_gpt2, monkeypatch):
    w, _ = tiny_gpt2
    s = K.KernelSettings(**KS).resolved(w)
    windows, _ = K.load_windows(K._samples_spec(s.samples), w.tokenizer, s.n_ctx, s.n_samples + s.n_heldout,
                                seed=0, bos_token_id=w.analysis_bos)
    windows = windows.to(w.device)
    (wc, _), _ = context_neuron_gpt2
    cal = C.load_calibration(wc, C.CircuitSettings(calibration=CAL, n_ctx=128, heads=[0, 1]))
    monkeypatch.setattr(C, "load_calibration", lambda w, s: cal)  # reading the text happens on the host
    with torch.device("meta"):
        est = K.estimate_kernels(w, s, windows[: s.n_samples])
        val = K.validate_kernels(w, s, est, windows[s.n_samples :])
        arrays, cons = K.kernel_arrays(w, s, est, val, windows[: s.n_samples])
        circ = C.build_circuit(wc, C.CircuitSettings(calibration=CAL, n_ctx=128, heads=[0, 1]))
    found = list(_tensors(est, "KernelEstimate")) + list(_tensors(val, "KernelValidation"))
    found += list(_tensors(arrays, "arrays")) + list(_tensors(cons, "weights_consistency"))
    found += list(_tensors(circ, "Circuit"))
    assert len(found) > 15
    wrong = [(name, str(t.device)) for name, t in found if t.device != w.device]
    assert not wrong, f"tensors off the weights' device {w.device}: {wrong}"
    assert cal.tokens.device == w.device
