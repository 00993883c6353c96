"""What this machine offers: physical cores, whether the CPU computes bf16 natively, the CPU's
name, and which device (CPU or a CUDA GPU) training runs on.

Engines and training pick threads, precisions and devices from these, so a model behaves the
same on a machine with other hardware, only slower or faster.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from fastflow.core.errors import FastFlowError

__all__ = [
    "DEVICE_CHOICES",
    "cpu_has_native_bf16",
    "cpu_model",
    "is_device_name",
    "physical_cores",
    "resolve_device",
    "threads_each",
]

DEVICE_CHOICES = "auto, cpu, cuda or cuda:N"
_DEVICE_NAME = re.compile(r"auto|cpu|cuda(:\d+)?")


def physical_cores() -> int:
    """Physical CPU cores available to this process (hyper-threads do not speed up these kernels)."""
    try:
        available = os.sched_getaffinity(0)
        cores = set()
        for cpu in available:
            topology = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
            package = (topology / "physical_package_id").read_text().strip()
            core = (topology / "core_id").read_text().strip()
            cores.add((package, core))
        return max(1, len(cores))
    except (AttributeError, OSError, ValueError):
        return max(1, (os.cpu_count() or 2) // 2)


def threads_each(processes: int) -> int:
    """CPU threads for each of ``processes`` processes that run side by side on this machine:
    an equal share of its logical CPUs, at least one, so together they do not oversubscribe it."""
    return max(1, (os.cpu_count() or 1) // processes)


def cpu_has_native_bf16() -> bool:
    """Whether the CPU has bf16 matrix or vector units (AMX, AVX-512 bf16).

    Elsewhere bf16 is emulated and slower than f32, so ``auto`` precisions choose f32 there.
    torch exposes these checks only as underscored functions; absent ones mean no.
    """
    checks = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def cpu_model() -> str:
    """The ``model name`` line of /proc/cpuinfo ("unknown" where there is none), for benchmark
    reports: speed and bf16 results depend on the CPU's kernels."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def is_device_name(name: object) -> bool:
    """Whether ``name`` is spelled as one of ``DEVICE_CHOICES``. Spelling only: a saved model names
    the device it was trained on, and must still load on a machine without that device."""
    return isinstance(name, str) and _DEVICE_NAME.fullmatch(name) is not None


def resolve_device(name: str) -> torch.device:
    """``name`` -> the device to train on; a clear error where this machine does not have it.

    ``auto``: a CUDA GPU where PyTorch sees one, else the CPU. ``cuda`` without an index, like
    ``auto`` on a GPU machine, takes GPU ``LOCAL_RANK`` (set by ``torchrun``; 0 otherwise) modulo
    the GPU count, so ``torchrun --nproc-per-node N`` puts one process on each GPU.
    """
    if not is_device_name(name):
        raise FastFlowError(f"bad --device {name!r}; use {DEVICE_CHOICES}")
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        raise FastFlowError(
            f"--device {name}: PyTorch sees no CUDA GPU on this machine "
            f"(torch {torch.__version__}); use --device cpu or auto"
        )
    given = name.partition(":")[2]
    index = int(given) if given else int(os.environ.get("LOCAL_RANK", "0")) % count
    if index >= count:
        raise FastFlowError(
            f"--device {name}: this machine has {count} CUDA GPU(s), cuda:0 to cuda:{count - 1}"
        )
    return torch.device("cuda", index)
