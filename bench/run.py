#!/usr/bin/env python
"""Benchmark attnscope's stages on GPT-2-Small/Medium-shaped models against TransformerLens and Hugging Face.

    .venv/bin/python bench/run.py [--model small|medium] [--n-samples 32] [--n-heldout 8] [--n-ctx 1024]
                                  [--device cpu|cuda] [--quick] [--stages a,b] [--pairs 1]

This file is the runner: it prepares the model and texts, runs every stage (``stages/``, one module per
stage) in a fresh subprocess, and writes the results (``tables.py``; floors in ``floors.py``; shared helpers
in ``common.py``).  See docs/benchmark.md for what each stage measures.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    BATCH,
    BENCH,
    MODELS,
    NOISY,
    RESULTS_DIR,
    SEED,
    make_model,
    make_texts,
    wait_quiet,
    warm_token_caches,
    work_dir,
)
from stages import run_child  # noqa: E402
from tables import build_rows, markdown, print_table, targets, update_docs  # noqa: E402


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


def child_main(a) -> None:
    cfg = json.loads(Path(a._config).read_text())
    os.environ["ATTNSCOPE_CACHE"] = cfg["cache"]
    arg = int(a._arg) if a._arg is not None else None
    res = run_child(a._stage, cfg, arg)
    Path(a._result).write_text(json.dumps(res))


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=["small", "medium"], default="small")
    ap.add_argument("--n-samples", type=int, default=32, help="estimation windows (max 500)")
    ap.add_argument("--n-heldout", type=int, default=8,
                    help="held-out windows of the whole-command comparison (the CLI's default: 8)")
    ap.add_argument("--n-ctx", type=int, default=1024)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--threads", type=int, default=2, help="torch threads in every stage (the issue's baseline: 2)")
    ap.add_argument("--quick", action="store_true", help="tiny model, few samples, in-process (< 1 min smoke check)")
    ap.add_argument("--in-process", action="store_true", help="run stages in this process (less isolated memory)")
    ap.add_argument("--stages", default=None, help="comma-separated subset of stages (default: all)")
    ap.add_argument("--pairs", type=int, default=1,
                    help="how often the Hugging Face baseline and the whole command run, interleaved (default 1)")
    ap.add_argument("--retries", type=int, default=2,
                    help="reruns of a stage during which other processes used > 10%% of the CPUs (default 2)")
    ap.add_argument("--replace", action="store_true",
                    help="with --stages: store the subset as this configuration's run (dropping the stored one)")
    ap.add_argument("--no-write", action="store_true", help="do not write bench/results or RESULTS.md")
    for hidden in ("--_stage", "--_config", "--_result", "--_arg"):
        ap.add_argument(hidden, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if not a._stage and not 1 <= a.n_samples <= 500:
        ap.error("--n-samples must be in 1..500")
    if not a._stage and (a.n_heldout < 0 or a.pairs < 1):
        ap.error("--n-heldout must be >= 0 and --pairs >= 1")
    return a


def make_config(a, argv) -> dict:
    name = "quick" if a.quick else a.model
    spec = MODELS[name]
    n_ctx = min(a.n_ctx, spec["n_positions"])
    n = 8 if a.quick else a.n_samples
    n_held = 2 if a.quick else a.n_heldout
    print(f"preparing GPT-2 {name} (random weights, seed {SEED}) in {work_dir()} ...", flush=True)
    folder = make_model(name)
    D = {"L": spec["n_layer"], "H": spec["n_head"], "d": spec["n_embd"], "dh": spec["n_embd"] // spec["n_head"],
         "d_mlp": 4 * spec["n_embd"], "V": spec["vocab_size"]}
    cfg = {"model": name, "folder": str(folder), "device": a.device, "n_ctx": n_ctx, "n_samples": n,
           "n_heldout": n_held, "threads": a.threads,
           "n_mem": min(n, max(BATCH, n // 4)),  # at least one full batch: peak memory depends on the batch size
           "dims": D, "cache": str(work_dir() / "cache"),
           "command": " ".join(["bench/run.py", *(argv if argv is not None else sys.argv[1:])]),
           "texts": make_texts(folder, spec["vocab_size"], n_ctx, max(n + n_held, 8) + 8)}
    if a.quick:
        cfg.update(matmul_n=1024, copy_bytes=64 * 2**20)
    return cfg


def make_plan(a, cfg) -> list[tuple[str, str, int | None]]:
    """``(result key, stage, argument)`` in run order; the baseline and the whole command alternate."""
    n, nm = cfg["n_samples"], cfg["n_mem"]
    plan = [("machine", "machine", None)]
    for p in range(a.pairs):  # first, back to back: the comparison the targets are about
        sfx = "" if p == 0 else f"#{p + 1}"
        plan += [(f"hf_eager{sfx}", "hf_eager", n + cfg["n_heldout"]), (f"command{sfx}", "command", n)]
    plan += [("kernels", "kernels", n), ("kernels_n", "kernels", nm),
             ("kernels_tl", "kernels_tl", n + cfg["n_heldout"]), ("forward_tl", "forward_tl", n),
             ("extract", "extract", None), ("extract_tl", "extract_tl", None), ("layer0", "layer0", None)]
    plan += [(s, s, None) for s in ("circuit", "scoring", "scoring_naive", "verify", "verify_tl")]
    if a.stages:
        keep = set(a.stages.split(",")) | {"machine"}
        plan = [p for p in plan if p[0].split("#")[0] in keep]
    return plan


def run_plan(plan, cfg, R: dict, *, in_process: bool, retries: int) -> None:
    for key, stage, arg in plan:
        print(f"  {key}{'' if arg is None else f' (N={arg})'} ...", end=" ", flush=True)
        res = run_stage(stage, cfg, arg, in_process=in_process)
        for _ in range(retries if not in_process else 0):
            if res.get("foreign_cpu", 0) <= NOISY:
                break
            print(f"{res.get('time', 0):.3f} s, but other processes used {res['foreign_cpu']:.0%} of the CPUs: "
                  "waiting for quiet and running again ...", end=" ", flush=True)
            wait_quiet()
            again = run_stage(stage, cfg, arg, in_process=in_process)
            if "error" not in again and again.get("foreign_cpu", 1) < res.get("foreign_cpu", 1):
                res = again
        R[key] = res
        print(f"error: {res['error']}" if "error" in res else
              f"{res.get('time', 0):.3f} s" + (f" (other processes: {res['foreign_cpu']:.0%} of the CPUs)"
                                              if res.get("foreign_cpu", 0) > NOISY else "")
              if "time" in res else "done", flush=True)


def merge_previous(a, cfg, R: dict) -> tuple[dict, bool]:
    """A ``--stages`` subset updates the stored run of the same configuration; else it is written on its own."""
    prev = RESULTS_DIR / f"{cfg['model']}-{a.device}.json"
    if not a.stages or a.replace or not prev.exists():
        return R, bool(a.stages) and not a.replace
    old = json.loads(prev.read_text())
    if not all(old["config"].get(k) == cfg[k] for k in ("n_ctx", "n_samples", "n_heldout", "device")):
        return R, True
    if "kernels_n" not in a.stages.split(","):
        cfg["n_mem"] = old["config"]["n_mem"]
    return {**old["results"], "date": R["date"] + f" (stages {a.stages} rerun; others {old['results']['date']})",
            "info": R["info"]}, False


def write_results(a, cfg, R: dict, partial: bool) -> None:
    name = cfg["model"]
    RESULTS_DIR.mkdir(exist_ok=True)
    if partial:
        out = RESULTS_DIR / f"{name}-{a.device}-partial.json"
        out.write_text(json.dumps({"results": R, "config": cfg}, indent=1))
        print(f"partial run written to {out} (RESULTS.md unchanged)")
        return
    (RESULTS_DIR / f"{name}-{a.device}.json").write_text(json.dumps({"results": R, "config": cfg}, indent=1))
    if a.quick:
        (RESULTS_DIR / "quick.md").write_text(markdown([(R, cfg)]))
        return
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


def main(argv=None) -> int:
    a = parse_args(argv)
    if a._stage:
        child_main(a)
        return 0
    if a.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            print("error: --device cuda but torch sees no CUDA device; refusing to fall back to CPU", file=sys.stderr)
            return 2
    os.environ["ATTNSCOPE_CACHE"] = str(work_dir() / "cache")
    t_start = time.perf_counter()
    load1 = os.getloadavg()[0]
    if load1 > 0.5 * (os.cpu_count() or 1):
        print(f"warning: load average {load1:.1f} on {os.cpu_count()} cores: other processes are running, "
              "timings will be noisy", file=sys.stderr)
    cfg = make_config(a, argv)
    warm_token_caches(cfg)
    R: dict = {"date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "info": machine_info()}
    R, partial = merge_previous(a, cfg, R)
    run_plan(make_plan(a, cfg), cfg, R, in_process=a.in_process or a.quick, retries=a.retries)
    print(f"total {time.perf_counter() - t_start:.0f} s", flush=True)
    print_table(build_rows(R, cfg), targets(R, cfg), cfg, R)
    if not a.no_write:
        write_results(a, cfg, R, partial)
    return 0


if __name__ == "__main__":
    sys.exit(main())
