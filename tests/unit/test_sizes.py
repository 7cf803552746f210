"""Size limits (no function over 60 lines, no module over 500) via scripts/check_sizes.py.

Enforced for every module of src/ (``python scripts/check_sizes.py src`` lists what is over)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
def _script():
    spec = importlib.util.spec_from_file_location("check_sizes", ROOT / "scripts" / "check_sizes.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["check_sizes"] = mod  # its dataclass looks its module up
    spec.loader.exec_module(mod)
    return mod


def test_the_check_finds_long_functions_and_modules(tmp_path):
    cs = _script()
    body = "\n".join(f"    x{i} = {i}" for i in range(60))
    (tmp_path / "long.py").write_text(f"class A:\n    def f(self):\n{body.replace('    ', '        ')}\n\n"
                                      f"def g():\n    return 1\n" + "# pad\n" * 440)
    found = cs.check([tmp_path])
    assert {(v.name, v.lines) for v in found} == {("A.f", 61), ("<module>", 505)}
    assert cs.check([tmp_path], max_function=61, max_module=505) == []


def test_every_module_within_limits(capsys):
    cs = _script()
    assert cs.main([str(ROOT / "src")]) == 0, capsys.readouterr().out
