"""Errors that reach the user as one line: what is wrong and how to fix it."""

from __future__ import annotations


class AttnscopeError(Exception):
    """Base class: the CLI prints ``str(err)`` on one line, never a traceback."""


class ModelNotFoundError(AttnscopeError):
    """A model name or path could not be resolved to weights."""


class UnsupportedModelError(AttnscopeError):
    """The weights load but their architecture has no adapter."""


class TextTooShortError(AttnscopeError):
    """A text has fewer tokens than the context the analysis needs."""


class IndexOutOfRangeError(AttnscopeError):
    """A layer, head or neuron index outside the model."""


class ConditionFailedError(AttnscopeError):
    """An approximation's stated input condition does not hold (the message says which and by how much)."""


class NoContextualHeadsError(ConditionFailedError):
    """No head of a layer meets the contextual-head criteria; ``closest_head`` and its failed ``reasons`` (each
    with its measured value) say how near the layer came."""

    def __init__(self, message: str, closest_head: int, reasons: list[str]) -> None:
        super().__init__(message)
        self.closest_head = closest_head
        self.reasons = reasons

    @property
    def limiting(self) -> str:
        """The limiting measurement: the closest head and the criteria it fails."""
        return f"head {self.closest_head}: {'; '.join(self.reasons)}"


def check_index(kind: str, value: int, n: int) -> int:
    """Return ``value`` if ``0 <= value < n``; otherwise raise a one-line :class:`IndexOutOfRangeError`."""
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < n:
        raise IndexOutOfRangeError(
            f"{kind} index {value!r} is out of range: this model has {n} {kind}s, numbered 0..{n - 1}"
        )
    return value
