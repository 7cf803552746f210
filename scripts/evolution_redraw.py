"""Redraw the training-dynamics figures and page from a saved evolution.json (no model, no retraining).

    python scripts/evolution_redraw.py docs/data/evolution-demo-series.json OUT_DIR
"""

from __future__ import annotations

import sys
from pathlib import Path

from attnscope.evolution.page import evolution_figures, write_evolution_page
from attnscope.evolution.run import EvolutionResult


def main(argv: list[str]) -> None:
    if len(argv) != 2:
        sys.exit("usage: python scripts/evolution_redraw.py EVOLUTION_JSON OUT_DIR")
    res = EvolutionResult.load(argv[0])
    figs = evolution_figures(res, Path(argv[1]))
    page = write_evolution_page(res, Path(argv[1]), figs, command=f"scripts/evolution_redraw.py {argv[0]}")
    print(f"wrote {len(figs)} figures and {page}")


if __name__ == "__main__":
    main(sys.argv[1:])
