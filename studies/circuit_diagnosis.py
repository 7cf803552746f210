"""Research measurement: where does the contextual circuit's error come from? (issue 10)

Builds the layer-0 circuit (detected or forced heads) and compares, on held-out bundled texts, the heads' true
summed output with approximations that each replace one piece (FVU of the centred vectors, positions >= n_min):

* ``values``        true attention patterns, approximated value vectors (content + position + bias split);
* ``own kernels``   per-head K_h(n,i) f_h(x_i) / Z_h with exact values (each head's own pattern approximation);
* ``bag, own K``    per-head kernels and approximated values: a sum of per-head bags (still linear in the bag);
* ``circuit``       the circuit's summary (one shared kernel), what the neurons read;
* ``+ true sink``   the ``own K`` bag on positions >= 1 renormalised to the true 1 - s_n, plus the true sink term.

    PYTHONPATH=src python studies/circuit_diagnosis.py all-MiniLM-L6-v2
    PYTHONPATH=src python studies/circuit_diagnosis.py smollm2 --heads 0 1 2 4 5 6 7 8
"""

from __future__ import annotations

import argparse

import torch

from attnscope.circuit.build import CircuitSettings, build_circuit, content_inputs, true_head_output, value_bias
from attnscope.core.texts import bundled_texts, text_tokens
from attnscope.exact.decomposition import approximate_pattern, centre, reference_norm
from attnscope.exact.forward import embed_raw, iter_layers
from attnscope.models import load_model


def fvu(y: torch.Tensor, yh: torch.Tensor) -> float:
    y, yh = y.double(), yh.double()
    return float(((y - yh) ** 2).sum() / ((y - y.mean(0)) ** 2).sum())


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--heads", type=int, nargs="*", default=None)
    a = ap.parse_args()
    w = load_model(a.model)
    circ = build_circuit(w, CircuitSettings(heads=a.heads))
    hs = torch.tensor(circ.heads)
    T, n_min = circ.T, circ.settings.min_position
    e_val, p_val, key_content = content_inputs(w, T, circ.settings.reference_position, reference_norm(w))
    WOV = torch.einsum("hde,hef->hdf", w.W_V[0][hs], w.W_O[0][hs])
    const = torch.einsum("he,hed->d", value_bias(w)[hs], w.W_O[0][hs])
    bos = w.bos_token_id if w.prepend_bos else None
    rows: dict[str, list] = {k: [] for k in ("true", "values", "own kernels", "bag, own K", "circuit", "+ true sink",
                                             "own K, exact Z", "exact-query split")}
    p_static = embed_raw(w, torch.zeros(1, T, dtype=torch.long))[0] - w.W_E[0] if w.positional == "learned" else None
    circ_static = None
    if w.positional == "rotary":
        cal = circ.calibration_tokens[None]
        kk = next(iter_layers(w, cal, stop_layer=0)).k
        from attnscope.exact.decomposition import apply_pair_weights, pre_rotation
        kk = pre_rotation(w, kk)[0]
        kk_cal = next(iter_layers(w, cal, stop_layer=0)).k
        circ_static = kk[:, 1 if bos is not None else 0:].mean(1, keepdim=True).expand(-1, T, -1).clone()
        if bos is not None:
            circ_static[:, 0] = kk[:, 0]
    sinks = []
    tvs, ph = [], {}
    for spec in [f"bundled:{t}" for t in bundled_texts() if f"bundled:{t}" != circ.settings.calibration]:
        toks = text_tokens(spec, w.tokenizer, max_tokens=T, min_tokens=n_min + 2, bos_token_id=bos).to(w.device)
        n = len(toks)
        act = next(iter_layers(w, toks[None], stop_layer=0))
        y = true_head_output(w, circ.heads, toks)[0]
        vals = torch.einsum("vd,hdf->hvf", e_val[toks], WOV) + torch.einsum("nd,hdf->hnf", p_val[:n], WOV)  # [h, n, d]
        pat = act.pattern[0, hs]  # [h, n, n]
        approx = circ.head_kernels[:, :n, :n] * circ.f[:, toks][:, None, :] / circ.Z[:, None, None]
        s = pat[..., 0]  # true sink mass [h, n]
        rest = approx.clone()
        rest[..., 0] = 0
        rest = rest / rest.sum(-1, keepdim=True).clamp(min=1e-30) * (1 - s)[..., None]
        rest[..., 0] = s
        static = p_static if w.positional == "learned" else circ_static
        split = approximate_pattern(w, 0, act, static, reference_norm(w))
        exact_v = torch.einsum("hpe,hed->hpd", act.v[0, hs], w.W_O[0][hs])  # [h, n, d] exact value vectors
        got = {
            "true": y,
            "values": torch.einsum("hni,hid->nd", pat, vals) + const,
            "own kernels": torch.einsum("hni,hid->nd", approx, exact_v),
            "bag, own K": torch.einsum("hni,hid->nd", approx, vals) + const,
            "circuit": circ.summary(toks),
            "+ true sink": torch.einsum("hni,hid->nd", rest, vals) + const,
            "own K, exact Z": torch.einsum("hni,hid->nd", approx / approx.sum(-1, keepdim=True), exact_v),
            "exact-query split": torch.einsum("hni,hid->nd", split[0, hs], exact_v),
        }
        if w.positional == "rotary":
            from attnscope.exact.decomposition import (
                pair_weights_of_kernel,
                pooled_static_keys,
                separable_rotary_score_parts,
            )
            from attnscope.exact.forward import mask_scores
            c = pair_weights_of_kernel(w, circ.head_kernels[:, -1], bos is not None)
            qp, kp = pre_rotation(w, act.q)[:, hs], pre_rotation(w, act.k)[:, hs]
            stat = pooled_static_keys(pre_rotation(w, kk_cal)[0][hs], bos is not None)[:, :n]
            cont, posi = separable_rotary_score_parts(w, qp, kp, stat, c)
            sc = float(w.attn_scale[0])
            sep = mask_scores(w, (cont + posi) / sc).softmax(-1)[0]
            fq = circ.head_kernels[:, :n, :n] * (cont[0] / sc - (cont[0] / sc).amax(-1, keepdim=True)).exp()
            got["q-cond separable, self-normalised"] = torch.einsum("hni,hid->nd", sep, exact_v)
            got["typical K, q-cond f, self-norm"] = torch.einsum("hni,hid->nd", fq / fq.sum(-1, keepdim=True), exact_v)
            # calibrated per-query denominator: Z_q(n) = sum_j K_n(j) f_q(x_cal_j), f clipped at 3 x the median
            kc = pre_rotation(w, kk_cal)[0][hs][:, :n]  # calibration keys [h, n, e]
            qc = apply_pair_weights(w, qp[0], c)  # [h, n, e]
            lf = torch.einsum("hne,hie->hni", qc, kp[0] - stat[None][0]) / sc
            lz = torch.einsum("hne,hie->hni", qc, kc - stat[None][0]) / sc
            cap = lz[..., 1:].median(-1, keepdim=True).values + torch.log(torch.tensor(3.0))
            lf, lz = torch.minimum(lf, cap), torch.minimum(lz, cap)
            K = circ.head_kernels[:, :n, :n]
            logZ = torch.logsumexp(torch.log(K.clamp(min=1e-300)) + lz, -1, keepdim=True)
            aq = torch.exp(torch.log(K.clamp(min=1e-300)) + lf - logZ) * (K > 0)
            got["typical K, q-cond f, cal Z_q"] = torch.einsum("hni,hid->nd", aq, exact_v)
            for k in ("q-cond separable, self-normalised", "typical K, q-cond f, self-norm",
                      "typical K, q-cond f, cal Z_q"):
                rows.setdefault(k, [])
        if w.positional == "learned":
            from attnscope.exact.decomposition import learned_score_parts
            cont, posi, _ = learned_score_parts(w, 0, act.norm_in, p_static[:n], act.q, reference_norm(w))
            sc = float(w.attn_scale[0])
            kq = (posi[0, hs] / sc).softmax(-1) * circ.f[:, toks][:, None, :]
            fq = circ.head_kernels[:, :n, :n] * (cont[0, hs] / sc - (cont[0, hs] / sc).amax(-1, keepdim=True)).exp()
            got["exact-q K, typical f"] = torch.einsum("hni,hid->nd", kq / kq.sum(-1, keepdim=True), exact_v)
            got["typical K, exact-q f"] = torch.einsum("hni,hid->nd", fq / fq.sum(-1, keepdim=True), exact_v)
            # query-conditioned content factor with a calibrated, query-conditioned denominator
            keys = torch.einsum("vd,hde->hve", key_content, w.W_K[0][hs])  # [h, V, e]
            qn = act.q[0, hs]  # [h, n, e]
            cal = circ.calibration_tokens.to(w.device)
            lf = torch.einsum("hne,hie->hni", qn, keys[:, toks]) / sc
            lz = torch.einsum("hne,hje->hnj", qn, keys[:, cal[:n]]) / sc
            m = lz.amax(-1, keepdim=True)
            Kh = circ.head_kernels[:, :n, :n]
            Zq = (Kh * (lz - m).exp()).sum(-1, keepdim=True)
            aq = Kh * (lf - m).exp() / Zq
            got["typical K, q-cond f, cal Z_q"] = torch.einsum("hni,hid->nd", aq, exact_v)
            got["bag: q-cond f, cal Z_q"] = torch.einsum("hni,hid->nd", aq, vals) + const
            for k in ("exact-q K, typical f", "typical K, exact-q f", "typical K, q-cond f, cal Z_q",
                      "bag: q-cond f, cal Z_q"):
                rows.setdefault(k, [])
        an = approx / approx.sum(-1, keepdim=True)
        tvs.append(0.5 * (an - pat).abs().sum(-1)[:, n_min:])
        for j in range(len(circ.heads)):
            ph.setdefault(j, {"true": [], "sep": []})
            ph[j]["true"].append(centre(exact_v[j].T @ pat[j].T, w).T[n_min:] if False else
                                 centre(pat[j] @ exact_v[j], w)[n_min:])
            ph[j]["sep"].append(centre(an[j] @ exact_v[j], w)[n_min:])
        for k, v in got.items():
            rows[k].append(centre(v, w)[n_min:])
        sinks.append(s[:, n_min:])
    y = torch.cat(rows["true"])
    print(f"{a.model}: heads {circ.heads}; held-out texts {len(rows['true'])}; sink mass per head (median) "
          f"{[round(float(x), 3) for x in torch.cat(sinks, 1).median(-1).values]}")
    tv = torch.cat(tvs, 1).median(-1).values
    print("  per head: typical-query separable TV (median, held-out) and FVU of its own output (exact Z):")
    for j, h in enumerate(circ.heads):
        print(f"    head {h}: TV {float(tv[j]):.3f}  FVU {fvu(torch.cat(ph[j]['true']), torch.cat(ph[j]['sep'])):.3f}")
    for k in list(rows)[1:]:
        print(f"  FVU {k:14s} {fvu(y, torch.cat(rows[k])):.3f}")


if __name__ == "__main__":
    main()
