"""The report leads with its findings (issue 21, items 1-2, 4-5), in headless Chromium on the hand-built
context-neuron model's report: every number shown is checked against the typed results it came from."""

from __future__ import annotations

from pathlib import Path

import pytest
from chromium import browser_missing, css, js_click, severe_logs

MISSING = browser_missing()
pytestmark = [pytest.mark.browser, pytest.mark.skipif(MISSING is not None, reason=MISSING or "")]


@pytest.fixture(scope="module")
def report(hand_report, hand_results):
    """The shared report of the hand-built model (tests/conftest.py: hand_report), its circuit and neurons."""
    _, _, c, n, _ = hand_results
    return hand_report, c, n


@pytest.fixture(scope="module")
def drv(report_driver):
    return report_driver


_by, _click, _severe = css, js_click, severe_logs


def test_findings_fit_in_the_first_screen_and_name_the_baselines(drv, report):
    from attnscope.report.findings import ScopeVerdicts
    from attnscope.report.html import fmt as _fmt

    _, c, n = report
    drv.execute_script("window.scrollTo(0, 0)")
    box = drv.execute_script("return document.querySelector('#findings').getBoundingClientRect().toJSON()")
    assert box["top"] < 200 and box["bottom"] <= 900, box
    s = n.summary()
    tile = drv.find_element(*_by("#finding-pass")).text
    assert f"{n.n_selected} / {n.n_scored}" in tile and f"precision {_fmt(s['precision'])}" in tile
    assert f"random neurons {_fmt(s['precision_random'])}" in tile
    fit = drv.find_element(*_by("#finding-fit")).text
    assert f"random neurons: r {_fmt(n.verification.random.r)}" in fit
    con = drv.find_element(*_by("#finding-contrast")).text
    assert "noise ceiling: not measured" in con and "null: not measured" in con
    v = ScopeVerdicts.of(c, n)
    assert f"{v.n_failed} of {v.n_conditions}" in drv.find_element(*_by("#finding-scope")).text
    assert "pass = predicted context sensitivity" in drv.find_element(*_by("#pass-definition")).text
    top = drv.find_elements(*_by("#top-neurons tbody tr"))
    assert [t.find_element(*_by("td")).text for t in top] == [f"L0N{r.index}" for r in n.rows[:len(top)]]
    assert not _severe(drv)


def test_banners_count_the_scope_sections_failed_rows(drv, report):
    from attnscope.report.findings import ScopeVerdicts

    _, c, n = report
    failed_rows = len(drv.find_elements(*_by("#scope .badge.fail")))
    v = ScopeVerdicts.of(c, n)
    assert v.n_failed == failed_rows
    if failed_rows:
        for sel in ("#conditions-banner", "#scope-banner"):
            assert drv.find_element(*_by(sel)).get_attribute("data-failed") == str(failed_rows)


def test_full_ranking_is_sortable_searchable_and_linked(drv, report):
    _, _, n = report
    rows = drv.find_elements(*_by("#neuron-ranking tbody tr"))
    assert len(rows) == n.n_scored
    # predicted and true d side by side, from the result
    first = rows[0].find_elements(*_by("td"))
    r0 = n.rows[0]
    assert float(first[4].text) == pytest.approx(r0.predicted_d, rel=1e-3, abs=1e-3)
    assert float(first[5].get_attribute("data-value")) == pytest.approx(r0.true_d, rel=1e-5)
    # sort by true d (ascending, then descending)
    th = drv.find_elements(*_by("#neuron-ranking thead th"))[5]
    _click(drv, th.find_element(*_by("button")))
    _click(drv, th.find_element(*_by("button")))
    top = drv.find_element(*_by("#neuron-ranking tbody tr td:nth-child(6)")).get_attribute("data-value")
    assert float(top) == pytest.approx(max(r.true_d for r in n.rows), rel=1e-5)
    # search
    k = n.cards[0].index if n.cards else n.rows[0].index
    box = drv.find_element(*_by("#ranking-search"))
    box.send_keys(f"l0n{k}")
    shown = [r for r in drv.find_elements(*_by("#neuron-ranking tbody tr")) if r.is_displayed()]
    assert shown and all(r.find_elements(*_by("td"))[1].text.startswith(f"L0N{k}") for r in shown)
    assert drv.find_element(*_by("#ranking-count")).text == f"{len(shown)} of {n.n_scored} shown"
    box.clear()
    box.send_keys(" ")
    # a row's link opens its card
    if n.cards:
        _click(drv, drv.find_element(*_by("#cards-close")))
        drv.execute_script("document.getElementById('ranking-search').value=''; "
                           "document.getElementById('ranking-search').dispatchEvent(new Event('input'))")
        link = drv.find_element(*_by(f'#neuron-ranking a[href="#neuron-0-{k}"]'))
        drv.execute_script("arguments[0].click()", link)
        card = drv.find_element(*_by(f"#neuron-0-{k}"))
        assert card.find_element(*_by("details")).get_attribute("open") is not None
        assert card.find_element(*_by("summary h3")).text == f"L0N{k}"
    assert not _severe(drv)


def test_cards_collapse_and_filter_with_their_verdicts(drv, report):
    from attnscope.report.findings import ScopeVerdicts

    _, c, n = report
    if not n.cards:
        pytest.skip("no neuron card in this report")
    cards = drv.find_elements(*_by("article.neuron-card"))
    assert len(cards) == len(n.cards)
    _click(drv, drv.find_element(*_by("#cards-open")))
    assert all(x.find_element(*_by("details")).get_attribute("open") is not None for x in cards)
    _click(drv, drv.find_element(*_by("#cards-close")))
    assert all(x.find_element(*_by("details")).get_attribute("open") is None for x in cards)
    v = ScopeVerdicts.of(c, n)
    best = {r.index: r.best_contrast for r in n.rows}
    out = [x.index for x in n.cards if v.for_texts([best[x.index], x.positive_text, x.negative_text])]
    _click(drv, drv.find_element(*_by("#card-out-only")))
    shown = [int(x.get_attribute("data-index")) for x in cards if x.is_displayed()]
    assert shown == out
    assert drv.find_element(*_by("#card-count")).text == f"{len(out)} of {len(n.cards)} shown"
    _click(drv, drv.find_element(*_by("#card-out-only")))
    for x in cards:  # each card carries its verdict
        assert x.find_element(*_by("summary .verdict")).text.startswith(("✓ in scope", "✗ outside scope"))


def test_sink_column_has_one_format_and_figures_enlarge(drv):
    cells = drv.execute_script("return Array.from(document.querySelectorAll('#head-table tbody tr'))"
                               ".map(r => r.cells[3].textContent)")
    assert cells and all(c == "—" or (len(c.split(".")) == 2 and len(c.split(".")[1]) == 3 and "e" not in c)
                         for c in cells), cells
    img = drv.find_element(*_by("figure.fig img"))
    drv.execute_script("arguments[0].click()", img)
    assert drv.execute_script("return arguments[0].closest('figure').classList.contains('zoomed')", img)
    drv.execute_script("arguments[0].click()", img)
    assert not drv.execute_script("return arguments[0].closest('figure').classList.contains('zoomed')", img)


def test_report_is_one_file_under_2_mb(report):
    path: Path = report[0]
    html = path.read_text()
    assert path.stat().st_size < 2_000_000
    assert "http://" not in html.replace("http://www.w3.org", "") and "https://" not in html


def test_d_scatter_has_every_neuron_with_its_baselines(drv, report):
    _, _, n = report
    dots = drv.execute_script("return Array.from(document.querySelectorAll('#d-scatter circle')).map(c => "
                              "[+c.dataset.index, c.getAttribute('class'), c.textContent])")
    assert len(dots) == n.n_scored
    rows = {r.index: r for r in n.rows}
    assert sum(cls == "pass" for _, cls, _ in dots) == sum(r.passed for r in n.rows)
    k, cls, title = dots[0]
    assert title.startswith(f"L0N{k} ") and title.endswith(f", {fmt_(rows[k].true_d)}")
    assert drv.find_elements(*_by("#d-scatter .ident")) and drv.find_elements(*_by("#d-scatter .band"))


def fmt_(v):
    from attnscope.report.html import fmt

    return fmt(v)
