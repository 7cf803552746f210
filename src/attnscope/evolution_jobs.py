"""``attnscope evolution --executor ray``: one job per checkpoint that is not in the driver's cache.

Each job loads its own checkpoint once (so every checkpoint path must be readable on every node) and returns
the checkpoint's :class:`~attnscope.evolution.CheckpointSummary`; the driver looks every summary up in its
cache before sending any job, and caches what comes back.
"""

from __future__ import annotations

from pathlib import Path

import torch

from . import evolution as E
from .cache import write_json
from .evolution import CheckpointRef, CheckpointSummary, EvolutionSettings
from .executor import Executor
from .models import load_model


@torch.no_grad()
def summarise_remote(ref: CheckpointRef, s: EvolutionSettings, cache: bool, device: str, dtype: str
                     ) -> CheckpointSummary:
    """One checkpoint's summary on a worker (an independent job: it loads its own checkpoint once); the
    driver, which looked the summary up in its cache before sending the job, writes it there."""
    return E.summarise_weights(load_model(ref.spec, device=device, dtype=dtype), ref, s, cache)


def run_jobs(refs: list[CheckpointRef], s: EvolutionSettings, cache: bool, device: str, dtype: str, log,
             executor: Executor) -> list[CheckpointSummary]:
    """Every checkpoint's summary: cached ones read here, one ``executor`` job for each of the others (written
    to the cache here when they come back)."""
    out: list[CheckpointSummary | None] = [None] * len(refs)
    todo: list[tuple[int, Path]] = []
    for i, ref in enumerate(refs):
        w, path, hit = E.cached_summary(ref, s, cache, device, dtype)
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

    # cache=False on the workers: their nodes' caches are not the driver's (the summaries are cached here)
    got = executor.map(summarise_remote, [refs[i] for i, _ in todo], s, False, device, dtype, log=done)
    for (i, path), summary in zip(todo, got):
        out[i] = summary
        if cache:
            write_json(path, summary.to_json(), indent=None)
    return out  # type: ignore[return-value]
