"""Issue 22, the hostile pass: one row per failing case, each run the way a user would hit it.

``CASES`` is the table (beside ``test_cli.ERROR_CASES``): the arguments, the exit status, words the one
``error:`` line must hold, and how the case is run: in this process through the console entry point
(``inproc``), in a fresh process (``proc``), under a real file-size limit (``fsize``: ``RLIMIT_FSIZE`` set in
the child), with a real SIGINT after a delay or once the staging folder appears (``sigint``), after a real
``kill -9`` of an earlier run (``kill9``), or through bash (``shell``, for ``<(cat f)``).  ``setup`` builds
decoys (user files at output paths, a user's folder as the cache, a leftover staging folder, a permuted
tokenizer) and ``check`` asserts what must survive: nothing lost, nothing stale, no empty folder.

The issue's groups 7-9 (``serve`` limits, Host allow-list, error format) are tested with the serve work.
"""

from __future__ import annotations

import io
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from test_cli import run_main
from typer.testing import CliRunner

import attnscope.cli.app as cli_app
import attnscope.cli.cache_cmds as cache_cmds
from attnscope.cli.app import app

PY = [sys.executable, "-m", "attnscope.cli"]  # the console entry point (attnscope.cli:main)
DATA = (Path(__file__).parents[1] / "data").resolve()
K = ("--samples", str(DATA), "--n-ctx", "32", "--n-samples", "2", "--n-heldout", "2")  # a fast kernels run
runner = CliRunner()


@dataclass(frozen=True)
class Case:
    id: str
    group: int  # the issue's failure group (1-12)
    args: tuple[str, ...]
    code: int = 2
    words: tuple[str, ...] = ()
    how: str = "inproc"  # inproc | proc | fsize | sigint | kill9 | shell
    # fsize: bytes (0: half the file `setup` stored as ctx["limit_file"]); sigint: seconds (0: at staging)
    param: float = 0.0
    setup: Callable[[Path, dict], None] | None = None
    check: Callable[[Path, dict, tuple[int, str, str]], None] | None = None
    env: dict[str, str] = field(default_factory=dict)


# --- decoys and checks ---------------------------------------------------------------------------------
def _write(p: Path, text: str | bytes) -> Path:
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(text if isinstance(text, bytes) else text.encode())
    return p


def _absent(*rels: str):
    def check(tmp, ctx, res):
        for r in rels:
            assert not (tmp / r).exists(), f"{r} was left behind"
    return check


def _no_staging(folder: str):
    def check(tmp, ctx, res):
        assert not list((tmp / folder).glob(".attnscope-staging-*")), "a staging folder was left behind"
    return check


def _all(*checks):
    def check(tmp, ctx, res):
        for c in checks:
            c(tmp, ctx, res)
    return check


DECOY_CACHE = {"kernels/src/matmul.cu": "__global__ void k() {}", "tokens/secrets.txt": "hunter2",
               "evolution/notes.md": "# my notes"}


def _decoy_cache(marked: bool):
    def setup(tmp, ctx):
        for rel, text in DECOY_CACHE.items():
            _write(tmp / "D" / rel, text)
        if marked:
            from attnscope.core.cache import MARKER, MARKER_TEXT

            _write(tmp / "D" / MARKER, MARKER_TEXT)
            ctx["entry"] = _write(tmp / "D" / "tokens" / f"{'a' * 16}-{'b' * 24}.npy", b"x" * 100)
    return setup


def _decoys_intact(tmp, ctx, res):
    for rel, text in DECOY_CACHE.items():
        assert (tmp / "D" / rel).read_text() == text, rel


def _entry_removed(tmp, ctx, res):
    assert not ctx["entry"].exists()


def _entry_kept(tmp, ctx, res):
    assert ctx["entry"].exists()


def _cache_info_counts_nothing(tmp, ctx, res):
    d = json.loads(res[1])
    assert d["marked"] is False and d["not_attnscope"] == 3 and d["total_bytes"] == 0
    assert all(k["entries"] == 0 for k in d["kinds"].values())


def _user_outputs(*rels: str):
    def setup(tmp, ctx):
        for r in rels:
            _write(tmp / "D" / r, f"the user's own {r}")
    return setup


def _user_outputs_intact(*rels: str):
    def check(tmp, ctx, res):
        for r in rels:
            assert (tmp / "D" / r).read_text() == f"the user's own {r}", r
    return check


def _replaced_by_attnscope(tmp, ctx, res):
    assert json.loads((tmp / "D" / "kernels.json").read_text())["heads"]


def _older_run_left_nested(tmp, ctx, res=None):
    """An older run of the command wrote later/L1/neurons.json (listed in its manifest)."""
    r = runner.invoke(app, ["kernels", ctx["tiny"], *K, "--out", str(tmp / "D"), "--no-cache", "--json"])
    assert r.exit_code == 0, r.output
    m = tmp / "D" / ".attnscope-kernels-manifest.json"
    _write(tmp / "D" / "later" / "L1" / "neurons.json", "{}")
    d = json.loads(m.read_text())
    m.write_text(json.dumps({**d, "files": d["files"] + ["later/L1/neurons.json"]}))


def _good_contrast(tmp, ctx):
    r = runner.invoke(app, ["contrast", "demo", "--a", "bundled:es_fortunes", "--b", "bundled:en_milton",
                            "--out", str(tmp / "c"), "--no-cache", "--json"])
    assert r.exit_code == 0, r.output
    ctx["limit_file"] = tmp / "c" / "contrast.json"
    ctx["good"] = ctx["limit_file"].read_bytes()


def _good_contrast_kept(tmp, ctx, res):
    assert ctx["limit_file"].read_bytes() == ctx["good"]  # the earlier good result, byte for byte
    json.loads(ctx["good"])


def _same_text_twice(tmp, ctx):
    shutil.copy(DATA / "moby.txt", tmp / "x.txt")
    shutil.copy(DATA / "moby.txt", tmp / "y.txt")


def _one_token_texts(tmp, ctx):
    _write(tmp / "rep.txt", "x " * 3000)
    _write(tmp / "a.txt", "a " * 3000)
    _write(tmp / "b.txt", "b " * 3000)


def _copy_of_tiny(tmp, ctx):
    shutil.copytree(ctx["tiny"], tmp / "copy")


def _non_utf8_name(tmp, ctx):
    with open(os.path.join(os.fsencode(tmp), b"caf\xe9.txt"), "wb") as f:  # not UTF-8: a Latin-1 name
        f.write((DATA / "moby.txt").read_bytes())


def _analysis_list(tmp, ctx):
    _write(tmp / "A" / "neurons.json", "[]")


def _cache_part_is_a_file(tmp, ctx):
    _write(tmp / "D" / "kernels", "a file, not a folder")


def _live_leftover(tmp, ctx):
    """A staging folder of a run still going (this process: alive) is not removed."""
    ctx["live"] = _write(tmp / "D" / f".attnscope-staging-{os.getpid()}-0123abcd" / "x.json", "{}").parent


def _live_leftover_kept(tmp, ctx, res):
    assert ctx["live"].is_dir()


def _oov_token_cache(tmp, ctx):
    """A well-formed token .npy whose ids are outside the vocabulary, at the cache path of the text."""
    from transformers import AutoTokenizer

    from attnscope.core.texts import _cache_path, open_source

    ctx["monkeypatch"].setenv("ATTNSCOPE_CACHE", str(tmp / "cache"))
    p = _cache_path(AutoTokenizer.from_pretrained(ctx["tiny"]), open_source(DATA / "moby.txt"))
    p.parent.mkdir(parents=True)
    np.save(p, np.array([10**6, 5], dtype=np.int64))


def _permuted_tokenizer(tmp, ctx):
    """The demo model copied; kernels computed (and cached); then vocabulary ids >= 2000 of tokenizer.json
    permuted in place (the weights' files are untouched)."""
    from attnscope.models import demo_model_path

    shutil.copytree(demo_model_path(), tmp / "dm")
    r = runner.invoke(app, ["kernels", str(tmp / "dm"), *K, "--layers", "0", "--out", str(tmp / "a"), "--json"],
                      env={"ATTNSCOPE_CACHE": str(tmp / "cache")})
    assert r.exit_code == 0, r.output
    tj = tmp / "dm" / "tokenizer.json"
    d = json.loads(tj.read_text())
    vocab = d["model"]["vocab"]
    high = sorted((i, t) for t, i in vocab.items() if i >= 2000)
    ids = [i for i, _ in high]
    for (_, t), new in zip(high, ids[::-1]):
        vocab[t] = new
    tj.write_text(json.dumps(d))


def _kernels_recomputed(tmp, ctx, res):
    from safetensors.torch import load_file

    r = runner.invoke(app, ["kernels", str(tmp / "dm"), *K, "--layers", "0", "--out", str(tmp / "c"), "--json",
                            "--no-cache"])
    assert r.exit_code == 0, r.output
    before, cached, fresh = (load_file(str(tmp / d / "kernels.safetensors")) for d in ("a", "b", "c"))
    assert all(cached[k].equal(fresh[k]) for k in fresh)  # the cache missed: same as --no-cache ...
    assert any(not before[k].equal(fresh[k]) for k in fresh)  # ... and the permutation changed the result


def _log_file_holds_traceback(tmp, ctx, res):
    line = res[2].strip().splitlines()[-1]
    log = Path(line.split("the traceback is in ")[1].split(" ")[0])
    text = log.read_text()
    assert "Traceback (most recent call last)" in text and "planted bug" in text
    log.unlink()


def _log_file_removed(tmp, ctx, res):
    Path(res[2].split("the traceback is in ")[1].split(" ")[0]).unlink()


def _fifo(tmp, ctx):
    os.mkfifo(tmp / "fifo.txt")
    data = (DATA / "moby.txt").read_bytes()

    def write():
        with open(tmp / "fifo.txt", "wb") as f:  # blocks until the command opens it, once
            f.write(data)
    threading.Thread(target=write, daemon=True).start()


def _planted(exc: BaseException):
    def patch(mp):
        def boom(*a, **k):
            raise exc
        mp.setattr(cli_app, "analyse_kernels", boom)
    return patch


class _Unprintable(Exception):
    def __str__(self):
        raise RuntimeError("str() fails too")


PATCHES = {"bug": _planted(ZeroDivisionError("planted bug")), "unprintable": _planted(_Unprintable()),
           "enospc": _planted(OSError(28, "No space left on device", "/data/out/kernels.json"))}


# --- the table -----------------------------------------------------------------------------------------
T, TINY = "{tmp}", "{tiny}"
CASES: list[Case] = [
    # 1. the error boundary: every exception class ends as one line
    Case("cache-part-is-a-file", 1, ("kernels", TINY, *K, "--out", f"{T}/k"), words=("kernels is a file",
         "ATTNSCOPE_CACHE"), setup=_cache_part_is_a_file, check=_absent("k"), env={"ATTNSCOPE_CACHE": f"{T}/D"}),
    Case("ulimit-f-while-writing", 1, ("kernels", TINY, *K, "--out", f"{T}/k", "--no-cache", "--json"),
         words=("File too large", "ulimit -f"), how="fsize", param=40_000, check=_absent("k")),
    *(Case(f"train-demo-{o[0][2:]}-{o[1]}", 1, ("train-demo", "--corpora", str(DATA), *o, "--out", f"{T}/m"),
           words=(f"{o[0]} {o[1]}",), check=_absent("m"))
      for o in [("--n-embd", "30"), ("--lr", "nan"), ("--batch-size", "0"), ("--n-ctx", "0"), ("--lr", "inf"),
                ("--max-minutes", "-1")]),
    Case("serve-analysis-neurons-json-is-a-list", 1, ("serve", TINY, "--analysis", f"{T}/A"),
         words=("neurons.json is a JSON list",), setup=_analysis_list),
    Case("non-utf8-file-name", 1, ("check", TINY, "--text", f"{T}/caf\udce9.txt", "--n-tokens", "32", "--json"),
         code=0, setup=_non_utf8_name),
    Case("ref-norm-1e300", 1, ("kernels", TINY, "--ref-norm", "1e300"), words=("--ref-norm 1e+300", "finite")),
    Case("seed-negative", 1, ("kernels", TINY, "--seed", "-1"), words=("--seed -1",)),
    Case("internal-error-has-a-log-file", 1, ("kernels", TINY, *K, "--out", f"{T}/k", "--no-cache", "--json"),
         code=1, words=("internal error: ZeroDivisionError: planted bug", "attnscope-internal-error-"),
         env={"patch": "bug"}, check=_all(_log_file_holds_traceback, _absent("k"))),
    Case("boundary-survives-an-unprintable-error", 1, ("kernels", TINY, *K, "--no-cache", "--json", "--out", f"{T}/k"),
         code=1, words=("internal error", "its message cannot be printed"), env={"patch": "unprintable"},
         check=_log_file_removed),
    Case("disk-full", 1, ("kernels", TINY, *K, "--no-cache", "--json", "--out", f"{T}/k"),
         words=("/data/out/kernels.json: No space left on device", "disk is full"), env={"patch": "enospc"}),
    # 2. Ctrl-C at start-up (torch still importing)
    Case("sigint-at-0.3s", 2, ("kernels", TINY, *K, "--n-samples", "100000", "--no-cache", "--out", f"{T}/k"),
         code=130, words=("interrupted",), how="sigint", param=0.3, check=_absent("k")),
    Case("sigint-at-1.5s", 2, ("kernels", TINY, *K, "--n-samples", "100000", "--no-cache", "--out", f"{T}/k"),
         code=130, words=("interrupted",), how="sigint", param=1.5, check=_absent("k")),
    # 3. contrast --out: staged, so a file-size limit cannot truncate the previous good result
    Case("contrast-rerun-under-ulimit-f", 3, ("contrast", "demo", "--a", "bundled:es_fortunes", "--b",
         "bundled:de_fortunes", "--out", f"{T}/c", "--no-cache", "--json"), words=("File too large",), how="fsize",
         setup=_good_contrast, check=_all(_good_contrast_kept, _no_staging("c"))),
    # 4. the cache owns only what it created
    Case("cache-clear-unmarked-user-folder", 4, ("cache", "clear", "--yes"), words=("no attnscope cache marker",),
         setup=_decoy_cache(False), check=_decoys_intact, env={"ATTNSCOPE_CACHE": f"{T}/D"}),
    Case("cache-info-counts-only-entries", 4, ("cache", "info", "--json"), code=0, setup=_decoy_cache(False),
         check=_all(_decoys_intact, _cache_info_counts_nothing), env={"ATTNSCOPE_CACHE": f"{T}/D"}),
    Case("cache-clear-keeps-user-files", 4, ("cache", "clear", "--yes"), code=0, setup=_decoy_cache(True),
         check=_all(_decoys_intact, _entry_removed), env={"ATTNSCOPE_CACHE": f"{T}/D"}),
    Case("cache-clear-not-a-terminal", 4, ("cache", "clear"), words=("stdin is not a terminal", "--yes"),
         setup=_decoy_cache(True), check=_entry_kept, env={"ATTNSCOPE_CACHE": f"{T}/D"}),
    Case("cache-clear-confirmed", 4, ("cache", "clear"), code=0, setup=_decoy_cache(True),
         check=_all(_decoys_intact, _entry_removed), env={"ATTNSCOPE_CACHE": f"{T}/D", "stdin": "y\n"}),
    Case("cache-clear-declined", 4, ("cache", "clear"), code=1, setup=_decoy_cache(True),
         check=_all(_decoys_intact, _entry_kept), env={"ATTNSCOPE_CACHE": f"{T}/D", "stdin": "n\n"}),
    # 5. user files at output paths
    Case("report-refuses-user-files", 5, ("report", TINY, "--out", f"{T}/D"),
         words=("neurons.csv (and 1 more) exists", "not written by attnscope", "--force"),
         setup=_user_outputs("report.html", "neurons/neurons.csv"),
         check=_user_outputs_intact("report.html", "neurons/neurons.csv")),
    Case("kernels-refuses-user-figure-at-publish", 5, ("kernels", TINY, *K, "--out", f"{T}/D", "--no-cache", "--json"),
         words=("categories.png", "not written by attnscope"), setup=_user_outputs("categories.png"),
         check=_all(_user_outputs_intact("categories.png"), _no_staging("D"))),
    Case("kernels-force-replaces-user-file", 5, ("kernels", TINY, *K, "--out", f"{T}/D", "--no-cache", "--force",
         "--json"), code=0, setup=_user_outputs("kernels.json"), check=_replaced_by_attnscope),
    Case("user-folder-where-a-file-goes", 5, ("kernels", TINY, *K, "--out", f"{T}/D", "--no-cache", "--force",
         "--json"), words=("kernels.json is a folder",), setup=_user_outputs("kernels.json/mine.txt"),
         check=_user_outputs_intact("kernels.json/mine.txt")),
    Case("rerun-leaves-no-empty-folder", 5, ("kernels", TINY, *K, "--out", f"{T}/D", "--no-cache", "--json"),
         code=0, setup=_older_run_left_nested, check=_absent("D/later")),
    # 6. leftovers after kills
    Case("kill-9-leftover-staging-cleaned", 6, ("kernels", TINY, *K, "--out", f"{T}/m", "--no-cache", "--json"),
         code=0, how="kill9", check=_no_staging("m")),
    Case("live-staging-folder-kept", 6, ("kernels", TINY, *K, "--out", f"{T}/D", "--no-cache", "--json"), code=0,
         setup=_live_leftover, check=_live_leftover_kept),
    Case("sigint-leaves-no-new-out", 6, ("report", TINY, "--out", f"{T}/new", "--no-cache"), code=130,
         words=("interrupted",), how="sigint", param=0, check=_absent("new")),
    Case("failed-run-leaves-no-new-out", 6, ("neurons", TINY, "--calibration", f"{T}/rep.txt", "--out", f"{T}/a/b"),
         words=("calibration text",), setup=_one_token_texts, check=_absent("a")),
    # 10. cache keys cover everything that changes the result
    Case("tokenizer-ids-permuted", 10, ("kernels", f"{T}/dm", *K, "--layers", "0", "--out", f"{T}/b", "--json"),
         code=0, setup=_permuted_tokenizer, check=_kernels_recomputed, env={"ATTNSCOPE_CACHE": f"{T}/cache"}),
    Case("out-of-vocabulary-token-cache", 10, ("check", TINY, "--text", str(DATA / "moby.txt"), "--n-tokens", "32",
         "--json"), code=0, words=("dropped unreadable cache entry", "outside this tokenizer's"),
         setup=_oov_token_cache, env={"ATTNSCOPE_CACHE": f"{T}/cache"}),
    # 11. degenerate inputs: refused, never scored as perfect
    Case("ref-norm-inf", 11, ("kernels", TINY, "--ref-norm", "inf"), words=("--ref-norm inf", "finite")),
    Case("ref-norm-nan", 11, ("kernels", TINY, "--ref-norm", "nan"), words=("--ref-norm nan",)),
    Case("contrast-identical-content", 11, ("contrast", TINY, "--a", f"{T}/x.txt", "--b", f"{T}/y.txt", "--verify"),
         words=("hold the same text",), setup=_same_text_twice),
    Case("calibration-one-repeated-token", 11, ("neurons", TINY, "--calibration", f"{T}/rep.txt", "--out", f"{T}/n"),
         words=("calibration text", "distinct tokens", "at least 20"), setup=_one_token_texts, check=_absent("n")),
    Case("eval-one-token-texts", 11, ("neurons", TINY, "--heads", "0-3", "--eval", f"{T}/a.txt", "--eval", f"{T}/b.txt",
         "--out", f"{T}/n"), words=("evaluation text", "distinct tokens"), setup=_one_token_texts, check=_absent("n")),
    Case("evolution-same-checkpoint-twice", 11, ("evolution", TINY, TINY, "--out", f"{T}/e"),
         words=("same checkpoint",), check=_absent("e")),
    Case("evolution-identical-copies", 11, ("evolution", TINY, f"{T}/copy", "--out", f"{T}/e"),
         words=("identical weights",), setup=_copy_of_tiny, check=_absent("e")),
    # 12. input handling
    Case("hf-offline-fails-fast", 12, ("kernels", TINY, "--samples", "hf:wikitext", "--out", f"{T}/k"),
         words=("hub cannot be reached",), env={"HF_HUB_OFFLINE": "1", "max_s": "3"}),
    Case("hf-unreachable-fails-fast", 12, ("kernels", TINY, "--samples", "hf:wikitext", "--out", f"{T}/k"),
         words=("hub cannot be reached",), env={"HF_HUB_OFFLINE": "", "max_s": "3"}),
    Case("process-substitution", 12, ("check", TINY, "--text", f"<(cat {DATA}/moby.txt)", "--n-tokens", "32",
         "--json"), code=0, how="shell"),
    Case("fifo", 12, ("check", TINY, "--text", f"{T}/fifo.txt", "--n-tokens", "32", "--json"), code=0, how="proc",
         setup=_fifo),
    Case("empty-samples", 12, ("kernels", TINY, "--samples", ""), words=("--samples was given an empty string",)),
    Case("empty-samples-equals", 12, ("kernels", TINY, "--samples="), words=("--samples was given an empty string",)),
    Case("empty-out", 12, ("kernels", TINY, "--out", ""), words=("--out was given an empty string",)),
]


# --- running a case ------------------------------------------------------------------------------------
def _child_env(env: dict[str, str]) -> dict[str, str]:
    out = {**os.environ, **{k: v for k, v in env.items() if k.isupper()}}
    return {k: v for k, v in out.items() if v != ""}


def _start(args: list[str], env: dict[str, str], **kw) -> subprocess.Popen:
    # a pytest-xdist worker ignores SIGINT, and an ignored signal stays ignored across exec
    def pre():
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        if kw.get("fsize"):
            resource.setrlimit(resource.RLIMIT_FSIZE, (kw["fsize"], kw["fsize"]))
    return subprocess.Popen([*PY, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=_child_env(env), preexec_fn=pre)


def _wait_for(pattern: Path, p: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while not list(pattern.parent.glob(pattern.name)):
        assert p.poll() is None and time.time() < deadline, "the run ended before its staging folder appeared"
        time.sleep(0.05)


def run_case(case: Case, tmp: Path, ctx: dict, monkeypatch, capsys) -> tuple[int, str, str]:
    args = [a.format(tmp=tmp, tiny=ctx["tiny"]) for a in case.args]
    env = {"ATTNSCOPE_CACHE": str(tmp / "cache"), **{k: v.format(tmp=tmp) for k, v in case.env.items()}}
    if case.how == "inproc":
        for k, v in env.items():
            if k.isupper():
                monkeypatch.setenv(k, v) if v else monkeypatch.delenv(k, raising=False)
        if "patch" in env:
            PATCHES[env["patch"]](monkeypatch)
        if "stdin" in env:
            monkeypatch.setattr(cache_cmds, "stdin_is_terminal", lambda: True)
            monkeypatch.setattr(sys, "stdin", io.StringIO(env["stdin"]))
        t0 = time.perf_counter()
        res = run_main(args, monkeypatch, capsys)
        if "max_s" in env:
            assert time.perf_counter() - t0 < float(env["max_s"]), "took too long"
        return res
    if case.how == "shell":
        cmd = " ".join([*PY, *[a if a.startswith("<(") else f"'{a}'" for a in args]])
        r = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, env=_child_env(env), timeout=300)
        return r.returncode, r.stdout, r.stderr
    if case.how == "kill9":  # an earlier run killed while its staging folder exists, then this run
        p = _start(["train-demo", "--corpora", str(DATA), "--steps", "100000", "--out", str(tmp / "m")], env)
        _wait_for(tmp / "m" / ".attnscope-staging-*", p)
        p.kill()
        p.wait()
        assert list((tmp / "m").glob(".attnscope-staging-*")), "kill -9 left no staging folder to clean"
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        return run_main(args, monkeypatch, capsys)
    fsize = int(case.param or len(ctx["limit_file"].read_bytes()) // 2) if case.how == "fsize" else 0
    for _ in range(3):
        p = _start(args, env, fsize=fsize)
        try:
            if case.how == "sigint":
                if case.param:
                    time.sleep(case.param)
                else:
                    _wait_for(Path(args[args.index("--out") + 1]) / ".attnscope-staging-*", p)
                p.send_signal(signal.SIGINT)
            out, err = p.communicate(timeout=300)
        finally:
            p.kill()
        if not _before_first_line(p.returncode, err):
            break
    return p.returncode, out, err


def _before_first_line(code: int, err: str) -> bool:
    """A SIGINT that arrived while the interpreter itself was still starting (on a loaded machine, the first
    0.1-0.4 s), before any line of attnscope ran: no Python code can handle it, so the run is repeated."""
    return code == -signal.SIGINT and "KeyboardInterrupt" in err and "attnscope" not in err.replace("-m attnscope", "")


@pytest.mark.parametrize("case", CASES, ids=[f"g{c.group}-{c.id}" for c in CASES])
def test_hostile_case(case, tmp_path, tiny_gpt2_dir, monkeypatch, capsys):
    ctx = {"tiny": str(tiny_gpt2_dir), "monkeypatch": monkeypatch}
    if case.setup:
        case.setup(tmp_path, ctx)
    code, out, err = run_case(case, tmp_path, ctx, monkeypatch, capsys)
    assert code == case.code, err[-2000:]
    assert "Traceback" not in err, err[-2000:]
    lines = [ln for ln in err.replace("\r", "\n").splitlines() if ln.strip()]
    verdicts = [ln for ln in lines if ln.startswith(("error:", "interrupted:"))]
    if case.code in (2, 130) or (case.code == 1 and case.words):
        assert len(verdicts) == 1 and verdicts[0] == lines[-1], err[-2000:]  # one line, the last one
    else:
        assert not verdicts, err[-2000:]
    for w in case.words:
        assert w in err, (w, err[-2000:])
    if case.check:
        case.check(tmp_path, ctx, (code, out, err))


def test_every_group_of_the_issue_has_a_row():
    assert {c.group for c in CASES} == {1, 2, 3, 4, 5, 6, 10, 11, 12}  # 7-9: serve, tested with the serve work
    assert len({c.id for c in CASES}) == len(CASES)
