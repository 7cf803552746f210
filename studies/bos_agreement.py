"""Sink-excluded kernels with and without BOS on a GPT-2-architecture model, beside the sampling noise floor
(issue 10; numbers in docs/kernels.md).

    PYTHONPATH=src python studies/bos_agreement.py demo --n-ctx 64 --n-samples 96
"""

from __future__ import annotations

import argparse

from attnscope.exact.decomposition import tv_distance
from attnscope.exact.sinks import split_sink
from attnscope.kernels.analysis import KernelSettings, analyse_kernels
from attnscope.models import load_model

ap = argparse.ArgumentParser()
ap.add_argument("model")
ap.add_argument("--n-ctx", type=int, default=64)
ap.add_argument("--n-samples", type=int, default=96)
a = ap.parse_args()
res = {}
for bos, seed in ((False, 0), (True, 0), (False, 1)):
    w = load_model(a.model, prepend_bos=bos)
    res[bos, seed] = analyse_kernels(w, KernelSettings(n_ctx=a.n_ctx, n_samples=a.n_samples, n_heldout=1, seed=seed),
                                     cache=False, progress=False)


def compare(x, y):
    tv = tv_distance(split_sink(res[x].arrays["data_kernel"].double())[1],
                     split_sink(res[y].arrays["data_kernel"].double())[1])
    return " ".join(f"{float(v):.3f}" for v in tv.amax((1, 2))), float(tv.median())


pairs = {"BOS vs no BOS": ((False, 0), (True, 0)), "noise (seed 0 vs 1, no BOS)": ((False, 0), (False, 1))}
for name, (x, y) in pairs.items():
    per_layer, med = compare(x, y)
    print(f"{name:30s} max TV per layer {per_layer}   median {med:.3f}")
