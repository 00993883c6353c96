"""Data-parallel training on ``torch.distributed``: the few collectives ``fit`` needs.

Launched by ``torchrun`` (``torchrun --nproc-per-node N -m fastflow train ...``), or by ``launch``
(``fastflow train --processes N``), which starts the same local processes through torch's
launcher API. Either sets ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` / ``MASTER_ADDR``; ``setup``
joins the process group they describe. Without them everything here is the identity of a single
process, so one code path serves both. The feature caches and their statistics live in CPU memory, so those collectives
(and the held-out NLL) always go through gloo. The gradients live where the flows train: gloo on
CPUs, NCCL on CUDA GPUs (``group``). Where the caller already started a group of another backend,
a gloo group beside it serves the CPU collectives.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import uuid
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from fastflow.core.errors import FastFlowError
from fastflow.core.hardware import threads_each

__all__ = [
    "all_gather",
    "all_reduce_sum",
    "barrier",
    "broadcast",
    "check_process_count",
    "cleanup",
    "group",
    "is_main",
    "launch",
    "launched_processes",
    "launched_rank",
    "rank",
    "setup",
    "world_size",
]

_cpu_group: Any = None
_started_here = False

CPU = torch.device("cpu")


def launched_processes() -> int:
    """How many processes ``torchrun`` (or ``launch``) started this one among; 1 when neither did."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def launched_rank() -> int:
    """This process's rank among those ``torchrun`` (or ``launch``) started, known before ``setup``; 0 alone."""
    return int(os.environ.get("RANK", "0"))


def check_process_count(processes: int, datasets: int, device: str, resolved: torch.device) -> bool:
    """Check a count of data-parallel training processes (``train --processes``) before anything
    starts: against the datasets to train, the device (``device`` as given, ``resolved`` what it
    resolved to, ``fastflow.core.hardware.resolve_device``) and a ``torchrun`` around this process.

    Returns whether this process must start the others (``launch``): ``processes`` > 1 and no
    launcher started this one. Raises ``FastFlowError`` (one line naming the fix) where the
    processes cannot train: fewer than 1, a count other than torchrun's under torchrun, several
    datasets (data-parallel processes train one), one GPU named for all of them, or more
    processes than GPUs (NCCL runs one process a GPU).
    """
    launched = launched_processes()
    if processes < 1:
        raise FastFlowError(f"--processes must be at least 1, got {processes}")
    if launched > 1 and processes not in (1, launched):
        raise FastFlowError(
            f"--processes {processes} under torchrun, which started {launched}; "
            "leave --processes out under torchrun, or run without torchrun"
        )
    if datasets > 1 and max(processes, launched) > 1:
        raise FastFlowError(
            "data-parallel processes train one dataset at a time; for several datasets at once "
            "use --jobs, without --processes or torchrun"
        )
    if processes > 1 and device.startswith("cuda:"):
        raise FastFlowError(
            f"--device {device} puts every process on one GPU; with --processes use --device cuda "
            "or auto (one GPU a process)"
        )
    gpus = torch.cuda.device_count() if resolved.type == "cuda" else 0
    if gpus and processes > gpus:  # NCCL runs one process a GPU
        raise FastFlowError(
            f"--processes {processes} on {gpus} GPU(s): NCCL needs one GPU a process; "
            f"use --processes {gpus} or fewer, or --device cpu"
        )
    return processes > 1 and launched == 1


def launch(processes: int, arguments: list[str]) -> None:
    """Run ``python -m fastflow ARGUMENTS`` in ``processes`` local processes and wait for them, as
    ``torchrun --standalone --nproc-per-node PROCESSES -m fastflow ARGUMENTS`` would.

    Torch's launcher API (``elastic_launch``) rather than a ``torchrun`` subprocess: a process that
    fails becomes one ``FastFlowError`` here instead of torchrun's traceback (the process's own
    one-line error is already on stderr), and a signal that stops the launcher stops as Ctrl-C
    stops one process. Each process gets an equal share of the CPU threads unless
    ``OMP_NUM_THREADS`` is set, as torchrun does.
    """
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=processes,
        run_id=str(uuid.uuid4()),
        rdzv_backend="c10d",
        rdzv_endpoint="localhost:0",
        max_restarts=0,
    )
    threads = os.environ.get("OMP_NUM_THREADS") or str(threads_each(processes))
    with (
        _environment("OMP_NUM_THREADS", threads),
        _quiet("torch.distributed.elastic"),
        _signal_handlers_kept(),
    ):
        try:
            elastic_launch(config, sys.executable)("-m", "fastflow", *arguments)
        except ChildFailedError as error:
            raise FastFlowError(_failure_line(list(error.failures.values()), processes)) from None
        except SignalException:  # Ctrl-C (or a kill): the launcher has stopped the processes
            raise KeyboardInterrupt from None


def _failure_line(failures: list[Any], processes: int) -> str:
    """The one line that ends a failed launch: the processes that failed by themselves (exit
    status > 0), not those the launcher then stopped with a signal (negative status)."""
    own = sorted((f for f in failures if f.exitcode > 0), key=lambda f: f.local_rank) or failures
    line = (
        "training process "
        + ", ".join(f"{f.local_rank} (exit {f.exitcode})" for f in own)
        + f" of {processes} failed"
    )
    if len(own) < processes:
        line += "; the launcher stopped the others"
    return line + "; the error lines above say why"


@contextlib.contextmanager
def _quiet(prefix: str) -> Iterator[None]:
    """Silence the loggers under ``prefix`` (the launcher's own report of a failed process, which
    ``launch``'s one-line error replaces); their levels back after."""
    import logging

    names = [
        name for name in logging.root.manager.loggerDict if name == prefix or name.startswith(prefix + ".")
    ]
    levels = {name: logging.getLogger(name).level for name in names}
    for name in names:
        logging.getLogger(name).setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)


@contextlib.contextmanager
def _signal_handlers_kept() -> Iterator[None]:
    """This process's signal handlers back after the launcher, which installs its own (to stop
    the processes it started) and leaves them: a later Ctrl-C in a program that called ``launch``
    must not raise the launcher's exception."""
    names = ("SIGINT", "SIGTERM", "SIGHUP", "SIGQUIT")
    kept = {
        number: signal.getsignal(number)
        for number in (getattr(signal, n) for n in names if hasattr(signal, n))
    }
    try:
        yield
    finally:
        for number, handler in kept.items():
            signal.signal(number, handler)


@contextlib.contextmanager
def _environment(name: str, value: str) -> Iterator[None]:
    """``os.environ[name] = value`` for the processes started inside; the old value after."""
    previous = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if previous is None:
            del os.environ[name]
        else:
            os.environ[name] = previous


def setup(device: torch.device = CPU) -> None:
    """Join the process group ``torchrun`` describes, once, for training on ``device``: NCCL for
    a CUDA device (this process's GPU made current first), gloo otherwise; nothing without
    ``WORLD_SIZE`` > 1."""
    global _cpu_group, _started_here
    if launched_processes() <= 1 or _cpu_group is not None:
        return
    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        _started_here = True
    _cpu_group = dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else dist.group.WORLD


def group(device: torch.device = CPU) -> Any:
    """The process group for collectives on ``device``'s tensors: the default group (NCCL as
    ``setup`` starts it) for CUDA, the gloo group for CPU tensors (``fit``'s other collectives)."""
    return dist.group.WORLD if device.type == "cuda" else _cpu_group


def cleanup() -> None:
    """Leave the process group if ``setup`` started it (end of a CLI run)."""
    global _cpu_group, _started_here
    if _started_here and dist.is_initialized():
        dist.destroy_process_group()
    _cpu_group, _started_here = None, False


def _active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if _active() else 0


def world_size() -> int:
    return dist.get_world_size() if _active() else 1


def is_main() -> bool:
    """Rank 0 (or a single process): the one that writes files and shows progress."""
    return rank() == 0


def barrier() -> None:
    if _active():
        dist.barrier(group=_cpu_group)


def all_reduce_sum(tensor: Tensor) -> Tensor:
    """``tensor`` (CPU) summed over every rank, in place; returned for chaining."""
    if _active():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=_cpu_group)
    return tensor


def broadcast(value: Any) -> Any:
    """Rank 0's ``value`` (any picklable object made by this program, not read from a file) on every rank."""
    if not _active():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0, group=_cpu_group)
    return box[0]


def all_gather(value: Any) -> list[Any]:
    """Every rank's ``value`` (any picklable object made by this program), in rank order; ``[value]`` alone."""
    if not _active():
        return [value]
    values: list[Any] = [None] * world_size()
    dist.all_gather_object(values, value, group=_cpu_group)
    return values
