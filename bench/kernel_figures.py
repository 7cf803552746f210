"""Time kernel_figures on a GPT-2-Small-shaped random model's kernels (12 x 12 heads, n_ctx 1024):
`python bench/kernel_figures.py`."""
import tempfile
import time
from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from attnscope.kernels.analysis import KernelSettings, analyse_kernels
from attnscope.models import extract_weights, load_model
from attnscope.report.plots import kernel_figures

torch.manual_seed(0)
w = load_model("demo")  # tokenizer only
hf = GPT2LMHeadModel(GPT2Config(n_layer=12, n_head=12, n_embd=768, n_positions=1024, vocab_size=w.d_vocab)).eval()
w = extract_weights(hf, name="gpt2-small-shape", tokenizer=w.tokenizer)
t0 = time.perf_counter()
res = analyse_kernels(w, KernelSettings(n_ctx=1024, n_samples=1, n_heldout=1, batch_size=1), cache=False,
                      progress=False)
t1 = time.perf_counter()
out = Path(tempfile.mkdtemp())
for i in range(3):
    c0, p0 = time.perf_counter(), time.process_time()
    figs = kernel_figures(res, out)
    print(f"figures run {i}: {len(figs)} figures, wall {time.perf_counter() - c0:.2f} s, "
          f"cpu {time.process_time() - p0:.2f} s")
print(f"(analysis {t1 - t0:.1f} s)")
