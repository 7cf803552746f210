"""The unseen-text benchmark (issue 19): committed texts match the manifest, the split is frozen and disjoint,
no source overlaps the bundled texts or the training corpora, and the man-page stripper keeps the text."""

import hashlib
import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "bench" / "unseen"


def _load_builder():
    spec = importlib.util.spec_from_file_location("make_unseen_bench", ROOT / "scripts" / "make_unseen_bench.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def test_manifest_matches_the_committed_texts():
    man = json.loads((BENCH / "manifest.json").read_text())
    assert len(man["sources"]) >= 12
    for s in man["sources"]:
        data = (BENCH / "texts" / f"{s['name']}.txt").read_bytes()
        assert hashlib.sha256(data).hexdigest() == s["sha256"], s["name"]
        assert s["overlap_with_corpora"] < 0.01, s["name"]
        assert s["package"] and s["version"] and s["files"]


def test_split_is_disjoint_and_pairs_stay_in_their_half():
    man = {s["name"]: s for s in json.loads((BENCH / "manifest.json").read_text())["sources"]}
    sp = json.loads((BENCH / "split.json").read_text())
    dev, rep = set(sp["halves"]["dev"]), set(sp["halves"]["report"])
    ext = set(sp["extension"]["dev"])  # added to the development half only (issue 19, step 8)
    assert not dev & rep and not ext & (dev | rep) and dev | rep | ext == set(man)
    assert {s for s in man if man[s].get("extension") == "dev"} == ext
    for p in sp["pairs"]["dev_extension"]:
        assert {p["a"], p["b"]} & ext and {p["a"], p["b"]} <= dev | ext
    assert len(sp["pairs"]["dev_extension"]) == len(ext) * len(dev) + len(ext) * (len(ext) - 1) // 2
    assert sum(len(v) for v in sp["pairs"].values()) >= 16
    for h, names in sp["halves"].items():  # the seeded halves: their pairs and adversarial inputs as frozen
        for p in sp["pairs"][h]:
            assert p["a"] in names and p["b"] in names
        tags = {t for p in sp["pairs"][h] for t in p["tags"]}
        assert {"same genre, different language", "code vs prose quoting identifiers"} <= tags, h
        for name, adv in sp["adversarial"][h].items():
            assert set(adv["from"]) <= set(names), name
            data = (BENCH / "texts" / f"{name}.txt").read_bytes()
            assert hashlib.sha256(data).hexdigest() == adv["sha256"]


def test_split_is_the_seeded_one():
    b = _load_builder()
    man = [m for m in json.loads((BENCH / "manifest.json").read_text())["sources"] if "extension" not in m]
    assert len(man) == len(b.SOURCES)  # the development half's extension is not part of the seeded split
    assert b.split_sources(man) == json.loads((BENCH / "split.json").read_text())["halves"]


@pytest.mark.parametrize("roff, want", [
    ('.TH LS 1\n.SH NAME\nls \\- list directory\n.\\" a comment\n.B \\-a\nshow \\fBall\\fR files\n',
     "NAME\nls - list directory\n-a\nshow all files\n"),
])
def test_roff_to_text(roff, want):
    assert _load_builder().roff_to_text(roff) == want


def test_fetch_uses_the_downloaded_file_or_downloads_it_once(tmp_path, monkeypatch):
    """Offline: the package file already in the download folder is used; when absent, the registry's own
    client (apt-get download in the folder, pip download -d folder) is run once and the file it wrote is used."""
    mb = _load_builder()
    runs = []

    def fake_run(cmd, cwd=None, check=False):
        runs.append((cmd[:3], cwd))
        (tmp_path / ("fortunes-it_1%3a1.99-4.1_all.deb" if cmd[0] == "apt-get" else "requests-2.32.3-py3.whl")).touch()

    monkeypatch.setattr(mb.subprocess, "run", fake_run)
    deb, whl = (next(s for s in mb.SOURCES if s.package == p) for p in ("fortunes-it", "requests"))
    assert mb._fetch(deb, tmp_path).name == "fortunes-it_1%3a1.99-4.1_all.deb"
    assert mb._fetch(whl, tmp_path).name == "requests-2.32.3-py3.whl"
    assert runs == [(["apt-get", "download", "fortunes-it=1.99-4.1"], tmp_path),
                    ([sys.executable, "-m", "pip"], None)]
    assert mb._fetch(deb, tmp_path) and mb._fetch(whl, tmp_path) and len(runs) == 2  # found: no second download
