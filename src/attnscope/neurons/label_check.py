"""A label is given only when it agrees with the neuron's own best contrast (issue 21, item 4).

Labels come from token evidence alone (:mod:`attnscope.labels`).  Some labels name a kind of text that the
held-out contrasts also name ("Spanish" and ``es_fortunes``); when the neuron's strongest predicted one-vs-rest
contrast is another text on the label's side, the label contradicts the neuron's measured context and is
withheld (the report and the page say so).  The side matters: a neuron predicted *higher* on its best text
(predicted d > 0) is checked through its positive label, one predicted *lower* through its negative label.
Labels that name no held-out text (a script, a dialect) are not checked.
"""

from __future__ import annotations

from pathlib import Path

#: label -> the stems of the held-out texts that are of that kind (bundled texts; other texts match by stem prefix)
LABEL_TEXTS: dict[str, tuple[str, ...]] = {
    "Spanish": ("es_",), "German": ("de_",), "Python code": ("code_",),
    "Early Modern English": ("en_shakespeare", "en_milton"), "government / politics": ("en_speeches",),
    "sea / ships": ("en_moby_dick",), "English function words": ("en_",),
}


def _stem(text: str) -> str:
    return Path(text.split(":", 1)[-1]).stem if text else ""


def label_contradiction(label: str | None, best_contrast: str, predicted_d: float, positive: bool) -> str | None:
    """Why ``label`` contradicts the neuron's best contrast, or ``None`` when it does not (or is not checked)."""
    if not label or label not in LABEL_TEXTS or not best_contrast:
        return None
    if (predicted_d > 0) != positive:  # this label is on the other side of the best contrast
        return None
    stem = _stem(best_contrast)
    if any(stem.startswith(p) for p in LABEL_TEXTS[label]):
        return None
    side = "higher" if positive else "lower"
    return (f"label {label!r} withheld: its token evidence says {label}, but the neuron's strongest contrast puts it "
            f"{side} on {stem} (predicted d {predicted_d:+.2f})")


def checked_labels(label: str | None, label_negative: str | None, best_contrast: str, predicted_d: float
                   ) -> tuple[str | None, str | None, list[str]]:
    """The labels that stand, and a note for each one withheld."""
    notes = []
    why = label_contradiction(label, best_contrast, predicted_d, True)
    if why:
        notes.append(why)
        label = None
    why = label_contradiction(label_negative, best_contrast, predicted_d, False)
    if why:
        notes.append(why)
        label_negative = None
    return label, label_negative, notes
