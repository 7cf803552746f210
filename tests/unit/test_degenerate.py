"""Degenerate settings through the Python API: a validation that was not run is reported as None, never 0.0."""

from __future__ import annotations

import json

import pytest

from attnscope.cli.show import print_kernel_summary
from attnscope.kernels.analysis import KernelResult, KernelSettings, analyse_kernels
from attnscope.report import write_report
from attnscope.report.plots import tv_per_head

HELD_OUT = ("query_consistency", "tv_decomposition", "tv_kernel_vs_attention")


@pytest.fixture(scope="module")
def no_heldout(tiny_gpt2):
    w, _ = tiny_gpt2
    s = KernelSettings(n_ctx=32, n_samples=4, n_heldout=0, samples="tests/data", batch_size=4)
    return w, analyse_kernels(w, s, cache=False, progress=False)


def test_heldout_checks_are_none_not_zero(no_heldout, tiny_gpt2):
    w, r = no_heldout
    assert len(r.records) == 2 * w.n_heads
    for rec in r.records:
        for f in HELD_OUT:
            assert getattr(rec, f) is None, f
        assert 1.0 <= rec.n_eff <= 32 and 0 <= rec.equivariance <= 1  # the estimation itself still ran
        if rec.layer == 0:  # weights-only checks need no held-out text
            assert rec.tv_weights_vs_data is not None and 0 <= rec.tv_weights_vs_data <= 1
    assert "mean_attention" not in r.arrays  # no held-out attention to average
    # the same model with held-out windows measures real numbers, not None
    w, _ = tiny_gpt2
    ran = analyse_kernels(w, KernelSettings(n_ctx=32, n_samples=4, n_heldout=2, samples="tests/data", batch_size=4),
                          cache=False, progress=False)
    rec = ran.records[0]
    assert 0 < rec.tv_decomposition["median"] <= 1 and 0 < rec.tv_kernel_vs_attention <= 1
    assert 0 < rec.query_consistency <= 1


def test_none_survives_json_and_reload(no_heldout, tmp_path):
    _, r = no_heldout
    r.save(tmp_path)
    heads = json.loads((tmp_path / "kernels.json").read_text())["heads"]
    assert all(h[f] is None for h in heads for f in HELD_OUT)
    back = KernelResult.load(tmp_path)
    assert all(getattr(rec, f) is None for rec in back.records for f in HELD_OUT)


def test_cli_table_report_and_figure_say_not_run(no_heldout, tmp_path, capsys):
    w, r = no_heldout
    print_kernel_summary(r)
    out = capsys.readouterr().out
    assert "not run" in out and "0.000" not in out
    html = write_report(tmp_path / "rep", model_info=w.info(), kernels=r).read_text(encoding="utf-8")
    assert html.count("not run: no held-out windows (n_heldout=0)") == 3
    assert tv_per_head(r, tmp_path / "tv.png").stat().st_size > 0
