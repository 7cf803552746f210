"""Text sources: files, folders, JSONL, bundled texts; determinism; clear errors."""

from __future__ import annotations

import pytest
import torch

from attnscope.core.errors import AttnscopeError, TextTooShortError
from attnscope.core.texts import bundled_texts, load_windows, open_source, sample_windows, text_tokens, tokenize

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


# --- input hygiene (issue 13) ----------------------------------------------------------------------
def test_strict_utf8_names_file_and_byte(tmp_path):
    from attnscope.core.texts import decoding

    p = tmp_path / "latin1.txt"
    p.write_bytes("na\xefve caf\xe9".encode("latin-1"))
    with pytest.raises(AttnscopeError, match=r"latin1.txt is not valid UTF-8 \(byte 2: .*--decode-errors replace"):
        open_source(p)
    with decoding("replace"):
        assert open_source(p).documents[0][1] == "na\ufffdve caf\ufffd"
    with pytest.raises(AttnscopeError):  # the relaxed decoding ends with its block
        open_source(p)


def test_binary_files(tmp_path, caplog):
    d = tmp_path / "folder"
    d.mkdir()
    (d / "good.txt").write_text("Call me Ishmael. " * 50)
    (d / "image.txt").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00" + bytes(range(256)))
    src = open_source(d)
    assert [n for n, _ in src.documents] == ["good.txt"]
    assert "skipped 1 binary file(s)" in caplog.text and "image.txt" in caplog.text
    with pytest.raises(AttnscopeError, match="image.txt is a binary file"):
        open_source(d / "image.txt")


@pytest.mark.parametrize("line,words", [
    ('{"text": null}', "not a string"), ('{"text": 3}', "not a string"), ('{"text": ["a"]}', "not a string"),
    ('["text"]', "is a JSON list, not an object"), ('"text"', "is a JSON str, not an object"),
    ('{"body": "x"}', "has no 'text' field"), ('{"text": "a"', "is not valid JSON"),
])
def test_jsonl_rejects_non_text(tmp_path, line, words):
    p = tmp_path / "x.jsonl"
    p.write_text('{"text": "fine"}\n' + line + "\n")
    with pytest.raises(AttnscopeError, match=rf"x.jsonl:2 .*{words}"):
        open_source(p)


def test_bundled_all_and_names(tiny_gpt2):
    w, _ = tiny_gpt2
    names = bundled_texts()
    from attnscope.core.texts import bundled_dir

    # bundled: is the bundled folder, the same documents as `kernels --samples bundled:` reads
    assert open_source("bundled:").sha256 == open_source(bundled_dir()).sha256
    assert {f"{n}.txt" for n in names} <= {n for n, _ in open_source("bundled:").documents}
    assert open_source("bundled:en_moby_dick.txt").sha256 == open_source("bundled:en_moby_dick").sha256
    assert len(text_tokens("bundled:", w.tokenizer, max_tokens=50)) == 50  # --calibration / --text accept it


def test_unreadable_input_is_one_line(tmp_path, monkeypatch):
    import attnscope.core.texts as T

    p = tmp_path / "locked.txt"
    p.write_text("x")

    def denied(path):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(T.Path, "read_bytes", denied)  # chmod 000 does not stop root, who runs these tests here
    with pytest.raises(AttnscopeError, match="cannot read .*locked.txt \\(permission denied\\)"):
        open_source(p)


def test_file_name_that_is_not_utf8(tmp_path):
    """A Latin-1 file name (``caf\\xe9.txt``, decoded with surrogates): hashed as its bytes, and written into an
    HTML page as an escape, not a UnicodeEncodeError (issue 22)."""
    import os

    from attnscope.report import write_report

    with open(os.path.join(os.fsencode(tmp_path), b"caf\xe9.txt"), "wb") as f:
        f.write(b"Call me Ishmael.")
    name = os.fsdecode(b"caf\xe9.txt")
    src = open_source(tmp_path / name)
    assert src.documents[0][0] == name and len(src.sha256) == 64
    page = write_report(tmp_path / "r", command=f"attnscope kernels m --samples {name}").read_bytes().decode("utf-8")
    assert "caf\\udce9.txt" in page
