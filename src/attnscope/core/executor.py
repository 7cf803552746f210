"""Where the passes over sample windows run: in this process (:data:`LOCAL`, the default) or on a Ray cluster.

A *window task* is a module-level function ``task(w, windows, first_window, *args, bar=None)`` that runs
the model ``w`` over a shard of ``windows [n, T]`` (``first_window``: the index of the shard's first
window in the whole set) and returns a partial accumulator (:mod:`attnscope.core.accumulators`).  An executor
shards the windows, runs the task on each shard and merges the partial results in window order:

* :class:`LocalExecutor` runs the task once on all windows, with the progress bar updated per batch:
  exactly what the one-process code did before executors existed;
* :class:`attnscope.core.distributed.RayExecutor` sends shards to Ray actors that hold the model (loaded once
  per actor) and merges what they return (``import ray`` happens only there, when a Ray executor is made).

``map`` runs independent jobs (one per checkpoint in ``evolution``): in a loop locally, one Ray task each
under Ray.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol, runtime_checkable

from torch import Tensor

from attnscope.core.distributed import RayExecutor
from attnscope.core.errors import AttnscopeError

EXECUTORS = ("local", "ray")


@runtime_checkable
class Executor(Protocol):
    """Runs window tasks (sharded, merged) and independent jobs."""

    def map_windows(self, w: Any, task: Callable, windows: Tensor, *args: Any, bar=None, shard_size: int = 4) -> Any:
        """The merged partial result of ``task`` over every shard of ``windows``."""
        ...

    def map(self, fn: Callable, items: Sequence, *args: Any, log=None) -> list:
        """``[fn(item, *args) for item in items]``, in order."""
        ...

    def close(self) -> None:
        ...


class LocalExecutor:
    """This process: one shard holding every window (bit-identical to the code before executors)."""

    workers = 1

    def map_windows(self, w: Any, task: Callable, windows: Tensor, *args: Any, bar=None, shard_size: int = 4) -> Any:
        return task(w, windows, 0, *args, bar=bar)

    def map(self, fn: Callable, items: Sequence, *args: Any, log=None) -> list:
        return [fn(item, *args) for item in items]

    def close(self) -> None:
        pass

    def __enter__(self) -> LocalExecutor:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


LOCAL = LocalExecutor()


def make_executor(kind: str = "local", *, address: str | None = None, workers: int | None = None,
                  device: str | None = None) -> Executor:
    """The executor named on the command line: ``local`` or ``ray`` (``address``: ``auto`` for a running
    cluster, ``HOST:PORT`` / ``ray://HOST:PORT``, or ``None`` for a local cluster started here; ``workers``:
    actors, default one per CPU of the cluster up to the number of shards; ``device``: the workers' torch
    device, default the model's)."""
    if kind == "local":
        if address is not None or workers is not None:
            raise AttnscopeError("--ray-address and --workers apply only with --executor ray; add --executor ray "
                                 "or leave them out")
        return LOCAL
    if kind != "ray":
        raise AttnscopeError(f"--executor {kind!r} is not one of {', '.join(EXECUTORS)}; pass local or ray")
    if workers is not None and workers < 1:
        raise AttnscopeError(f"--workers {workers} must be at least 1")
    return RayExecutor(address=address, workers=workers, device=device)


@contextlib.contextmanager
def running(choice: Any, device: str, report=None) -> Iterator[Executor]:
    """The executor of ``choice`` (``cli_args.ExecutorChoice``, checked on entry, before anything is loaded), closed
    with its workers and any local cluster it started when the block ends or is interrupted; then ``report(line)``
    with the executor's one-line summary (Ray: shards, start-up and merge time; default: on stderr), if it ran
    anything."""
    ex = make_executor(choice.executor, address=choice.ray_address, workers=choice.workers, device=device)
    try:
        yield ex
    finally:
        ex.close()
    if line := getattr(ex, "summary", lambda: "")():
        (report or (lambda m: print(m, file=sys.stderr)))(line)
