"""The Ray engine of a sweep (extra ``sparsemup[ray]``): every run is a Ray task, the driver still records.

Each task trains one run exactly as the local engine does (the same ``_execute``, the same
``train.threads``) and asks Ray for that many CPUs (and a GPU when the run trains on CUDA), so Ray
places runs on whatever machines the cluster has; at most ``workers`` run at once. The driver is
the only writer of the results store (``sweep.run_sweep`` records what each task returns). A task
whose worker process dies (a node lost, a worker killed) is retried by Ray up to ``RETRIES`` times,
resuming from the run's last checkpoint; after that it counts as failed (``failures.jsonl``) and
the next invocation retries it.
"""

from __future__ import annotations

import importlib.util
import socket
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

__all__ = ["CONNECT_TIMEOUT_S", "RETRIES", "connect", "disconnect", "require_ray", "run_on_ray", "task_resources"]

CONNECT_TIMEOUT_S = 10.0  # the longest wait for a cluster address to answer
RETRIES = 2  # Ray's retries of a task whose worker died (not of a run that raised: that is a result)
Job = TypeVar("Job")


def require_ray() -> None:
    """A ValueError naming the extra unless Ray can be imported."""
    if importlib.util.find_spec("ray") is None:
        raise ValueError("--engine ray needs Ray, which is not installed: pip install 'sparsemup[ray]'")


def connect(address: str | None) -> bool:
    """Start or join Ray unless this process already has; True when it did. ``address``: None or "local" starts a
    private instance (never a stray cluster's); "auto" or HOST:PORT joins that cluster, failing within
    ``CONNECT_TIMEOUT_S`` naming the address where nothing answers there (Ray itself retries for minutes)."""
    require_ray()
    import ray

    if ray.is_initialized():
        return False
    if address not in (None, "local", "auto"):
        _probe(address)
    try:
        ray.init(address="local" if address in (None, "local") else address, include_dashboard=False,
                 log_to_driver=False)
    except ConnectionError as err:
        raise ValueError(f"cannot join the Ray cluster at {address} ({err}); start it (ray start --head) or check "
                         "--address") from None
    return True


def _probe(address: str) -> None:
    """Open and close a TCP connection to ``address`` ([ray://]HOST:PORT) within ``CONNECT_TIMEOUT_S``; a ValueError
    naming it and the fix where that fails."""
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ValueError(f"--address {address!r} is not HOST:PORT (or auto, or local)")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as err:
        raise ValueError(f"no Ray cluster answers at {address} within {CONNECT_TIMEOUT_S:g} s ({err}); start it "
                         "(ray start --head) or check --address") from None


def disconnect() -> None:
    """Leave Ray (stopping the private instance ``connect`` started)."""
    import ray

    ray.shutdown()


def task_resources(config: dict[str, Any], cluster_gpus: float) -> dict[str, float]:
    """What one run asks Ray for: its ``train.threads`` CPUs, and one GPU when it trains on CUDA (``train.device``
    cuda, or auto on a cluster that has GPUs), so Ray places it on a node with a free GPU."""
    train = config["train"]
    gpu = train["device"] == "cuda" or (train["device"] == "auto" and cluster_gpus > 0)
    return {"num_cpus": float(train["threads"]), "num_gpus": 1.0 if gpu else 0.0}


def run_on_ray(jobs: Sequence[tuple[Job, dict[str, Any], str]], workers: int,
               execute: Callable[[dict[str, Any], str], dict[str, Any]],
               done: Callable[[Job, dict[str, Any]], None]) -> None:
    """Run ``execute(config, run_dir)`` of every job as a Ray task (``task_resources``), ``workers`` at a time, and
    call ``done(job, result)`` in the driver as each finishes (after ``connect``)."""
    import ray

    task = ray.remote(max_retries=RETRIES, retry_exceptions=False)(execute)
    gpus = float(ray.cluster_resources().get("GPU", 0))
    queue = list(jobs)
    pending: dict[Any, Job] = {}
    while queue or pending:
        while queue and len(pending) < workers:
            job, config, run_dir = queue.pop(0)
            pending[task.options(**task_resources(config, gpus)).remote(config, run_dir)] = job
        ready, _ = ray.wait(list(pending), num_returns=1)
        for ref in ready:
            job = pending.pop(ref)
            try:
                result = ray.get(ref)
            except ray.exceptions.RayError as error:  # the worker died RETRIES + 1 times
                result = {"error": f"{type(error).__name__} after {RETRIES} Ray retries: {error}"}
            done(job, result)
