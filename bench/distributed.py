"""Time `attnscope kernels` end to end: local against --executor ray at 1 and 2 workers (issue 23).

    python bench/distributed.py                                  # GPT-2-Small shape, 8 + 2 windows of 1024 tokens
    python bench/distributed.py --n-samples 32 --n-heldout 8     # the issue's target config (~7 min a run here)
    python bench/distributed.py --model quick --n-ctx 256        # seconds
    python bench/distributed.py --baseline-src /tmp/base/src     # also the local path of another checkout

Each variant is the whole command in a fresh process (model load, Ray start-up, workers loading the model,
both passes, figures), `--no-cache`, timed by wall clock.  Under Ray the command's stderr line gives the
start-up, the time the shards ran and the merge time.  The outputs are compared with the local run's (max
relative difference of the saved arrays, and the head categories).  The load of the machine (1-minute load
average and the CPU share other processes used during the run) is printed beside each time: the machine
is shared.  Writes bench/results/distributed.json and prints a markdown table and a projection to N nodes.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import MODELS, RESULTS_DIR, cpu_jiffies, make_model, make_texts, work_dir  # noqa: E402

RAY_LINE = re.compile(r"ray: (\d+) shards on (\d+) workers.*started in ([\d.]+) s, shards ran for ([\d.]+) s, "
                      r"merging took ([\d.]+) s")


def run_variant(name: str, model: Path, args: argparse.Namespace, samples: str, extra: list[str],
                env_extra: dict[str, str]) -> dict:
    out = work_dir() / "distributed" / name
    # the console entry point, as `attnscope` runs it (also in a --baseline-src checkout of another layout)
    cmd = [sys.executable, "-c", "import attnscope.cli as c; c.main()", "kernels", str(model), "--samples", samples,
           "--n-ctx", str(args.n_ctx), "--n-samples", str(args.n_samples), "--n-heldout", str(args.n_heldout),
           "--no-cache", "--json", "--out", str(out), *extra]
    env = {**os.environ, **env_extra}
    load0, (busy0, _) = os.getloadavg()[0], cpu_jiffies()
    own0 = _children_jiffies()
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    (busy1, _), own1 = cpu_jiffies(), _children_jiffies()
    if r.returncode != 0:
        raise SystemExit(f"{name} failed ({r.returncode}): {r.stderr[-2000:]}")
    hz, n = os.sysconf("SC_CLK_TCK"), os.cpu_count() or 1
    others = max(0.0, (busy1 - busy0) - (own1 - own0)) / hz / (wall * n)  # CPU share used by other processes
    row = {"variant": name, "wall_s": round(wall, 1), "load_1min_before": round(load0, 2),
           "load_1min_after": round(os.getloadavg()[0], 2), "other_processes_cpu_share": round(others, 2),
           "out": str(out)}
    if m := RAY_LINE.search(r.stderr):
        row.update(shards=int(m[1]), workers=int(m[2]), start_s=float(m[3]), shards_s=float(m[4]), merge_s=float(m[5]))
    return row


def _children_jiffies() -> int:
    """CPU time (user + system, in clock ticks) of this process's finished children, Ray's processes included
    only where they are our children (a local cluster started by the command is)."""
    t = os.times()
    return int((t.children_user + t.children_system) * os.sysconf("SC_CLK_TCK"))


def compare(a: str, b: str) -> dict:
    from safetensors.torch import load_file

    x, y = load_file(f"{a}/kernels.safetensors"), load_file(f"{b}/kernels.safetensors")
    rel = max(float(((x[k].double() - y[k].double()).abs() / (x[k].double().abs() + 1e-9)).max()) for k in x)
    ja, jb = (json.loads(Path(f"{p}/kernels.json").read_text())["heads"] for p in (a, b))
    same = [h["category"] for h in ja] == [h["category"] for h in jb]
    return {"max_rel_diff": rel, "same_categories": same, "arrays_identical": all(x[k].equal(y[k]) for k in x)}


def projection(rows: list[dict], local: dict, n_nodes=(1, 2, 4, 8, 16, 32)) -> list[dict]:
    """Time on N nodes, one worker each as fast as this machine: the driver's own part (model load, tokenising,
    layer-0 weights kernel, figures: the 1-worker run's wall time minus its start-up, shards and merge), the
    cluster start-up (as measured), the two passes (each ceil(shards / N) shards; the held-out pass waits for
    the estimation) at the local run's mean time per shard (its wall time minus the driver's part, over the
    shards: the local run has no Ray overhead), and the merge (per shard, as measured)."""
    one = next((r for r in rows if r.get("workers") == 1), None)
    if one is None:
        return []
    fixed = max(0.0, one["wall_s"] - one["start_s"] - one["shards_s"] - one["merge_s"])
    per_shard = max(0.0, local["wall_s"] - fixed) / one["shards"]
    merge_per = one["merge_s"] / one["shards"]
    n_est = math.ceil(one["n_samples"] / one["batch_size"])  # shards of each pass: one batch each
    n_val = one["shards"] - n_est
    out = []
    for n in n_nodes:
        t = (fixed + one["start_s"] + (math.ceil(n_est / n) + math.ceil(n_val / n)) * per_shard
             + merge_per * one["shards"])
        out.append({"nodes": n, "projected_s": round(t, 1), "speed_up_vs_local": round(local["wall_s"] / t, 2),
                    "driver_s": round(fixed, 1), "per_shard_s": round(per_shard, 1)})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="small", choices=list(MODELS))
    ap.add_argument("--n-ctx", type=int, default=1024)
    ap.add_argument("--n-samples", type=int, default=8)
    ap.add_argument("--n-heldout", type=int, default=2)
    ap.add_argument("--workers", default="1,2", help="Ray worker counts to time")
    ap.add_argument("--baseline-src", help="src/ folder of another checkout: also time its local path")
    ap.add_argument("--out", type=Path, default=RESULTS_DIR / "distributed.json")
    ap.add_argument("--project", type=Path, help="only print the projection of an earlier run's JSON")
    args = ap.parse_args()
    if args.project:
        d = json.loads(args.project.read_text())
        for p in projection(d["rows"], d["rows"][0]):
            print(p)
        return
    model = make_model(args.model)
    samples = make_texts(model, MODELS[args.model]["vocab_size"], args.n_ctx, args.n_samples + args.n_heldout + 4)
    samples = samples["samples"]
    rows = []
    variants = [("local", [], {})]
    if args.baseline_src:
        variants.append(("local (baseline checkout)", [], {"PYTHONPATH": args.baseline_src}))
    variants += [(f"ray, {k} worker{'s' * (int(k) > 1)}", ["--executor", "ray", "--workers", k], {})
                 for k in args.workers.split(",")]
    for name, extra, env in variants:
        row = run_variant(name.replace(" ", "_").replace(",", "").replace("(", "").replace(")", ""), model, args,
                          samples, extra, env)
        row.update(variant=name, n_samples=args.n_samples, n_heldout=args.n_heldout, batch_size=4)
        rows.append(row)
        print(json.dumps(row), flush=True)
    local = rows[0]
    for r in rows[1:]:
        r.update(compare(local["out"], r["out"]))
        r["vs_local"] = round(r["wall_s"] / local["wall_s"], 2)
        if "merge_s" in r:
            r["merge_share"] = round(r["merge_s"] / r["wall_s"], 4)
    proj = projection(rows, local)
    cfg = {"model": args.model, **MODELS[args.model], "n_ctx": args.n_ctx, "n_samples": args.n_samples,
           "n_heldout": args.n_heldout, "cpus": os.cpu_count()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"config": cfg, "rows": rows, "projection": proj}, indent=1))
    print(f"\nattnscope kernels, {args.model} ({cfg['n_layer']} layers x {cfg['n_head']} heads, d {cfg['n_embd']}), "
          f"{args.n_samples} + {args.n_heldout} windows of {args.n_ctx} tokens, {cfg['cpus']} CPUs\n")
    print("| variant | wall s | vs local | Ray start s | shards | shards ran s | merge s | merge share "
          "| max rel diff | load 1 min (before/after) | other processes' CPU share |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {r['wall_s']} | {r.get('vs_local', 1.0)} | {r.get('start_s', '-')} "
              f"| {r.get('shards', '-')} | {r.get('shards_s', '-')} | {r.get('merge_s', '-')} "
              f"| {_pct(r.get('merge_share'))} | {_g(r.get('max_rel_diff'))} "
              f"| {r['load_1min_before']}/{r['load_1min_after']} | {r['other_processes_cpu_share']} |")
    if proj:
        print("\n| nodes | projected s | speed-up vs local |\n|---|---|---|")
        for p in proj:
            print(f"| {p['nodes']} | {p['projected_s']} | {p['speed_up_vs_local']} |")
    print(f"\nwrote {args.out}")


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.2f}%"


def _g(x) -> str:
    return "-" if x is None else f"{x:.2g}"


if __name__ == "__main__":
    main()
