#!/usr/bin/env python
"""Size limits of the source: no function over 60 lines, no module over 500 lines.

    python scripts/check_sizes.py [PATH ...]              # default: src/; exit 1 on any violation
    python scripts/check_sizes.py --only FILE [--only ...] # report everything, fail only for these files

A function's length runs from its ``def`` line to its last line (decorators and docstring included;
nested functions count towards their parent as well as on their own).  Only ``.py`` files are checked.
"""

from __future__ import annotations

import argparse
import ast
import sys
from dataclasses import dataclass
from pathlib import Path

MAX_FUNCTION = 60
MAX_MODULE = 500
ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Violation:
    path: str
    name: str  # "<module>" or the function's dotted name
    lines: int
    limit: int

    def __str__(self) -> str:
        return f"{self.path}: {self.name} has {self.lines} lines (limit {self.limit})"


def _functions(tree: ast.AST, prefix: str = ""):
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            name = prefix + node.name
            yield name, node.end_lineno - node.lineno + 1
            yield from _functions(node, name + ".")
        elif isinstance(node, ast.ClassDef):
            yield from _functions(node, prefix + node.name + ".")
        else:
            yield from _functions(node, prefix)


def check_file(path: Path, max_function: int = MAX_FUNCTION, max_module: int = MAX_MODULE) -> list[Violation]:
    text = path.read_text(encoding="utf-8")
    rel = str(path.resolve().relative_to(ROOT)) if path.resolve().is_relative_to(ROOT) else str(path)
    out = []
    n = len(text.splitlines())
    if n > max_module:
        out.append(Violation(rel, "<module>", n, max_module))
    for name, lines in _functions(ast.parse(text, filename=str(path))):
        if lines > max_function:
            out.append(Violation(rel, name, lines, max_function))
    return out


def check(paths: list[Path], max_function: int = MAX_FUNCTION, max_module: int = MAX_MODULE) -> list[Violation]:
    files = sorted({f for p in paths for f in ([p] if p.is_file() else p.rglob("*.py"))})
    return [v for f in files for v in check_file(f, max_function, max_module)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("paths", nargs="*", type=Path, default=[ROOT / "src"])
    ap.add_argument("--only", action="append", default=[], help="fail only for these files (relative to the repo)")
    ap.add_argument("--max-function", type=int, default=MAX_FUNCTION)
    ap.add_argument("--max-module", type=int, default=MAX_MODULE)
    args = ap.parse_args(argv)
    found = check(args.paths, args.max_function, args.max_module)
    failing = [v for v in found if not args.only or any(v.path == o or v.path.startswith(o.rstrip("/") + "/")
                                                          for o in args.only)]
    for v in found:
        print(("FAIL " if v in failing else "note ") + str(v))
    print(f"{len(found)} over the limits, {len(failing)} failing")
    return 1 if failing else 0


if __name__ == "__main__":
    sys.exit(main())
