"""Headless Chromium for the report's browser tests and scripts/make_report_screenshot.py.

Debian ``chromium`` + ``chromium-driver`` driven by Selenium; no driver is ever downloaded.  Not part of the
library: the report itself needs no browser.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


class BrowserUnavailableError(RuntimeError):
    """Headless Chromium, its driver or Selenium is not installed."""


CHROMIUM_INSTALL_HINT = "headless Chromium not installed: apt-get install chromium chromium-driver"


def find_chromium() -> tuple[str, str]:
    """``(browser, driver)`` paths: ``$ATTNSCOPE_CHROMIUM`` / ``$ATTNSCOPE_CHROMEDRIVER``, else the Debian
    packages' ``/usr/bin/chromium`` and ``/usr/bin/chromedriver`` (or whatever is on ``PATH``)."""
    browser = os.environ.get("ATTNSCOPE_CHROMIUM") or next(
        (p for p in ("/usr/bin/chromium", shutil.which("chromium"), shutil.which("chromium-browser"))
         if p and Path(p).is_file()), None)
    driver = os.environ.get("ATTNSCOPE_CHROMEDRIVER") or next(
        (p for p in ("/usr/bin/chromedriver", shutil.which("chromedriver")) if p and Path(p).is_file()), None)
    if not browser or not driver or not Path(browser).is_file() or not Path(driver).is_file():
        raise BrowserUnavailableError(CHROMIUM_INSTALL_HINT)
    return browser, driver


@contextlib.contextmanager
def chrome_driver(width: int = 1280, height: int = 1600) -> Iterator[Any]:
    """A headless Chromium WebDriver (Selenium) that never downloads anything; quit on exit.

    Browser console messages are kept (``driver.get_log("browser")``)."""
    browser, driver_path = find_chromium()
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError as e:
        raise BrowserUnavailableError("selenium not installed: pip install selenium") from e
    with tempfile.TemporaryDirectory(prefix="attnscope-chromium-") as profile:
        opts = webdriver.ChromeOptions()
        opts.binary_location = browser
        for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--no-first-run", "--disable-extensions", "--hide-scrollbars", f"--user-data-dir={profile}",
                  f"--window-size={width},{height}"):
            opts.add_argument(a)
        opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
        # an explicit driver path: Selenium Manager is skipped, nothing is downloaded
        service = Service(executable_path=driver_path)
        try:
            drv = webdriver.Chrome(service=service, options=opts)
        except Exception as e:  # noqa: BLE001 - report any start failure as one line
            raise BrowserUnavailableError(f"headless Chromium failed to start ({type(e).__name__}: "
                                          f"{str(e).strip().splitlines()[0] if str(e).strip() else ''})") from e
        try:
            drv.set_window_size(width, height)
            yield drv
        finally:
            drv.quit()


def set_viewport(driver: Any, width: int, height: int) -> None:
    """Exact CSS viewport size (the window size includes the browser's frame)."""
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                           {"width": int(width), "height": int(height), "deviceScaleFactor": 1, "mobile": False})


def screenshot(html_path, png_path, *, width: int = 1280, height: int = 1600, full_page: bool = False,
               driver: Any = None) -> Path:
    """Render ``html_path`` in headless Chromium and save a PNG of the top ``width`` x ``height`` pixels
    (``full_page``: the whole page, up to 16384 pixels high) to ``png_path``.  Raises
    :class:`BrowserUnavailableError` (with the apt command) when Chromium, its driver or Selenium is
    missing.  Pass ``driver`` to reuse an open :func:`chrome_driver`."""
    html_path, png_path = Path(html_path).resolve(), Path(png_path)
    png_path.parent.mkdir(parents=True, exist_ok=True)
    if driver is None:
        with chrome_driver(width, height) as drv:
            return screenshot(html_path, png_path, width=width, height=height, full_page=full_page, driver=drv)
    set_viewport(driver, width, height)
    driver.get(html_path.as_uri())
    if full_page:
        h = int(driver.execute_script("return document.documentElement.scrollHeight"))
        set_viewport(driver, width, min(max(h, 1), 16384))
    driver.execute_script("window.scrollTo(0, 0)")
    if not driver.save_screenshot(str(png_path)):
        raise RuntimeError(f"could not save a screenshot to {png_path}")
    return png_path


def browser_missing() -> str | None:
    """Why a browser test cannot run (Chromium, its driver or Selenium missing), or ``None``."""
    import importlib.util

    try:
        find_chromium()
    except BrowserUnavailableError:
        return CHROMIUM_INSTALL_HINT
    if importlib.util.find_spec("selenium") is None:
        return "selenium not installed: pip install selenium"
    return None


def css(selector: str) -> tuple[str, str]:
    """A Selenium locator for a CSS selector: ``driver.find_element(*css("#id"))``."""
    return "css selector", selector


def js_click(driver: Any, el: Any) -> None:
    """Click through the page's own handlers (the sticky navigation bar may cover the element)."""
    driver.execute_script("arguments[0].scrollIntoView({block: 'center'}); arguments[0].click()", el)


def severe_logs(driver: Any) -> list:
    """The console's error entries since the last call."""
    return [e for e in driver.get_log("browser") if e.get("level") == "SEVERE"]
