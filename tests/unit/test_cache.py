"""On-disk caches (issue 13): full-content keys, kill-and-resume, concurrent writers, corruption, --no-cache."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from attnscope.core import cache
from attnscope.core.texts import _cache_path, open_source, tokenize
from attnscope.kernels.analysis import KernelSettings, analyse_kernels
from attnscope.models import load_model

DATA = "tests/data"
S = KernelSettings(samples=DATA, n_ctx=32, n_samples=2, n_heldout=2)


@pytest.fixture()
def cdir(tmp_path, monkeypatch) -> Path:
    d = tmp_path / "cache"
    monkeypatch.setenv("ATTNSCOPE_CACHE", str(d))
    return d


def _entries(d: Path) -> list[Path]:
    return sorted(p for p in d.iterdir() if not p.name.startswith(".")) if d.exists() else []


def _same(a, b) -> None:
    assert [r.__dict__ for r in a.records] == [r.__dict__ for r in b.records]
    assert a.arrays.keys() == b.arrays.keys()
    for k in a.arrays:
        assert torch.allclose(a.arrays[k].float().cpu(), b.arrays[k].float().cpu(), atol=1e-6), k


# --- keys ------------------------------------------------------------------------------------------
def test_edited_weights_get_a_new_key(tiny_gpt2_dir, cdir):
    """Zero most layer-0 MLP input columns in memory: the old key sampled every (size/4096)-th element
    and kept it, so the old N_eff came back.  The full-content hash changes, and so does the result."""
    w = load_model(str(tiny_gpt2_dir))
    fp = w.fingerprint()
    assert load_model(str(tiny_gpt2_dir)).fingerprint() == fp  # same files: same key (memoised file hash)
    assert _entries(cdir / "filehash")
    before = analyse_kernels(w, S, progress=False)
    with torch.no_grad():
        w.W_in[0][:, : w.d_mlp - 6] = 0.0  # in place, as a user of the Python API would
    fp2 = w.fingerprint()
    assert fp2 != fp
    after = analyse_kernels(w, S, progress=False)
    assert after.provenance["cache_key"] != before.provenance["cache_key"]
    assert len(_entries(cdir / "kernels")) == 2
    with torch.no_grad():
        w.W_in[0][0, 0] += 1e-3  # one element: still a new key
    assert w.fingerprint() not in (fp, fp2)
    w.W_Q = w.W_Q.clone()  # a replaced tensor with equal content: the key follows the content
    assert w.fingerprint() == w.fingerprint() and w.fingerprint() not in (fp, fp2)


def test_tensor_hash_is_full_content():
    a = {"x": torch.zeros(10_000), "y": torch.ones(3, dtype=torch.bfloat16)}
    h = cache.tensor_sha256(a)
    for i in (0, 1234, 9_999):
        b = {**a, "x": a["x"].clone()}
        b["x"][i] = 1e-30
        assert cache.tensor_sha256(b) != h
    assert cache.tensor_sha256({**a, "x": torch.zeros(100, 100)}) != h  # shape is part of the key


def test_file_hash_memo_follows_size_and_mtime(tmp_path, cdir):
    f = tmp_path / "w.bin"
    f.write_bytes(b"a" * 1000)
    h = cache.file_sha256(f)
    import hashlib

    assert h == hashlib.sha256(b"a" * 1000).hexdigest()
    f.write_bytes(b"b" * 1000)
    os.utime(f, ns=(f.stat().st_atime_ns, f.stat().st_mtime_ns + 1_000_000))
    assert cache.file_sha256(f) == hashlib.sha256(b"b" * 1000).hexdigest()


# --- kill and resume, concurrency ------------------------------------------------------------------
KILL = """
import os, signal, sys
import safetensors.torch
from attnscope.kernels.analysis import KernelSettings, analyse_kernels
from attnscope.models import load_model

def killed(*a, **k):  # SIGKILL in the middle of writing the entry: kernels.json is written, the arrays are not
    os.kill(os.getpid(), signal.SIGKILL)

safetensors.torch.save_file = killed
analyse_kernels(load_model(sys.argv[1]), KernelSettings(samples="tests/data", n_ctx=32, n_samples=2, n_heldout=2),
                progress=False)
"""

RUN = """
import sys
from attnscope.kernels.analysis import KernelSettings, analyse_kernels
from attnscope.models import load_model
r = analyse_kernels(load_model(sys.argv[1]), KernelSettings(samples="tests/data", n_ctx=32, n_samples=2, n_heldout=2),
                    progress=False)
print(r.provenance["cache_key"])
"""


def _py(code: str, *args: str, cdir: Path) -> subprocess.Popen:
    env = {**os.environ, "ATTNSCOPE_CACHE": str(cdir), "PYTHONPATH": str(Path("src").resolve())}
    return subprocess.Popen([sys.executable, "-c", code, *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


@pytest.mark.integration  # subprocess runs of the CLI
def test_kill_while_writing_then_resume(tiny_gpt2_dir, cdir, monkeypatch):
    p = _py(KILL, str(tiny_gpt2_dir), cdir=cdir)
    p.communicate(timeout=300)
    assert p.returncode == -9  # really killed
    assert _entries(cdir / "kernels") == []  # only a hidden temporary folder may remain: never a half entry
    w = load_model(str(tiny_gpt2_dir))
    res = analyse_kernels(w, S, progress=False)  # resumes: computes and stores a complete entry
    assert len(_entries(cdir / "kernels")) == 1
    import attnscope.kernels.estimation as E

    monkeypatch.setattr(E, "_stream_layers", lambda *a, **k: (_ for _ in ()).throw(AssertionError("recomputed")))
    _same(analyse_kernels(w, S, progress=False), res)  # a hit now


@pytest.mark.integration  # subprocess runs of the CLI
def test_concurrent_runs_share_the_cache(tiny_gpt2_dir, cdir):
    procs = [_py(RUN, str(tiny_gpt2_dir), cdir=cdir) for _ in range(3)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], [o[1][-500:] for o in outs]
    assert len({o[0].strip() for o in outs}) == 1
    assert len(_entries(cdir / "kernels")) == 1 and len(_entries(cdir / "tokens")) == 1
    leftovers = [p for p in cdir.rglob("*") if p.name.endswith(".tmp")]
    assert leftovers == []
    res = analyse_kernels(load_model(str(tiny_gpt2_dir)), S, progress=False)
    _same(res, analyse_kernels(load_model(str(tiny_gpt2_dir)), S, cache=False, progress=False))


def test_atomic_writers_never_collide(tmp_path):
    target = tmp_path / "x.bin"
    errors: list[BaseException] = []

    def write(i: int) -> None:
        try:
            for _ in range(20):
                with cache.atomic_path(target) as tmp:
                    tmp.write_bytes(bytes([i]) * 10_000)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=write, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    data = target.read_bytes()
    assert not errors and len(data) == 10_000 and len(set(data)) == 1
    assert [p.name for p in tmp_path.iterdir()] == ["x.bin"]


def test_failed_write_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError), cache.atomic_path(tmp_path / "a.json") as tmp:
        tmp.write_text("half")
        raise RuntimeError
    with pytest.raises(RuntimeError), cache.atomic_dir(tmp_path / "entry") as tmp:
        (tmp / "kernels.json").write_text("{}")
        raise RuntimeError
    assert list(tmp_path.iterdir()) == []


# --- corruption: one test per cache file type ------------------------------------------------------
@pytest.mark.parametrize("damage", ["kernels.json garbage", "kernels.json missing", "kernels.safetensors truncated",
                                    "kernels.safetensors missing"])
def test_corrupt_kernels_entry_is_dropped_and_recomputed(damage, tiny_gpt2_dir, cdir, caplog):
    w = load_model(str(tiny_gpt2_dir))
    res = analyse_kernels(w, S, progress=False)
    [entry] = _entries(cdir / "kernels")
    name, how = damage.split()
    f = entry / name
    if how == "garbage":
        f.write_text('{"heads": [')
    elif how == "truncated":
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    else:
        f.unlink()
    again = analyse_kernels(w, S, progress=False)
    _same(again, res)
    assert "dropped unreadable cache entry" in caplog.text and str(entry) in caplog.text
    assert len([r for r in caplog.records if "dropped" in r.getMessage()]) == 1
    _same(analyse_kernels(w, S, progress=False), res)  # repaired: read back without a warning
    assert len([r for r in caplog.records if "dropped" in r.getMessage()]) == 1


@pytest.mark.parametrize("damage", ["truncated", "garbage", "wrong dtype"])
def test_corrupt_token_cache_is_dropped_and_recomputed(damage, tiny_gpt2, cdir, caplog):
    w, _ = tiny_gpt2
    src = open_source(f"{DATA}/moby.txt")
    stream = tokenize(src, w.tokenizer)
    path = _cache_path(w.tokenizer, src)
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[:200])
    elif damage == "garbage":
        path.write_bytes(os.urandom(300))
    else:
        np.save(path, stream.astype(np.float32))
    assert np.array_equal(tokenize(src, w.tokenizer), stream)
    assert "dropped unreadable cache entry" in caplog.text
    assert np.array_equal(np.load(path), stream)  # repaired on disk


def test_no_cache_bypasses_the_token_cache(tiny_gpt2, cdir, caplog):
    w, _ = tiny_gpt2
    src = open_source(f"{DATA}/moby.txt")
    stream = tokenize(src, w.tokenizer)
    path = _cache_path(w.tokenizer, src)
    path.write_bytes(b"corrupt")
    with cache.caching(False):
        assert np.array_equal(tokenize(src, w.tokenizer), stream)
    assert path.read_bytes() == b"corrupt" and "dropped" not in caplog.text  # neither read nor written


def test_corrupt_file_hash_memo_is_recomputed(tmp_path, cdir):
    f = tmp_path / "w.bin"
    f.write_bytes(b"abc")
    h = cache.file_sha256(f)
    [memo] = _entries(cdir / "filehash")
    memo.write_text("not a hash")
    assert cache.file_sha256(f) == h
    assert memo.read_text() == h


def test_corrupt_gguf_copy_is_dropped_and_rebuilt(tiny_gpt2_dir, tmp_path, cdir, monkeypatch, caplog):
    """The de-quantised .gguf cache: a truncated copy is detected (safetensors header vs length), dropped
    and rebuilt.  The .gguf reader is replaced by the tiny model (no .gguf is small enough for a test)."""
    import importlib
    import shutil

    import transformers

    R = importlib.import_module("attnscope.models.resolve")  # the module (the package exports a function of that name)

    gguf = tmp_path / "tiny.gguf"
    gguf.write_bytes(b"GGUF stand-in")
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir)
    tok = transformers.AutoTokenizer.from_pretrained(tiny_gpt2_dir)
    calls = []
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained",
                        lambda *a, **k: calls.append(1) or model)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: tok)
    r = R.ResolvedModel("tiny", "gguf", str(tmp_path), gguf.name)
    out = Path(R._dequantised_gguf(r))
    assert R._check_hf_folder(out) == out and len(calls) == 1
    assert Path(R._dequantised_gguf(r)) == out and len(calls) == 1  # a hit
    st = next(out.glob("*.safetensors"))
    st.write_bytes(st.read_bytes()[:1000])
    assert Path(R._dequantised_gguf(r)) == out and len(calls) == 2  # dropped and rebuilt
    assert "dropped unreadable cache entry" in caplog.text
    R._check_hf_folder(out)
    shutil.rmtree(out)
    (out.parent / f".{out.name}.123-abcd.tmp").mkdir()  # a killed writer's leftover is ignored
    assert Path(R._dequantised_gguf(r)) == out and len(calls) == 3
    gguf.write_bytes(b"GGUF stand-in, version 2")  # the .gguf changed: a new copy replaces the old one
    new = Path(R._dequantised_gguf(r))
    assert new != out and new.exists() and not out.exists() and len(calls) == 4


def test_cache_info_and_clear_api(cdir, tiny_gpt2):
    w, _ = tiny_gpt2
    tokenize(open_source(f"{DATA}/moby.txt"), w.tokenizer)
    (cdir / "other").mkdir()
    info = cache.cache_info()
    assert info["path"] == str(cdir) and info["kinds"]["tokens"]["entries"] == 1 and info["total_bytes"] > 0
    assert json.loads(json.dumps(info)) == info
    assert cache.cache_clear() > 0
    assert cache.cache_info()["total_bytes"] == 0 and (cdir / "other").exists()
