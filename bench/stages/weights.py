"""Stages on the weights alone: weight extraction (and the TransformerLens way), the layer-0 weights kernel,
and the machine's matmul rate and copy bandwidth (the floors' denominators)."""

from __future__ import annotations

import time

from common import SEED, _bridge, _load, assert_device, measure, sync


def stage_extract(cfg):
    from attnscope.models import extract_weights, load_hf

    dev = cfg["device"]
    hf, tok, _ = load_hf(cfg["folder"])
    hf.to(dev)

    def check(w):
        for k, t in w.tensors().items():
            assert_device(t, dev, f"ModelWeights.{k}")

    # what load_model does after loading: extract, then move (a no-op on CPU)
    return measure(lambda: extract_weights(hf, tokenizer=tok).to(device=dev), repeats=5, device=dev, check=check)


def stage_extract_tl(cfg):
    import torch

    from attnscope.models import load_hf

    dev = cfg["device"]

    def setup():
        hf, tok, _ = load_hf(cfg["folder"])
        return hf.to(dev), tok

    def check(bridge):
        assert_device(bridge.W_Q, dev, "bridge.W_Q")

    with torch.no_grad():
        return measure(lambda hf, tok: _bridge(cfg, hf, tok), repeats=2, device=dev, setup=setup, check=check)


def stage_layer0(cfg):
    import torch

    from attnscope.exact.decomposition import layer0_weight_kernels, reference_norm

    dev, T = cfg["device"], cfg["n_ctx"]
    w = _load(cfg)
    g = torch.Generator().manual_seed(SEED)
    query = w.W_E[torch.randint(0, w.d_vocab - 1, (T,), generator=g).to(dev)].mean(0)
    ref = reference_norm(w)

    def check(K):
        assert_device(K, dev, "layer-0 kernels")
        assert K.shape == (w.n_heads, T, T), K.shape
        assert torch.allclose(K.sum(-1), torch.ones((), device=K.device, dtype=K.dtype), atol=1e-4)

    with torch.no_grad():
        return measure(lambda: layer0_weight_kernels(w, query, T, ref), repeats=3, device=dev, check=check)


def stage_machine(cfg):
    """Achievable fp32 matmul rate and copy bandwidth on this machine (best of a few)."""
    import torch

    dev = cfg["device"]
    n = cfg.get("matmul_n", 3072)
    a = torch.randn(n, n, device=dev)
    b = torch.randn(n, n, device=dev)
    c = a @ b
    flops = []
    for _ in range(4):
        sync(dev)
        t0 = time.perf_counter()
        torch.matmul(a, b, out=c)
        sync(dev)
        flops.append(2 * n**3 / (time.perf_counter() - t0))
    del a, b, c
    nbytes = cfg.get("copy_bytes", 512 * 2**20)
    src = torch.ones(nbytes // 4, device=dev)
    dst = torch.empty_like(src)
    dst.copy_(src)
    bws = []
    for _ in range(5):
        sync(dev)
        t0 = time.perf_counter()
        dst.copy_(src)
        sync(dev)
        bws.append(2 * nbytes / (time.perf_counter() - t0))  # read + write
    return {"flops": max(flops), "bandwidth": max(bws), "matmul_n": n, "copy_mb": nbytes / 2**20,
            "threads": torch.get_num_threads()}
