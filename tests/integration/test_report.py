"""The self-contained HTML report: written, offline, complete, escaped, and sections omitted on ``None``."""

from __future__ import annotations

import dataclasses
import re
from html.parser import HTMLParser
from pathlib import Path

import pytest

from attnscope.report import write_report

DATA = Path(__file__).resolve().parents[1] / "data"


@pytest.fixture(scope="module")
def results(hand_results):
    return hand_results


@pytest.fixture(scope="module")
def report(results, tmp_path_factory) -> tuple[Path, str]:
    w, k, c, n, figs = results
    out = tmp_path_factory.mktemp("report")
    path = write_report(out, model_info=w.info(), kernels=k, circuit=c, neurons=n, figures=figs,
                        command="attnscope report tiny --out x", provenance={"seed": 0, "note": "test"})
    return path, path.read_text(encoding="utf-8")


class _Collector(HTMLParser):
    """Ids, classes, and every src/href attribute of a page."""

    def __init__(self):
        super().__init__()
        self.ids: list[str] = []
        self.classes: list[list[str]] = []
        self.links: list[tuple[str, str, str]] = []
        self.tags: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        for k, v in attrs:
            if k == "id":
                self.ids.append(v)
            elif k == "class" and v:
                self.classes.append(v.split())
            elif k in ("src", "href", "data", "action", "poster", "srcset") and v is not None:
                self.links.append((tag, k, v))


def _parse(text: str) -> _Collector:
    p = _Collector()
    p.feed(text)
    return p


def test_written_and_self_contained(report, results):
    path, text = report
    assert path.name == "report.html" and path.is_file()
    assert text.startswith("<!DOCTYPE html>")
    p = _parse(text)
    for tag, attr, url in p.links:  # only in-page anchors and embedded data
        assert url.startswith(("#", "data:")), (tag, attr, url[:80])
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", text, re.I)
    assert "@import" not in text and "url(http" not in text and "fetch(" not in text
    assert "<link rel=\"stylesheet\"" not in text and not re.search(r"<script[^>]+src=", text)
    # every figure embedded as base64 PNG
    _, _, _, _, figs = results
    imgs = [u for t, a, u in p.links if t == "img"]
    assert len(imgs) == len(figs) and all(u.startswith("data:image/png;base64,") for u in imgs)


def test_key_elements(report, results):
    _, text = report
    p = _parse(text)
    for el_id in ("model-summary", "kernels", "head-table", "head-selector", "circuit", "conditions", "neurons",
                  "scope", "provenance", "command", "kernel-data", "sel-layer", "sel-head", "kernel-svg"):
        assert el_id in p.ids, el_id
    assert len(p.ids) == len(set(p.ids)), "duplicate ids"
    _, k, c, n, _ = results
    assert sum("neuron-card" in c for c in p.classes) == len(n.records) >= 1
    # one head-table row per head, every condition listed with its badge
    rows = re.search(r'<table id="head-table".*?<tbody>(.*?)</tbody>', text, re.S).group(1)
    assert rows.count("<tr ") == len(k.records)
    conds = re.search(r'<table id="conditions".*?<tbody>(.*?)</tbody>', text, re.S).group(1)
    assert conds.count("<tr") == len(c.conditions)
    assert conds.count("badge ok") + conds.count("badge fail") == len(c.conditions)
    for d in c.decisions:
        for reason in d.reasons:
            assert reason.replace("<", "&lt;").replace(">", "&gt;") in text
    assert "attnscope report tiny --out x" in text and "0.1.0" in text
    assert c.calibration_sha in text


def test_tokens_escaped_and_whitespace_visible(results, tmp_path):
    w, k, c, n, figs = results
    rec = n.records[0]
    evil = dataclasses.replace(rec, top_positive_tokens=[("<script>alert(1)</script>", 9.5), (" the", 1.0),
                                                         ("\n", 0.5)] + list(rec.top_positive_tokens),
                               label='"><img src=x onerror=alert(2)>')
    n2 = dataclasses.replace(n, cards=[evil] + n.cards[1:])
    text = write_report(tmp_path, model_info=w.info(), neurons=n2).read_text(encoding="utf-8")
    assert "<script>alert(1)</script>" not in text and "alert(1)" in text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    assert "<img src=x" not in text and "&lt;img src=x onerror=alert(2)&gt;" in text
    assert '<span class="ws">␣</span>the' in text and '<span class="ws">↵</span>' in text
    assert len(re.findall(r"<script\b", text)) == 1  # the page's own script only (no kernel data here)


def test_sections_omitted_when_none(results, tmp_path):
    w, k, c, n, figs = results
    only_k = write_report(tmp_path / "k", model_info=w.info(), kernels=k).read_text(encoding="utf-8")
    ids = _parse(only_k).ids
    assert "kernels" in ids and "head-table" in ids and "model-summary" in ids and "scope" in ids
    assert not {"circuit", "conditions", "neurons"} & set(ids)
    assert not any("neuron-card" in c for c in _parse(only_k).classes)
    assert "not part of this report (no neuron results given)" in only_k
    only_n = write_report(tmp_path / "n", model_info=w.info(), circuit=c, neurons=n).read_text(encoding="utf-8")
    ids = _parse(only_n).ids
    assert {"circuit", "conditions", "neurons"} <= set(ids)
    assert not {"kernels", "head-table", "head-selector", "kernel-data"} & set(ids)
    assert "not part of this report (no kernel results given)" in only_n
    failed = write_report(tmp_path / "f", model_info=w.info(), kernels=k,
                          circuit_error="no contextual head: <none> passes").read_text(encoding="utf-8")
    assert 'id="circuit-error"' in failed and "no contextual head: &lt;none&gt; passes" in failed
    bare = write_report(tmp_path / "b", model_info={"name": "m"}).read_text(encoding="utf-8")
    ids = _parse(bare).ids
    assert "model-summary" in ids and not {"kernels", "circuit", "neurons", "scope"} & set(ids)
    assert bare.count('class="omitted"') == 3


def test_scope_lists_every_condition(report, results):
    _, text = report
    _, k, circ, n, _ = results
    scope = text[text.index('<section id="scope">'):]
    for c in circ.conditions:
        assert c.name in scope
    assert "translation equivariance" in scope and "median r" in scope


def test_embedded_kernel_data_is_valid_json(report, results):
    import json

    _, text = report
    _, k, _, _, _ = results
    blob = re.search(r'<script type="application/json" id="kernel-data">(.*?)</script>', text, re.S).group(1)
    d = json.loads(blob)
    ok = k.arrays["offset_kernel"]
    assert len(d["offset_kernel"]) == ok.shape[0] and len(d["offset_kernel"][0]) == ok.shape[1]
    assert len(d["offset_kernel"][0][0]) == ok.shape[2]
    assert abs(d["offset_kernel"][0][0][0] - float(ok[0, 0, 0])) <= 1e-3 * abs(float(ok[0, 0, 0])) + 1e-12
    assert set(d["records"]) == {f"{r.layer}-{r.head}" for r in k.records}


def test_reasons_and_scope_follow_the_typed_results(report, results):
    """Unmet tests are marked from each decision's failed criteria, and every condition sits in the scope block
    of its own group (no parsing of names or reason strings)."""
    from attnscope.report.scope import SCOPE_GROUPS

    _, text = report
    _, _, c, _, _ = results
    decisions = re.search(r'<table id="head-decisions".*?<tbody>(.*?)</tbody>', text, re.S).group(1)
    assert decisions.count('<li class="unmet">') == sum(len(d.failed) for d in c.decisions) >= 1
    blocks = re.findall(r'<div class="scope-item"><h3>(.*?)</h3>(.*?)</div>', text, re.S)
    title = {html_title: body for html_title, body in blocks}
    for cond in c.conditions:
        assert cond.name in title[SCOPE_GROUPS[cond.group][0]], (cond.name, cond.group)


def test_css_and_js_are_package_files_inlined(report):
    from attnscope.report.write import asset

    _, text = report
    css, js = asset("report.css"), asset("report.js")
    assert len(css) > 1000 and len(js) > 1000
    assert f"<style>{css}</style>" in text and f"<script>{js}</script>" in text
