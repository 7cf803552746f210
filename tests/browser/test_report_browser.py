"""The HTML report in a real browser: headless Debian Chromium driven by Selenium.

Renders, sorts, redraws the head explorer, prints, logs no console errors; saves a screenshot (copied to
docs/report-screenshot.png when ATTNSCOPE_SAVE_SCREENSHOT=1).  Skipped when Chromium, chromedriver or
Selenium is absent.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from chromium import browser_missing
from chromium import css as _by

MISSING = browser_missing()
pytestmark = [pytest.mark.browser, pytest.mark.skipif(MISSING is not None, reason=MISSING or "")]
DATA = Path(__file__).resolve().parents[1] / "data"
DOCS = Path(__file__).resolve().parents[2] / "docs"
VIEWPORT = (1280, 1600)  # of tests/conftest.py's report_driver (the shared hand-built report)


@pytest.fixture(scope="module")
def driver(report_driver):
    return report_driver


def _visible(el) -> bool:
    s = el.size
    return el.is_displayed() and s["width"] > 0 and s["height"] > 0


def test_key_elements_render(driver):
    for css in ("#model-summary", "#kernels", "#head-table", "#head-selector", "#kernel-svg", "#circuit",
                "#conditions", "#neurons", "#scope", "nav"):
        el = driver.find_element(*_by(css))
        assert _visible(el), css
    cards = driver.find_elements(*_by(".neuron-card"))
    assert cards and all(_visible(c) for c in cards)
    # every embedded figure decoded to a real image and is laid out
    imgs = driver.find_elements(*_by("figure.fig img"))
    assert len(imgs) >= 5
    for img in imgs:
        assert driver.execute_script("return arguments[0].complete && arguments[0].naturalWidth", img) > 0
        assert _visible(img)
    # the explorer drew something on load, and filled its record table
    assert driver.find_element(*_by("#kernel-line")).get_attribute("points").count(",") > 3
    assert len(driver.find_elements(*_by("#head-record tbody tr"))) >= 10
    # nothing was loaded from the network (data: URLs are not resource entries)
    names = driver.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    assert all(n.startswith("data:") for n in names), names


def _column(driver, key: str) -> list[str]:
    i = driver.execute_script(
        "return Array.from(document.querySelectorAll('#head-table thead th'))"
        ".findIndex(t => t.dataset.key === arguments[0])",
        key)
    return driver.execute_script(
        "return Array.from(document.querySelectorAll('#head-table tbody tr'))"
        ".map(r => r.cells[arguments[0]].dataset.value)", i)


def _order(driver) -> list[str]:
    return driver.execute_script(
        "return Array.from(document.querySelectorAll('#head-table tbody tr'))"
        ".map(r => r.dataset.layer + '-' + r.dataset.head)")


def test_sorting_reorders_rows(driver):
    before = _order(driver)
    th = driver.find_element(*_by('#head-table th[data-key="n_eff"]'))
    th.find_element(*_by("button")).click()
    vals = [float(v) for v in _column(driver, "n_eff")]
    assert vals == sorted(vals) and th.get_attribute("aria-sort") == "ascending"
    after = _order(driver)
    assert sorted(after) == sorted(before) and after != before  # same rows, new order
    th.click()  # clicking the header itself also sorts; a second click reverses
    vals = [float(v) for v in _column(driver, "n_eff")]
    assert vals == sorted(vals, reverse=True) and th.get_attribute("aria-sort") == "descending"
    # a text column, then back to layer order
    driver.find_element(*_by('#head-table th[data-key="category"]')).click()
    cats = _column(driver, "category")
    assert cats == sorted(cats, key=str.lower)
    driver.find_element(*_by('#head-table th[data-key="layer"]')).click()
    assert [int(x) for x in _column(driver, "layer")] == sorted(int(x) for x in _column(driver, "layer"))


def test_head_selector_redraws(driver):
    from selenium.webdriver.support.ui import Select

    svg = driver.find_element(*_by("#kernel-svg"))
    layer_sel = Select(driver.find_element(*_by("#sel-layer")))
    head_sel = Select(driver.find_element(*_by("#sel-head")))
    assert len(layer_sel.options) >= 2 and len(head_sel.options) >= 2
    layer_sel.select_by_index(0)
    head_sel.select_by_index(0)
    pts0 = driver.find_element(*_by("#kernel-line")).get_attribute("points")
    title0 = svg.text
    head_sel.select_by_index(1)
    line = driver.find_element(*_by("#kernel-line"))
    assert line.get_attribute("data-head") == "1" and svg.get_attribute("data-head") == "1"
    assert line.get_attribute("points") != pts0
    layer_sel.select_by_index(1)
    line = driver.find_element(*_by("#kernel-line"))
    layer1 = layer_sel.first_selected_option.text
    assert line.get_attribute("data-layer") == layer1 and svg.get_attribute("data-layer") == layer1
    assert svg.text != title0 and f"L{layer1}H1" in svg.text  # the title follows; the head is kept
    rec = {r.find_element(*_by("th")).text: r.find_element(*_by("td")).text
           for r in driver.find_elements(*_by("#head-record tbody tr"))}
    assert rec["layer"] == layer1 and rec["head"] == "1"
    # clicking a table row selects that head
    row = driver.find_element(*_by('#head-table tbody tr[data-layer="0"][data-head="2"]'))
    driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", row)
    row.click()
    assert layer_sel.first_selected_option.text == "0" and head_sel.first_selected_option.text == "2"
    assert "selected" in row.get_attribute("class")
    assert svg.get_attribute("data-layer") == "0" and svg.get_attribute("data-head") == "2"


def test_print_layout(driver):
    driver.execute_cdp_cmd("Emulation.setEmulatedMedia", {"media": "print"})
    try:
        assert not driver.find_element(*_by("#head-selector")).is_displayed()
        assert not driver.find_element(*_by("nav")).is_displayed()
        assert all(_visible(c) for c in driver.find_elements(*_by(".neuron-card")))
        assert driver.execute_script(
            "return getComputedStyle(document.querySelector('.neuron-card')).breakInside") == "avoid"
    finally:
        driver.execute_cdp_cmd("Emulation.setEmulatedMedia", {"media": ""})
    assert driver.find_element(*_by("#head-selector")).is_displayed()


def test_no_console_errors_and_screenshot(driver, hand_report, tmp_path):
    from chromium import screenshot

    driver.get(hand_report.resolve().as_uri())  # fresh load: its own console log
    driver.find_element(*_by('#head-table th[data-key="n_eff"]')).click()
    logs = driver.get_log("browser")
    severe = [e for e in logs if e.get("level") == "SEVERE"]
    assert not severe, severe
    png = screenshot(hand_report, tmp_path / "report.png", width=1280, height=1600, full_page=True, driver=driver)
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000
    if os.environ.get("ATTNSCOPE_SAVE_SCREENSHOT") == "1":
        DOCS.mkdir(exist_ok=True)  # (scripts/make_report_screenshot.py makes the MiniLM one)
        shutil.copyfile(png, DOCS / "report-screenshot.png")
