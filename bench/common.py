"""Shared pieces of the benchmark: constants, the random GPT-2 models and texts, and the measurement helpers.

Everything here runs in the parent (model, texts, token caches) or in a stage's child process (``measure``).
"""

from __future__ import annotations

import gc
import os
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
    # two windows per held-out text: find_neurons tunes its threshold on the first and reports on the second
    evals = [str(random_text(tdir / f"heldout{i}-{2 * n_ctx}.txt", 2 * n_ctx, vocab, seed=10 + i))
             for i in range(N_EVAL)]
    return {"samples": str(samples), "calibration": str(cal), "eval": evals}


def warm_token_caches(cfg: dict) -> None:
    """Tokenise every text once (attnscope caches token streams on disk): stages time analysis, not tokenising."""
    from transformers import AutoTokenizer

    from attnscope.core.texts import open_source, tokenize

    tok = AutoTokenizer.from_pretrained(cfg["folder"])
    for p in [cfg["texts"]["samples"], cfg["texts"]["calibration"], *cfg["texts"]["eval"]]:
        tokenize(open_source(p), tok)



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


def rate_probe(device: str, n: int = 1536, repeats: int = 3) -> float:
    """Best fp32 matmul rate (FLOP/s) of a few ``n^3`` products right now: taken before and after a stage, it
    gives that stage's floor at the rate the machine offered meanwhile (on a shared machine the rate measured
    once at the start says little about a stage that runs minutes later)."""
    import torch

    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    best = 0.0
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        a @ b
        sync(device)
        best = max(best, 2 * n**3 / (time.perf_counter() - t0))
    return best


def assert_device(t, device: str, what: str):
    """Fail loudly when a result tensor is not on the device asked for (no silent CPU fallback)."""
    import torch

    assert isinstance(t, torch.Tensor), f"{what}: not a tensor"
    if t.device.type != device:
        raise AssertionError(f"{what} is on {t.device}, expected {device}: a stage fell back to another device")
    return t


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
    from attnscope.circuit.build import CircuitSettings, build_circuit

    return build_circuit(w, CircuitSettings(calibration=cfg["texts"]["calibration"], n_ctx=cfg["n_ctx"],
                                            heads=_heads(cfg)))


def _windows(cfg, tok, n):
    """The exact token windows ``analyse_kernels`` reads for ``n`` windows in all (same source, seed, count and
    BOS token: the bench models' config has a BOS token, so attnscope prepends it)."""
    from attnscope.core.texts import load_windows

    win, _ = load_windows(cfg["texts"]["samples"], tok, cfg["n_ctx"], n, seed=0, bos_token_id=tok.bos_token_id)
    return win.to(cfg["device"])
