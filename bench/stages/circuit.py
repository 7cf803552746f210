"""The contextual-circuit stage (``build_circuit`` with forced heads)."""

from __future__ import annotations

from common import _circuit, _load, assert_device, measure


def stage_circuit(cfg):
    import torch

    dev = cfg["device"]
    w = _load(cfg)

    def check(circ):
        for k in ("ext", "kernel", "head_kernels", "f", "positional"):
            assert_device(getattr(circ, k), dev, f"Circuit.{k}")
        assert circ.ext.shape == (w.d_vocab, w.d_model)
        return {"heads": circ.heads}

    with torch.no_grad():
        return measure(lambda: _circuit(cfg, w), repeats=2, device=dev, check=check)
