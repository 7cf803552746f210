"""Behaviour-identical check for refactors: run the demo's commands with two source trees and compare the outputs.

    python scripts/compare_outputs.py run  --src /path/to/old/src --out /tmp/cmp/before
    python scripts/compare_outputs.py run  --src src              --out /tmp/cmp/after
    python scripts/compare_outputs.py diff /tmp/cmp/before /tmp/cmp/after

``run`` executes a fixed list of commands (the demo report, a verified contrast, a later-layer run) with
``PYTHONPATH=SRC`` and ``--no-cache``.  ``diff`` compares every file the two runs wrote:

* ``.safetensors``: every array identical (names, shapes, dtypes, values bit for bit);
* ``.png``: identical bytes (matplotlib writes no time stamp);
* ``.json``: identical by a semantic diff (parsed, so key order and whitespace do not matter), except keys
  listed in ``VOLATILE`` (timings, dates, paths of the run) and keys new in the second run listed in ``NEW_KEYS``;
* ``.csv`` and other text: identical bytes; ``.html``: identical after removing ``VOLATILE`` lines.

Exit 0 when identical under these rules, 1 otherwise, listing each difference.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

COMMANDS: dict[str, list[str]] = {
    "report": ["report", "demo", "--out", "{out}/report", "--no-cache"],
    "contrast": ["contrast", "demo", "--a", "bundled:es_fortunes", "--b", "bundled:de_fortunes", "--verify",
                 "--out", "{out}/contrast", "--no-cache"],
    "later": ["neurons", "demo", "--layer", "1", "--out", "{out}/later", "--no-cache"],
}
# keys whose values legitimately differ between two runs of the same code (time, where it ran)
VOLATILE = {"wall_time_s", "elapsed_s", "seconds", "time_s", "timings", "timings_s", "date", "created", "command",
            "out", "started", "finished", "shown_out", "path",
            "cache_key"}  # the kernels' cache key hashes the model's info, which holds its folder
# the same keys in the report's provenance tables: <th>cache_key</th><td>...</td>, and the timings' nested table
_HTML_VOLATILE = re.compile(r"(<th>cache_key</th><td>)[0-9a-f]+|(<th>timings_s</th><td>)<table.*?</table>")
_DATE = re.compile(r"\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2} UTC")
# keys that a refactor is allowed to add (listed here with the commit that added them)
NEW_KEYS: set[str] = {"schema_version", "limiting"}  # neurons.json versioned; LayerPiece.limiting typed (issue 20)


def run(src: Path, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "meta.log").write_text(json.dumps({"src": str(src.resolve()), "out": str(out)}))
    env = {**os.environ, "PYTHONPATH": str(src.resolve())}
    for name, args in COMMANDS.items():
        cmd = [sys.executable, "-c", "from attnscope.cli import main; main()", *[a.format(out=out) for a in args]]
        log = out / f"{name}.log"
        with log.open("w") as fh:
            rc = subprocess.call(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT)
        print(f"{name}: exit {rc} (log {log})")


def _json_diff(a, b, where: str, out: list[str]) -> None:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if k in VOLATILE:
                continue
            if k not in a:
                if k not in NEW_KEYS:
                    out.append(f"{where}.{k}: new key")
                continue
            if k not in b:
                out.append(f"{where}.{k}: missing")
                continue
            _json_diff(a[k], b[k], f"{where}.{k}", out)
    elif isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            out.append(f"{where}: length {len(a)} != {len(b)}")
            return
        for i, (x, y) in enumerate(zip(a, b)):
            _json_diff(x, y, f"{where}[{i}]", out)
    elif a != b and not (isinstance(a, float) and isinstance(b, float) and a != a and b != b):
        out.append(f"{where}: {str(a)[:60]!r} != {str(b)[:60]!r}")


def _safetensors_diff(pa: Path, pb: Path, out: list[str]) -> None:
    from safetensors.numpy import load_file

    a, b = load_file(str(pa)), load_file(str(pb))
    if set(a) != set(b):
        out.append(f"{pb}: arrays {sorted(set(a) ^ set(b))} differ in presence")
    for k in sorted(set(a) & set(b)):
        if a[k].shape != b[k].shape or a[k].dtype != b[k].dtype or a[k].tobytes() != b[k].tobytes():
            out.append(f"{pb}:{k}: values differ")


def _normaliser(d: Path):
    """Replace the run's own source tree and output folder in every string (they differ between the runs)."""
    meta = json.loads((d / "meta.log").read_text())
    pairs = [(meta["src"], "<SRC>"), (str(Path(meta["src"]).parent), "<ROOT>"), (meta["out"], "<OUT>")]

    def norm(t: str) -> str:
        for a, b in pairs:
            t = t.replace(a, b)
        t = _HTML_VOLATILE.sub(lambda m: (m.group(1) or m.group(2)) + "<VOLATILE>", t)
        return _DATE.sub("<DATE>", t)

    return norm


def diff(da: Path, db: Path) -> int:
    problems: list[str] = []
    na, nb = _normaliser(da), _normaliser(db)
    fa = {p.relative_to(da) for p in da.rglob("*") if p.is_file() and p.suffix != ".log"}
    fb = {p.relative_to(db) for p in db.rglob("*") if p.is_file() and p.suffix != ".log"}
    for rel in sorted(fa ^ fb):
        problems.append(f"{rel}: only in {'before' if rel in fa else 'after'}")
    for rel in sorted(fa & fb):
        pa, pb = da / rel, db / rel
        if pa.suffix == ".json":
            _json_diff(json.loads(na(pa.read_text())), json.loads(nb(pb.read_text())), str(rel), problems)
        elif pa.suffix == ".safetensors":
            _safetensors_diff(pa, pb, problems)
        elif pa.suffix == ".html":
            la, lb = na(pa.read_text()).splitlines(), nb(pb.read_text()).splitlines()
            bad = [i for i, (x, y) in enumerate(zip(la, lb)) if x != y]
            if bad or len(la) != len(lb):
                problems.append(f"{rel}: html differs (lines {[i + 1 for i in bad[:5]]}, {len(la)} vs {len(lb)} lines)")
        elif pa.read_bytes() != pb.read_bytes():
            problems.append(f"{rel}: bytes differ")
    print(f"compared {len(fa & fb)} files: {len(problems)} differences")
    for p in problems[:200]:
        print("  " + p)
    return 1 if problems else 0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--src", type=Path, required=True)
    r.add_argument("--out", type=Path, required=True)
    d = sub.add_parser("diff")
    d.add_argument("a", type=Path)
    d.add_argument("b", type=Path)
    args = p.parse_args()
    if args.cmd == "run":
        run(args.src, args.out)
    else:
        sys.exit(diff(args.a, args.b))


if __name__ == "__main__":
    main()
