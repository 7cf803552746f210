"""Data-kernel stages: attnscope's estimation (``analyse_kernels`` without held-out validation), and the
TransformerLens baselines (``run_with_cache`` averaging ``hook_pattern``; the plain forward alone)."""

from __future__ import annotations

import time

from common import BATCH, _bridge, _load, _windows, assert_device, measure, rate_probe, sync


def stage_kernels(cfg, n: int):
    from attnscope.kernels.analysis import KernelSettings, analyse_kernels

    dev = cfg["device"]
    w = _load(cfg)
    s = KernelSettings(samples=cfg["texts"]["samples"], n_ctx=cfg["n_ctx"], n_samples=n, n_heldout=0,
                       batch_size=BATCH)

    def check(res):
        assert_device(res.arrays["data_kernel"], dev, "data kernels")
        assert res.arrays["data_kernel"].shape[:2] == (w.n_layers, w.n_heads)
        return {"n_records": len(res.records)}

    p0 = rate_probe(dev)
    res = measure(lambda: analyse_kernels(w, s, cache=False, progress=False), repeats=1, device=dev, check=check)
    res["extra"]["rate_flops"] = [p0, rate_probe(dev)]  # matmul rate just before and just after the stage
    return res



def stage_kernels_tl(cfg, n: int):
    """What a TransformerLens user writes: run_with_cache on each batch, average hook_pattern per layer/head
    (the b2 kernel estimate: mean attention).  Times the run_with_cache calls separately too."""
    import torch

    from attnscope.models import load_hf

    dev = cfg["device"]
    hf, tok, _ = load_hf(cfg["folder"])
    hf.to(dev)
    try:
        bridge, impl = _bridge(cfg, hf, tok), "TransformerBridge.run_with_cache(names_filter=hook_pattern)"
    except Exception as err:  # noqa: BLE001 - any TL failure: fall back to plain transformers, and say so
        bridge, impl = None, f"transformers output_attentions=True (TransformerLens failed: {err!s:.120})"
    win = _windows(cfg, tok, n)
    L, H, T = cfg["dims"]["L"], cfg["dims"]["H"], cfg["n_ctx"]

    def run():
        acc = torch.zeros(L, H, T, T, device=dev)
        t_fwd, marks, t_all = 0.0, [], time.perf_counter()
        for b0 in range(0, n, BATCH):
            batch = win[b0 : b0 + BATCH]
            t0 = time.perf_counter()
            if bridge is not None:
                _, cache = bridge.run_with_cache(batch, names_filter=lambda name: name.endswith("hook_pattern"))
                pats = [cache[f"blocks.{l}.attn.hook_pattern"] for l in range(L)]
            else:
                pats = list(hf(batch, output_attentions=True).attentions)
                cache = None
            sync(dev)
            t_fwd += time.perf_counter() - t0
            for l in range(L):
                acc[l] += pats[l].sum(0)
            del cache, pats
            sync(dev)
            marks.append([min(n, b0 + BATCH), time.perf_counter() - t_all, t_fwd])
        # cumulative [windows, total s, forward s] after each batch: the same run gives the first N windows
        return acc / n, {"forward_s": t_fwd, "impl": impl, "cumulative": marks}

    def check(mean_attn):
        assert_device(mean_attn, dev, "baseline mean attention")

    with torch.no_grad():
        return measure(run, repeats=1, device=dev, check=check)


def stage_forward_tl(cfg, n: int):
    """The baseline's forward passes alone (no cache, no averaging): the data-kernel target."""
    import torch

    from attnscope.models import load_hf

    dev = cfg["device"]
    hf, tok, _ = load_hf(cfg["folder"])
    hf.to(dev)
    try:
        bridge, impl = _bridge(cfg, hf, tok), "TransformerBridge forward"
    except Exception as err:  # noqa: BLE001
        bridge, impl = None, f"transformers forward (TransformerLens failed: {err!s:.120})"
    win = _windows(cfg, tok, n)

    def run():
        out = None
        for b0 in range(0, n, BATCH):
            batch = win[b0 : b0 + BATCH]
            out = bridge(batch) if bridge is not None else hf(batch).logits
        return out, {"impl": impl}

    def check(logits):
        assert_device(logits, dev, "baseline logits")

    with torch.no_grad():
        return measure(run, repeats=1, device=dev, check=check)
