"""Research measurement: how well do separable rotary splits reproduce attention (issue 10, docs/rotary-split.md).

For layers 0-2 of a rotary model, estimate on one text source, evaluate on others:

* ``zero-offset``  today's split (content at zero offset, c_j = 1), exact query per position;
* ``ls-pairs``     content with per-pair weights c_j = sum_d w(d) e^{i d theta_j} (w = mean attention by offset
                   on the estimation texts, sink excluded), exact query;
* ``fit-pairs``    c_j fitted (amplitude and phase per pair and head) by minimising KL(true || split) on the
                   estimation texts, exact query;
* ``*-rows``       per-row pair weights: the same closed form with the profile restricted to the offsets that
                   exist at query position ``n`` (``d <= n``, the BOS offset excluded), one ``c(n)`` per row;
* ``typical-*``    the same with one typical query (mean pre-rotation query of the estimation texts) at every
                   position: the fully separable form f(x_i) K(n - i) the circuit needs.

TV is measured per query position on the held-out windows (positions >= --n-min), full row and with the
first position (BOS) excluded and both rows renormalised ("sink-excluded").  Prints a table per layer and
writes JSON.

    PYTHONPATH=src python studies/rotary_split_study.py smollm2 --layers 0 1 2 \
        --estimate bundled:en_moby_dick --evaluate bundled:en_speeches_1900_2016 bundled:code_python \
        --out out/rotary_split.json
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from attnscope.core.texts import load_windows
from attnscope.exact.decomposition import (
    pair_weights_from_profile,
    pre_rotation,
    rotary_frequencies,
    separable_rotary_score_parts,
    tv_distance,
)
from attnscope.exact.forward import apply_rotary, iter_layers, rotary_cos_sin
from attnscope.kernels.analysis import offset_profile
from attnscope.models import load_model


def masked_log_softmax(s: torch.Tensor, scale: float) -> torch.Tensor:
    T = s.shape[-1]
    m = torch.ones(T, T, dtype=torch.bool).tril()
    return (s / scale).masked_fill(~m, float("-inf")).log_softmax(-1)


def collect(w, windows, layers, batch=8):
    """Per layer: pre-rotation q, k ``[b, h, T, e]`` and true patterns ``[b, h, T, T]``."""
    out = {l: {"q": [], "k": [], "p": []} for l in layers}
    for b0 in range(0, len(windows), batch):
        for a in iter_layers(w, windows[b0 : b0 + batch], stop_layer=max(layers)):
            if a.layer in out:
                out[a.layer]["q"].append(pre_rotation(w, a.q))
                out[a.layer]["k"].append(pre_rotation(w, a.k))
                out[a.layer]["p"].append(a.pattern)
    return {l: {k: torch.cat(v) for k, v in d.items()} for l, d in out.items()}


def tv_rows(approx_log: torch.Tensor, true: torch.Tensor, n_min: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-head median TV over (window, position >= n_min): full row and sink-excluded (position 0 dropped)."""
    a = approx_log.exp()[:, :, n_min:]
    t = true[:, :, n_min:]
    full = tv_distance(a, t)
    a1, t1 = a[..., 1:], t[..., 1:]
    rest = tv_distance(a1 / a1.sum(-1, keepdim=True), t1 / t1.sum(-1, keepdim=True))
    H = a.shape[1]
    return full.transpose(0, 1).reshape(H, -1).median(-1).values, rest.transpose(0, 1).reshape(H, -1).median(-1).values


def row_pair_weights(w, profile: torch.Tensor, start: int) -> torch.Tensor:
    """Per-row closed-form pair weights ``c [h, T, D/2]``: at query position ``n`` the profile over the offsets
    ``d = 0..n - start`` that exist there (the BOS offset left out), ``sum_d w(d) e^{i d theta} / sum_d w(d)``."""
    theta = rotary_frequencies(w)
    H, T = profile.shape
    d = torch.arange(T, dtype=torch.float64)
    phase = torch.polar(torch.ones(T, len(theta), dtype=torch.float64), d[:, None] * theta)  # [d, D/2]
    p = profile.double()
    num = torch.cumsum(p[..., None].to(torch.complex128) * phase, 1)  # [h, d, D/2]
    den = torch.cumsum(p, 1)[..., None]
    rows = (torch.arange(T) - start).clamp(min=0)
    return num[:, rows] / den[:, rows].clamp(min=1e-300)


def row_content(w, q, k, k_static, c_rows):
    """Content scores ``[b, h, n, i]`` with per-row pair weights ``c_rows [h, n, D/2]``."""
    rd = w.rotary_dim or w.d_head
    half = rd // 2
    re, im = c_rows.real.to(q.dtype), c_rows.imag.to(q.dtype)
    x1, x2 = q[..., :half], q[..., half:rd]
    qw = torch.cat([x1 * re - x2 * im, x1 * im + x2 * re, q[..., rd:]], -1)
    return torch.einsum("bhne,bhie->bhni", qw, k - k_static[None, :, : k.shape[-2]])


def fit_pairs(w, q, k, k_static, p, c0, scale, steps, n_min, lr=0.05):
    """Fit complex pair weights ``c [h, D/2]`` by minimising KL(true || separable) (Adam, full batch)."""
    par = torch.stack([c0.real, c0.imag], -1).float().clone().requires_grad_(True)
    opt = torch.optim.Adam([par], lr=lr)
    for _ in range(steps):
        c = torch.complex(par[..., 0], par[..., 1])
        cont, pos = separable_rotary_score_parts(w, q, k, k_static, c)
        logp = masked_log_softmax(cont + pos, scale)[:, :, n_min:]
        tgt = p[:, :, n_min:]
        loss = -(tgt * logp.clamp(min=-1e4)).sum(-1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return torch.complex(par[..., 0], par[..., 1]).detach()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--layers", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--estimate", default="bundled:en_moby_dick")
    ap.add_argument("--evaluate", nargs="+", default=["bundled:en_speeches_1900_2016", "bundled:code_python"])
    ap.add_argument("--n-ctx", type=int, default=256)
    ap.add_argument("--n-estimate", type=int, default=24)
    ap.add_argument("--n-evaluate", type=int, default=8)
    ap.add_argument("--n-min", type=int, default=16)
    ap.add_argument("--fit-steps", type=int, default=150)
    ap.add_argument("--out", default=None)
    ap.add_argument("--static", choices=["per-position", "pooled"], default="per-position")
    a = ap.parse_args()
    torch.manual_seed(0)
    t0 = time.time()
    w = load_model(a.model)
    bos = w.bos_token_id if w.prepend_bos else None
    est, _ = load_windows(a.estimate, w.tokenizer, a.n_ctx, a.n_estimate, seed=0, bos_token_id=bos)
    ev = torch.cat([load_windows(s, w.tokenizer, a.n_ctx, a.n_evaluate, seed=1, bos_token_id=bos)[0]
                    for s in a.evaluate])
    with torch.no_grad():
        E, V = collect(w, est, a.layers), collect(w, ev, a.layers)
    start = 1 if bos is not None else 0
    results = {"model": a.model, "estimate": a.estimate, "evaluate": a.evaluate, "n_ctx": a.n_ctx, "n_min": a.n_min,
               "bos": bos, "layers": {}}
    for l in a.layers:
        scale = float(w.attn_scale[l])
        e, v = E[l], V[l]
        k_static = e["k"].mean(0)  # [h, T, e]
        if a.static == "pooled":  # exchangeable positions (layer 0): one mean key for every position after BOS
            k_static[:, start:] = e["k"][:, :, start:].mean((0, 2))[:, None]
        q_typ = e["q"][:, :, start:].mean((0, 2))  # [h, e]
        # offset weights: mean true attention by offset over query positions >= n_min, first position excluded
        H, T = e["p"].shape[1], e["p"].shape[-1]
        prof = torch.zeros(H, T, dtype=torch.float64)
        for n in range(a.n_min, T):
            row = e["p"][:, :, n].mean(0).double().clone()  # [h, T]
            if start:
                row[:, 0] = 0
            prof += torch.stack([torch.nn.functional.pad(offset_profile(row[h], n, True), (0, T - n - 1))
                                 for h in range(H)])
        c_ls = pair_weights_from_profile(w, prof)  # [h, D/2]
        # weights-only alternative: the offset profile of the typical-query kernel itself (no attention data)
        cos, sin = rotary_cos_sin(w, torch.arange(T))
        ks = (apply_rotary(q_typ[:, None], cos[-1:], sin[-1:]) * apply_rotary(k_static, cos, sin)).sum(-1) / scale
        if start:
            ks[:, 0] = float("-inf")
        c_kern = pair_weights_from_profile(w, ks.softmax(-1).flip(-1).double())
        c_ls_rows = row_pair_weights(w, prof, start)
        c_kern_rows = row_pair_weights(w, ks.softmax(-1).flip(-1).double(), start)
        ones = torch.ones_like(c_ls)
        q_typ_e = q_typ[None, :, None].expand_as(e["q"])
        with torch.enable_grad():
            c_fit = fit_pairs(w, e["q"], e["k"], k_static, e["p"], c_ls, scale, a.fit_steps, a.n_min)
            c_fit_typ = fit_pairs(w, q_typ_e, e["k"], k_static, e["p"], c_ls, scale, a.fit_steps, a.n_min)
        rows = {}
        q_typ_v = q_typ[None, :, None].expand_as(v["q"])
        with torch.no_grad():
            for name, q, c in [("zero-offset", v["q"], ones), ("ls-pairs", v["q"], c_ls), ("fit-pairs", v["q"], c_fit),
                               ("kernel-pairs", v["q"], c_kern), ("typical-kernel-pairs", q_typ_v, c_kern),
                               ("typical-zero-offset", q_typ_v, ones), ("typical-ls-pairs", q_typ_v, c_ls),
                               ("typical-fit-pairs", q_typ_v, c_fit_typ)]:
                cont, pos = separable_rotary_score_parts(w, q, v["k"], k_static, c)
                full, rest = tv_rows(masked_log_softmax(cont + pos, scale), v["p"], a.n_min)
                rows[name] = {"full": [round(float(x), 4) for x in full],
                              "sink_excluded": [round(float(x), 4) for x in rest]}
            for name, q, c in [("ls-pairs-rows", v["q"], c_ls_rows), ("kernel-pairs-rows", v["q"], c_kern_rows),
                               ("typical-kernel-pairs-rows", q_typ_v, c_kern_rows)]:
                pos = separable_rotary_score_parts(w, q, v["k"], k_static, ones)[1]
                scores = row_content(w, q, v["k"], k_static, c) + pos
                full, rest = tv_rows(masked_log_softmax(scores, scale), v["p"], a.n_min)
                rows[name] = {"full": [round(float(x), 4) for x in full],
                              "sink_excluded": [round(float(x), 4) for x in rest]}
            sink = v["p"][:, :, a.n_min:, 0].mean((0, 2))
        results["layers"][l] = {"variants": rows, "sink_mass": [round(float(x), 4) for x in sink],
                                "c_ls_abs": c_ls.abs().float().tolist(), "c_fit_abs": c_fit.abs().tolist()}
        print(f"\nlayer {l}  (median over heads of per-head median TV; sink mass per head "
              f"{' '.join(f'{x:.2f}' for x in sink)})")
        print(f"{'variant':22s} {'full':>7s} {'sink-excl':>9s}   per head (full)")
        for name, r in rows.items():
            f = torch.tensor(r["full"])
            s = torch.tensor(r["sink_excluded"])
            print(f"{name:22s} {f.median():7.3f} {s.median():9.3f}   {' '.join(f'{x:.2f}' for x in f)}")
    print(f"\n{time.time() - t0:.0f} s")
    if a.out:
        import pathlib

        pathlib.Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        pathlib.Path(a.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
