"""--executor ray: the same results as one process, on a local Ray cluster of 2 CPUs shared by these tests.

Skipped (with the reason) only where Ray is not installed; scripts/setup.sh and CI install it.  One cluster
for the module (Ray's start-up costs seconds); each comparison is against the local path within the issue's
tolerance (1e-6 relative + 1e-9 absolute), with identical categories, head decisions and neuron sets.
"""

from __future__ import annotations

import os
import re
import sys

import pytest
import torch

ray = pytest.importorskip("ray", reason="Ray is not installed: pip install 'attnscope[distributed]' (scripts/setup.sh)")

from conftest import ATOL, RTOL, assert_same_kernels, kernel_settings  # noqa: E402

from attnscope.core.distributed import RayExecutor  # noqa: E402

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def ex(cluster):
    with RayExecutor(workers=2) as e:
        yield e


def test_kernels_on_ray_equal_local(tiny_gpt2, ex):
    from attnscope.kernels.analysis import analyse_kernels

    w, _ = tiny_gpt2
    s = kernel_settings()
    local = analyse_kernels(w, s, cache=False, progress=False)
    before = ex.stats["shards"]
    dist = analyse_kernels(w, s, cache=False, progress=False, executor=ex)
    assert ex.stats["shards"] - before == 3 + 2 and ex.workers == 2 and ex.threads == 1
    assert_same_kernels(local, dist)


def test_ground_truth_and_contrast_on_ray_equal_local(tiny_gpt2, ex):
    """The true effect sizes (one-vs-rest, as neurons and the ground-truth bench measure them) and
    ``contrast --verify``: same numbers, same set of neurons with |d| >= 1."""
    from attnscope.circuit.build import CircuitSettings, build_circuit
    from attnscope.neurons.contrast import pre_stats, run_contrast
    from attnscope.neurons.find import held_out_windows, one_vs_rest_effects

    w, _ = tiny_gpt2
    circ = build_circuit(w, CircuitSettings(heads=[0, 1]))
    windows, n_min = held_out_windows(w, circ, None, 4)[:3], circ.settings.min_position
    d_local = one_vs_rest_effects([pre_stats(w, x.tune, n_min) for x in windows])
    d_ray = one_vs_rest_effects([pre_stats(w, x.tune, n_min, ex) for x in windows])
    torch.testing.assert_close(d_ray, d_local, rtol=RTOL, atol=ATOL)
    assert torch.equal(d_ray.abs() >= 1, d_local.abs() >= 1) and (d_local.abs() >= 1).any()
    a, b = "bundled:es_fortunes", "bundled:de_fortunes"
    one = run_contrast(w, circ, a, b, verify=True, max_windows=5)
    before = ex.stats["shards"]
    two = run_contrast(w, circ, a, b, verify=True, max_windows=5, executor=ex)
    assert ex.stats["shards"] - before == 2 * 2  # the per-window truth of 5 windows per side, in shards of 4
    assert [r.index for r in one.records] == [r.index for r in two.records]
    torch.testing.assert_close(torch.tensor([r.true_d for r in two.records]),
                               torch.tensor([r.true_d for r in one.records]), rtol=RTOL, atol=ATOL)
    v1, v2 = one.verification, two.verification
    assert v1 is not None and v2 is not None and v1.n_true == v2.n_true
    assert v1.noise_ceiling is not None and v2.noise_ceiling is not None
    assert v2.noise_ceiling.split_half == pytest.approx(v1.noise_ceiling.split_half, rel=1e-9)
    assert v2.like_for_like.spearman == pytest.approx(v1.like_for_like.spearman, rel=1e-9)


class DieOnce:
    """A window task whose worker process dies (``os._exit``) the first time it reaches window ``at``."""

    def __init__(self, task, marker: str, at: int) -> None:
        self.task, self.marker, self.at = task, marker, at

    def __call__(self, w, windows, first, *args, bar=None):
        if first == self.at and not os.path.exists(self.marker):
            open(self.marker, "w").close()
            os._exit(1)
        return self.task(w, windows, first, *args, bar=bar)


def test_killed_worker_is_retried_and_the_result_is_identical(tiny_gpt2, ex, tmp_path):
    from attnscope.core.texts import load_windows
    from attnscope.kernels.analysis import estimation_shard

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers cannot import this test file
    w, _ = tiny_gpt2
    s = kernel_settings().resolved(w)
    windows, _ = load_windows("tests/data", w.tokenizer, 32, 6, seed=0)
    local = estimation_shard(w, windows, 0, s)
    marker = tmp_path / "died"
    ex.close()  # its actors hold the cluster's 2 CPUs: free them for this test's own
    with RayExecutor(workers=2) as own:
        got = own.map_windows(w, DieOnce(estimation_shard, str(marker), at=2), windows, s, shard_size=2)
    assert marker.exists()  # a worker did die on the shard starting at window 2
    assert got.n == local.n == 6
    for f in ("q", "k", "resid", "sq"):
        torch.testing.assert_close(getattr(got, f), getattr(local, f), rtol=1e-12, atol=1e-12)


def test_evolution_on_ray_one_job_per_checkpoint(ex, tmp_path, monkeypatch):
    from conftest import make_tiny_gpt2

    import attnscope.evolution.run as E
    from attnscope.neurons.find import NeuronSettings

    for name, seed in (("step-0", 0), ("step-10", 1)):
        make_tiny_gpt2(tmp_path / "series" / name, seed=seed)
    monkeypatch.setenv("ATTNSCOPE_CACHE", str(tmp_path / "cache"))
    s = E.EvolutionSettings(kernel=kernel_settings(n_samples=2, n_heldout=1), neuron=NeuronSettings(max_windows=2),
                            top_k=3)
    local = E.run_evolution([str(tmp_path / "series")], s, cache=False)
    lines: list[str] = []
    dist = E.run_evolution([str(tmp_path / "series")], s, executor=ex, log=lines.append)
    assert sum("on a worker" in x for x in lines) == 2
    for a, b in zip(local.checkpoints, dist.checkpoints, strict=True):
        ja, jb = a.to_json(), b.to_json()
        ja.pop("seconds"), jb.pop("seconds")
        assert ja == jb or _close(ja, jb)
    lines.clear()  # the driver wrote both summaries to its cache: nothing is sent the second time
    again = E.run_evolution([str(tmp_path / "series")], s, executor=ex, log=lines.append)
    assert sum("(cached)" in x for x in lines) == 2 and again.timeline == dist.timeline


def _close(a, b) -> bool:
    """JSON trees equal, floats within the tolerance."""
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(_close(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, float):
        return abs(a - b) <= ATOL + RTOL * abs(a)
    return a == b


def test_kernels_command_on_ray(tiny_gpt2_dir, ex, tmp_path, monkeypatch, capsys):
    """The CLI end to end: same files as the local run, and one line on stderr with the shards and merge time."""
    from attnscope.kernels.analysis import KernelResult

    ex.close()  # free the cluster's CPUs for the command's own workers
    from test_cli import K, run_main

    outs = {}
    for kind in ("local", "ray"):
        extra = ["--executor", "ray", "--workers", "2"] if kind == "ray" else []
        code, _, err = run_main(["kernels", str(tiny_gpt2_dir), *K, "--no-cache", "--out", str(tmp_path / kind),
                                 *extra], monkeypatch, capsys)
        assert code == 0, err
        outs[kind] = KernelResult.load(tmp_path / kind)
    assert "ray: 2 shards on 2 workers" in err and "merging took" in err
    assert_same_kernels(outs["local"], outs["ray"])


def test_cache_is_read_before_any_work_is_sent(tiny_gpt2, tmp_path, monkeypatch):
    """A cached kernel analysis is returned by the driver: the executor never connects to a cluster."""
    from attnscope.kernels.analysis import analyse_kernels

    monkeypatch.setenv("ATTNSCOPE_CACHE", str(tmp_path))
    w, _ = tiny_gpt2
    s = kernel_settings(n_samples=2, n_heldout=1)
    analyse_kernels(w, s, progress=False)  # computed and cached
    cached = analyse_kernels(w, s, progress=False)
    lazy = RayExecutor(workers=2)
    again = analyse_kernels(w, s, progress=False, executor=lazy)
    assert lazy._started is None and lazy.stats["shards"] == 0 and lazy.summary() == ""
    assert_same_kernels(cached, again)


def test_sigint_stops_the_driver_and_its_cluster(tiny_gpt2_dir, tmp_path):
    """A real Ctrl-C while shards run on a local cluster the command started: exit 130 in one line, and no Ray
    process of that cluster (raylet, GCS, workers) is left."""
    import shutil
    import signal
    import subprocess
    import tempfile
    import time

    from test_cli import PY

    ray_dir = tempfile.mkdtemp(prefix="r", dir="/tmp")  # short: Ray's socket paths must fit 107 characters
    env = {**os.environ, "RAY_TMPDIR": ray_dir, "ATTNSCOPE_CACHE": str(tmp_path / "cache")}
    p = subprocess.Popen([*PY, "kernels", str(tiny_gpt2_dir), "--samples", "tests/data", "--n-ctx", "32", "--n-samples",
                          "20000", "--n-heldout", "2", "--batch-size", "2", "--out", str(tmp_path / "k"), "--no-cache",
                          "--executor", "ray", "--workers", "1"],
                         stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline, buf = time.time() + 240, ""
        while not re.search(r"estimate:\s+\d+%.*\| [1-9]\d*/", buf) and time.time() < deadline:  # shards done
            buf += p.stderr.read(1)
        p.send_signal(signal.SIGINT)
        _, rest = p.communicate(timeout=120)
        time.sleep(2)
        left = [c for c in _cmdlines() if ray_dir in c]
    finally:
        p.kill()
        shutil.rmtree(ray_dir, ignore_errors=True)
    assert p.returncode == 130, buf + rest
    assert (buf + rest).strip().endswith("interrupted: nothing was written (partial outputs are discarded)")
    assert "Traceback" not in buf + rest and not (tmp_path / "k" / "kernels.json").exists()
    assert left == [], left


def _cmdlines() -> list[str]:
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                out.append(open(f"/proc/{d}/cmdline", "rb").read().replace(b"\0", b" ").decode(errors="replace"))
            except OSError:
                pass
    return out
