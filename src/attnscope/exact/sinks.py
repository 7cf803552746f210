r"""Attention sinks as a property of every head (method §15, issue 10).

A head's attention from query ``n`` splits into the *sink mass* ``s_n = A(n, 0)`` on the first position
(the BOS token when one is prepended, else the text's first token) and the rest, renormalised,
``\tilde A(n, i) = A(n, i) / (1 - s_n)`` for ``i >= 1``.  The kernel proper is the renormalised one:
categories, ``N_eff`` and decay come from it, and the sink mass is reported beside them (its median over
query positions and its coefficient of variation), so that a head reads "sink 0.70 + slow decay" rather
than "sink".  In the circuit a sink contributes ``s * v_sink W_O``: a constant when ``s`` is stable.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

SINK_FIRST = 0  # the position treated as the sink
SINK_SHOW = 0.05  # sink masses below this are left out of a head's label


def split_sink(rows: Tensor) -> tuple[Tensor, Tensor]:
    """``(sink mass [...], renormalised rest [..., T])`` of attention or kernel rows ``[..., T]``.

    The rest has position 0 set to 0 and sums to 1 over positions ``>= 1`` (all zeros where the row has
    no mass there, e.g. query position 0)."""
    s = rows[..., SINK_FIRST]
    rest = rows.clone()
    rest[..., SINK_FIRST] = 0
    tot = rest.sum(-1, keepdim=True)
    return s, torch.where(tot > 0, rest / tot.clamp(min=torch.finfo(rest.dtype).tiny), rest)


@dataclass
class SinkStats:
    """Sink mass of one head over query positions (and texts)."""

    median: float  # median over query positions n >= n_min of s_n
    mean: float
    cv: float  # std / mean of s_n over query positions (the constant-sink condition of the circuit)

    @classmethod
    def of(cls, sink: Tensor) -> SinkStats:
        """``sink``: sink masses ``[n_values]`` (query positions, possibly pooled over texts)."""
        s = sink.double().reshape(-1)
        mean = float(s.mean())
        return cls(median=float(s.median()), mean=mean, cv=float(s.std() / s.mean()) if mean > 0 else 0.0)


def sink_label(sink_mass: float | None, category: str) -> str:
    """Display label of a head: ``"sink 0.70 + slow decay"`` (or just the category for a small or unmeasured
    sink: ``None`` when no held-out window was analysed)."""
    return f"sink {sink_mass:.2f} + {category}" if sink_mass is not None and sink_mass >= SINK_SHOW else category


def sink_masses(pattern: Tensor, n_min: int = 1) -> Tensor:
    """Sink masses ``[batch, head, n]`` of attention patterns ``[batch, head, n, T]`` at query positions >= n_min."""
    return pattern[:, :, n_min:, SINK_FIRST]


def drop_sink(kernel: Tensor) -> Tensor:
    """Kernel rows ``[..., n, T]`` without the first position, renormalised (row 0, which sees only the sink,
    is left as zeros)."""
    return split_sink(kernel)[1]


def sink_term(pattern_sink: Tensor, n_min: int) -> tuple[Tensor, Tensor]:
    """``(median, CV)`` per head of the sink mass ``pattern_sink [H, T]`` (true attention on position 0 at each
    query position of the calibration text) over positions ``>= n_min``."""
    s = pattern_sink[:, n_min:].double()
    mean = s.mean(-1)
    return s.median(-1).values, torch.where(mean > 0, s.std(-1) / mean.clamp(min=1e-30), torch.zeros_like(mean))
