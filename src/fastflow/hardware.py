"""What this machine's CPU offers: physical cores, and whether it computes bf16 natively.

Engines and training pick threads and precisions from these, so a model behaves the same on a
machine with other hardware, only slower or faster.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

__all__ = ["cpu_has_native_bf16", "physical_cores"]


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


def cpu_has_native_bf16() -> bool:
    """Whether the CPU has bf16 matrix or vector units (AMX, AVX-512 bf16).

    Elsewhere bf16 is emulated and slower than f32, so ``auto`` precisions choose f32 there.
    torch exposes these checks only as underscored functions; absent ones mean no.
    """
    checks = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)
