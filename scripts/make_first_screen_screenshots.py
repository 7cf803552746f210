#!/usr/bin/env python
"""Screenshots of the report's first screen and of the `serve` page on a Spanish text (issue 21, docs/img).

    python scripts/make_first_screen_screenshots.py --report DIR/report.html --analysis DIR --prefix after

writes ``docs/img/report-first-screen-{prefix}.png`` (1400 x 900, the top of the report) and
``docs/img/serve-spanish-{prefix}.png`` (1400 x 900 and a full-page copy, the page with the Spanish text of
tests/test_serve_browser.py analysed for the first neuron of the ranking).  ``--url`` screenshots a page
that is already served (e.g. by an older attnscope) instead of starting one from ``--analysis``.
Needs Selenium and headless Chromium (tests/chromium.py).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path
from urllib.parse import urlencode

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "browser"))
SPANISH = ("El pueblo estaba en silencio cuando llegó la noche, y los niños dormían mientras sus padres hablaban de "
           "la cosecha, del tiempo y de los viajes que nunca harían juntos por el mundo. Nadie sabía qué pasaría "
           "mañana, pero todos esperaban que la lluvia volviera pronto a los campos.")


def _serve(analysis: Path | None, url: str | None):
    if url:
        return contextlib.nullcontext(url.rstrip("/"))
    from attnscope.models import load_model
    from attnscope.serve import background_server, create_app, load_serve_model

    return background_server(create_app(load_serve_model(load_model("demo"), analysis, log=print)))


def main(argv: list[str] | None = None) -> int:
    from chromium import chrome_driver, screenshot, set_viewport

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--report", type=Path, required=True)
    ap.add_argument("--analysis", type=Path, default=None)
    ap.add_argument("--url", default=None)
    ap.add_argument("--neuron", type=int, default=None, help="default: the page's first neuron")
    ap.add_argument("--prefix", default="after")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "img")
    a = ap.parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    with chrome_driver(1400, 900) as drv:
        screenshot(a.report, a.out / f"report-first-screen-{a.prefix}.png", width=1400, height=900, driver=drv)
        with _serve(a.analysis, a.url) as url:
            set_viewport(drv, 1400, 900)
            params = {"model": "demo", "text": SPANISH, **({"neuron": a.neuron} if a.neuron is not None else {})}
            drv.get(f"{url}/#{urlencode(params)}")
            t0 = time.monotonic()
            while not drv.find_elements("css selector", "#plot-true") and time.monotonic() - t0 < 120:
                time.sleep(0.2)
            time.sleep(1.0)
            drv.execute_script("document.querySelector('#text-section').scrollIntoView()")
            drv.save_screenshot(str(a.out / f"serve-spanish-{a.prefix}.png"))
            h = int(drv.execute_script("return document.documentElement.scrollHeight"))
            set_viewport(drv, 1400, min(h, 6000))
            drv.execute_script("window.scrollTo(0, 0)")
            drv.save_screenshot(str(a.out / f"serve-spanish-{a.prefix}-full.png"))
    print("wrote", *sorted(p.name for p in a.out.glob(f"*-{a.prefix}*.png")))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
