"""The `neurons` command's human output uses the result's own terms (issue 14 follow-up): neurons *pass the
measured threshold*, some get an *explanation card*, and the table shows the *predicted |d|*; it names
neurons.csv (one row per neuron) in its help and its final line."""

from __future__ import annotations

import csv

from conftest import make_context_neuron_gpt2
from typer.testing import CliRunner

from attnscope.cli.app import app

runner = CliRunner()


def test_neurons_output_wording(tmp_path):
    model, _ = make_context_neuron_gpt2(tmp_path / "model")
    out = tmp_path / "out"
    r = runner.invoke(app, ["neurons", str(model), "--calibration", "tests/data/moby.txt", "--n-ctx", "128",
                            "--out", str(out)])
    assert r.exit_code == 0, r.output
    text = " ".join(r.stdout.split())  # rich wraps long lines
    for words in ("neurons pass the measured threshold", "with an explanation card", "predicted |d|",
                  f"{out / 'neurons.csv'} (one row per neuron)"):
        assert words in text, words
    for old in (" found;", " verified:", "effect ┃"):
        assert old not in text, old
    with (out / "neurons.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 256  # d_mlp of the hand-built model: every neuron has a row
    n_pass = sum(row["passed"] == "True" for row in rows)
    assert f"{n_pass} of 256 neurons pass the measured threshold" in text


def test_neurons_help_names_the_csv():
    r = runner.invoke(app, ["neurons", "--help"])
    assert r.exit_code == 0 and "neurons.csv" in r.output and "one row per neuron" in " ".join(r.output.split())
