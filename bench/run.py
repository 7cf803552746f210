#!/usr/bin/env python
"""Benchmark attnscope's stages on GPT-2-Small/Medium-shaped models against a TransformerLens baseline.

    .venv/bin/python bench/run.py [--model small|medium] [--n-samples 32] [--n-ctx 1024] [--device cpu|cuda] [--quick]

Models are *randomly initialised* GPT-2s with the real shapes (seeded), saved once to a temp folder with a
word-level tokenizer of exactly ``vocab_size`` entries (token ``i`` is the word ``t{i}``), so texts of random
tokens round-trip through the tokenizer and every attnscope API (``load_model``, ``analyse_kernels`` with a
text source, ``build_circuit`` with a calibration text, ``find_neurons`` with held-out texts) runs unchanged.
Random weights have no contextual heads, so the circuit and neuron stages force heads with
``CircuitSettings(heads=[0..5])``, and verification keeps the 64 top-effect neurons (thresholds set to 0).

Each stage runs in a fresh subprocess (``--in-process`` / ``--quick`` run them in this process): time is the
best of k repeats (wall clock), peak memory is the rise of the process's peak RSS (``VmHWM``, reset through
``/proc/self/clear_refs`` right before the stage) above its RSS before the stage, i.e. the stage's working
memory on top of the loaded model and inputs.  On CUDA it is ``torch.cuda.max_memory_allocated`` above the
allocation before the stage.

Floors: every stage states the FLOPs it must do and the bytes it must move (see ``floor_*``); the floor time is
``max(FLOPs / P, bytes / B)`` with ``P`` the best fp32 matmul rate and ``B`` the best copy bandwidth measured
at start on this machine.  Results: a table on stdout, ``bench/results/<model>.json`` and ``bench/RESULTS.md``
(``--quick`` writes ``bench/results/quick.md`` instead).
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
RESULTS_DIR = BENCH / "results"

MODELS = {
    # GPT-2 Small / Medium shapes; d_mlp = 4 d_model
    "small": dict(n_layer=12, n_head=12, n_embd=768, n_positions=1024, vocab_size=50257),
    "medium": dict(n_layer=24, n_head=16, n_embd=1024, n_positions=1024, vocab_size=50257),
    # --quick: a few seconds per stage
    "quick": dict(n_layer=2, n_head=4, n_embd=128, n_positions=256, vocab_size=4096),
}
SEED = 0
NOISY = 0.1  # a stage is rerun when other processes used more than this share of the CPUs meanwhile
BATCH = 4  # sequences per forward pass, ours (KernelSettings.batch_size default) and the baseline
N_EVAL = 4  # held-out texts for verification
N_VERIFY = 64  # neurons verified (NeuronSettings.max_neurons default)


# ==================================================================================================
# Model, tokenizer and texts (parent, once)
# ==================================================================================================


def work_dir() -> Path:
    d = Path(tempfile.gettempdir()) / "attnscope-bench"
    d.mkdir(parents=True, exist_ok=True)
    return d


def make_model(name: str) -> Path:
    """Random GPT-2 with ``MODELS[name]`` shapes + a word-level tokenizer of ``vocab_size`` entries (cached)."""
    spec = MODELS[name]
    folder = work_dir() / f"gpt2-{name}-seed{SEED}"
    if all((folder / f).exists() for f in ("config.json", "tokenizer.json", "model.safetensors")):
        return folder
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    V = spec["vocab_size"]
    eos = "<|endoftext|>"
    vocab = {f"t{i}": i for i in range(V - 1)}
    vocab[eos] = V - 1
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=eos))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos, bos_token=eos, unk_token=eos)
    assert len(fast) == V, len(fast)
    torch.manual_seed(SEED)
    cfg = GPT2Config(**spec, bos_token_id=V - 1, eos_token_id=V - 1)
    model = GPT2LMHeadModel(cfg).eval()
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    model.save_pretrained(tmp)
    fast.save_pretrained(tmp)
    tmp.rename(folder)
    return folder


def random_text(path: Path, n_tokens: int, vocab: int, seed: int) -> Path:
    """A text of ``n_tokens`` uniformly random tokens (seeded), written as the words ``t{id}``."""
    import numpy as np

    if not path.exists():
        ids = np.random.default_rng(seed).integers(0, vocab - 1, size=n_tokens)
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        tmp.write_text(" ".join(f"t{i}" for i in ids))
        tmp.rename(path)
    return path


def make_texts(folder: Path, vocab: int, n_ctx: int, n_max: int) -> dict:
    tdir = folder / "texts"
    tdir.mkdir(exist_ok=True)
    samples = random_text(tdir / f"samples-{n_max * n_ctx}.txt", n_max * n_ctx, vocab, seed=1)
    cal = random_text(tdir / f"calibration-{n_ctx}.txt", n_ctx, vocab, seed=2)
    evals = [str(random_text(tdir / f"heldout{i}-{n_ctx}.txt", n_ctx, vocab, seed=10 + i)) for i in range(N_EVAL)]
    return {"samples": str(samples), "calibration": str(cal), "eval": evals}


def warm_token_caches(cfg: dict) -> None:
    """Tokenise every text once (attnscope caches token streams on disk): stages time analysis, not tokenising."""
    from transformers import AutoTokenizer

    from attnscope.neurons import bundled_unigrams
    from attnscope.texts import open_source, tokenize

    tok = AutoTokenizer.from_pretrained(cfg["folder"])
    for p in [cfg["texts"]["samples"], cfg["texts"]["calibration"], *cfg["texts"]["eval"]]:
        tokenize(open_source(p), tok)
    bundled_unigrams(tok, cfg["dims"]["V"])


# ==================================================================================================
# Measurement helpers (child)
# ==================================================================================================


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(field)


def reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def cpu_jiffies() -> tuple[int, int]:
    """``(busy jiffies of the whole machine, jiffies of this process)`` from /proc (0, 0 where unavailable)."""
    try:
        f = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
        busy = sum(int(x) for x in f[:8]) - int(f[3]) - int(f[4])  # all but idle and iowait
        st = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        return busy, int(st[11]) + int(st[12])  # utime + stime of all this process's threads
    except (OSError, IndexError, ValueError):
        return 0, 0


def malloc_trim() -> None:
    """Hand freed heap memory back to the OS, so that a stage's allocations show up as RSS growth instead of
    silently reusing memory its setup freed (glibc keeps freed chunks in the heap)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def measure(fn, *, repeats: int, device: str, setup=None, check=None) -> dict:
    """Best-of-``repeats`` wall time and peak working memory of ``fn()``.

    ``setup()`` (untimed, before each repeat) returns ``fn``'s arguments; ``check(out)`` runs once on the last
    output (device and shape assertions).  Memory: peak RSS (CUDA: peak allocation) above the level right
    before the call, maximised over repeats.
    """
    import torch

    times, peaks, extra = [], [], {}
    busy0, own0 = cpu_jiffies()
    wall0 = time.perf_counter()
    for r in range(repeats):
        args = setup() if setup is not None else ()
        gc.collect()
        sync(device)
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        else:
            malloc_trim()
            base = _status_kb("VmRSS") * 1024
            if not reset_peak_rss():
                raise RuntimeError("cannot reset the peak RSS (/proc/self/clear_refs); Linux >= 4.0 needed")
        t0 = time.perf_counter()
        out = fn(*args)
        sync(device)
        times.append(time.perf_counter() - t0)
        peak = torch.cuda.max_memory_allocated() if device == "cuda" else _status_kb("VmHWM") * 1024
        peaks.append(max(0, peak - base))
        if r == repeats - 1:
            if isinstance(out, tuple) and len(out) == 2 and isinstance(out[1], dict):  # (result, extra timings)
                out, extra = out
            if check is not None:
                extra.update(check(out) or {})
        del out, args
    busy1, own1 = cpu_jiffies()
    hz = os.sysconf("SC_CLK_TCK")
    # share of the machine's CPU used by *other* processes while this stage ran (timings are suspect above ~0.1)
    foreign = max(0.0, (busy1 - busy0) - (own1 - own0)) / hz / ((time.perf_counter() - wall0) * (os.cpu_count() or 1))
    return {"time": min(times), "times": times, "peak_mb": max(peaks) / 2**20, "extra": extra,
            "foreign_cpu": round(foreign, 3)}


def assert_device(t, device: str, what: str):
    """Fail loudly when a result tensor is not on the device asked for (no silent CPU fallback)."""
    import torch

    assert isinstance(t, torch.Tensor), f"{what}: not a tensor"
    if t.device.type != device:
        raise AssertionError(f"{what} is on {t.device}, expected {device}: a stage fell back to another device")
    return t


# ==================================================================================================
# Stages (child).  Each returns measure(...)'s dict.
# ==================================================================================================


def _load(cfg, *, keep_hf=False):
    from attnscope.models import load_model

    return load_model(cfg["folder"], device=cfg["device"], keep_hf=keep_hf)


def _bridge(cfg, hf, tok):
    """TransformerBridge on the given HF model, in compatibility mode (HookedTransformer numerics)."""
    from transformer_lens.model_bridge import TransformerBridge

    bridge = TransformerBridge.boot_transformers(cfg["folder"], hf_model=hf, tokenizer=tok, device=cfg["device"])
    bridge.enable_compatibility_mode()
    return bridge


def _heads(cfg) -> list[int]:
    return list(range(min(6, cfg["dims"]["H"])))


def _circuit(cfg, w):
    from attnscope.circuit import CircuitSettings, build_circuit

    return build_circuit(w, CircuitSettings(calibration=cfg["texts"]["calibration"], n_ctx=cfg["n_ctx"],
                                            heads=_heads(cfg)))


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

    from attnscope.decomposition import layer0_weight_kernels, reference_norm

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


def stage_kernels(cfg, n: int):
    from attnscope.kernels import KernelSettings, analyse_kernels

    dev = cfg["device"]
    w = _load(cfg)
    s = KernelSettings(samples=cfg["texts"]["samples"], n_ctx=cfg["n_ctx"], n_samples=n, n_heldout=0,
                       batch_size=BATCH)

    def check(res):
        assert_device(res.arrays["data_kernel"], dev, "data kernels")
        assert res.arrays["data_kernel"].shape[:2] == (w.n_layers, w.n_heads)
        return {"n_records": len(res.records)}

    return measure(lambda: analyse_kernels(w, s, cache=False, progress=False), repeats=1, device=dev, check=check)


def _windows(cfg, tok, n):
    """The exact token windows analyse_kernels estimates from (same source, seed and count)."""
    from attnscope.texts import load_windows

    win, _ = load_windows(cfg["texts"]["samples"], tok, cfg["n_ctx"], n, seed=0)
    return win.to(cfg["device"])


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
        t_fwd = 0.0
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
        return acc / n, {"forward_s": t_fwd, "impl": impl}

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


def stage_scoring(cfg):
    import torch

    from attnscope.neurons import NeuronSettings, score_neurons

    dev = cfg["device"]
    w = _load(cfg)
    circ = _circuit(cfg, w)

    def check(out):
        effect = out[0]
        assert_device(effect, dev, "neuron effects")
        assert effect.shape == (w.d_mlp,)
        assert torch.isfinite(effect).all()
        return {"swing_pos_head": [round(float(x), 5) for x in out[1][:4]]}

    return measure(lambda: score_neurons(w, circ, NeuronSettings(), progress=False), repeats=2, device=dev,
                   check=check)


def stage_scoring_naive(cfg):
    """The naive way: the whole ``[V, d_mlp]`` score matrix ``Ext' @ W_in'`` in one product, then the same top-m
    reductions over the vocabulary (what score_neurons computes in chunks of 1024 neurons)."""
    import torch

    from attnscope.circuit import mlp_input_weights, true_head_output
    from attnscope.decomposition import centre
    from attnscope.neurons import NeuronSettings

    dev = cfg["device"]
    w = _load(cfg)
    circ = _circuit(cfg, w)
    m = NeuronSettings().top_m

    def run():
        W, _ = mlp_input_weights(w)
        ext = centre(circ.ext, w) / circ.mlp_scale
        cal = circ.calibration_tokens.to(dev)
        p_cal = torch.bincount(cal, minlength=w.d_vocab).to(ext.dtype)
        p_cal = p_cal / p_cal.sum()
        _, pre_cal, _ = true_head_output(w, circ.heads, cal)
        std_cal = pre_cal[circ.settings["min_position"]:].std(0) + 1e-6
        S = ext[circ.token_mask] @ W  # [V, d_mlp] in one go
        mean_cal = (p_cal @ ext) @ W
        sw_pos = S.topk(m, dim=0).values.mean(0) - mean_cal
        sw_neg = (-S).topk(m, dim=0).values.mean(0) + mean_cal
        return torch.maximum(sw_pos, sw_neg) / std_cal, sw_pos

    def check(out):
        assert_device(out[0], dev, "naive neuron effects")
        return {"swing_pos_head": [round(float(x), 5) for x in out[1][:4]]}

    with torch.no_grad():
        return measure(run, repeats=2, device=dev, check=check)


def stage_verify(cfg):
    """find_neurons minus scoring: selection, explanation cards and verification on held-out texts."""
    import torch

    import attnscope.neurons as nm

    dev = cfg["device"]
    w = _load(cfg)
    circ = _circuit(cfg, w)
    scored = nm.score_neurons(w, circ, nm.NeuronSettings(), progress=False)
    nm.score_neurons = lambda *a, **k: scored  # time what find_neurons adds to scoring
    s = nm.NeuronSettings(eval=cfg["texts"]["eval"], effect_min=0.0, outlier_z=-1e9, max_neurons=N_VERIFY)

    def check(res):
        assert len(res.records) == min(N_VERIFY, w.d_mlp), len(res.records)
        assert res.fidelity["n_positions"] > 0
        return {"n_verified": len(res.records), "fidelity": res.fidelity}

    with torch.no_grad():
        return measure(lambda: nm.find_neurons(w, circ, s, progress=False), repeats=2, device=dev, check=check)


def stage_verify_tl(cfg):
    """A TransformerLens user verifying the same neurons: run_with_cache up to layer 0 on each held-out text,
    the chosen heads' summed output (hook_z @ W_O) and its projection on the neurons' input weights."""
    import torch

    import attnscope.neurons as nm
    from attnscope.models import load_hf
    from attnscope.texts import text_tokens

    dev = cfg["device"]
    hf, tok, _ = load_hf(cfg["folder"])
    hf.to(dev)
    bridge = _bridge(cfg, hf, tok)
    texts = [text_tokens(p, tok, max_tokens=cfg["n_ctx"]).to(dev) for p in cfg["texts"]["eval"]]
    heads = _heads(cfg)
    kept = torch.arange(N_VERIFY, device=dev) % cfg["dims"]["d_mlp"]
    del nm

    def run():
        outs = []
        for toks in texts:
            _, cache = bridge.run_with_cache(toks[None], stop_at_layer=1)
            z = cache["blocks.0.attn.hook_z"][0]  # [pos, head, d_head]
            y = torch.einsum("phe,hed->pd", z[:, heads], bridge.W_O[0, heads])
            contrib = (y - y.mean(-1, keepdim=True)) @ bridge.W_in[0][:, kept]
            outs.append(torch.stack([contrib, cache["blocks.0.mlp.hook_pre"][0][:, kept]]))
            del cache
        return outs

    def check(outs):
        assert_device(outs[0], dev, "baseline verification")

    with torch.no_grad():
        return measure(run, repeats=2, device=dev, check=check)


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


STAGES = {
    "machine": stage_machine,
    "extract": stage_extract,
    "extract_tl": stage_extract_tl,
    "layer0": stage_layer0,
    "kernels": stage_kernels,
    "kernels_tl": stage_kernels_tl,
    "forward_tl": stage_forward_tl,
    "circuit": stage_circuit,
    "scoring": stage_scoring,
    "scoring_naive": stage_scoring_naive,
    "verify": stage_verify,
    "verify_tl": stage_verify_tl,
}


def run_child(stage: str, cfg: dict, arg) -> dict:
    fn = STAGES[stage]
    if cfg["device"] == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: no CUDA device is available here (refusing to fall back to CPU)")
    return fn(cfg, arg) if arg is not None else fn(cfg)


# ==================================================================================================
# Floors: FLOPs a stage must do and bytes it must move (fp32, 4 bytes/element)
# ==================================================================================================

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
    # circuit: content factors of every token for each head, log f = key_content[v] . (W_K[h] q[h]) (2 V d H,
    # after folding q into W_K) + the norm of V content vectors (~10 V d); extended embeddings through
    # W_V then W_O for the chosen heads (4 V d n dh); one layer-0 pass on the calibration text; kernels
    # (as layer0) and the positional term K @ (P W_OV) (2 n T^2 d + 4 n T d dh)
    circ_f = (2 * V * d * H + 10 * V * d + 4 * V * d * n_heads * dh + forward_flops(D, 1, T, 1)
              + out["layer0"][0] + 2 * n_heads * pairs * d + 4 * n_heads * T * d * dh)
    circ_b = F32 * (3 * V * d + H * T * T + V * n_heads)
    out["circuit"] = (circ_f, circ_b, "FLOPs 2VdH + 10Vd + 4Vd*n*dh + layer-0 pass(T) + kernels; bytes 4(3Vd + HT^2)")
    # neuron scoring: the [V, d] @ [d, d_mlp] product + top/bottom-m over V per neuron (2 V d_mlp compares)
    out["scoring"] = (2 * V * d * m + 2 * V * m + forward_flops(D, 1, T, 1), F32 * (V * d + d * m),
                      "FLOPs 2*V*d*d_mlp (+ layer-0 pass on calibration); bytes 4(Vd + d*d_mlp)")
    # verification: a layer-0 pass per held-out text, the linear summary K @ Ext[tokens] (2 d T(T+1)/2),
    # projections on the k verified neurons (2 * 2 T d k), their token scores over V (2 V d k)
    k = N_VERIFY
    ver_f = N_EVAL * (forward_flops(D, 1, T, 1) + 2 * d * pairs + 4 * T * d * k) + 2 * V * d * k
    ver_b = F32 * (V * d + N_EVAL * T * d * 4)
    out["verify"] = (ver_f, ver_b, "FLOPs E*(layer-0 pass + 2d*T(T+1)/2 + 4Tdk) + 2Vdk; bytes 4(Vd + 4ETd)")
    return out


# ==================================================================================================
# Parent: orchestration, table, markdown
# ==================================================================================================


def machine_info() -> dict:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    ram = 0.0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                ram = int(line.split()[1]) / 2**20
    except OSError:
        pass
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu": cpu, "cores": os.cpu_count(), "ram_gb": round(ram, 1), "torch": torch.__version__,
            "python": platform.python_version(), "gpu": gpu, "load_avg": os.getloadavg()}


def run_stage(stage: str, cfg: dict, arg=None, *, in_process: bool) -> dict:
    t0 = time.perf_counter()
    if in_process:
        try:
            res = run_child(stage, cfg, arg)
        except AssertionError:
            raise
        except Exception as err:  # noqa: BLE001 - report and go on
            res = {"error": f"{type(err).__name__}: {err}"}
    else:
        with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
            json.dump(cfg, f)
            cpath = f.name
        rpath = cpath + ".out"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--_stage", stage, "--_config", cpath, "--_result", rpath]
        if arg is not None:
            cmd += ["--_arg", str(arg)]
        p = subprocess.run(cmd, capture_output=True, text=True)
        if p.returncode != 0 or not Path(rpath).exists():
            tail = (p.stderr or p.stdout).strip().splitlines()[-3:]
            res = {"error": " | ".join(tail)[-400:]}
            if "AssertionError" in (p.stderr or "") and cfg["device"] == "cuda":
                raise SystemExit(f"stage {stage}: device assertion failed: {res['error']}")
        else:
            res = json.loads(Path(rpath).read_text())
        for q in (cpath, rpath):
            Path(q).unlink(missing_ok=True)
    res["wall_with_setup_s"] = time.perf_counter() - t0
    return res


def wait_quiet(max_s: float = 180, window: float = 10, share: float = 0.1) -> bool:
    """Wait until other processes use less than ``share`` of the CPUs over ``window`` seconds (at most ``max_s``)."""
    t_end = time.perf_counter() + max_s
    hz, n = os.sysconf("SC_CLK_TCK"), os.cpu_count() or 1
    while time.perf_counter() < t_end:
        b0, _ = cpu_jiffies()
        time.sleep(window)
        b1, _ = cpu_jiffies()
        if (b1 - b0) / hz / (window * n) < share:
            return True
    return False


def child_main(a) -> None:
    cfg = json.loads(Path(a._config).read_text())
    os.environ["ATTNSCOPE_CACHE"] = cfg["cache"]
    arg = int(a._arg) if a._arg is not None else None
    res = run_child(a._stage, cfg, arg)
    Path(a._result).write_text(json.dumps(res))


def fmt(x, spec=".2f", none="–"):
    return none if x is None else format(x, spec)


def build_rows(R: dict, cfg: dict) -> list[dict]:
    D = cfg["dims"]
    P, B = R["machine"]["flops"], R["machine"]["bandwidth"]
    fl = floors(D, cfg)
    N, nm = cfg["n_samples"], cfg["n_mem"]

    def t(k):
        return R.get(k, {}).get("time")

    def mem(k):
        return R.get(k, {}).get("peak_mb")

    def floor_s(k):
        f, b, _ = fl[k]
        return max(f / P, b / B)

    spec = [
        ("weight extraction", "extract", "extract_tl", "extract"),
        (f"layer-0 kernels from weights (T={cfg['n_ctx']} queries)", "layer0", None, "layer0"),
        (f"data kernels, all {D['L']} layers, N={N}", "kernels", "kernels_tl", "kernels"),
        (f"data kernels, N={N} vs TL forward alone", "kernels", "forward_tl", "kernels"),
        (f"data kernels, N={nm} (memory vs N)", "kernels_n", None, "kernels_small_n"),
        (f"contextual circuit ({len(_heads(cfg))} forced heads)", "circuit", None, "circuit"),
        (f"neuron scoring ({D['V']} x {D['d_mlp']})", "scoring", "scoring_naive", "scoring"),
        (f"verification ({N_EVAL} held-out texts, {N_VERIFY} neurons)", "verify", "verify_tl", "verify"),
    ]
    rows = []
    for label, ours, base, fk in spec:
        o, b = t(ours), (t(base) if base else None)
        f = floor_s(fk)
        err = R.get(ours, {}).get("error") or (R.get(base, {}).get("error") if base else None)
        noisy = max(R.get(ours, {}).get("foreign_cpu", 0), R.get(base, {}).get("foreign_cpu", 0) if base else 0)
        if noisy > NOISY:
            label += f" (*{noisy:.0%})"
        rows.append({"stage": label, "ours": o, "baseline": b, "ratio": (o / b) if o and b else None,
                     "floor": f, "time_floor": (o / f) if o else None, "peak_mb": mem(ours),
                     "baseline_peak_mb": mem(base) if base else None, "error": err, "key": ours, "base": base})
    # forward alone: the faster of the plain forward passes and the run_with_cache calls (same work + caching)
    fwd = forward_alone(R)
    for r in rows:
        if r["base"] == "forward_tl" and fwd is not None and r["ours"]:
            r["baseline"], r["ratio"] = fwd, r["ours"] / fwd
    return rows


def forward_alone(R: dict) -> float | None:
    """The baseline's forward passes alone: min(plain bridge forward, run_with_cache calls of kernels_tl).
    Both do the same forward; run-to-run noise on this machine is ~10%, so the faster is the fair floor."""
    ts = [R.get("forward_tl", {}).get("time"), R.get("kernels_tl", {}).get("extra", {}).get("forward_s")]
    ts = [t for t in ts if t]
    return min(ts) if ts else None


def targets(R: dict, cfg: dict) -> list[tuple[str, bool | None, str]]:
    out = []
    k, f = R.get("kernels", {}).get("time"), forward_alone(R)
    if k and f:
        out.append(("data kernels at most as slow as the baseline's forward passes alone", k <= f,
                    f"{k:.1f} s vs {f:.1f} s ({k / f:.2f}x)"))
    s = R.get("scoring", {}).get("time")
    if s:
        D = cfg["dims"]
        out.append((f"neuron scoring over {D['V']} x {D['d_mlp']} in seconds ({os.cpu_count()} cores; < 10 s)",
                    s < 10, f"{s:.2f} s"))
    m1, m2 = R.get("kernels_n", {}).get("peak_mb"), R.get("kernels", {}).get("peak_mb")
    if m1 is not None and m2 is not None:
        ok = m2 <= 1.15 * m1 + 64
        out.append(("data-kernel peak memory independent of N", ok,
                    f"N={cfg['n_mem']}: {m1:.0f} MB, N={cfg['n_samples']}: {m2:.0f} MB"))
    return out


def print_table(rows, tg, cfg, R) -> None:
    from rich.console import Console
    from rich.table import Table

    c = Console(width=None if sys.stdout.isatty() else 180)
    tb = Table(title=f"attnscope benchmark: GPT-2 {cfg['model']} shapes (random weights), N={cfg['n_samples']}, "
                     f"n_ctx={cfg['n_ctx']}, {cfg['device']}")
    for col in ("stage", "ours (s)", "baseline (s)", "ratio", "floor (s)", "time/floor", "peak memory (MB)",
                "baseline peak (MB)"):
        tb.add_column(col, justify="left" if col == "stage" else "right")
    for r in rows:
        tb.add_row(r["stage"] + (f" [red]({r['error'][:60]})[/red]" if r["error"] else ""), fmt(r["ours"], ".3f"),
                   fmt(r["baseline"], ".3f"), fmt(r["ratio"], ".2f"), fmt(r["floor"], ".3f"),
                   fmt(r["time_floor"], ".1f"), fmt(r["peak_mb"], ".0f"), fmt(r["baseline_peak_mb"], ".0f"))
    c.print(tb)
    m = R["machine"]
    c.print(f"machine: {m['flops'] / 1e9:.0f} GFLOP/s fp32 matmul, {m['bandwidth'] / 1e9:.1f} GB/s copy")
    for name, ok, detail in tg:
        c.print(f"target: {name}: {'[green]met[/green]' if ok else '[red]not met[/red]'} ({detail})")


def markdown(results: list[tuple[dict, dict]]) -> str:
    lines = ["# attnscope benchmark results", "",
             "Generated by `bench/run.py` (see `docs/benchmark.md` for what each stage measures and the floors).", ""]
    for R, cfg in results:
        mi, m = R["info"], R["machine"]
        rows, tg = build_rows(R, cfg), targets(R, cfg)
        D = cfg["dims"]
        lines += [
            f"## GPT-2 {cfg['model']} shapes ({D['L']} layers x {D['H']} heads, d_model {D['d']}, vocab {D['V']})", "",
            f"* date: {R['date']}",
            f"* machine: {mi['cpu']}, {mi['cores']} cores, {mi['ram_gb']} GB RAM"
            + (f", GPU {mi['gpu']}" if mi.get("gpu") else "") + f"; load average at start {mi['load_avg'][0]:.2f}",
            f"* torch {mi['torch']}, Python {mi['python']}, {m['threads']} threads, device {cfg['device']}",
            f"* N = {cfg['n_samples']} samples, n_ctx = {cfg['n_ctx']}, batch {BATCH}; measured {m['flops'] / 1e9:.0f} "
            f"GFLOP/s (fp32 {m['matmul_n']}^3 matmul), {m['bandwidth'] / 1e9:.1f} GB/s (copy, read+write)",
            f"* command: `{cfg['command']}`", "",
            "| stage | ours (s) | baseline (s) | ratio | floor (s) | time/floor | peak memory (MB) "
            "| baseline peak (MB) |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in rows:
            st = r["stage"] + (f" (error: {r['error'][:80]})" if r["error"] else "")
            lines.append(f"| {st} | {fmt(r['ours'], '.3f')} | {fmt(r['baseline'], '.3f')} | {fmt(r['ratio'])} | "
                         f"{fmt(r['floor'], '.3f')} | {fmt(r['time_floor'], '.1f')} | {fmt(r['peak_mb'], '.0f')} | "
                         f"{fmt(r['baseline_peak_mb'], '.0f')} |")
        kt = R.get("kernels_tl", {}).get("extra", {})
        lines += ["", "Baselines: weight extraction = `TransformerBridge.boot_transformers(folder, hf_model=hf)` + "
                  "`enable_compatibility_mode()`; data kernels = `run_with_cache` per batch of "
                  f"{BATCH} + average of `hook_pattern` per layer/head ({kt.get('impl', '?')}"
                  + (f"; of which run_with_cache {kt['forward_s']:.1f} s" if "forward_s" in kt else "")
                  + "); forward alone = the faster of the bridge's plain forward on the same batches (no cache) "
                  "and the run_with_cache calls above (the same forward; run-to-run noise is ~10%); "
                  "neuron scoring = the whole `[V, d_mlp]` product in one go + the same top-m reductions; verification = "
                  "`run_with_cache(stop_at_layer=1)` on the same held-out texts + the heads' output projected on "
                  "the neurons. Ratio = ours / baseline (< 1: ours faster). Peak memory = rise of peak RSS above "
                  "the RSS before the stage (model and inputs already loaded). `(*x%)` after a stage: other "
                  "processes used x% of the CPUs while it ran (after retries), so its time is inflated.", "",
                  "Targets:", ""]
        for name, ok, detail in tg:
            lines.append(f"* {name}: **{'met' if ok else 'not met'}** ({detail})")
        lines += [""]
    return "\n".join(lines) + "\n"


DOCS = BENCH.parent / "docs" / "benchmark.md"
START, END = "<!-- results:start (written by bench/run.py) -->", "<!-- results:end -->"


def update_docs(md: str) -> None:
    """Copy the results (RESULTS.md without its title) between the markers of docs/benchmark.md."""
    if not DOCS.exists():
        return
    text = DOCS.read_text()
    if START not in text or END not in text:
        return
    body = md.split("\n", 1)[1].strip().replace("## GPT-2", "### GPT-2")
    head, rest = text.split(START, 1)
    DOCS.write_text(head + START + "\n\n" + body + "\n\n" + END + rest.split(END, 1)[1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=["small", "medium"], default="small")
    ap.add_argument("--n-samples", type=int, default=32, help="samples for the data kernels (max 500)")
    ap.add_argument("--n-ctx", type=int, default=1024)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--quick", action="store_true", help="tiny model, few samples, in-process (< 1 min smoke check)")
    ap.add_argument("--in-process", action="store_true", help="run stages in this process (less isolated memory)")
    ap.add_argument("--stages", default=None, help="comma-separated subset of stages (default: all)")
    ap.add_argument("--retries", type=int, default=2,
                    help="reruns of a stage during which other processes used > 10%% of the CPUs (default 2)")
    ap.add_argument("--no-write", action="store_true", help="do not write bench/results or RESULTS.md")
    ap.add_argument("--_stage", help=argparse.SUPPRESS)
    ap.add_argument("--_config", help=argparse.SUPPRESS)
    ap.add_argument("--_result", help=argparse.SUPPRESS)
    ap.add_argument("--_arg", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a._stage:
        child_main(a)
        return 0
    if not 1 <= a.n_samples <= 500:
        ap.error("--n-samples must be in 1..500")
    if a.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            print("error: --device cuda but torch sees no CUDA device; refusing to fall back to CPU", file=sys.stderr)
            return 2
    name = "quick" if a.quick else a.model
    spec = MODELS[name]
    n_ctx = min(a.n_ctx, spec["n_positions"])
    n = 8 if a.quick else a.n_samples
    n_mem = min(n, max(BATCH, n // 4))  # at least one full batch: peak memory depends on the batch size
    in_process = a.in_process or a.quick
    wd = work_dir()
    cache = wd / "cache"
    os.environ["ATTNSCOPE_CACHE"] = str(cache)
    t_start = time.perf_counter()
    load1 = os.getloadavg()[0]
    if load1 > 0.5 * (os.cpu_count() or 1):
        print(f"warning: load average {load1:.1f} on {os.cpu_count()} cores: other processes are running, "
              "timings will be noisy", file=sys.stderr)
    print(f"preparing GPT-2 {name} (random weights, seed {SEED}) in {wd} ...", flush=True)
    folder = make_model(name)
    D = {"L": spec["n_layer"], "H": spec["n_head"], "d": spec["n_embd"], "dh": spec["n_embd"] // spec["n_head"],
         "d_mlp": 4 * spec["n_embd"], "V": spec["vocab_size"]}
    cfg = {"model": name, "folder": str(folder), "device": a.device, "n_ctx": n_ctx, "n_samples": n, "n_mem": n_mem,
           "dims": D, "cache": str(cache),
           "command": " ".join(["bench/run.py", *(argv if argv is not None else sys.argv[1:])]),
           "texts": make_texts(folder, spec["vocab_size"], n_ctx, max(n, 8) + 8)}
    if a.quick:
        cfg.update(matmul_n=1024, copy_bytes=64 * 2**20)
    warm_token_caches(cfg)
    plan = [("machine", None), ("extract", None), ("extract_tl", None), ("layer0", None), ("kernels", n),
            ("kernels_n", n_mem), ("kernels_tl", n), ("forward_tl", n), ("circuit", None), ("scoring", None),
            ("scoring_naive", None), ("verify", None), ("verify_tl", None)]
    if a.stages:
        keep = set(a.stages.split(",")) | {"machine"}
        plan = [p for p in plan if p[0] in keep]
    R: dict = {"date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "info": machine_info()}
    prev = RESULTS_DIR / f"{name}-{a.device}.json"
    partial = bool(a.stages)  # a subset that cannot be merged into a stored run is written on its own
    if a.stages and prev.exists():  # a subset: update the stored run of the same configuration
        old = json.loads(prev.read_text())
        same = all(old["config"].get(k) == cfg[k] for k in ("n_ctx", "n_samples", "device"))
        if same:
            partial = False
            if "kernels_n" not in a.stages.split(","):
                cfg["n_mem"] = old["config"]["n_mem"]
            R = {**old["results"], "date": R["date"] + f" (stages {a.stages} rerun; others {old['results']['date']})",
                 "info": R["info"]}
    for stage, arg in plan:
        print(f"  {stage}{'' if arg is None else f' (N={arg})'} ...", end=" ", flush=True)
        res = run_stage("kernels" if stage == "kernels_n" else stage, cfg, arg, in_process=in_process)
        for _ in range(a.retries if not in_process else 0):
            if res.get("foreign_cpu", 0) <= NOISY:
                break
            print(f"{res.get('time', 0):.3f} s, but other processes used {res['foreign_cpu']:.0%} of the CPUs: "
                  "waiting for quiet and running again ...", end=" ", flush=True)
            wait_quiet()
            again = run_stage("kernels" if stage == "kernels_n" else stage, cfg, arg, in_process=in_process)
            if "error" not in again and again.get("foreign_cpu", 1) < res.get("foreign_cpu", 1):
                res = again
        R[stage] = res
        print(f"error: {res['error']}" if "error" in res else
              f"{res.get('time', 0):.3f} s" + (f" (other processes: {res['foreign_cpu']:.0%} of the CPUs)"
                                              if res.get("foreign_cpu", 0) > NOISY else "")
              if "time" in res else "done", flush=True)
    print(f"total {time.perf_counter() - t_start:.0f} s", flush=True)
    rows, tg = build_rows(R, cfg), targets(R, cfg)
    print_table(rows, tg, cfg, R)
    if not a.no_write:
        RESULTS_DIR.mkdir(exist_ok=True)
        if partial:
            out = RESULTS_DIR / f"{name}-{a.device}-partial.json"
            out.write_text(json.dumps({"results": R, "config": cfg}, indent=1))
            print(f"partial run written to {out} (RESULTS.md unchanged)")
            return 0
        (RESULTS_DIR / f"{name}-{a.device}.json").write_text(json.dumps({"results": R, "config": cfg}, indent=1))
        if a.quick:
            (RESULTS_DIR / "quick.md").write_text(markdown([(R, cfg)]))
        else:
            runs = []
            for mname in ("small", "medium"):
                for dev in ("cpu", "cuda"):
                    p = RESULTS_DIR / f"{mname}-{dev}.json"
                    if p.exists():
                        d = json.loads(p.read_text())
                        runs.append((d["results"], d["config"]))
            md = markdown(runs)
            (BENCH / "RESULTS.md").write_text(md)
            update_docs(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
