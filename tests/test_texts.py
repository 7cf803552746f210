"""Text sources: files, folders, JSONL, bundled texts; determinism; clear errors."""

from __future__ import annotations

import pytest
import torch

from attnscope.errors import AttnscopeError, TextTooShortError
from attnscope.texts import bundled_texts, load_windows, open_source, sample_windows, text_tokens, tokenize

DATA = "tests/data"


def test_sources(tmp_path):
    assert len(open_source(f"{DATA}/moby.txt").documents) == 1
    assert len(open_source(f"{DATA}/speeches.jsonl").documents) == 5
    folder = open_source(DATA)
    assert len(folder.documents) == 6
    assert {"en_moby_dick", "es_fortunes", "code_python"} <= set(bundled_texts())
    assert open_source("bundled:es_fortunes").n_chars > 10_000


def test_windows_deterministic(tiny_gpt2):
    w, _ = tiny_gpt2
    a, prov = load_windows(DATA, w.tokenizer, 32, 8, seed=3)
    b, _ = load_windows(DATA, w.tokenizer, 32, 8, seed=3)
    c, _ = load_windows(DATA, w.tokenizer, 32, 8, seed=4)
    assert a.shape == (8, 32) and torch.equal(a, b) and not torch.equal(a, c)
    assert prov["sha256"] == open_source(DATA).sha256 and prov["n_tokens"] > 1000
    # windows are real contiguous slices of the stream
    stream = torch.as_tensor(tokenize(open_source(DATA), w.tokenizer))
    s = a[0].tolist()
    assert any(stream[i : i + 32].tolist() == s for i in range(len(stream) - 31))


def test_bos_prepended():
    win = sample_windows(torch.arange(100).numpy(), 10, 4, seed=0, bos_token_id=-7)
    assert (win[:, 0] == -7).all() and win.shape == (4, 10)
    assert ((win[:, 2:] - win[:, 1:-1]) == 1).all()


def test_text_too_short(tiny_gpt2, tmp_path):
    w, _ = tiny_gpt2
    p = tmp_path / "short.txt"
    p.write_text("Call me Ishmael.")
    with pytest.raises(TextTooShortError, match=r"has \d+ tokens but 64 are needed per sample; pass a longer text"):
        load_windows(p, w.tokenizer, 64, 2)
    with pytest.raises(TextTooShortError, match="at least 500"):
        text_tokens(p, w.tokenizer, min_tokens=500)


def test_missing_and_bad_sources(tmp_path):
    with pytest.raises(AttnscopeError, match="no such text file or folder"):
        open_source(tmp_path / "nope.txt")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"body": "x"}\n')
    with pytest.raises(AttnscopeError, match="has no 'text' field"):
        open_source(bad)
    with pytest.raises(AttnscopeError, match="no bundled text"):
        open_source("bundled:klingon")


def test_hf_dataset_offline_is_one_line(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(AttnscopeError) as e:
        open_source("hf:no-such-user/no-such-dataset")
    assert "\n" not in str(e.value) and ("datasets" in str(e.value) or "offline" in str(e.value))
