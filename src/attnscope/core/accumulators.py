r"""Mergeable statistics: the partial results that shards of windows return and a driver combines.

Every statistic attnscope estimates from sample texts is either a **sum** over windows (means of queries,
keys and residuals, mean attention, sums of squares, per-neuron moments) or a **median / quantile** over
per-window values (decomposition TVs, sink masses).  Each accumulator here has three steps, as Ray Data's
``AggregateFnV2`` splits an aggregate:

* ``add(...)``: one batch of windows (in place);
* ``merge(other)``: another shard's partial result (in place; returns ``self``);
* ``finalise()``: the statistic.

Sums are kept in float64 with the count of what was summed; gathered values are kept with the index of the
first window of their batch and concatenated in window order on ``finalise``, so the gathered tensor (and
any median, quantile or mean of it) is the same however the windows were sharded.  The one-process path
(:class:`~attnscope.core.executor.LocalExecutor`) uses the same accumulators with a single shard, so the local
and the distributed paths cannot drift apart: they differ only in the order in which float64 partial sums
are added.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar, Self

import torch
from jaxtyping import Float
from torch import Tensor

F64 = torch.float64


class Mergeable:
    """``merge`` for dataclasses of sums: tensors and counts add, :class:`Gathered` fields (and lists of
    them) merge.  Subclasses define ``add`` and ``finalise``."""

    def merge(self, other: Mergeable) -> Mergeable:
        if type(other) is not type(self):
            raise TypeError(f"cannot merge {type(other).__name__} into {type(self).__name__}")
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            a, b = getattr(self, f.name), getattr(other, f.name)
            setattr(self, f.name, _merged(a, b, f.name))
        return self


def _merged(a, b, name: str):
    if isinstance(a, Tensor):
        if a.shape != b.shape:
            raise ValueError(f"{name}: shapes {tuple(a.shape)} and {tuple(b.shape)} do not merge")
        return a.add_(b.to(a.device))
    if isinstance(a, Mergeable):
        return a.merge(b)
    if isinstance(a, list):
        if len(a) != len(b):
            raise ValueError(f"{name}: {len(a)} and {len(b)} parts do not merge")
        return [_merged(x, y, name) for x, y in zip(a, b)]
    if isinstance(a, int) and not isinstance(a, bool):
        return a + b
    if a != b:  # settings-like fields (a shape, a minimum position) must agree
        raise ValueError(f"{name}: {a!r} and {b!r} differ; these partial results come from different analyses")
    return a


def merge_all(parts: list[Mergeable]) -> Mergeable:
    """The first partial result with every other merged into it (in the order given)."""
    if not parts:
        raise ValueError("nothing to merge")
    out = parts[0]
    for p in parts[1:]:
        out.merge(p)
    return out


# --------------------------------------------------------------------------------------------------
# Generic accumulators
# --------------------------------------------------------------------------------------------------


@dataclass
class Moments(Mergeable):
    """Count, sum and sum of squares per feature over rows (e.g. a neuron's pre-activation over positions)."""

    n: int
    s1: Float[Tensor, " feature"]  # float64 sum
    s2: Float[Tensor, " feature"]  # float64 sum of squares

    @classmethod
    def zeros(cls, *shape: int) -> Moments:
        return cls(0, torch.zeros(shape, dtype=F64), torch.zeros(shape, dtype=F64))

    def add(self, y: Float[Tensor, "rows feature"]) -> Moments:
        y = y.double().cpu()
        self.s1 += y.sum(0)
        self.s2 += (y**2).sum(0)
        self.n += y.shape[0]
        return self

    @property
    def mean(self) -> Tensor:
        return self.s1 / self.n

    @property
    def var(self) -> Tensor:
        """Population variance ``E[y^2] - E[y]^2`` (clamped at 0)."""
        return (self.s2 / self.n - self.mean**2).clamp_min(0)

    def finalise(self) -> tuple[Tensor, Tensor]:
        return self.mean, self.var

    def __add__(self, o: Moments) -> Moments:  # a new object: the operands are left as they were
        return Moments(self.n + o.n, self.s1 + o.s1, self.s2 + o.s2)


class ByWindow(Mergeable):
    """Values keyed by the index of their (first) window, each added once; merging takes the other's keys.
    Subclasses are dataclasses with a ``chunks`` dict field and name what ``add`` does (``verb``)."""

    chunks: dict
    verb: ClassVar[str] = "added"

    def add(self, window: int, value: Any) -> Self:
        if window in self.chunks:
            raise ValueError(f"window {window} was {self.verb} twice")
        self.chunks[window] = value
        return self

    def check_mergeable(self, other: Self) -> None:
        """Raise when ``other`` holds values of another kind (subclasses add their own checks)."""

    def merge(self, other: Mergeable) -> Self:
        if type(other) is not type(self):
            raise TypeError(f"cannot merge {type(other).__name__} into {type(self).__name__}")
        self.check_mergeable(other)
        for k, v in other.chunks.items():
            self.add(k, v)
        return self

    def __len__(self) -> int:
        return len(self.chunks)

    def ordered(self) -> list:
        """The values in window order."""
        return [self.chunks[k] for k in sorted(self.chunks)]


@dataclass
class Gathered(ByWindow):
    """Per-window values kept for a median or quantile: chunks keyed by the index of their first window,
    concatenated along ``dim`` in window order."""

    dim: int = 0
    chunks: dict[int, Tensor] = field(default_factory=dict)
    verb: ClassVar[str] = "gathered"

    def check_mergeable(self, other: Gathered) -> None:
        if other.dim != self.dim:
            raise ValueError(f"gathered along dims {self.dim} and {other.dim}")

    def finalise(self) -> Tensor:
        return torch.cat(self.ordered(), self.dim)


@dataclass
class PerWindow(ByWindow):
    """Per-window accumulators kept apart (e.g. one :class:`Moments` per window, for a split-half noise ceiling):
    keyed by window index, listed in window order."""

    chunks: dict[int, Mergeable] = field(default_factory=dict)

    def finalise(self) -> list:
        return self.ordered()


# --------------------------------------------------------------------------------------------------
# Kernels (method §5): the estimation and the held-out pass
# --------------------------------------------------------------------------------------------------


@dataclass
class EstimationSums(Mergeable):
    """Sums over estimation windows, per analysed layer ``j``: (rotated) queries and keys and the pre-norm
    residual per position, and the squared centred residual."""

    n: int  # windows
    q: Float[Tensor, "layer head ctx d_head"]
    k: Float[Tensor, "layer head ctx d_head"]
    resid: Float[Tensor, "layer ctx d_model"]
    sq: Float[Tensor, " layer"]

    @classmethod
    def zeros(cls, L: int, H: int, T: int, dh: int, d: int, device: torch.device | str = "cpu") -> EstimationSums:
        z = torch.zeros(L, H, T, dh, dtype=F64, device=device)
        return cls(0, z, torch.zeros_like(z), torch.zeros(L, T, d, dtype=F64, device=device),
                   torch.zeros(L, dtype=F64, device=device))

    def add(self, j: int, q: Float[Tensor, "batch head ctx d_head"], k: Float[Tensor, "batch head ctx d_head"],
            resid: Float[Tensor, "batch ctx d_model"], sq: Float[Tensor, ""]) -> EstimationSums:
        """One batch at analysed layer ``j`` (``sq``: its summed squared centred residual, float64); the
        windows are counted once per batch with :meth:`count`."""
        self.q[j] += q.sum(0).to(F64)
        self.k[j] += k.sum(0).to(F64)
        self.resid[j] += resid.sum(0).to(F64)
        self.sq[j] += sq
        return self

    def count(self, n_windows: int) -> None:
        self.n += n_windows

    def finalise(self, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Mean query and key (in ``dtype``), mean residual (float64) and the summed squares."""
        n = self.n
        return (self.q / n).to(dtype), (self.k / n).to(dtype), self.resid / n, self.sq


@dataclass
class ValidationSums(Mergeable):
    """Held-out pass: summed attention rows at the kept query positions and query-consistency TVs (means over
    windows), and the gathered per-position decomposition TVs and sink masses (medians, quantiles)."""

    n: int  # windows
    attn: Float[Tensor, "layer head n_query ctx"]
    consistency: Float[Tensor, "layer head"]
    tv: list[Gathered]  # per layer: [head, positions] chunks
    sink: list[Gathered]

    @classmethod
    def zeros(cls, L: int, H: int, nq: int, T: int, device: torch.device | str = "cpu") -> ValidationSums:
        return cls(0, torch.zeros(L, H, nq, T, dtype=F64, device=device), torch.zeros(L, H, dtype=F64, device=device),
                   [Gathered(1) for _ in range(L)], [Gathered(1) for _ in range(L)])

    def add(self, j: int, first_window: int, attn: Float[Tensor, "batch head n_query ctx"],
            consistency: Float[Tensor, "batch head"], tv: Float[Tensor, "head _m"], sink: Float[Tensor, "head _m"]
            ) -> ValidationSums:
        self.attn[j] += attn.sum(0).to(F64)
        self.consistency[j] += consistency.sum(0).to(F64)
        self.tv[j].add(first_window, tv)
        self.sink[j].add(first_window, sink)
        return self

    def count(self, n_windows: int) -> None:
        self.n += n_windows

    def finalise(self, dtype: torch.dtype, H: int) -> tuple[list[Tensor], Tensor, Tensor, list[Tensor]]:
        """Per-layer TVs ``[H, m]``, mean attention (``dtype``), mean consistency (float64), per-layer sinks;
        with no window, TVs and sinks are ``zeros(H, 1)`` and the means are zero."""
        n = max(1, self.n)
        dev = self.attn.device

        def cat(g: Gathered) -> Tensor:
            return g.finalise() if len(g) else torch.zeros(H, 1, device=dev)

        return [cat(g) for g in self.tv], (self.attn / n).to(dtype), self.consistency / n, [cat(g) for g in self.sink]
