"""The CLI: help, info (human and JSON), and one-line errors with exit status 2."""

from __future__ import annotations

import json
import subprocess
import sys

from typer.testing import CliRunner

from attnscope.cli import app

runner = CliRunner()


def test_help():
    r = runner.invoke(app, ["--help"])
    assert r.exit_code == 0 and "info" in r.output and "--device" in r.output


def test_info_json(tiny_gpt2_dir):
    r = runner.invoke(app, ["info", str(tiny_gpt2_dir), "--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert d["n_layers"] == 2 and d["n_heads"] == 4 and d["positional"] == "learned" and d["context_length"] == 128


def test_info_packaged_models(smollm2, minilm):
    for name, arch, layers in [("smollm2", "llama", 30), ("all-MiniLM-L6-v2", "bert", 6)]:
        r = runner.invoke(app, ["info", name, "--json"])
        assert r.exit_code == 0, r.output
        d = json.loads(r.stdout)
        assert d["architecture"] == arch and d["n_layers"] == layers


def test_check_command(tiny_gpt2_dir):
    r = runner.invoke(app, ["check", str(tiny_gpt2_dir), "--text", "tests/data/moby.txt", "--n-tokens", "64", "--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert d["max_abs_diff_pattern"] < 1e-4 and len(d["per_layer"]["pattern"]) == 2


def test_errors_are_one_line():
    r = subprocess.run([sys.executable, "-m", "attnscope.cli", "info", "./missing-model-folder"],
                       capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip().startswith("error: no such file or folder") and len(r.stderr.strip().splitlines()) == 1
    r = subprocess.run([sys.executable, "-m", "attnscope.cli", "--dtype", "float8", "info", "demo"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "unknown dtype" in r.stderr and "Traceback" not in r.stderr


def test_kernels_command(tiny_gpt2_dir, tmp_path):
    out = tmp_path / "k"
    r = runner.invoke(app, ["kernels", str(tiny_gpt2_dir), "--samples", "tests/data", "--n-ctx", "32", "--n-samples", "4",
                            "--n-heldout", "2", "--out", str(out), "--no-cache"])
    assert r.exit_code == 0, r.output
    d = json.loads((out / "kernels.json").read_text())
    assert len(d["heads"]) == 8 and {"layer", "head", "category", "n_eff", "decay_length", "query_consistency",
                                     "equivariance", "tv_decomposition", "tv_kernel_vs_attention"} <= set(d["heads"][0])
    assert {p.name for p in out.glob("*.png")} == {"kernel_curves.png", "n_eff_heatmap.png", "categories.png",
                                                   "tv_per_head.png"}


def test_demo_command(demo, tmp_path):
    r = runner.invoke(app, ["demo", "--out", str(tmp_path)])
    assert r.exit_code == 0, r.output
    assert f"report: {(tmp_path / 'report.html').resolve()}" in r.stdout
    d = json.loads((tmp_path / "neurons" / "neurons.json").read_text())
    assert d["summary"]["n_neurons_found"] > 0


def test_condition_failure_is_one_line():
    r = subprocess.run([sys.executable, "-m", "attnscope.cli", "neurons", "smollm2", "--n-ctx", "128", "--heads", "99"],
                       capture_output=True, text=True)
    if "not installed" in r.stderr:
        return
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith("error: head index 99 is out of range")
