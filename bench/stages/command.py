"""The whole ``attnscope kernels`` command against the fixed baseline of issue 14.

* ``command``: what ``attnscope kernels MODEL --n-ctx T --no-cache`` does once the model is loaded, with the
  library calls the CLI makes: the analysis (estimation over ``n_samples`` windows, validation over
  ``n_heldout`` further windows), saving ``kernels.json`` / ``kernels.safetensors``, the four figures and
  the summary table.  Each step is timed on its own as well.
* ``hf_eager``: the baseline.  A plain Hugging Face forward with eager attention and
  ``output_attentions=True``, in batches of 4, summing the patterns of every layer and head over the same
  ``n_samples + n_heldout`` windows (``load_windows`` with the same source, seed, count and BOS token), then
  dividing by their number: the mean attention, i.e. the simplest estimate of the kernels.  The cumulative
  time after each batch is recorded, so the same run also gives the baseline over the first
  ``n_samples`` windows (the estimation windows).

Model load is excluded on both sides (done before the timed call).  Both run with ``cfg["threads"]`` torch
threads (2, the issue's setting).
"""

from __future__ import annotations

import io
import tempfile
import time
from contextlib import redirect_stdout
from pathlib import Path

from common import BATCH, _load, _windows, assert_device, measure, sync


def stage_hf_eager(cfg, n: int):
    """Mean attention over the first ``n`` windows from ``hf(batch, output_attentions=True)``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dev = cfg["device"]
    hf = AutoModelForCausalLM.from_pretrained(cfg["folder"], attn_implementation="eager").eval().to(dev)
    tok = AutoTokenizer.from_pretrained(cfg["folder"])
    win = _windows(cfg, tok, n)
    L, H, T = cfg["dims"]["L"], cfg["dims"]["H"], win.shape[1]

    def run():
        acc = torch.zeros(L, H, T, T, device=dev)
        marks = []
        t0 = time.perf_counter()
        for b0 in range(0, n, BATCH):
            out = hf(win[b0 : b0 + BATCH], output_attentions=True)
            for l, a in enumerate(out.attentions):
                acc[l] += a.sum(0)
            del out
            sync(dev)
            marks.append([min(n, b0 + BATCH), time.perf_counter() - t0])
        return acc / n, {"cumulative": marks, "impl": f"transformers {_tf_version()} eager, output_attentions=True"}

    def check(mean_attn):
        assert_device(mean_attn, dev, "baseline mean attention")
        assert torch.allclose(mean_attn[0, 0, -1].sum(), torch.ones((), device=dev), atol=1e-3)

    with torch.no_grad():
        return measure(run, repeats=1, device=dev, check=check)


def _tf_version() -> str:
    import transformers

    return transformers.__version__


def baseline_over(res: dict, n: int) -> float | None:
    """Time of the baseline ``res`` (an ``hf_eager`` result) over its first ``n`` windows."""
    for count, t in res.get("extra", {}).get("cumulative", []):
        if count >= n:
            return t
    return None


def stage_command(cfg, n: int):
    """``attnscope kernels`` at ``n`` estimation + ``cfg["n_heldout"]`` held-out windows, model already loaded."""
    import torch

    from attnscope.kernels import analysis as K
    from attnscope.report.plots import kernel_figures

    dev = cfg["device"]
    w = _load(cfg)
    s = K.KernelSettings(samples=cfg["texts"]["samples"], n_ctx=cfg["n_ctx"], n_samples=n,
                         n_heldout=cfg["n_heldout"], batch_size=BATCH)
    out = Path(tempfile.mkdtemp(prefix="attnscope-bench-command-"))

    def run():
        steps = {}
        t0 = time.perf_counter()
        res = _analyse(K, w, s, steps)
        t1 = time.perf_counter()
        res.save(out)
        t2 = time.perf_counter()
        figs = kernel_figures(res, out)
        t3 = time.perf_counter()
        _summary(res)
        t4 = time.perf_counter()
        steps.update(analysis_s=t1 - t0, save_s=t2 - t1, figures_s=t3 - t2, summary_s=t4 - t3, n_figures=len(figs))
        return res, steps

    def check(res):
        for k, t in res.arrays.items():
            assert_device(t, dev, f"KernelResult.arrays[{k!r}]")
        assert res.arrays["data_kernel"].shape[:2] == (w.n_layers, w.n_heads)
        return {"n_records": len(res.records)}

    with torch.no_grad():
        return measure(run, repeats=1, device=dev, check=check)


def _analyse(K, w, s, steps: dict):
    """``analyse_kernels(w, s, cache=False)`` through its public steps (the same calls, in the same order), so
    that the estimation and the validation are timed on their own."""
    from dataclasses import asdict

    dev = w.device.type
    t0 = time.perf_counter()
    s = s.resolved(w)
    windows, prov = K.load_windows(K._samples_spec(s.samples), w.tokenizer, s.n_ctx, s.n_samples + s.n_heldout,
                                   seed=s.seed, bos_token_id=w.analysis_bos)
    windows = windows.to(w.device)
    est_windows, held = windows[: s.n_samples], windows[s.n_samples :]
    t1 = time.perf_counter()
    est = K.estimate_kernels(w, s, est_windows)
    sync(dev)
    t2 = time.perf_counter()
    val = K.validate_kernels(w, s, est, held)
    sync(dev)
    t3 = time.perf_counter()
    arrays, consistency = K.kernel_arrays(w, s, est, val, est_windows)
    records = K.head_records(w, est, val, arrays, consistency)
    res = K.KernelResult(model=w.info(), settings=asdict(s), provenance=prov, query_positions=est.query_positions,
                         records=records, arrays=arrays, ref_norms=est.ref_norms)
    sync(dev)
    steps.update(windows_s=t1 - t0, estimate_s=t2 - t1, validate_s=t3 - t2, properties_s=time.perf_counter() - t3)
    return res


def _summary(res) -> None:
    """The CLI's summary table (printed to a buffer: the table is built and rendered, not shown)."""
    try:
        from attnscope.cli.show import print_kernel_summary
    except ImportError:  # the CLI was reorganised: the summary is a few ms either way
        return
    with redirect_stdout(io.StringIO()):
        print_kernel_summary(res)
