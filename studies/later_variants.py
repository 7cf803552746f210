"""Later-layer predictor variants side by side (issue 11, accuracy experiments), scored on BOTH halves.

    python studies/later_variants.py demo --layers 1,2,3
    python studies/later_variants.py smollm2 --layers 1,2,3,4,5 --max-windows 4 --ceilings-only

Choices are made on the tuning half (``tune``: the sample's own windows, so in-sample for the token-mean
parts) and reported on the reporting half (``report``).  Median over the one-vs-rest contrasts of the
Spearman between each predictor and the true effect sizes of the MLP of L.  Not a test.
"""

from __future__ import annotations

import argparse
import time

import torch


def spearman_median(P: torch.Tensor, D: torch.Tensor) -> float:
    from attnscope.core.stats import median
    from attnscope.neurons.groundtruth import spearman

    return median(spearman(P[c], D[c]) for c in range(P.shape[0]))


def _effects(S: torch.Tensor, lc, td, V: int) -> torch.Tensor:
    """One-vs-rest predicted effects ``[C, d_mlp]`` of token scores ``S [V, d_mlp]`` (tuning counts)."""
    from attnscope.neurons.contrast import token_frequencies

    counts = torch.stack([token_frequencies(x.tune, V) * x.tune.numel() for x in lc.windows])
    out = []
    for c in range(len(lc.windows)):
        rest = torch.arange(len(lc.windows)) != c
        q = counts[c] / counts[c].sum() - counts[rest].sum(0) / counts[rest].sum()
        out.append(q @ S.double() / td.sigma)
    return torch.stack(out)


@torch.no_grad()
def _position_ctx(w, lc) -> dict[str, torch.Tensor]:
    """Each context term's per-position prediction on the sample windows, ``[N, T, d_mlp]``."""
    from attnscope.later.evaluate import position_prediction

    allk = torch.arange(w.d_mlp, device=w.device)
    per = [position_prediction(w, lc, t, allk) for t in torch.cat([x.tune for x in lc.windows])]
    return {k: torch.stack([p[k] for p in per]) for k in per[0] if k != "direct"}


def _token_means(X: torch.Tensor, toks: torch.Tensor, n_min: int, V: int) -> torch.Tensor:
    from attnscope.later.evaluate import token_mean

    return token_mean([X], [toks], n_min, V)


def _neff(K: torch.Tensor, n: int) -> float:
    return float(1.0 / (K[n, : n + 1] ** 2).sum())


@torch.no_grad()
def head_terms(w, lc):
    """Per head of every layer <= L, at the MLP input of L: token vectors [V, d] and a function of the tokens
    giving its per-position output [pos, d]; with each head's kernel width N_eff at the reference position."""
    from attnscope.exact.decomposition import centre
    from attnscope.neurons.explain import other_heads_output  # noqa: F401  (same computation, per head below)

    I = torch.eye(w.d_model)
    out = {}
    for l, circ in lc.circuits.items():
        M = lc.gain.get(l, 1.0) * lc.G[l] if l < lc.layer else I
        n_star = circ.settings.reference_position
        if circ.heads:
            out[(l, "bag")] = (centre(circ.ext.float().cpu(), w) @ M,
                               lambda t, c=circ, M=M: c.summary(t).float().cpu() @ M,
                               _neff(circ.kernel.float().cpu(), n_star), None)
        ex = lc.explainers[l]
        for j, h in enumerate(ex.other_heads):
            def f(t, ex=ex, j=j, M=M):
                n = t.shape[-1]
                A = ex.kernels[j, :n, :n] * ex.f[j, t][None, :]
                A = A / A.sum(-1, keepdim=True).clamp_min(1e-30)
                return (A @ ((ex.e_val[t] + ex.p_val[:n]) @ ex.W_OV[j])).float().cpu() @ M
            out[(l, f"H{h}")] = (centre((ex.e_val @ ex.W_OV[j]).float().cpu(), w) @ M, f,
                                 _neff(ex.kernels[j].float().cpu(), n_star), ex.f[j].double().cpu())
    return out


def variant_predictors(w, lc, td) -> dict[str, torch.Tensor]:
    V = w.d_vocab
    tm = lc.token_model
    S = {k: (v @ tm.W_in / tm.scale).double().cpu() for k, v in tm.parts.items()}
    ctx = _position_ctx(w, lc)
    toks = torch.cat([x.tune for x in lc.windows])
    Cm = {k: _token_means(v, toks, lc.n_min, V) for k, v in ctx.items()}
    terms = [k for k in S if k != "direct"]
    out = {}
    allc = sum(S[k] - Cm[k] for k in terms)
    out["hybrid (token mean + ctx correction)"] = _effects(td.M + allc, lc, td, V)
    out["correction alone"] = _effects(allc, lc, td, V)
    for k in terms:
        out[f"hybrid, {k} only"] = _effects(td.M + S[k] - Cm[k], lc, td, V)
    # per head: token scores S_h and per-token means of its per-position prediction C_h
    from attnscope.exact.decomposition import centre

    W = tm.W_in.float().cpu()
    hs = head_terms(w, lc)
    per = {}
    for key, (tv, fn, ne, fh) in hs.items():
        Sh = (tv @ W / tm.scale).double()
        X = torch.stack([centre(fn(t), w) @ W / tm.scale for t in toks])
        per[key] = (Sh, _token_means(X, toks, lc.n_min, V), ne, fh)
    print("   heads (layer, head): N_eff " + ", ".join(f"{k[0]}{k[1]} {v[2]:.0f}" for k, v in per.items()))
    for thr in (16.0, 4.0, 64.0):
        broad = [k for k, v in per.items() if v[2] >= thr]
        out[f"hybrid, N_eff >= {thr:g} heads"] = _effects(td.M + sum((per[k][0] - per[k][1] for k in broad),
                                                                   torch.zeros_like(td.M)), lc, td, V)
        early = [k for k in broad if k[0] < lc.layer]
        out[f"hybrid, N_eff >= {thr:g}, l < L"] = _effects(td.M + sum((per[k][0] - per[k][1] for k in early),
                                                                    torch.zeros_like(td.M)), lc, td, V)
    # content-weighted ("extended") expectation of each head: E_c[o_h] = p_c.(f V) / p_c.f per context
    for thr, own in ((16.0, True), (64.0, True), (16.0, False), (0.0, True), (0.0, False)):
        keys = [k for k, v in per.items() if v[2] >= thr and (own or k[0] < lc.layer)]
        lin = sum((-per[k][1] for k in keys), td.M.clone())
        P = _effects(lin, lc, td, V)
        for k in keys:
            Sh, _, _, fh = per[k]
            P = P + (_effects(Sh, lc, td, V) if fh is None else _effects_ratio(Sh, fh, lc, td, V))
        out[f"hybrid f-weighted, N_eff >= {thr:g}{'' if own else ', l < L'}"] = P
    return out


def _effects_ratio(S: torch.Tensor, f: torch.Tensor, lc, td, V: int) -> torch.Tensor:
    """One-vs-rest effects of a head whose attention weights tokens by ``f``: mean output p.(f S) / p.f."""
    from attnscope.neurons.contrast import token_frequencies

    counts = torch.stack([token_frequencies(x.tune, V) * x.tune.numel() for x in lc.windows])
    fS = f[:, None] * S
    out = []
    for c in range(len(lc.windows)):
        rest = counts[torch.arange(len(lc.windows)) != c].sum(0)
        out.append(((counts[c] @ fS) / (counts[c] @ f) - (rest @ fS) / (rest @ f)) / td.sigma)
    return torch.stack(out)


@torch.no_grad()
def ceilings(w, lc, td) -> dict[str, torch.Tensor]:
    """Not predictors: what any predictor of this form can reach.  The true one-vs-rest mean differences
    divided by the calibration std (the predictors' normalisation) of each half, and the true d of the
    tuning half (the noise of a finite sample of windows)."""
    from attnscope.later.truth import layer_pre

    out = {}
    for half in ("tune", "report"):
        mus, ns = [], []
        for x in lc.windows:
            p = layer_pre(w, getattr(x, half), lc.layer)[:, lc.n_min:].reshape(-1, w.d_mlp).double()
            mus.append(p.mean(0))
            ns.append(p.shape[0])
        mus, ns = torch.stack(mus), torch.tensor(ns, dtype=torch.float64)
        rows = []
        for c in range(len(ns)):
            rest = torch.arange(len(ns)) != c
            rows.append((mus[c] - (ns[rest, None] * mus[rest]).sum(0) / ns[rest].sum()) / td.sigma)
        out[f"[ceiling] true mean diff / sigma, {half} half"] = torch.stack(rows)
    out["[ceiling] true d of the tuning half"] = td.d_tune
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--layers", default="1,2,3")
    ap.add_argument("--max-windows", type=int, default=8)
    ap.add_argument("--ceilings-only", action="store_true", help="only the shipped predictors and the ceilings "
                    "(the per-head variants hold [vocab, d_mlp] tables per head: too large for a 49k vocabulary)")
    a = ap.parse_args()
    from attnscope.later.evaluate import predictors
    from attnscope.later.method import LaterSettings, build_later, prepare
    from attnscope.later.truth import truth_data
    from attnscope.models import load_model

    w = load_model(a.model)
    layers = [int(x) for x in a.layers.split(",")]
    s = LaterSettings(max_windows=a.max_windows)
    sh = prepare(w, max(layers), s=s)
    for L in layers:
        t0 = time.perf_counter()
        lc = build_later(w, L, s=s, shared=sh)
        td = truth_data(w, lc, sh.cs.calibration)
        preds, _ = predictors(w, lc, td)
        if not a.ceilings_only:
            preds.update(variant_predictors(w, lc, td))
        preds.update(ceilings(w, lc, td))
        print(f"layer {L} ({time.perf_counter() - t0:.0f} s)")
        for k, P in preds.items():
            print(f"  {k:28s} tune {spearman_median(P, td.d_tune):.3f}  report {spearman_median(P, td.d_report):.3f}",
                  flush=True)


if __name__ == "__main__":
    main()
