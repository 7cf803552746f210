#!/usr/bin/env python
"""Prototypes of faster versions of attnscope's slowest pieces, timed against the current code on the
same inputs and checked for equal results.  Nothing here is used by attnscope: these are the measured
effects quoted in docs/benchmark.md ("Recommended fixes").

    .venv/bin/python studies/proto.py [--model small|medium|quick] [--n-ctx 1024] [--only NAME,...]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import common as B  # noqa: E402

FOREIGN = []  # share of the CPUs other processes used during each timing (noted in the report line)


def best(fn, k=3):
    B.wait_quiet(max_s=120, window=5)
    b0, o0 = B.cpu_jiffies()
    w0 = time.perf_counter()
    ts, out = [], None
    for _ in range(k):
        out = None
        t0 = time.perf_counter()
        out = fn()
        ts.append(time.perf_counter() - t0)
    b1, o1 = B.cpu_jiffies()
    span = time.perf_counter() - w0
    # jiffies are 10 ms: the share is meaningless for shorter spans
    share = max(0, (b1 - b0) - (o1 - o0)) / os.sysconf("SC_CLK_TCK") / (span * os.cpu_count())
    FOREIGN.append(share if span > 1 else 0.0)
    return min(ts), out


def report(name, t_old, t_new, err):
    print(f"{name:48s} current {t_old:8.3f} s   proposed {t_new:8.3f} s   speed-up {t_old / t_new:5.1f}x   "
          f"max |diff| {err:.2e}"
          + (f"   (other processes: {max(FOREIGN[-2:]):.0%} CPU)" if max(FOREIGN[-2:]) > 0.05 else ""),
          flush=True)


# --------------------------------------------------------------------------------------------------
# layer0_weight_kernels: only the positional part is needed
# --------------------------------------------------------------------------------------------------


def layer0_positional_only(w, query, n_ctx, ref_norm):
    """Same kernel as decomposition.layer0_weight_kernels, computing only q . P[n, i].

    The kernel is softmax_i((q_n . P[n, i]) / scale) with P[n, i] = (pi_i - pi_n) W~_K / sigma_ref(i); the
    q_n . pi_n W~_K / sigma_ref(i) term is *not* constant in i (sigma_ref depends on i), so it is kept, but
    the content scores (QE), the [n, i] sigma matrix and the bias that learned_score_parts also builds are
    skipped."""
    from attnscope.exact.decomposition import centre
    from attnscope.exact.forward import attn_norm_params, embed_raw, norm

    T = n_ctx
    pi = embed_raw(w, torch.zeros(1, T, dtype=torch.long, device=w.device))[0] - w.W_E[0]
    gamma, beta = attn_norm_params(w, 0)
    x = norm(w, (query[None, :] + pi)[None], gamma, beta)[0]  # [T, d]
    q = torch.einsum("pd,hde->hpe", x, w.W_Q[0]) + w.b_Q[0][:, None]  # [H, T, dh]
    pic = centre(pi, w)
    PK = torch.einsum("td,hde->hte", pic, gamma[None, :, None] * w.W_K[0])  # [H, T, dh]
    QP = q @ PK.transpose(1, 2)  # [H, n, i]
    QPnn = QP.diagonal(dim1=-2, dim2=-1)  # [H, n]
    inv_sig = 1.0 / ((pic.pow(2).sum(-1) + ref_norm**2) / w.d_model + w.eps).sqrt()  # [i]
    s = (QP - QPnn[..., None]) * (inv_sig / w.attn_scale[0])
    mask = torch.ones(T, T, dtype=torch.bool, device=w.device).triu(1)
    return s.masked_fill_(mask, float("-inf")).softmax(-1)


def layer0_rows(w, query, n_ctx, ref_norm, rows):
    """Kernel rows ``[H, len(rows), T]`` at the query positions ``rows`` only (what analyse_kernels keeps):
    positional keys for all T positions, queries for ``rows`` only."""
    from attnscope.exact.decomposition import centre
    from attnscope.exact.forward import attn_norm_params, embed_raw, norm

    T = n_ctx
    r = torch.as_tensor(rows, device=w.device)
    pi = embed_raw(w, torch.zeros(1, T, dtype=torch.long, device=w.device))[0] - w.W_E[0]
    gamma, beta = attn_norm_params(w, 0)
    x = norm(w, (query[None, :] + pi[r])[None], gamma, beta)[0]  # [nq, d]
    q = torch.einsum("pd,hde->hpe", x, w.W_Q[0]) + w.b_Q[0][:, None]  # [H, nq, dh]
    pic = centre(pi, w)
    PK = torch.einsum("td,hde->hte", pic, gamma[None, :, None] * w.W_K[0])  # [H, T, dh]
    QP = q @ PK.transpose(1, 2)  # [H, nq, T]
    QPnn = QP.gather(2, r[None, :, None].expand(QP.shape[0], -1, 1))  # [H, nq, 1]
    inv_sig = 1.0 / ((pic.pow(2).sum(-1) + ref_norm**2) / w.d_model + w.eps).sqrt()
    s = (QP - QPnn) * (inv_sig / w.attn_scale[0])
    mask = torch.arange(T, device=w.device)[None, :] > r[:, None]
    return s.masked_fill_(mask, float("-inf")).softmax(-1)


def proto_layer0(w, T):
    from attnscope.exact.decomposition import layer0_weight_kernels, reference_norm

    g = torch.Generator().manual_seed(0)
    query = w.W_E[torch.randint(0, w.d_vocab - 1, (T,), generator=g)].mean(0)
    ref = reference_norm(w)
    with torch.no_grad():
        t0, a = best(lambda: layer0_weight_kernels(w, query, T, ref))
        t1, b = best(lambda: layer0_positional_only(w, query, T, ref))
    report("layer0_weight_kernels: positional part only", t0, t1, float((a - b).abs().max()))
    from attnscope.kernels.analysis import query_positions

    qp = query_positions(T, w.causal)
    with torch.no_grad():
        t2, c = best(lambda: layer0_rows(w, query, T, ref, qp))
    report("  ... and only the 5 query rows analyse_kernels keeps", t0, t2, float((a[:, qp] - c).abs().max()))
    print(f"{'  (analyse_kernels calls it 1 + n_query_tokens = 17 times)':48s} current {17 * t0:8.3f} s   "
          f"proposed {17 * t2:8.3f} s", flush=True)


# --------------------------------------------------------------------------------------------------
# the estimation pass of analyse_kernels: only q, k and the layer outputs are needed
# --------------------------------------------------------------------------------------------------


def layers_sdpa(w, tokens):
    """iter_layers for learned-position pre-LN models without materialising scores or patterns:
    torch's fused causal attention (scaled_dot_product_attention) does Q.K^T, mask, softmax and @ V."""
    import torch.nn.functional as F

    from attnscope.exact.forward import activation, embed, norm, qkv

    x = embed(w, tokens)
    for l in range(w.n_layers):
        a_in = norm(w, x, w.ln1_w[l], w.ln1_b[l])
        q, k, v = qkv(w, l, a_in)
        z = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=1.0 / float(w.attn_scale[l]))
        mid = x + torch.einsum("bhpe,hed->bpd", z, w.W_O[l]) + w.b_O[l]
        m_in = norm(w, mid, w.ln2_w[l], w.ln2_b[l])
        x = mid + activation(w.act, m_in @ w.W_in[l] + w.b_in[l]) @ w.W_out[l] + w.b_out[l]
        yield l, q, k, x


def proto_forward(w, T):
    from attnscope.exact.forward import iter_layers

    tok = torch.randint(0, w.d_vocab - 1, (B.BATCH, T), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        def old():
            for a in iter_layers(w, tok):
                out = (a.q.sum(0), a.k.sum(0))
            return a.resid_post, out

        def new():
            for _, q, k, resid in layers_sdpa(w, tok):
                out = (q.sum(0), k.sum(0), resid)
            return out[2], out[:2]

        t0, a = best(old, 2)
        t1, b = best(new, 2)
    err = float(max((a[0] - b[0]).abs().max() / a[0].abs().max(),
                    (a[1][0] - b[1][0]).abs().max() / a[1][0].abs().max()))
    report(f"estimation pass, one batch of {B.BATCH} (fused attention)", t0, t1, err)



# --------------------------------------------------------------------------------------------------
# build_circuit: content factors and extended embeddings
# --------------------------------------------------------------------------------------------------


def proto_circuit(w, cfg):
    """The two [V, d] x [d, d] products of build_circuit, as written and refactored."""
    from attnscope.circuit.build import LAYER, content_inputs, layer0_kernels_and_queries
    from attnscope.core.texts import text_tokens
    from attnscope.exact.decomposition import reference_norm

    T = cfg["n_ctx"]
    cal = text_tokens(cfg["texts"]["calibration"], w.tokenizer, max_tokens=T)
    n_star = T // 2
    heads = B._heads(cfg)
    hs = torch.tensor(heads)
    with torch.no_grad():
        e_val, _, key_content = content_inputs(w, T, n_star, reference_norm(w))
        _, q = layer0_kernels_and_queries(w, cal)
        scale = w.attn_scale[LAYER]

        def logf_old():  # circuit.py: keys of every token for every head, then q . key
            keys = torch.einsum("vd,hde->hve", key_content, w.W_K[LAYER])
            return torch.einsum("he,hve->hv", q[:, n_star], keys) / scale

        def logf_new():  # fold the one query into W_K first: [H, d], then one [V, d] x [d, H] product
            qk = torch.einsum("hde,he->hd", w.W_K[LAYER], q[:, n_star])
            return (key_content @ qk.T).T / scale

        t0, a = best(logf_old, 2)
        t1, b = best(logf_new, 2)
        report("build_circuit: log f (fold q into W_K)", t0, t1, float((a - b).abs().max()))

        wt = torch.rand(len(heads), w.d_vocab, dtype=w.dtype)  # stands for f / Z

        def ext_old():  # circuit.py: W_OV = W_V W_O per head ([d, d]), then e_val @ W_OV per head
            WOV = torch.einsum("hde,hef->hdf", w.W_V[LAYER][hs], w.W_O[LAYER][hs])
            ext = torch.zeros(w.d_vocab, w.d_model, dtype=w.dtype)
            for j in range(len(heads)):
                ext += wt[j][:, None] * (e_val @ WOV[j])
            return ext

        def ext_new():  # through d_head: e_val @ [W_V of all chosen heads] ([V, n dh]), weight, then @ W_O stacked
            Wv = w.W_V[LAYER][hs].permute(1, 0, 2).reshape(w.d_model, -1)  # [d, n*dh]
            z = (e_val @ Wv).view(w.d_vocab, len(heads), -1) * wt.T[:, :, None]
            return z.reshape(w.d_vocab, -1) @ w.W_O[LAYER][hs].reshape(-1, w.d_model)

        t0, a = best(ext_old, 2)
        t1, b = best(ext_new, 2)
        report("build_circuit: extended embeddings (via d_head)", t0, t1, float((a - b).abs().max() / a.abs().max()))


# --------------------------------------------------------------------------------------------------
# score_neurons: top-m over the vocabulary
# --------------------------------------------------------------------------------------------------


def proto_scoring(w, cfg):
    from attnscope.circuit.build import mlp_input_weights
    from attnscope.exact.decomposition import centre
    from attnscope.neurons.find import NeuronSettings

    circ = B._circuit(cfg, w)
    s = NeuronSettings()
    m = s.top_m
    with torch.no_grad():
        W, _ = mlp_input_weights(w)
        ext_m = (centre(circ.ext, w) / circ.mlp_scale)[circ.token_mask]

        def old():  # neurons.py loop: [V, chunk] scores, topk over dim 0 (strided), and of a negated copy
            out = []
            for c0 in range(0, W.shape[1], s.chunk):
                S = ext_m @ W[:, c0 : c0 + s.chunk]
                out.append(torch.stack([S.topk(m, dim=0).values.mean(0), (-S).topk(m, dim=0).values.mean(0)]))
            return torch.cat(out, 1)

        ext_t = ext_m.T.contiguous()

        def new():  # [chunk, V] scores (the vocabulary contiguous), topk along the last dim, no negated copy
            out = []
            for c0 in range(0, W.shape[1], s.chunk):
                S = W[:, c0 : c0 + s.chunk].T @ ext_t
                hi, lo = S.topk(m, dim=1).values, S.topk(m, dim=1, largest=False).values
                out.append(torch.stack([hi.mean(1), -lo.mean(1)]))
            return torch.cat(out, 1)

        def product_only():
            for c0 in range(0, W.shape[1], s.chunk):
                ext_m @ W[:, c0 : c0 + s.chunk]

        t0, a = best(old, 2)
        t1, b = best(new, 2)
        tp, _ = best(product_only, 2)
        report("score_neurons: top-m along a contiguous dim", t0, t1, float((a - b).abs().max()))
        print(f"{'  (the products alone)':48s} {tp:8.3f} s", flush=True)


# --------------------------------------------------------------------------------------------------
# find_neurons: per-neuron work in the verification loop
# --------------------------------------------------------------------------------------------------


def proto_verify(w, cfg):
    from attnscope.circuit.build import mlp_input_weights
    from attnscope.exact.decomposition import centre

    circ = B._circuit(cfg, w)
    kept = list(range(B.N_VERIFY))
    n_top = 20
    with torch.no_grad():
        W, _ = mlp_input_weights(w)
        ext = centre(circ.ext, w) / circ.mlp_scale
        mask_ids = torch.nonzero(circ.token_mask).squeeze(1)

        def old():  # neurons.py: per neuron, ext[mask_ids] (a [V, d] copy) @ W[:, k], then 4 top-k
            out = []
            for k in kept:
                S = ext[mask_ids] @ W[:, k]
                out.append((S.topk(n_top).indices, (-S).topk(n_top).indices, S.topk(50).indices, (-S).topk(50).indices))
            return out

        def new():  # one [V, k] product, top-50 once per side (top-20 are its first 20)
            S = (ext[mask_ids] @ W[:, kept]).T.contiguous()  # [k, V]
            hi, lo = S.topk(50, dim=1).indices, S.topk(50, dim=1, largest=False).indices
            return [(hi[j, :n_top], lo[j, :n_top], hi[j], lo[j]) for j in range(len(kept))]

        t0, a = best(old, 2)
        t1, b = best(new, 2)
        same = all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(a, b))
        report("find_neurons: token scores of the kept neurons", t0, t1, 0.0 if same else float("nan"))

        y = torch.randn(4 * cfg["n_ctx"], len(kept), dtype=torch.float64)
        yh = y + 0.3 * torch.randn_like(y)

        def r_old():
            return [float(torch.corrcoef(torch.stack([y[:, j], yh[:, j]]))[0, 1]) for j in range(len(kept))]

        def r_new():
            a_, b_ = y - y.mean(0), yh - yh.mean(0)
            return ((a_ * b_).sum(0) / (a_.norm(dim=0) * b_.norm(dim=0))).tolist()

        t0, a = best(r_old, 3)
        t1, b = best(r_new, 3)
        report("find_neurons: Pearson r of all kept neurons", t0, t1, max(abs(x - z) for x, z in zip(a, b)))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", choices=list(B.MODELS), default="small")
    ap.add_argument("--n-ctx", type=int, default=1024)
    ap.add_argument("--only", default="layer0,forward,circuit,scoring,verify")
    a = ap.parse_args()
    os.environ["ATTNSCOPE_CACHE"] = str(B.work_dir() / "cache")
    spec = B.MODELS[a.model]
    T = min(a.n_ctx, spec["n_positions"])
    folder = B.make_model(a.model)
    D = {"L": spec["n_layer"], "H": spec["n_head"], "d": spec["n_embd"], "dh": spec["n_embd"] // spec["n_head"],
         "d_mlp": 4 * spec["n_embd"], "V": spec["vocab_size"]}
    cfg = {"model": a.model, "folder": str(folder), "device": "cpu", "n_ctx": T, "dims": D,
           "texts": B.make_texts(folder, spec["vocab_size"], T, 16)}
    w = B._load(cfg)
    only = set(a.only.split(","))
    print(f"GPT-2 {a.model} shapes, n_ctx {T}, {torch.get_num_threads()} threads")
    if "layer0" in only:
        proto_layer0(w, T)
    if "forward" in only:
        proto_forward(w, T)
    if "circuit" in only:
        proto_circuit(w, cfg)
    if "scoring" in only:
        proto_scoring(w, cfg)
    if "verify" in only:
        proto_verify(w, cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
