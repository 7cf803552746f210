"""The CLI: help, commands, and the one error path (issue 13).

``ERROR_CASES`` is the table of bad invocations: each must exit 2 with exactly one line on stderr, starting
``error:`` and containing the expected words, and no traceback.  A new command joins by adding rows.
Placeholders in the arguments: ``{tiny}`` a tiny GPT-2 folder, ``{tmp}`` a fresh folder, ``{bad}`` a folder
of broken inputs (see ``bad``), ``{trunc}``/``{garbage}``/``{shape}``/``{notok}`` broken model folders.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from attnscope.cli import app as cli
from attnscope.cli.app import app

runner = CliRunner()
PY = [sys.executable, "-m", "attnscope.cli.app"]
K = ["--samples", "tests/data", "--n-ctx", "32", "--n-samples", "2", "--n-heldout", "2"]  # a fast kernels run

# (id, arguments, words the one line must contain, extra environment)
ERROR_CASES: list[tuple[str, list[str], list[str], dict[str, str]]] = [
    # usage errors (typer bundles click: they used to crash with a traceback and exit 1)
    ("no-arguments", [], ["no command given"], {}),
    ("missing-model", ["kernels"], ["Missing argument 'MODEL'"], {}),
    ("unknown-option", ["kernels", "{tiny}", "--bogus"], ["No such option: --bogus"], {}),
    ("non-integer", ["kernels", "{tiny}", "--n-samples", "x"], ["--n-samples"], {}),
    ("unknown-subcommand", ["kernel", "{tiny}"], ["No such command"], {}),
    ("cache-unknown-part", ["cache", "clear", "bogus"], ["no cache part 'bogus'"], {}),
    # global options: bad values, before or after the subcommand
    ("dtype-before", ["--dtype", "float8", "info", "{tiny}"], ["unknown dtype"], {}),
    ("dtype-after", ["info", "{tiny}", "--dtype", "float8"], ["unknown dtype"], {}),
    ("device-bogus", ["info", "{tiny}", "--device", "bogus"], ["--device 'bogus'"], {}),
    ("device-mps", ["--device", "mps", "info", "{tiny}"], ["--device mps", "not available"], {}),
    ("device-cuda-missing", ["kernels", "{tiny}", "--device", "cuda:7"], ["--device cuda:7"], {}),
    # degenerate settings: refused before any computation
    ("layers-empty-range", ["kernels", "{tiny}", "--layers", "3-1"], ["--layers", "empty"], {}),
    ("layers-not-numbers", ["kernels", "{tiny}", "--layers", "a,b"], ["--layers", "not a list"], {}),
    ("layer-out-of-range", ["kernels", "{tiny}", "--layers", "5"], ["layer index 5", "numbered 0..1"], {}),
    ("n-samples-0", ["kernels", "{tiny}", "--n-samples", "0"], ["--n-samples 0", "at least 1"], {}),
    ("n-heldout-0", ["kernels", "{tiny}", "--n-heldout", "0"], ["--n-heldout 0", "at least 1"], {}),
    ("n-ctx-too-big", ["kernels", "{tiny}", "--n-ctx", "4096"], ["--n-ctx 4096", "context"], {}),
    ("ref-norm-negative", ["kernels", "{tiny}", "--ref-norm", "-1"], ["--ref-norm"], {}),
    ("window-negative", ["neurons", "{tiny}", "--window", "-10"], ["--window -10", "at least 1"], {}),
    ("n-ctx-below-window", ["neurons", "{tiny}", "--n-ctx", "64"], ["--n-ctx 64", "--window 100"], {}),
    ("heads-99", ["neurons", "{tiny}", "--heads", "99"], ["head index 99"], {}),
    ("heads-not-numbers", ["neurons", "{tiny}", "--heads", "x"], ["--heads 'x'"], {}),
    ("report-window-negative", ["report", "{tiny}", "--window", "0", "--out", "{tmp}/r"], ["--window 0"], {}),
    # executors (docs/distributed.md)
    ("executor-bogus", ["kernels", "{tiny}", "--executor", "dask"], ["--executor 'dask'", "local or ray"], {}),
    ("workers-without-ray", ["kernels", "{tiny}", "--workers", "2"], ["only with --executor ray"], {}),
    ("ray-address-without-ray", ["neurons", "{tiny}", "--ray-address", "auto"], ["only with --executor ray"], {}),
    ("workers-0", ["kernels", "{tiny}", "--executor", "ray", "--workers", "0"], ["--workers 0", "at least 1"], {}),
    ("ray-address-unreachable", ["kernels", "{tiny}", "--executor", "ray", "--ray-address", "127.0.0.1:1"],
     ["--ray-address 127.0.0.1:1", "no Ray cluster answers", "ray start --head"], {}),
    ("ray-address-malformed", ["kernels", "{tiny}", "--executor", "ray", "--ray-address", "headnode"],
     ["--ray-address 'headnode'", "HOST:PORT"], {}),
    ("neurons-later-layer-ray", ["neurons", "{tiny}", "--layer", "1", "--executor", "ray"],
     ["layer-0 neurons only", "--executor local"], {}),
    ("contrast-ray-without-verify", ["contrast", "{tiny}", "--a", "bundled:es_fortunes", "--b", "bundled:de_fortunes",
                                     "--executor", "ray"], ["--verify was not given"], {}),
    ("evolution-workers-local", ["evolution", "{tiny}", "--workers", "2", "--out", "{tmp}/e"],
     ["only with --executor ray"], {}),
    ("report-later-layers-0", ["report", "{tiny}", "--later-layers", "0,1", "--out", "{tmp}/r"],
     ["--later-layers holds 0", "from 1"], {}),
    ("report-later-layers-99", ["report", "{tiny}", "--later-layers", "1,99", "--out", "{tmp}/r"],
     ["layer index 99"], {}),
    ("report-later-layers-not-numbers", ["report", "{tiny}", "--later-layers", "x", "--out", "{tmp}/r"],
     ["--later-layers 'x'"], {}),
    ("check-n-tokens-0", ["check", "{tiny}", "--n-tokens", "0"], ["--n-tokens 0"], {}),
    ("check-n-tokens-negative", ["check", "{tiny}", "--n-tokens", "-5"], ["--n-tokens -5"], {}),
    ("probe-one-text", ["probe", "{tiny}", "--text", "tests/data/moby.txt"], ["at least two --text"], {}),
    ("probe-duplicate-names", ["probe", "{tiny}", "--text", "tests/data/moby.txt", "--text", "{bad}/moby.txt"],
     ["share the context name 'moby'"], {}),
    ("probe-short-text", ["probe", "{tiny}", "--text", "{bad}/short.txt", "--text", "{bad}/short2.txt"],
     ["short.txt has", "the probe needs at least"], {}),
    ("probe-layer-99", ["probe", "{tiny}", "--layer", "99"], ["layer index 99"], {}),
    # models: unknown, broken files, no tokenizer
    ("unknown-model", ["info", "no-such-model-xyz"], ["could not load 'no-such-model-xyz'"], {"HF_HUB_OFFLINE": "1"}),
    ("unknown-model-quick-probe", ["info", "no-such-model-xyz"], ["could not load 'no-such-model-xyz'"], {}),
    ("missing-folder", ["info", "./missing-model-folder"], ["no such file or folder"], {}),
    ("truncated-safetensors", ["info", "{trunc}"], ["could not read the weights"], {}),
    ("garbage-safetensors", ["info", "{garbage}"], ["could not read the weights"], {}),
    ("config-shape-mismatch", ["info", "{shape}"], ["do not match config.json"], {}),
    ("no-tokenizer", ["info", "{notok}"], ["no usable tokenizer"], {}),
    # outputs and caches
    ("out-is-a-file", ["kernels", "{tiny}", "--out", "{bad}/moby.txt"], ["is an existing file"], {}),
    ("out-under-a-file", ["neurons", "{tiny}", "--out", "{bad}/moby.txt/sub"], ["not writable"], {}),
    ("out-unwritable", ["kernels", "{tiny}", "--out", "/proc/attnscope-out"], ["not writable"], {}),
    ("cache-unwritable", ["kernels", "{tiny}"], ["cache folder", "ATTNSCOPE_CACHE"],
     {"ATTNSCOPE_CACHE": "/proc/attnscope-cache"}),
    # text inputs
    ("latin1-text", ["kernels", "{tiny}", "--samples", "{bad}/latin1.txt"],
     ["latin1.txt is not valid UTF-8", "byte 3"], {}),
    ("binary-text", ["check", "{tiny}", "--text", "{bad}/binary.txt"], ["binary file"], {}),
    ("jsonl-not-object", ["kernels", "{tiny}", "--samples", "{bad}/list.jsonl"], ["list.jsonl:2", "not an object"], {}),
    ("jsonl-null-text", ["kernels", "{tiny}", "--samples", "{bad}/null.jsonl"],
     ["null.jsonl:1", "not a string"], {}),
    ("jsonl-number-text", ["neurons", "{tiny}", "--calibration", "{bad}/num.jsonl"],
     ["num.jsonl:1", "not a string"], {}),
    ("jsonl-non-utf8", ["kernels", "{tiny}", "--samples", "{bad}/latin1.jsonl"],
     ["latin1.jsonl is not valid UTF-8", "byte 13"], {}),
    ("jsonl-bad-json", ["kernels", "{tiny}", "--samples", "{bad}/broken.jsonl"],
     ["broken.jsonl:1", "not valid JSON"], {}),
    ("bad-eval-text", ["neurons", "{tiny}", "--eval", "tests/data/moby.txt", "--eval", "{bad}/null.jsonl"],
     ["null.jsonl:1"], {}),
    ("missing-text", ["check", "{tiny}", "--text", "{bad}/nope.txt"], ["no such text file or folder"], {}),
    ("unknown-bundled", ["neurons", "{tiny}", "--calibration", "bundled:klingon"], ["no bundled text 'klingon'"], {}),
    ("decode-errors-bogus", ["check", "{tiny}", "--decode-errors", "maybe"], ["--decode-errors 'maybe'"], {}),
    ("text-too-short", ["check", "{tiny}", "--text", "{bad}/short.txt"], ["short.txt has", "tokens"], {}),
    # train-demo
    ("train-demo-no-corpora", ["train-demo", "--out", "{tmp}/m"], ["needs --corpora DIR"], {}),
    ("train-demo-not-a-folder", ["train-demo", "--corpora", "{bad}/moby.txt"], ["is not a folder"], {}),
    ("train-demo-empty", ["train-demo", "--corpora", "{tmp}/empty"], ["holds no .txt files"], {}),
    ("train-demo-non-utf8", ["train-demo", "--corpora", "{bad}/latin1corpus"], ["not valid UTF-8"], {}),
    # commands added later join the table
    ("neurons-layer-out-of-range", ["neurons", "{tiny}", "--layer", "5"], ["layer index 5", "numbered 0..1"], {}),
    ("neurons-layer-not-a-number", ["neurons", "{tiny}", "--layer", "x"], ["--layer"], {}),
    ("contrast-missing-b", ["contrast", "{tiny}", "--a", "bundled:es_fortunes"], ["Missing option '--b'"], {}),
    ("contrast-unknown-bundled", ["contrast", "{tiny}", "--a", "bundled:es_fortunes", "--b", "bundled:klingon"],
     ["no bundled text 'klingon'"], {}),
    ("serve-port-out-of-range", ["serve", "{tiny}", "--port", "70000"], ["--port 70000 is out of range"], {}),
    ("evolution-missing-folder", ["evolution", "./no/such/checkpoints"],
     ["no model folder at ./no/such/checkpoints"], {}),
    ("bos-without-bos-token", ["kernels", "{nobos}", "--bos"], ["has no BOS token id", "without BOS"], {}),
    ("query-conditioned-bogus", ["neurons", "{tiny}", "--query-conditioned", "maybe"],
     ["--query-conditioned 'maybe'", "auto, on or off"], {}),
    ("evolution-negative-layer", ["evolution", "{tiny}", "--layer", "-1"], ["--layer must be 0 or more"], {}),
    ("evolution-layer-out-of-range", ["evolution", "{tiny}", "--layer", "5"], ["layer index 5", "numbered 0..1"], {}),
]


@pytest.fixture(scope="module")
def bad(tmp_path_factory, tiny_gpt2_dir) -> dict[str, Path]:
    """Broken inputs and broken copies of the tiny model."""
    d = tmp_path_factory.mktemp("bad")
    shutil.copy("tests/data/moby.txt", d / "moby.txt")
    (d / "short.txt").write_text("Call me Ishmael. Some years ago.")
    (d / "short2.txt").write_text("It was the best of times.")
    (d / "latin1.txt").write_bytes("Caf\xe9s et na\xefvet\xe9 ".encode("latin-1") * 200)
    (d / "binary.txt").write_bytes(bytes(range(256)) * 20)
    (d / "list.jsonl").write_text('{"text": "fine"}\n["not", "an", "object"]\n')
    (d / "null.jsonl").write_text('{"text": null}\n')
    (d / "num.jsonl").write_text('{"text": 42}\n')
    (d / "latin1.jsonl").write_bytes('{"text": "caf\xe9"}\n'.encode("latin-1"))
    (d / "broken.jsonl").write_text('{"text": "unterminated\n')
    (d / "latin1corpus").mkdir()
    (d / "latin1corpus" / "fr.txt").write_bytes("d\xe9j\xe0 vu".encode("latin-1"))
    models = {}
    for kind in ("trunc", "garbage", "shape", "notok", "nobos"):
        m = models[kind] = d / kind
        shutil.copytree(tiny_gpt2_dir, m)
        st = m / "model.safetensors"
        if kind == "trunc":
            st.write_bytes(st.read_bytes()[: st.stat().st_size // 2])
        elif kind == "garbage":
            st.write_bytes(os.urandom(4096))
        elif kind in ("shape", "nobos"):
            cfg = json.loads((m / "config.json").read_text())
            (m / "config.json").write_text(json.dumps({**cfg, "n_embd": 32} if kind == "shape" else
                                                      {**cfg, "bos_token_id": None, "eos_token_id": None}))
        else:
            for f in m.glob("*"):
                if f.name.startswith(("tokenizer", "special_tokens", "vocab", "merges")):
                    f.unlink()
    return {"bad": d, **models}


def run_main(args: list[str], monkeypatch, capsys, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    """Run ``attnscope ARGS`` in this process through :func:`attnscope.cli.app.main` (the console entry point)."""
    for k, v in (env or {}).items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(sys, "argv", ["attnscope", *args])
    with pytest.raises(SystemExit) as e:
        cli.main()
    out, err = capsys.readouterr()
    return e.value.code, out, err


@pytest.mark.parametrize("case", ERROR_CASES, ids=[c[0] for c in ERROR_CASES])
def test_error_table(case, bad, tiny_gpt2_dir, tmp_path, monkeypatch, capsys):
    _, args, words, env = case
    (tmp_path / "empty").mkdir()
    subst = {"tiny": str(tiny_gpt2_dir), "tmp": str(tmp_path), "bad": str(bad["bad"]),
             **{k: str(v) for k, v in bad.items() if k != "bad"}}
    args = [a.format(**subst) for a in args]
    code, _, err = run_main(args, monkeypatch, capsys, env)
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for w in words:
        assert w in lines[0], (w, lines[0])


@pytest.mark.parametrize("command", [["kernels", "{tiny}"], ["evolution", "{tiny}", "--out", "{tmp}/e"],
                                     ["contrast", "{tiny}", "--a", "bundled:es_fortunes", "--b", "bundled:de_fortunes",
                                      "--verify"]])
def test_executor_ray_without_ray_is_one_line(command, tiny_gpt2_dir, tmp_path, monkeypatch, capsys):
    """Ray not installed (its import fails): one line naming the extra, exit 2, before anything is computed."""
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    args = [a.format(tiny=tiny_gpt2_dir, tmp=tmp_path) for a in command]
    code, _, err = run_main([*args, "--executor", "ray"], monkeypatch, capsys)
    assert code == 2 and err.count("\n") == 1, err
    assert err.startswith("error: --executor ray needs Ray") and "attnscope[distributed]" in err


@pytest.mark.parametrize("args", [["evolution", "./no/such/checkpoints"], ["kernels", "./no-such-model"]])
def test_failed_command_leaves_no_output_folder(args, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code, _, err = run_main(args, monkeypatch, capsys, {})
    assert code == 2, err
    assert list(tmp_path.iterdir()) == []  # the --out writability check removes what it created
    assert not list(tmp_path.glob("r/*.json")), "nothing may be computed or written before the checks"


@pytest.mark.parametrize("args,words", [
    (["kernels", "{tiny}", "--bogus"], "No such option: --bogus"),  # used to crash in typer's bundled click
    (["info", "no-such-model-xyz"], "could not load 'no-such-model-xyz'"),  # used to print 25 s of hub retries
])
def test_errors_through_the_console_script(args, words, tiny_gpt2_dir):
    """The real entry point in a fresh process, where the hub's retry messages would reach stderr too."""
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    r = subprocess.run([*PY, *[a.format(tiny=tiny_gpt2_dir) for a in args]], capture_output=True, text=True, env=env)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [r.stderr.strip()] and words in r.stderr


def test_interrupt_exits_130_in_one_line(monkeypatch, capsys, tiny_gpt2_dir, tmp_path):
    import attnscope.cli.app

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(attnscope.cli.app, "analyse_kernels", interrupted)
    code, _, err = run_main(["kernels", str(tiny_gpt2_dir), "--out", str(tmp_path / "k"), *K], monkeypatch, capsys)
    assert code == 130
    assert err.strip().splitlines() == ["interrupted: nothing was written (partial outputs are discarded)"]
    assert not (tmp_path / "k" / "kernels.json").exists()


def test_sigint_exits_130(tiny_gpt2_dir, tmp_path):
    """A real Ctrl-C (SIGINT) in the middle of a computation: exit 130, no traceback, nothing written."""
    env = {**os.environ, "ATTNSCOPE_CACHE": str(tmp_path / "cache")}
    p = subprocess.Popen([*PY, "kernels", str(tiny_gpt2_dir), "--samples", "tests/data", "--n-ctx", "32", "--n-samples",
                          "100000", "--n-heldout", "2", "--out", str(tmp_path / "k"), "--no-cache"],
                         stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
                         # a pytest-xdist worker ignores SIGINT, and an ignored signal stays ignored across exec
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.time() + 120
        buf = ""
        while "kernels: estimate" not in buf and time.time() < deadline:  # wait for the computation to start
            buf += p.stderr.read(1)
        p.send_signal(signal.SIGINT)
        _, rest = p.communicate(timeout=60)
    finally:
        p.kill()
    assert p.returncode == 130
    assert "Traceback" not in buf + rest and (buf + rest).strip().endswith("interrupted: nothing was written "
                                                                             "(partial outputs are discarded)")
    assert not (tmp_path / "k" / "kernels.json").exists()


def test_global_options_after_the_subcommand(tiny_gpt2_dir):
    r = runner.invoke(app, ["info", str(tiny_gpt2_dir), "--json", "--dtype", "float64", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["dtype"] == "float64"
    r = runner.invoke(app, ["--dtype", "float64", "info", str(tiny_gpt2_dir), "--json"])
    assert json.loads(r.stdout)["dtype"] == "float64"


def test_help_teaches():
    r = runner.invoke(app, ["--help"])
    assert r.exit_code == 0 and "info" in r.output and "--device" in r.output and "ATTNSCOPE_CACHE" in r.output
    commands = ["info", "check", "kernels", "neurons", "report", "demo", "probe", "train-demo", "cache"]
    helps = {c: runner.invoke(app, [c, "--help"]).output for c in commands}
    for c, h in helps.items():
        assert "<bool>" not in h and "<list" not in h and "<int>" not in h and "<str>" not in h.split("Options:")[-1], c
    for c in ("check", "kernels", "neurons", "report", "probe"):
        h = " ".join(helps[c].split())
        assert "bundled:NAME" in h and "en_moby_dick" in h and '"text" string' in h and "hf:DATASET" in h, c
        assert "in tokens" in h and "numbered from 0" in h and "--device" in h and "--revision" in h, c
    assert "--n-ctx TOKENS" in helps["kernels"] and "--layers LAYERS" in helps["kernels"]
    assert "--weights-query TOKEN" in helps["kernels"]


def _options(help_text: str) -> set[str]:
    return {w.rstrip(",") for w in help_text.split() if w.startswith("--")}


def test_report_has_the_options_of_kernels_and_neurons():
    k, n, rep = (_options(runner.invoke(app, [c, "--help"]).output) for c in ("kernels", "neurons", "report"))
    # --layer selects the later-layer method, a separate analysis the report does not run (it reports layer 0)
    assert (k | n) - {"--json", "--layer"} <= rep and "--later-layers" in rep


def test_options_default_to_the_settings_dataclasses():
    from attnscope.kernels.analysis import KernelSettings

    h = " ".join(runner.invoke(app, ["kernels", "--help"]).output.split())
    assert f"estimation windows (the method uses 500); at least 1 [default: {KernelSettings().n_samples}]" in h
    assert f"[default: {KernelSettings().n_heldout}]" in h


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


def test_latin1_accepted_with_replacement(tiny_gpt2_dir, bad):
    r = runner.invoke(app, ["check", str(tiny_gpt2_dir), "--text", str(bad["bad"] / "latin1.txt"), "--n-tokens", "32",
                            "--decode-errors", "replace", "--json", "--no-cache"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["max_abs_diff_pattern"] < 1e-4


def test_kernels_command_and_rerun_replaces_only_its_files(tiny_gpt2_dir, tmp_path):
    out = tmp_path / "k"
    r = runner.invoke(app, ["kernels", str(tiny_gpt2_dir), *K, "--out", str(out), "--no-cache"])
    assert r.exit_code == 0, r.output
    d = json.loads((out / "kernels.json").read_text())
    assert len(d["heads"]) == 8 and {"layer", "head", "category", "n_eff", "decay_length", "query_consistency",
                                     "equivariance", "tv_decomposition", "tv_kernel_vs_attention"} <= set(d["heads"][0])
    figs = {"kernel_curves.png", "n_eff_heatmap.png", "categories.png", "tv_per_head.png"}
    assert {p.name for p in out.glob("*.png")} == figs
    manifest = out / ".attnscope-kernels-manifest.json"
    assert set(json.loads(manifest.read_text())["files"]) == figs | {"kernels.json", "kernels.safetensors"}
    # an older run wrote a figure this run does not write; the user keeps notes in the same folder
    (out / "old_figure.png").write_bytes(b"old")
    (out / "notes.txt").write_text("mine")
    m = json.loads(manifest.read_text())
    manifest.write_text(json.dumps({**m, "files": m["files"] + ["old_figure.png", "notes-not-listed.txt"]}))
    before = (out / "kernels.json").stat().st_mtime_ns
    r = runner.invoke(app, ["kernels", str(tiny_gpt2_dir), *K, "--layers", "1", "--out", str(out), "--no-cache"])
    assert r.exit_code == 0, r.output
    assert not (out / "old_figure.png").exists() and (out / "notes.txt").read_text() == "mine"
    assert (out / "kernels.json").stat().st_mtime_ns > before
    assert {h["layer"] for h in json.loads((out / "kernels.json").read_text())["heads"]} == {1}
    assert not [p for p in out.iterdir() if "staging" in p.name or p.name.endswith(".tmp")]


def test_windows_overlap_is_marked(tiny_gpt2_dir, tmp_path, caplog):
    text = tmp_path / "small.txt"
    text.write_text(Path("tests/data/moby.txt").read_text()[:1200])
    r = runner.invoke(app, ["kernels", str(tiny_gpt2_dir), "--samples", str(text), "--n-ctx", "64", "--n-samples",
                            "16", "--n-heldout", "8", "--out", str(tmp_path / "k"), "--no-cache"])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "k" / "kernels.json").read_text())["provenance"]["windows_overlap"] is True
    assert "windows overlap" in caplog.text and "held-out windows overlap" in r.output


def test_cache_info_and_clear(tmp_path, monkeypatch):
    """A cache written before the marker existed (only attnscope's entry forms) is recognised and migrated;
    clear removes attnscope's entries only, after --yes (stdin is not a terminal here)."""
    monkeypatch.setenv("ATTNSCOPE_CACHE", str(tmp_path))
    (tmp_path / "tokens").mkdir()
    entry = tmp_path / "tokens" / f"{'a' * 16}-{'b' * 24}.npy"
    entry.write_bytes(b"1" * 1000)
    r = runner.invoke(app, ["cache", "info", "--json"])
    d = json.loads(r.stdout)
    assert d["path"] == str(tmp_path) and d["marked"] is True  # migrated: every entry has attnscope's form
    assert d["kinds"]["tokens"] == {"entries": 1, "bytes": 1000, "temporary": 0, "not_attnscope": 0}
    (tmp_path / "mine.txt").write_text("not attnscope's")
    assert json.loads(runner.invoke(app, ["cache", "info", "--json"]).stdout)["not_attnscope"] == 1
    r = runner.invoke(app, ["cache", "clear", "tokens"])
    assert r.exit_code != 0 and "stdin is not a terminal; pass --yes" in str(r.exception) and entry.exists()
    r = runner.invoke(app, ["cache", "clear", "tokens", "--yes"])
    assert r.exit_code == 0 and "freed 0.0 MB" in r.output
    assert not (tmp_path / "tokens").exists() and (tmp_path / "mine.txt").exists()


def test_demo_command(demo, tmp_path):
    r = runner.invoke(app, ["demo", "--out", str(tmp_path)])
    assert r.exit_code == 0, r.output
    assert f"report: {(tmp_path / 'report.html').resolve()}" in r.stdout
    d = json.loads((tmp_path / "neurons" / "neurons.json").read_text())
    assert d["summary"]["n_neurons_found"] > 0
    assert not [p for p in tmp_path.iterdir() if "staging" in p.name]
    assert f"-> {tmp_path / 'neurons'}" in r.output and "staging" not in r.output  # the final folder is named


def test_bos_option_is_recorded(tiny_gpt2_dir, tmp_path, monkeypatch, capsys):
    """--bos / --no-bos override the model's convention (the tiny GPT-2, a local model, has none by default) and
    the choice is recorded in kernels.json; the kernels differ (their own cache entries)."""
    got = {}
    for flag in ("--bos", "--no-bos"):
        out = tmp_path / flag
        code, _, err = run_main(["kernels", str(tiny_gpt2_dir), *K, "--layers", "0", "--out", str(out), flag],
                                monkeypatch, capsys, {"ATTNSCOPE_CACHE": str(tmp_path / "cache")})
        assert code == 0, err
        got[flag] = json.loads((out / "kernels.json").read_text())
    assert got["--bos"]["provenance"]["prepend_bos"] is True and got["--bos"]["provenance"]["bos"] == 0
    assert got["--no-bos"]["provenance"]["prepend_bos"] is False and got["--no-bos"]["provenance"]["bos"] is None
    assert got["--bos"]["provenance"]["cache_key"] != got["--no-bos"]["provenance"]["cache_key"]
