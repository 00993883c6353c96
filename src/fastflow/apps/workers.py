"""Independent runs in worker processes: many categories trained at once on one machine.

``fastflow benchmark --jobs N`` and ``fastflow train DATA... --jobs N`` hand their runs to
``run_in_workers``: N worker processes (spawned, so none inherits the parent's threads), each
with its share of the cores and, where runs train on GPUs, a GPU of its own in turn
(``worker_devices``). A worker's progress bars and log lines stay off the terminal, which shows
the caller's one progress bar of finished runs; a worker's error still reaches the caller.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from typing import Any, TypeVar

import torch

from fastflow.core.errors import FastFlowError, is_integer
from fastflow.core.hardware import resolve_device, threads_each

__all__ = ["check_jobs", "run_in_workers", "worker_device", "worker_devices"]

Task = TypeVar("Task")
Result = TypeVar("Result")

# The device this worker process trains on (``_worker_setup``); None in the parent.
_worker_device: str | None = None


def check_jobs(jobs: Any) -> None:
    if not is_integer(jobs) or jobs < 1:
        raise FastFlowError(f"bad --jobs {jobs!r}; use a whole number of worker processes, 1 or more")


def worker_devices(device: str, jobs: int) -> list[str]:
    """The device of each of ``jobs`` workers: where ``device`` means any GPU (``auto`` or
    ``cuda`` without an index) and this machine has several, the GPUs in turn
    (``cuda:0``, ``cuda:1``, ..., again from ``cuda:0``); else ``device`` for every worker."""
    resolved = resolve_device(device)  # a GPU asked for on a machine without one stops here
    if resolved.type == "cuda" and device in ("auto", "cuda"):
        return [f"cuda:{index % torch.cuda.device_count()}" for index in range(jobs)]
    return [device] * jobs


def worker_device(requested: str) -> str:
    """The device a run asking for ``requested`` trains on: this worker's, or (outside a worker)
    ``requested`` itself."""
    return _worker_device or requested


def _worker_setup(threads: int, devices: Any) -> None:
    """A worker's share of the cores, its device (the next of the ``devices`` queue), and its
    bars and log lines kept off the terminal."""
    global _worker_device
    sys.stderr = open(os.devnull, "w")  # noqa: SIM115 - lives as long as the worker
    torch.set_num_threads(threads)
    _worker_device = devices.get()


def run_in_workers(
    function: Callable[[Task], Result],
    tasks: Sequence[Task],
    jobs: int,
    device: str,
) -> Iterator[tuple[Task, Result]]:
    """(task, ``function(task)``) as each task finishes: in this process, in order, for one job;
    else in ``jobs`` worker processes that split the cores and take their devices from
    ``worker_devices(device, jobs)``. ``function`` and the tasks must pickle."""
    check_jobs(jobs)
    if jobs == 1 or len(tasks) <= 1:
        for task in tasks:
            yield task, function(task)
        return
    jobs = min(jobs, len(tasks))
    threads = threads_each(jobs)
    context = multiprocessing.get_context("spawn")
    devices = context.Queue()
    for name in worker_devices(device, jobs):
        devices.put(name)
    with ProcessPoolExecutor(
        jobs, mp_context=context, initializer=_worker_setup, initargs=(threads, devices)
    ) as pool:
        futures = {pool.submit(function, task): task for task in tasks}
        for future in as_completed(futures):
            yield futures[future], future.result()
