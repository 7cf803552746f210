"""The results: table rows, targets, the console table, RESULTS.md and the copy in docs/benchmark.md."""

from __future__ import annotations

import os
import sys

from common import BATCH, BENCH, N_EVAL, N_VERIFY, NOISY, _heads
from floors import floors


def fmt(x, spec=".2f", none="–"):
    return none if x is None else format(x, spec)


def over(R: dict, key: str, n: int, col: int = 1) -> float | None:
    """Time of a streaming baseline ``R[key]`` over its first ``n`` windows, from the cumulative times it
    records after each batch (``col`` 1: everything, 2: the forward calls alone)."""
    for mark in R.get(key, {}).get("extra", {}).get("cumulative", []):
        if mark[0] >= n and len(mark) > col:
            return mark[col]
    return None


def pair_keys(R: dict) -> list[tuple[str, str]]:
    """``(hf_eager key, command key)`` of every interleaved pair that ran."""
    out, p = [], 1
    while True:
        sfx = "" if p == 1 else f"#{p}"
        if f"command{sfx}" not in R and f"hf_eager{sfx}" not in R:
            return out
        out.append((f"hf_eager{sfx}", f"command{sfx}"))
        p += 1


def estimate_time(R: dict, ck: str) -> tuple[float | None, str]:
    """The estimation over N windows: the command's own estimate step when the library has one, else the
    ``kernels`` stage (the analysis with no held-out windows)."""
    st = R.get(ck, {}).get("extra", {}).get("estimate_s")
    if st is not None:
        return st, ck
    return R.get("kernels", {}).get("time"), "kernels"


def _row(R, label, o, b, f, ours, base, peak_key=None) -> dict:
    err = R.get(ours, {}).get("error") or (R.get(base, {}).get("error") if base else None)
    noisy = max(R.get(ours, {}).get("foreign_cpu", 0), R.get(base, {}).get("foreign_cpu", 0) if base else 0)
    if noisy > NOISY:
        label += f" (*{noisy:.0%})"
    pk = peak_key or ours
    return {"stage": label, "ours": o, "baseline": b, "ratio": (o / b) if o and b else None, "floor": f,
            "time_floor": (o / f) if o and f else None, "peak_mb": R.get(pk, {}).get("peak_mb"),
            "baseline_peak_mb": R.get(base, {}).get("peak_mb") if base else None, "error": err, "key": ours,
            "base": base}


def build_rows(R: dict, cfg: dict) -> list[dict]:
    D = cfg["dims"]
    P, B = R["machine"]["flops"], R["machine"]["bandwidth"]
    fl = floors(D, cfg)
    N, nm, nh = cfg["n_samples"], cfg["n_mem"], cfg.get("n_heldout", 0)

    def t(k):
        return R.get(k, {}).get("time") if k else None

    def floor_s(k):
        f, b, _ = fl[k]
        return max(f / P, b / B)

    rows = [_row(R, "weight extraction", t("extract"), t("extract_tl"), floor_s("extract"), "extract", "extract_tl"),
            _row(R, f"layer-0 kernels from weights (T={cfg['n_ctx']} queries)", t("layer0"), None,
                 floor_s("layer0"), "layer0", None),
            _row(R, f"data kernels, all {D['L']} layers, N={N} (vs TL run_with_cache)", t("kernels"),
                 over(R, "kernels_tl", N) or t("kernels_tl"), floor_s("kernels"), "kernels", "kernels_tl"),
            _row(R, f"data kernels, N={N} vs TL forward alone", t("kernels"), forward_alone(R, N),
                 floor_s("kernels"), "kernels", "forward_tl"),
            _row(R, f"data kernels, N={nm} (memory vs N)", t("kernels_n"), None, floor_s("kernels_small_n"),
                 "kernels_n", None)]
    for hk, ck in pair_keys(R):
        sfx = ck[len("command"):]
        est, src = estimate_time(R, ck)
        rows.append(_row(R, f"estimation, N={N} (vs HF eager over the same {N}){sfx}", est, over(R, hk, N),
                         floor_s("kernels"), src, hk, peak_key="kernels"))
        rows.append(_row(R, f"whole `attnscope kernels`, {N}+{nh} windows (vs HF eager, same {N + nh}){sfx}",
                         t(ck), t(hk), floor_s("command"), ck, hk))
        rows.append(_row(R, f"whole `attnscope kernels` vs TL run_with_cache, same {N + nh}{sfx}", t(ck),
                         over(R, "kernels_tl", N + nh), floor_s("command"), ck, "kernels_tl"))
        figs = R.get(ck, {}).get("extra", {}).get("figures_s")
        rows.append(_row(R, f"figures (4 kernel figures){sfx}", figs, None, None, ck, None))
    rows += [_row(R, f"contextual circuit ({len(_heads(cfg))} forced heads)", t("circuit"), None,
                  floor_s("circuit"), "circuit", None),
             _row(R, f"neuron scoring ({D['V']} x {D['d_mlp']})", t("scoring"), t("scoring_naive"),
                  floor_s("scoring"), "scoring", "scoring_naive"),
             _row(R, f"verification ({N_EVAL} held-out texts, {N_VERIFY} neurons)", t("verify"), t("verify_tl"),
                  floor_s("verify"), "verify", "verify_tl")]
    for r in rows:  # the figures row has its own peak; everything without a time is dropped
        if r["stage"].startswith("figures"):
            r["peak_mb"] = None
    return [r for r in rows if r["ours"] is not None or r["error"]]


def forward_alone(R: dict, n: int) -> float | None:
    """The baseline's forward passes alone over ``n`` windows: min(plain bridge forward, run_with_cache calls of
    kernels_tl).  Both do the same forward; run-to-run noise on this machine is ~10%, so the faster is the
    fair floor."""
    ts = [R.get("forward_tl", {}).get("time"), over(R, "kernels_tl", n, col=2)]
    ts = [t for t in ts if t]
    return min(ts) if ts else None


def _median(xs: list[float]) -> float:
    xs = sorted(xs)
    return xs[len(xs) // 2] if len(xs) % 2 else 0.5 * (xs[len(xs) // 2 - 1] + xs[len(xs) // 2])


def targets(R: dict, cfg: dict) -> list[tuple[str, bool | None, str]]:
    out = []
    N, nh = cfg["n_samples"], cfg.get("n_heldout", 0)
    P, B = R["machine"]["flops"], R["machine"]["bandwidth"]
    fk = floors(cfg["dims"], cfg)["kernels"]
    k, f, floor = R.get("kernels", {}).get("time"), forward_alone(R, N), max(fk[0] / P, fk[1] / B)
    if k and f:
        out.append(("data kernels at most as slow as the baseline's forward passes alone", k <= f,
                    f"{k:.1f} s vs {f:.1f} s ({k / f:.2f}x)"))
    if k:
        rates = R["kernels"].get("extra", {}).get("rate_flops")
        local = ""
        if rates:  # the floor at the matmul rate the machine offered around the stage (mean of before / after)
            floor_l = max(fk[0] / (sum(rates) / len(rates)), fk[1] / B)
            local = f"; at the rate measured around the stage ({sum(rates) / len(rates) / 1e9:.0f} GFLOP/s): " \
                    f"floor {floor_l:.1f} s, {k / floor_l:.2f}x"
            floor = floor_l
        out.append(("data-kernel stage <= 1.5x its FLOP floor", k <= 1.5 * floor,
                    f"{k:.1f} s; floor at the start-of-run rate {max(fk[0] / P, fk[1] / B):.1f} s{local}"))
    pairs = [(hk, ck) for hk, ck in pair_keys(R) if R.get(ck, {}).get("time") and R.get(hk, {}).get("time")]
    if pairs:
        est = [estimate_time(R, ck)[0] / over(R, hk, N) for hk, ck in pairs
               if over(R, hk, N) and estimate_time(R, ck)[0]]
        whole = [R[ck]["time"] / R[hk]["time"] for hk, ck in pairs]
        figs = [R[ck]["extra"].get("figures_s") for _, ck in pairs if R[ck]["extra"].get("figures_s")]
        if est:
            out.append((f"estimation over N={N} windows <= 0.6x HF eager over the same windows",
                        _median(est) <= 0.6, "ratio " + ", ".join(f"{x:.2f}" for x in est) + " (per pair)"))
        out.append((f"whole `attnscope kernels` ({N}+{nh} windows) <= 0.8x HF eager over the same windows",
                    _median(whole) <= 0.8, "ratio " + ", ".join(f"{x:.2f}" for x in whole) + " (per pair)"))
        if figs:
            out.append(("figures <= 2 s in all", max(figs) <= 2.0, ", ".join(f"{x:.2f} s" for x in figs)))
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
                  + f"; run over the {cfg['n_samples']}+{cfg.get('n_heldout', 0)} windows of the whole-command "
                  "row, the first N of them timed for the data-kernel rows"
                  + "); HF eager = a Hugging Face forward with `attn_implementation=\"eager\"` and "
                  "`output_attentions=True`, batch 4, summing the patterns of every layer and head over the same "
                  "windows (model load excluded on both sides); whole `attnscope kernels` = analysis (estimation + "
                  "held-out validation), save, the four figures and the summary, model already loaded"
                  + "; forward alone = the faster of the bridge's plain forward on the same batches (no cache) "
                  "and the run_with_cache calls above (the same forward; run-to-run noise is ~10%); "
                  "neuron scoring = `score` with its swings from the whole `[V, d_mlp]` product in one go + the "
                  "same top-m reductions; verification = `run_with_cache(stop_at_layer=1)` on the same held-out "
                  "windows (both halves: MLP-0 pre-activation of every neuron) + on the reporting windows the "
                  "heads' output projected on the reported and random neurons. Ratio = ours / baseline "
                  "(< 1: ours faster). Peak memory = rise of peak RSS above the RSS before the stage (model and "
                  "inputs already loaded). `(*x%)` after a stage: other "
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
