"""The Ray engine of a sweep (extra ``sparsemup[ray]``): every run is a Ray task, the driver still records.

Each task trains one run exactly as the local engine does (the same ``_execute``, the same
``train.threads``) and asks Ray for that many CPUs, so Ray places runs on whatever machines the
cluster has; at most ``workers`` run at once. The driver is the only writer of the results store
(``sweep.run_sweep`` records what each task returns). A task whose worker process dies (a node lost,
a worker killed) is retried by Ray up to ``RETRIES`` times, resuming from the run's last checkpoint;
after that it counts as failed (``failures.jsonl``) and the next invocation retries it.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

__all__ = ["RETRIES", "require_ray", "run_on_ray"]

RETRIES = 2  # Ray's retries of a task whose worker died (not of a run that raised: that is a result)
Job = TypeVar("Job")


def require_ray() -> None:
    """A ValueError naming the extra unless Ray can be imported."""
    if importlib.util.find_spec("ray") is None:
        raise ValueError("--engine ray needs Ray, which is not installed: pip install 'sparsemup[ray]'")


def run_on_ray(jobs: Sequence[tuple[Job, dict[str, Any], str]], workers: int, threads: int, address: str | None,
               execute: Callable[[dict[str, Any], str], dict[str, Any]],
               done: Callable[[Job, dict[str, Any]], None]) -> None:
    """Run ``execute(config, run_dir)`` of every job as a Ray task of ``threads`` CPUs, ``workers`` at a time, and
    call ``done(job, result)`` in the driver as each finishes. ``address``: None or "local" starts a private
    Ray instance (never a stray cluster's); "auto" or HOST:PORT joins that cluster."""
    require_ray()
    import ray

    started_here = not ray.is_initialized()
    if started_here:
        ray.init(address="local" if address in (None, "local") else address, include_dashboard=False,
                 log_to_driver=False)
    try:
        task = ray.remote(num_cpus=threads, max_retries=RETRIES, retry_exceptions=False)(execute)
        queue = list(jobs)
        pending: dict[Any, Job] = {}
        while queue or pending:
            while queue and len(pending) < workers:
                job, config, run_dir = queue.pop(0)
                pending[task.remote(config, run_dir)] = job
            ready, _ = ray.wait(list(pending), num_returns=1)
            for ref in ready:
                job = pending.pop(ref)
                try:
                    result = ray.get(ref)
                except ray.exceptions.RayError as error:  # the worker died RETRIES + 1 times
                    result = {"error": f"{type(error).__name__} after {RETRIES} Ray retries: {error}"}
                done(job, result)
    finally:
        if started_here:
            ray.shutdown()
