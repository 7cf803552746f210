"""The Ray executor: shards of windows on actors that hold the model, merged on the driver (docs/distributed.md).

``import ray`` happens only in this module, inside its functions (an optional dependency:
``pip install 'attnscope[distributed]'``).

* **Actors.** Each worker is an actor created once per model with the model's weights from the object
  store (so every worker has exactly the driver's weights, whatever ``MODEL`` was), moved to the workers'
  ``device``; it runs window tasks (:mod:`attnscope.core.executor`) and returns partial accumulators on the CPU.
  Actors ask for ``cluster CPUs / workers`` CPUs each, use as many torch threads, and are spread over nodes.
* **Order.** Shards are sent to whichever actor is free; partial results are merged on the driver in window
  order (a result that arrives early waits for its predecessors), so a run's output does not depend on
  which worker finished first.
* **Faults.** A worker that dies is restarted and its shard retried (``max_restarts``, ``max_task_retries``);
  shards are pure functions of the windows, so the result is identical.  An unreachable ``--ray-address``
  or a missing Ray is one line and exit 2; Ctrl-C kills the actors (and the local cluster this process
  started) before the command exits.
* **Cost.** :attr:`RayExecutor.stats` counts shards and times the merging and the waiting on workers.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
import socket
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from attnscope.core.errors import AttnscopeError

log = logging.getLogger("attnscope")

MAX_RETRIES = 3  # restarts of a dead worker, and retries of its shard
START_TIMEOUT = 300  # seconds for the workers to start (resources free, model loaded)


def shards(n: int, shard_size: int) -> list[tuple[int, int]]:
    """``(start, stop)`` of consecutive shards of ``shard_size`` windows covering ``0..n``."""
    size = max(1, shard_size)
    return [(a, min(n, a + size)) for a in range(0, n, size)]


def import_ray():
    """``ray``, or one line saying how to install it."""
    try:
        import ray
    except ImportError:
        raise AttnscopeError("--executor ray needs Ray, which is not installed; install it with "
                             "pip install 'attnscope[distributed]' (scripts/setup.sh does) or use --executor local"
                             ) from None
    return ray


def _check_reachable(address: str, timeout: float = 5.0) -> None:
    """A ``HOST:PORT`` (or ``ray://HOST:PORT``) address answers a TCP connection within ``timeout`` seconds."""
    hostport = address.split("://", 1)[-1]
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise AttnscopeError(f"--ray-address {address!r} is not auto or HOST:PORT; pass auto on a node of a running "
                             "cluster, or the head's address, e.g. 10.0.0.1:6379")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as err:
        raise AttnscopeError(f"--ray-address {address}: no Ray cluster answers there ({err.strerror or err}); start "
                             "one with `ray start --head` and pass the address it prints") from None


def connect(address: str | None):
    """Connect to the cluster at ``address`` (``auto``, ``HOST:PORT``, ``ray://HOST:PORT``) or start a local one
    (``None``); returns ``(ray, started_here)``.  An already initialised Ray (a test's cluster) is used as is."""
    ray = import_ray()
    if ray.is_initialized():
        return ray, False
    try:
        ray.init(address=address, include_dashboard=False, logging_level=logging.ERROR, log_to_driver=False,
                 configure_logging=True)
    except (ConnectionError, RuntimeError, ValueError) as err:
        msg = " ".join(str(err).split())[:160]
        where = "auto (no running cluster found on this node)" if address == "auto" else address
        raise AttnscopeError(f"--ray-address {where}: cannot connect to Ray ({msg}); start a cluster with "
                             "`ray start --head`, or leave --ray-address out to start one here") from None
    return ray, True


def _to_cpu(x: Any) -> Any:
    """A partial result with every tensor on the CPU (dataclasses, lists and dicts walked)."""
    if isinstance(x, Tensor):
        return x.cpu()
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        for f in dataclasses.fields(x):
            setattr(x, f.name, _to_cpu(getattr(x, f.name)))
        return x
    if isinstance(x, list):
        return [_to_cpu(v) for v in x]
    if isinstance(x, dict):
        return {k: _to_cpu(v) for k, v in x.items()}
    return x


class _Worker:
    """One actor: the model, loaded once; runs window tasks on shards."""

    def __init__(self, model: list, device: str | None, threads: int) -> None:
        import ray

        torch.set_num_threads(max(1, threads))
        w = ray.get(model[0])  # the weights' ref travels inside a list: fetched here, and again after a restart
        self.w = w if device is None or torch.device(device) == w.device else w.to(device)

    def run(self, task: Callable, windows: Tensor, first: int, args: tuple) -> Any:
        with torch.no_grad():
            return _to_cpu(task(self.w, windows.to(self.w.device), first, *args))

    def ready(self) -> bool:
        return True


def _run_job(fn: Callable, item: Any, args: tuple, threads: int) -> Any:
    torch.set_num_threads(max(1, threads))
    return fn(item, *args)


class RayExecutor:
    """Window tasks on Ray actors (one pool per model), independent jobs as Ray tasks; see the module docstring."""

    def __init__(self, address: str | None = None, workers: int | None = None, device: str | None = None) -> None:
        if address not in (None, "auto"):
            _check_reachable(address)
        self._ray = import_ray()  # a missing Ray is reported before anything is computed
        self.address, self.device, self._workers = address, device, workers
        self._started: bool | None = None  # None: not connected yet (a cache hit never connects)
        self._pools: dict[int, tuple[Any, Any, list]] = {}  # id(model) -> (model, its object ref, actors)
        self.stats = {"shards": 0, "merge_s": 0.0, "wait_s": 0.0, "start_s": 0.0}

    def _connect(self) -> None:
        if self._started is not None:
            return
        t0 = time.perf_counter()
        self._ray, self._started = connect(self.address)
        cpus = float(self._ray.cluster_resources().get("CPU", 1.0))
        self.workers = self._workers or max(1, int(cpus))
        self.cpus_per_worker = cpus / self.workers
        self.threads = max(1, int(self.cpus_per_worker))
        self.stats["start_s"] += time.perf_counter() - t0

    def summary(self) -> str:
        """One line: shards, workers, start-up and merge time (empty when nothing was sent)."""
        if not self.stats["shards"]:
            return ""
        st = self.stats
        return (f"ray: {st['shards']} shards on {self.workers} workers ({self.threads} torch threads each); "
                f"cluster and workers started in {st['start_s']:.1f} s, shards ran for {st['wait_s']:.1f} s, "
                f"merging took {st['merge_s']:.2f} s")

    # -- actors ------------------------------------------------------------------------------------
    def _actors(self, w: Any) -> list:
        self._connect()
        if id(w) in self._pools and self._pools[id(w)][0] is w:
            return self._pools[id(w)][2]
        self._drop_pools()  # one model's actors at a time: memory
        ray, t0 = self._ray, time.perf_counter()
        ref = ray.put(copy.copy(w).to("cpu") if w.device.type != "cpu" else w)  # a copy: .to works in place
        cls = ray.remote(_Worker).options(num_cpus=self.cpus_per_worker, num_gpus=1 if _is_gpu(self.device) else 0,
                                          max_restarts=MAX_RETRIES, max_task_retries=MAX_RETRIES,
                                          scheduling_strategy="SPREAD")
        actors = [cls.remote([ref], self.device, self.threads) for _ in range(self.workers)]
        try:
            self._wait([a.ready.remote() for a in actors], timeout=START_TIMEOUT)
        except ray.exceptions.GetTimeoutError:
            for a in actors:
                ray.kill(a)
            free = ray.available_resources().get("CPU", 0.0)
            raise AttnscopeError(f"{self.workers} Ray workers of {self.cpus_per_worker:g} CPUs each did not start "
                                 f"within {START_TIMEOUT} s ({free:g} CPUs of the cluster are free); pass fewer "
                                 "--workers or free the cluster") from None
        self.stats["start_s"] += time.perf_counter() - t0
        self._pools[id(w)] = (w, ref, actors)
        return actors

    def _drop_pools(self) -> None:
        for _, _, actors in self._pools.values():
            for a in actors:
                self._ray.kill(a)
        self._pools.clear()

    def _wait(self, refs: list, timeout: float | None = None) -> list:
        try:
            return self._ray.get(refs, timeout=timeout)
        except self._ray.exceptions.GetTimeoutError:
            raise
        except self._ray.exceptions.RayError as err:
            raise AttnscopeError(_worker_error(err)) from None

    # -- window tasks --------------------------------------------------------------------------------
    def map_windows(self, w: Any, task: Callable, windows: Tensor, *args: Any, bar=None, shard_size: int = 4) -> Any:
        if windows.shape[0] == 0:  # nothing to send: the task's empty result, here
            return task(w, windows, 0, *args)
        ray, actors = self._ray, self._actors(w)
        windows, args_ref = windows.cpu(), ray.put(args)
        parts = shards(windows.shape[0], shard_size)
        todo, free, merged, nxt = list(range(len(parts))), list(actors), None, 0
        running: dict[Any, tuple[Any, int]] = {}  # object ref -> (actor, shard)
        done: dict[int, Any] = {}  # shard -> partial result, until its predecessors are merged
        self.stats["shards"] += len(parts)
        try:
            while todo or running:
                while todo and free:
                    i, actor = todo.pop(0), free.pop(0)
                    a0, a1 = parts[i]
                    running[actor.run.remote(task, windows[a0:a1], a0, args_ref)] = (actor, i)
                t0 = time.perf_counter()
                ready, _ = ray.wait(list(running), num_returns=1)
                actor, i = running.pop(ready[0])
                done[i] = self._wait([ready[0]])[0]
                self.stats["wait_s"] += time.perf_counter() - t0
                free.append(actor)
                if bar is not None:
                    bar.update(parts[i][1] - parts[i][0])
                t0 = time.perf_counter()
                while nxt in done:  # merge in window order
                    part = done.pop(nxt)
                    merged = part if merged is None else merged.merge(part)
                    nxt += 1
                self.stats["merge_s"] += time.perf_counter() - t0
        except BaseException:  # Ctrl-C or a failure: stop what is running
            for ref in running:
                ray.cancel(ref)
            raise
        return _to_device(merged, w.device)

    # -- independent jobs ---------------------------------------------------------------------------
    def map(self, fn: Callable, items: Sequence, *args: Any, log=None) -> list:
        if not items:
            return []
        self._connect()
        self._drop_pools()  # jobs load their own models: free the actors' CPUs
        ray = self._ray
        job = ray.remote(_run_job).options(num_cpus=self.cpus_per_worker, num_gpus=1 if _is_gpu(self.device) else 0,
                                           max_retries=MAX_RETRIES, scheduling_strategy="SPREAD")
        args_ref, todo, out = ray.put(args), list(range(len(items))), [None] * len(items)
        running: dict[Any, tuple[int, float]] = {}  # object ref -> (item, start time)
        try:
            while todo or running:
                while todo and len(running) < self.workers:
                    i = todo.pop(0)
                    running[job.remote(fn, items[i], args_ref, self.threads)] = (i, time.perf_counter())
                ready, _ = ray.wait(list(running), num_returns=1)
                i, t0 = running.pop(ready[0])
                out[i] = self._wait([ready[0]])[0]
                if log:
                    log(i, time.perf_counter() - t0)
        except BaseException:
            for ref in running:
                ray.cancel(ref, force=True)
            raise
        return out

    def close(self) -> None:
        if self._started is not None and self._ray.is_initialized():
            self._drop_pools()
            if self._started:
                self._ray.shutdown()

    def __enter__(self) -> RayExecutor:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _is_gpu(device: str | None) -> bool:
    return device is not None and device.startswith("cuda")


def _to_device(x: Any, device: torch.device) -> Any:
    if isinstance(x, Tensor):
        return x.to(device)
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        for f in dataclasses.fields(x):
            setattr(x, f.name, _to_device(getattr(x, f.name), device))
    elif isinstance(x, list):
        return [_to_device(v, device) for v in x]
    elif isinstance(x, dict):
        return {k: _to_device(v, device) for k, v in x.items()}
    return x


def _worker_error(err: Exception) -> str:
    """One line for a worker that failed for good (after its retries)."""
    cause = getattr(err, "cause", None)
    if isinstance(cause, AttnscopeError):
        return str(cause)
    first = next((ln for ln in str(err).splitlines() if ln.strip()), type(err).__name__)
    return (f"a Ray worker failed after {MAX_RETRIES} retries ({' '.join(first.split())[:160]}); see the worker logs "
            f"under {os.environ.get('RAY_TMPDIR', '/tmp/ray')}/session_latest/logs, or rerun with --executor local")
