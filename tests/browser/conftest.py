"""Shared set-up of the report's browser tests: one report of the hand-built context-neuron model, written once
per session, and one headless Chromium on it per module (1400 x 900)."""

from __future__ import annotations

from pathlib import Path

import pytest
from chromium import BrowserUnavailableError


@pytest.fixture(scope="session")
def hand_report(hand_results, tmp_path_factory) -> Path:
    """``report.html`` of the hand-built model's kernels, circuit and neurons (``hand_results``)."""
    from attnscope.report import write_report

    w, k, c, n, figs = hand_results
    return write_report(tmp_path_factory.mktemp("hand_report"), model_info=w.info(), kernels=k, circuit=c,
                        neurons=n, figures=figs, command="attnscope report tiny", provenance={"seed": 0})


@pytest.fixture(scope="module")
def report_driver(hand_report):
    """Headless Chromium at 1400 x 900 with ``hand_report`` open (skips when Chromium cannot start)."""
    from chromium import chrome_driver, set_viewport

    try:
        with chrome_driver(1400, 900) as d:
            set_viewport(d, 1400, 900)
            d.get(hand_report.resolve().as_uri())
            yield d
    except BrowserUnavailableError as e:
        pytest.skip(str(e))
