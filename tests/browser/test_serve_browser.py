"""`attnscope serve` in a real browser: headless Debian Chromium driven by Selenium, against a server started
on a free port.  Types a Spanish sentence, chooses the demo neuron with the highest *true* one-vs-rest effect
for Spanish (computed here from the model's own activations), and checks that the plotted true activation is
the API's, that the conditions panel renders, that bad input gets a message, that the share link reopens the
same analysis, and that the console logs no errors.  Saves docs/img/serve.png when ATTNSCOPE_SAVE_SCREENSHOT=1.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from chromium import browser_missing
from chromium import css as _by

MISSING = browser_missing() or (None if importlib.util.find_spec("fastapi") else
                                "fastapi not installed: pip install fastapi uvicorn")
pytestmark = [pytest.mark.browser, pytest.mark.skipif(MISSING is not None, reason=MISSING or "")]
DOCS = Path(__file__).resolve().parents[2] / "docs"
SPANISH = ("El pueblo estaba en silencio cuando llegó la noche, y los niños dormían mientras sus padres hablaban de "
           "la cosecha, del tiempo y de los viajes que nunca harían juntos por el mundo. Nadie sabía qué pasaría "
           "mañana, pero todos esperaban que la lluvia volviera pronto a los campos.")


def spanish_neuron(m) -> tuple[int, float]:
    """The neuron with the highest true one-vs-rest effect d for bundled:es_fortunes (method §15): means and
    variances of the model's own layer-0 pre-activations over positions n >= min_position of 256-token windows."""
    from attnscope.core.texts import bundled_texts, open_source, tokenize
    from attnscope.exact.forward import iter_layers

    T, n_min = m.circ.T, m.circ.settings.min_position
    acts: dict[str, torch.Tensor] = {}
    for name in bundled_texts():
        ids = torch.as_tensor(tokenize(open_source(f"bundled:{name}"), m.w.tokenizer))[: 4 * T]
        wins = ids[: len(ids) // T * T].reshape(-1, T)
        acts[name] = next(iter_layers(m.w, wins, stop_layer=0)).mlp_pre[:, n_min:].reshape(-1, m.w.d_mlp).double()
    A = acts.pop("es_fortunes")
    B = torch.cat(list(acts.values()))
    d = (A.mean(0) - B.mean(0)) / ((A.var(0) + B.var(0)) / 2).sqrt()
    return int(d.argmax()), float(d.max())


@pytest.fixture(scope="module")
def page(demo):
    from attnscope.models import load_model
    from attnscope.serve import background_server, create_app, load_serve_model

    m = load_serve_model(load_model("demo"), log=lambda *_: None)
    from chromium import chrome_driver, set_viewport

    with background_server(create_app(m)) as url, chrome_driver(1280, 1500) as drv:
        set_viewport(drv, 1280, 1500)
        yield m, url, drv


def _wait(drv, cond, timeout: float = 30.0):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(drv, timeout).until(cond)


def _post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    return json.load(urllib.request.urlopen(req, timeout=30))


def _plotted(drv, line_id: str) -> list[float]:
    """The values a polyline of the plot shows, read back through the plot's own axis."""
    svg = drv.find_element(*_by("#plot-svg"))
    lo, hi, top, bottom = (float(svg.get_attribute(f"data-{k}")) for k in ("ymin", "ymax", "top", "bottom"))
    pts = drv.find_element(*_by(f"#{line_id}")).get_attribute("points").split()
    return [hi - (float(p.split(",")[1]) - top) / (bottom - top) * (hi - lo) for p in pts]


def _severe(drv) -> list:
    return [e for e in drv.get_log("browser") if e.get("level") == "SEVERE"]


def test_spanish_neuron_true_activation_is_plotted(page):
    m, url, drv = page
    k, d = spanish_neuron(m)
    assert d > 1.0  # a real Spanish neuron exists in the demo model
    drv.get(url + "/")
    _wait(drv, lambda dr: len(dr.find_elements(*_by("#neuron-table tbody tr"))) > 100)
    search = drv.find_element(*_by("#neuron-search"))
    search.send_keys(str(k))
    row = _wait(drv, lambda dr: dr.find_element(*_by(f'#neuron-table tbody tr[data-neuron="{k}"]')))
    row.click()
    _wait(drv, lambda dr: dr.find_element(*_by("#neuron-input")).get_attribute("value") == str(k))
    drv.find_element(*_by("#text-input")).send_keys(SPANISH)
    drv.find_element(*_by("#analyse-btn")).click()
    _wait(drv, lambda dr: dr.find_elements(*_by("#plot-true")))
    api = _post(url + "/api/analyse", {"text": SPANISH, "neuron": k})
    shown = _plotted(drv, "plot-true")
    span = max(api["true"] + api["pred"]) - min(api["true"] + api["pred"] + [0.0])
    assert len(shown) == api["n_tokens"] > m.circ.settings.min_position
    assert max(abs(a - b) for a, b in zip(shown, api["true"])) < 1e-3 * span + 1e-4
    pred = _plotted(drv, "plot-pred")
    assert max(abs(a - b) for a, b in zip(pred, api["pred"])) < 1e-3 * span + 1e-4
    # the conditions panel: every condition the API measured, and its verdict
    assert drv.find_element(*_by("#conditions-section")).is_displayed()
    rows = drv.find_elements(*_by("#conditions-table tbody tr"))
    assert [r.find_element(*_by("td")).text for r in rows] == [c["name"] for c in api["conditions"]]
    banner = drv.find_element(*_by("#scope-banner"))
    assert banner.text == api["scope_message"] and banner.get_attribute("class") in ("inside", "outside")
    # the coloured text holds the typed text, token by token; the evidence panel answered
    assert drv.find_element(*_by("#coloured-text")).text.replace("\n", " ") == SPANISH
    assert "predicted" in drv.find_element(*_by("#evidence-sum")).text
    assert not _severe(drv)
    if os.environ.get("ATTNSCOPE_SAVE_SCREENSHOT") == "1":
        _screenshot(drv, DOCS / "img" / "serve.png")


def test_share_link_reopens_the_analysis(page):
    m, url, drv = page
    share = drv.find_element(*_by("#share-url")).get_attribute("value")
    assert share.startswith(url + "/#") and "text=" in share and "model=demo" in share
    before = _plotted(drv, "plot-true")
    neuron = drv.find_element(*_by("#neuron-input")).get_attribute("value")
    drv.get("about:blank")
    drv.get(share)
    _wait(drv, lambda dr: dr.find_elements(*_by("#plot-true")))
    assert drv.find_element(*_by("#neuron-input")).get_attribute("value") == neuron
    assert drv.find_element(*_by("#text-input")).get_attribute("value") == SPANISH
    assert _plotted(drv, "plot-true") == pytest.approx(before, abs=1e-6)
    assert not _severe(drv)


def test_bad_input_gets_a_message(page):
    _, url, drv = page
    drv.get(url + "/")
    _wait(drv, lambda dr: len(dr.find_elements(*_by("#neuron-table tbody tr"))) > 100)
    drv.find_element(*_by("#analyse-btn")).click()
    msg = drv.find_element(*_by("#message"))
    assert msg.is_displayed() and "The text is empty" in msg.text
    drv.find_element(*_by("#text-input")).send_keys("Hola")
    box = drv.find_element(*_by("#neuron-input"))
    box.clear()
    box.send_keys("99999")
    drv.find_element(*_by("#analyse-btn")).click()
    _wait(drv, lambda dr: "does not exist" in dr.find_element(*_by("#message")).text)
    assert "numbered 0..767" in msg.text
    drv.find_element(*_by("#contrast-btn")).click()
    assert "Both texts are needed" in drv.find_element(*_by("#contrast-message")).text
    assert not _severe(drv)


def _screenshot(drv, path: Path) -> None:
    from chromium import set_viewport

    drv.find_element(*_by("#text-a")).send_keys(SPANISH)
    drv.find_element(*_by("#text-b")).send_keys("Call me Ishmael. Some years ago, never mind how long precisely, "
                                                "having little or no money in my purse, and nothing particular to "
                                                "interest me on shore, I thought I would sail about a little and see "
                                                "the watery part of the world.")
    drv.find_element(*_by("#contrast-btn")).click()
    _wait(drv, lambda dr: dr.find_element(*_by("#contrast-result")).is_displayed())
    time.sleep(0.3)
    h = int(drv.execute_script("return document.documentElement.scrollHeight"))
    set_viewport(drv, 1280, min(h, 6000))
    drv.execute_script("window.scrollTo(0, 0)")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    assert drv.save_screenshot(str(tmp))
    shutil.move(tmp, path)
    set_viewport(drv, 1280, 1500)


def test_upload_and_downloads(page, tmp_path):
    """A text file chosen in the upload box is analysed; the JSON and PNG downloads hold what is shown."""
    _, url, drv = page
    f = tmp_path / "texto.txt"
    f.write_text(SPANISH, encoding="utf-8")
    drv.get(url + "/")
    _wait(drv, lambda dr: len(dr.find_elements(*_by("#neuron-table tbody tr"))) > 100)
    drv.find_element(*_by("#file-input")).send_keys(str(f))
    _wait(drv, lambda dr: dr.find_elements(*_by("#plot-true")))
    assert drv.find_element(*_by("#text-input")).get_attribute("value") == SPANISH
    # capture the downloads instead of writing files: replace the page's download(name, blob)
    drv.execute_script("window.__dl = []; window.download = (name, blob) => blob.arrayBuffer().then(b => "
                       "window.__dl.push({name, type: blob.type, size: b.byteLength, "
                       "head: Array.from(new Uint8Array(b.slice(0, 8))), text: blob.type.includes('json') ? "
                       "new TextDecoder().decode(b) : null}));")
    drv.find_element(*_by("#download-json")).click()
    drv.find_element(*_by("#download-png")).click()
    dl = _wait(drv, lambda dr: (lambda x: x if len(x) == 2 else False)(dr.execute_script("return window.__dl")))
    js = next(d for d in dl if d["name"].endswith(".json"))
    png = next(d for d in dl if d["name"].endswith(".png"))
    d = json.loads(js["text"])
    neuron = int(drv.find_element(*_by("#neuron-input")).get_attribute("value"))
    assert d["analysis"]["neuron"] == neuron and d["analysis"]["tokens"] and d["url"].startswith(url + "/#")
    assert d["analysis"]["true"] == pytest.approx(_plotted(drv, "plot-true"), abs=1e-3 * _span(d["analysis"]) + 1e-4)
    assert png["type"] == "image/png" and png["head"] == [137, 80, 78, 71, 13, 10, 26, 10] and png["size"] > 5000
    assert not _severe(drv)


def _span(a: dict) -> float:
    return max(a["true"] + a["pred"]) - min(a["true"] + a["pred"] + [0.0])


# ---------------------------------------------------------------- issue 21, item 5: page fixes
ENGLISH = ("Call me Ishmael. Some years ago, never mind how long precisely, having little or no money in my purse, "
           "and nothing particular to interest me on shore, I thought I would sail about a little and see the "
           "watery part of the world.")


def _open_with_text(drv, url: str, k: int, text: str) -> None:
    from urllib.parse import urlencode

    drv.get("about:blank")
    drv.get(f"{url}/#{urlencode({'model': 'demo', 'neuron': k, 'text': text})}")
    _wait(drv, lambda dr: dr.find_elements(*_by("#plot-true")))


def test_every_panel_follows_the_chosen_neuron(page):
    """The contrast panel (stale in the issue: it kept neuron 371 after switching to 415), the plot, the card and
    the evidence all show the newly chosen neuron, with the API's numbers."""
    m, url, drv = page
    k1, k2 = m.table[0].index, m.table[1].index
    _open_with_text(drv, url, k1, SPANISH)
    drv.find_element(*_by("#text-a")).send_keys(SPANISH)
    drv.find_element(*_by("#text-b")).send_keys(ENGLISH)
    drv.find_element(*_by("#contrast-btn")).click()
    _wait(drv, lambda dr: dr.find_element(*_by("#contrast-result")).get_attribute("data-neuron") == str(k1))
    drv.find_element(*_by("#neuron-search")).send_keys(str(k2))
    _wait(drv, lambda dr: dr.find_element(*_by(f'#neuron-table tbody tr[data-neuron="{k2}"]'))).click()
    _wait(drv, lambda dr: dr.find_element(*_by("#contrast-result")).get_attribute("data-neuron") == str(k2))
    c = _post(url + "/api/contrast", {"text_a": SPANISH, "text_b": ENGLISH, "neuron": k2, "top": 10})
    effect = drv.find_element(*_by("#contrast-effect")).text
    assert effect.startswith(f"L0N{k2}:") and f"true {c['d_true']:.2f}, predicted {c['d_pred']:.2f}" in effect
    cv = _post(url + "/api/contrast", {"text_a": SPANISH, "text_b": ENGLISH, "neuron": k2, "top": 10,
                                      "verify": True})["verification"]
    verify = drv.find_element(*_by("#contrast-verify")).text  # issue 19: every neuron like for like, with baselines
    assert f"Spearman {cv['like_for_like']['spearman']:.3f}" in verify and "token-shuffled null" in verify
    _wait(drv, lambda dr: f"L0N{k2}" in dr.find_element(*_by("#predicted-note")).text)
    assert drv.find_element(*_by("#neuron-card")).text.startswith(f"L0N{k2} ")
    api = _post(url + "/api/analyse", {"text": SPANISH, "neuron": k2})
    span = _span(api)
    assert max(abs(a - b) for a, b in zip(_plotted(drv, "plot-true"), api["true"])) < 1e-3 * span + 1e-4
    assert not _severe(drv)


def test_bad_share_link_gets_a_message_that_stays(page):
    """neuron=99999 and model=gpt2: a visible note that says both, still there after another analysis."""
    m, url, drv = page
    from urllib.parse import urlencode

    drv.get("about:blank")
    drv.get(f"{url}/#{urlencode({'model': 'gpt2', 'neuron': 99999, 'text': SPANISH})}")
    _wait(drv, lambda dr: dr.find_elements(*_by("#plot-true")))
    note = drv.find_element(*_by("#link-message"))
    assert note.is_displayed()
    first = m.table[0].index
    assert "neuron 99999" in note.text and f"showing L0N{first}" in note.text and "model gpt2" in note.text
    assert drv.find_element(*_by("#neuron-input")).get_attribute("value") == str(first)
    drv.find_element(*_by("#text-input")).clear()
    drv.find_element(*_by("#text-input")).send_keys(ENGLISH)
    drv.find_element(*_by("#analyse-btn")).click()
    n_tokens = _post(url + "/api/analyse", {"text": ENGLISH, "neuron": first})["n_tokens"]
    _wait(drv, lambda dr: dr.execute_script("const p = document.querySelector('#plot-true'); "
                                            "return p ? p.getAttribute('points').split(' ').length : 0") == n_tokens)
    assert note.is_displayed() and "neuron 99999" in note.text and "model gpt2" in note.text
    assert not _severe(drv)


def test_legend_evidence_marker_and_keyboard(page):
    """The colour scale has a legend with the API's scale; the evidence position is marked on the plot; rows and
    tokens work from the keyboard (Enter on a row chooses it; arrows on a token move the evidence)."""
    from selenium.webdriver.common.keys import Keys

    m, url, drv = page
    k = m.table[2].index
    _open_with_text(drv, url, k, SPANISH)
    api = _post(url + "/api/analyse", {"text": SPANISH, "neuron": k})
    scale = max(abs(v) for v in api["true"] + api["pred"])
    legend = drv.find_element(*_by("#colour-legend"))
    assert legend.is_displayed() and float(legend.get_attribute("data-scale")) == pytest.approx(scale, abs=1e-4)
    assert f"+{scale:.2f}" in legend.text and f"true pre-activation of L0N{k}" in legend.text
    pos = int(_wait(drv, lambda dr: dr.find_element(*_by("#evidence-pos")).get_attribute("value")))
    marker = drv.find_element(*_by("#plot-evidence"))
    assert marker.get_attribute("visibility") == "visible" and marker.get_attribute("data-position") == str(pos)
    svg = drv.find_element(*_by("#plot-svg"))
    left, right, n = (float(svg.get_attribute(f"data-{a}")) for a in ("left", "right", "n"))
    assert float(marker.get_attribute("x1")) == pytest.approx(left + pos / (n - 1) * (right - left), abs=0.01)
    # keyboard: a token, then the arrow key moves the evidence one position
    tok = drv.find_element(*_by(f'#coloured-text .tok[data-i="{pos}"]'))
    assert tok.get_attribute("tabindex") == "0"
    tok.send_keys(Keys.ARROW_LEFT)
    _wait(drv, lambda dr: dr.find_element(*_by("#evidence-pos")).get_attribute("value") == str(pos - 1))
    ev = _post(url + "/api/evidence", {"text": SPANISH, "neuron": k, "position": pos - 1})
    assert f"predicted {ev['prediction']:.3f}" in drv.find_element(*_by("#evidence-sum")).text
    assert drv.find_element(*_by("#plot-evidence")).get_attribute("data-position") == str(pos - 1)
    # keyboard: Enter on a table row chooses its neuron
    k2 = m.table[5].index
    drv.find_element(*_by("#neuron-search")).send_keys(str(k2))
    row = _wait(drv, lambda dr: dr.find_element(*_by(f'#neuron-table tbody tr[data-neuron="{k2}"]')))
    assert row.get_attribute("tabindex") == "0"
    row.send_keys(Keys.ENTER)
    _wait(drv, lambda dr: dr.find_element(*_by("#neuron-input")).get_attribute("value") == str(k2))
    _wait(drv, lambda dr: f"L0N{k2}" in dr.find_element(*_by("#predicted-note")).text)
    assert not _severe(drv)


@pytest.mark.parametrize("width", [800, 1400])
def test_layout_at_800_and_1400_px(page, width):
    """Nothing overflows the window sideways; the plot fits; the neuron table is not cut off."""
    from chromium import set_viewport

    m, url, drv = page
    set_viewport(drv, width, 1000)
    try:
        _open_with_text(drv, url, m.table[0].index, SPANISH)
        doc_w = drv.execute_script("return document.documentElement.scrollWidth")
        assert doc_w <= width, doc_w
        plot = drv.find_element(*_by("#plot-svg")).rect
        assert plot["x"] >= 0 and plot["x"] + plot["width"] <= width
        box = drv.execute_script("const s = document.querySelector('#neuron-table').parentElement;"
                                 "return [s.scrollWidth, s.clientWidth]")
        assert box[0] <= box[1] + 1, box
    finally:
        set_viewport(drv, 1280, 1500)
    assert not _severe(drv)


def test_png_export_holds_text_fit_and_verdict(page):
    m, url, drv = page
    k = m.table[0].index
    _open_with_text(drv, url, k, SPANISH)
    drv.execute_script("window.__dl = []; window.download = (name, blob) => blob.arrayBuffer().then(b => "
                       "window.__dl.push({name, size: b.byteLength}));")
    drv.find_element(*_by("#download-png")).click()
    dl = _wait(drv, lambda dr: dr.execute_script("return window.__dl.length ? window.__dl : false"))
    cap = drv.execute_script("return window.__pngCaption")
    api = _post(url + "/api/analyse", {"text": SPANISH, "neuron": k})
    assert dl[0]["name"] == f"attnscope-L0N{k}.png" and dl[0]["size"] > 5000
    assert f"r = {api['fit']['r']:.3f}" in cap["fit"] and cap["verdict"] == api["scope_message"]
    assert cap["text"] == SPANISH and " ".join(cap["lines"]["text"]).split()[:5] == SPANISH.split()[:5]
    assert f"L0N{k}" in cap["title"] and cap["height"] > 280 + 60


def test_verdict_and_fit_disagreement_is_explained(page):
    """Where the conditions put a text outside scope but the fit is good (r >= 0.9), the page shows both and says
    the verdict is the claim; otherwise the note stays hidden."""
    from attnscope.core.texts import text_tokens

    m, url, drv = page
    text = m.w.tokenizer.decode(text_tokens("bundled:de_fortunes", m.w.tokenizer, max_tokens=200))
    k = m.table[0].index
    api = _post(url + "/api/analyse", {"text": text, "neuron": k})
    _open_with_text(drv, url, k, text)
    note = drv.find_element(*_by("#verdict-fit"))
    disagree = not api["in_scope"] and api["fit"]["r"] is not None and api["fit"]["r"] >= 0.9
    assert note.is_displayed() == disagree
    if disagree:
        assert f"r = {api['fit']['r']:.3f}" in note.text and "The verdict is the claim" in note.text


def test_attention_on_the_users_text(page):
    """The page draws a contextual head's true pattern and its kernel x content reconstruction with the API's
    numbers, a legend, and the TV line."""
    m, url, drv = page
    _open_with_text(drv, url, m.table[0].index, SPANISH)
    h = m.circ.heads[-1]
    drv.execute_script(f"document.querySelector('#attn-head').value = '{h}'")
    drv.find_element(*_by("#attn-btn")).click()
    _wait(drv, lambda dr: dr.find_element(*_by("#attn-result")).get_attribute("data-head") == str(h))
    api = _post(url + "/api/attention", {"text": SPANISH, "head": h})
    size = drv.execute_script("const c = document.querySelector('#attn-true'); return [c.width, c.height]")
    assert size == [api["n"], api["n"]]
    # the pixel at (query, key) = (n-1, 0) has the colour of the API's value on the legend's scale
    vmax = float(drv.find_element(*_by("#attn-legend")).get_attribute("data-vmax"))
    assert vmax == pytest.approx(max(max(r) for r in api["true"] + api["reconstruction"]), abs=1e-6)
    px = drv.execute_script("const c = document.querySelector('#attn-true'); "
                            f"return Array.from(c.getContext('2d').getImageData(0, {api['n'] - 1}, 1, 1).data)")
    a = min(1.0, api["true"][-1][0] / vmax)
    assert px[0] == pytest.approx(255 - a * 244, abs=1.5)
    assert f"median {api['tv_median']:.3f}" in drv.find_element(*_by("#attn-tv")).text
    assert not _severe(drv)
