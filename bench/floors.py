"""Floors: the FLOPs a stage must do and the bytes it must move (fp32, 4 bytes per element)."""

from __future__ import annotations

from common import BATCH, N_EVAL, N_VERIFY, _heads

F32 = 4


def block_params(D) -> int:
    """Parameters of one transformer block (attention Q, K, V, O + MLP in/out, biases and norms)."""
    d, m = D["d"], D["d_mlp"]
    return 4 * d * d + 2 * d * m + 3 * d + d + m + d + 4 * d


def forward_flops(D, n_seq: int, T: int, layers: int) -> float:
    """Forward pass through ``layers`` blocks on ``n_seq x T`` tokens, causal attention, no unembedding:
    per token and layer 2*(4 d^2) for Q, K, V, O and 2*(2 d d_mlp) for the MLP; per sequence and layer
    2 * d * T(T+1)/2 for Q.K^T and the same for pattern @ V (only the causal half is needed)."""
    d, m = D["d"], D["d_mlp"]
    per_token = 2 * 4 * d * d + 2 * 2 * d * m
    attn = 2 * 2 * d * T * (T + 1) / 2
    return layers * n_seq * (T * per_token + attn)


def forward_bytes(D, n_seq: int, T: int, layers: int, batch: int) -> float:
    """Each batch reads every block's weights once; each token writes and reads back its residual, q, k, v,
    attention output (5 d) and MLP hidden (d_mlp) once per layer (attention done flash-style: no T^2 array)."""
    n_batches = -(-n_seq // batch)
    w = layers * block_params(D) * F32 * n_batches
    act = layers * n_seq * T * (5 * D["d"] + D["d_mlp"]) * F32 * 2
    return w + act


def floors(D, cfg) -> dict[str, tuple[float, float, str]]:
    """``stage -> (FLOPs, bytes, formula)``."""
    T, N, L, H, d, dh, V, m = cfg["n_ctx"], cfg["n_samples"], D["L"], D["H"], D["d"], D["dh"], D["V"], D["d_mlp"]
    n_heads = len(_heads(cfg))
    pairs = T * (T + 1) / 2
    out = {}
    # weight extraction: every block's weights are stacked (copied: read + write); W_E, W_pos are views
    out["extract"] = (0.0, 2 * L * block_params(D) * F32, "bytes 2*4*L*P_block (stack = copy)")
    # layer-0 weights kernel: positional keys and queries for T positions (2 * 2 T d^2), q.P over causal
    # pairs (2 H dh T(T+1)/2), softmax; must write the [H, T, T] kernel
    out["layer0"] = (2 * 2 * T * d * d + 2 * H * dh * pairs + 5 * H * pairs, H * T * T * F32,
                     "FLOPs 4Td^2 + 2*H*dh*T(T+1)/2; bytes 4*H*T^2 (the output)")
    # data kernels: a forward pass through all L layers on N x T tokens (no unembedding), + the mean q, k
    # (analyse_kernels also builds the layer-0 weights kernel: its floor is added)
    out["kernels"] = (forward_flops(D, N, T, L) + out["layer0"][0],
                      forward_bytes(D, N, T, L, BATCH) + out["layer0"][1],
                      "forward to layer L on N x T tokens (see forward_flops) + layer-0 weights kernel")
    nm = cfg["n_mem"]
    out["kernels_small_n"] = (forward_flops(D, nm, T, L) + out["layer0"][0],
                              forward_bytes(D, nm, T, L, BATCH) + out["layer0"][1], "same, N small")
    # the whole kernels command: the estimation forward on N windows and the held-out forward on n_heldout
    # windows (all L layers), plus per held-out window and layer the validation's approximate scores: content
    # and positional products q.E, q.P over the causal pairs (2 * 2 H dh T(T+1)/2), the sigma matrix u.pi
    # (2 d T(T+1)/2) and the content and positional keys (2 * 2 T d^2); bytes: the forwards' plus one
    # [b, H, T, T] pattern per batch and layer written and read (the held-out pass needs the true patterns)
    nh = cfg.get("n_heldout", 0)
    val_f = nh * L * (2 * 2 * H * dh * pairs + 2 * d * pairs + 2 * 2 * T * d * d)
    val_b = 2 * F32 * nh * L * H * pairs
    out["command"] = (forward_flops(D, N + nh, T, L) + val_f + out["layer0"][0],
                      forward_bytes(D, N + nh, T, L, BATCH) + val_b + out["layer0"][1],
                      "forward to layer L on (N + n_heldout) x T tokens + validation scores on the held-out windows")
    # circuit: content factors of every token for each head, log f = key_content[v] . (W_K[h] q[h]) (2 V d H,
    # after folding q into W_K) + the norm of V content vectors (~10 V d); extended embeddings through
    # W_V then W_O for the chosen heads (4 V d n dh); one layer-0 pass on the calibration text; kernels
    # (as layer0) and the positional term K @ (P W_OV) (2 n T^2 d + 4 n T d dh)
    circ_f = (2 * V * d * H + 10 * V * d + 4 * V * d * n_heads * dh + forward_flops(D, 1, T, 1)
              + out["layer0"][0] + 2 * n_heads * pairs * d + 4 * n_heads * T * d * dh)
    circ_b = F32 * (3 * V * d + H * T * T + V * n_heads)
    out["circuit"] = (circ_f, circ_b, "FLOPs 2VdH + 10Vd + 4Vd*n*dh + layer-0 pass(T) + kernels; bytes 4(3Vd + HT^2)")
    # neuron scoring: the token model (the other H - n heads' content keys, 2 V d dh each, and value paths
    # through d_head, 4 V d dh each), the [V, d] @ [d, d_mlp] swing product + top/bottom-m over V per neuron
    # (2 V d_mlp compares), a layer-0 pass on the calibration text; the predicted effects (vector-matrix
    # products per source) are negligible
    n_other = D["H"] - n_heads
    out["scoring"] = (6 * V * d * dh * n_other + 2 * V * d * m + 2 * V * m + forward_flops(D, 1, T, 1),
                      F32 * (4 * V * d + d * m),
                      "FLOPs 6Vd*dh*(H-n) + 2*V*d*d_mlp (+ layer-0 pass on calibration); bytes 4(4Vd + d*d_mlp)")
    # verification (select / verify / label after score): a layer-0 pass per held-out window (E tuning + E
    # reporting windows: true effect sizes of every neuron), the linear summary K @ Ext[tokens] on each reporting
    # window (2 d T(T+1)/2), projections on the k reported + k random neurons (2 * 2 T d * 2k), and the reported
    # neurons' token scores over V for the labels (2 V d k)
    k = N_VERIFY
    ver_f = (2 * N_EVAL * forward_flops(D, 1, T, 1) + N_EVAL * (2 * d * pairs + 4 * T * d * 2 * k)
             + 2 * V * d * k)
    ver_b = F32 * (V * d + 2 * N_EVAL * T * d * 4)
    out["verify"] = (ver_f, ver_b, "FLOPs 2E layer-0 passes + E*(2d*T(T+1)/2 + 4Td*2k) + 2Vdk; bytes 4(Vd + 8ETd)")
    return out
