"""Labels are checked against the neuron's own best contrast (issue 21, item 4): the issue's neuron 328, labelled
"Spanish" but ranked under code_python, loses the label; labels on the other side, or naming no text, stay."""

from __future__ import annotations

import pytest

from attnscope.neurons.label_check import checked_labels, label_contradiction


@pytest.mark.parametrize("label,best,d,positive,withheld", [
    ("Spanish", "bundled:code_python", 2.1, True, True),  # the L0N328
    ("Spanish", "bundled:es_fortunes", 2.1, True, False),
    ("Spanish", "es_fortunes", -1.5, True, False),  # lower on Spanish: the positive label is not about it
    ("German", "bundled:es_fortunes", -1.5, False, True),  # lower on Spanish, negative label says German
    ("German", "/data/de_more.txt", -1.5, False, False),
    ("Python code", "bundled:code_python", 3.0, True, False),
    ("Cyrillic", "bundled:code_python", 3.0, True, False),  # names no held-out text: not checked
    (None, "bundled:code_python", 3.0, True, False),
])
def test_label_contradiction(label, best, d, positive, withheld):
    why = label_contradiction(label, best, d, positive)
    assert (why is not None) == withheld
    if withheld:
        assert label in why and "withheld" in why


def test_checked_labels_keeps_what_agrees():
    pos, neg, notes = checked_labels("Spanish", "Python code", "bundled:code_python", 1.8)
    assert pos is None and neg == "Python code" and len(notes) == 1 and "code_python" in notes[0]
