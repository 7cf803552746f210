r"""Scope conditions of a text input and of a contrast of two inputs, each with its measured value and
threshold (issue 19).  An input is out of scope when any of its conditions fails.

The thresholds are set on the development half of the unseen-text benchmark (``bench/unseen.py --half dev``)
and checked on the report half.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from .input_scope import TextMeasure
from .serve.scope import InputCondition


@dataclass
class ScopeRule:
    """Which conditions make up the out-of-scope flag, and their thresholds."""

    text_conditions: tuple[str, ...] = ("denominators as on calibration", "sink mass as on calibration",
                                        "few clipped content factors", "few glitch-like tokens",
                                        "constant MLP-norm scale", "norm scale as on calibration", "long enough")


def text_scope(m: TextMeasure, rule: ScopeRule) -> list[InputCondition]:
    """The conditions of one text input."""
    return [c for c in m.conditions if c.name in rule.text_conditions]


def pair_scope(a: TextMeasure, b: TextMeasure, pred_d: Tensor, rule: ScopeRule) -> list[InputCondition]:
    """The conditions of a contrast: each side's text conditions (named by side)."""
    out = []
    for side, m in (("A", a), ("B", b)):
        for c in text_scope(m, rule):
            out.append(InputCondition(f"{side}: {c.name}", c.holds_when, c.measured, c.threshold, c.ok, c.detail))
    return out
