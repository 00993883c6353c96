"""Data-parallel training on ``torch.distributed``: the few collectives ``fit`` needs.

Launched by ``torchrun`` (``torchrun --nproc-per-node N -m fastflow train ...``), which sets
``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` / ``MASTER_ADDR``; ``setup`` joins the process group
it describes. Without them everything here is the identity of a single process, so one code path
serves both. The feature caches and their statistics live in CPU memory, so those collectives
(and the held-out NLL) always go through gloo. The gradients live where the flows train: gloo on
CPUs, NCCL on CUDA GPUs (``group``). Where the caller already started a group of another backend,
a gloo group beside it serves the CPU collectives.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["all_reduce_sum", "barrier", "broadcast", "cleanup", "group", "is_main", "rank", "setup", "world_size"]

_cpu_group: Any = None
_started_here = False


def setup(device: torch.device = torch.device("cpu")) -> None:
    """Join the process group ``torchrun`` describes, once, for training on ``device``: NCCL for
    a CUDA device (this process's GPU made current first), gloo otherwise; nothing without
    ``WORLD_SIZE`` > 1."""
    global _cpu_group, _started_here
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or _cpu_group is not None:
        return
    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        _started_here = True
    _cpu_group = dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else dist.group.WORLD


def group(device: torch.device = torch.device("cpu")) -> Any:
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
