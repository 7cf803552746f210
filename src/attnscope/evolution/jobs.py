"""``attnscope evolution --executor ray``: one job per checkpoint that is not in the driver's cache.

Each job loads its own checkpoint once (so every checkpoint path must be readable on every node) and returns
the checkpoint's :class:`~attnscope.evolution.run.CheckpointSummary`; the driver looks every summary up in its
cache before sending any job, and caches what comes back.  The summary functions come from
:mod:`attnscope.evolution.run` as arguments (it imports this module).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from attnscope.core.cache import write_json
from attnscope.core.executor import Executor
from attnscope.models import load_model

if TYPE_CHECKING:
    from attnscope.evolution.run import CheckpointRef, CheckpointSummary, EvolutionSettings


@torch.no_grad()
def summarise_remote(ref: CheckpointRef, s: EvolutionSettings, device: str, dtype: str,
                     summarise: Callable[..., CheckpointSummary]) -> CheckpointSummary:
    """One checkpoint's summary on a worker (it loads its own checkpoint once).  No cache on the worker: its
    node's cache is not the driver's, which writes the summary when it comes back."""
    return summarise(load_model(ref.spec, device=device, dtype=dtype), ref, s, False)


def run_jobs(refs: list[CheckpointRef], s: EvolutionSettings, cache: bool, device: str, dtype: str, log,
             executor: Executor, lookup: Callable[..., tuple[Any, Path, CheckpointSummary | None]],
             summarise: Callable[..., CheckpointSummary]) -> list[CheckpointSummary]:
    """Every checkpoint's summary: cached ones read here (``lookup``), one ``executor`` job running
    ``summarise`` for each of the others (written to the cache here when they come back)."""
    out: list[CheckpointSummary | None] = [None] * len(refs)
    todo: list[tuple[int, Path]] = []
    for i, ref in enumerate(refs):
        w, path, hit = lookup(ref, s, cache, device, dtype)
        del w
        if hit is not None:
            out[i] = hit
            if log:
                log(f"[{i + 1}/{len(refs)}] step {ref.step}: {ref.spec} (cached)")
        else:
            todo.append((i, path))

    def done(j: int, seconds: float) -> None:
        if log:
            i = todo[j][0]
            log(f"[{i + 1}/{len(refs)}] step {refs[i].step}: {refs[i].spec} ({seconds:.1f}s on a worker)")

    got = executor.map(summarise_remote, [refs[i] for i, _ in todo], s, device, dtype, summarise, log=done)
    for (i, path), summary in zip(todo, got):
        out[i] = summary
        if cache:
            write_json(path, summary.to_json(), indent=None)
    return out  # type: ignore[return-value]
