"""The training feature cache: every training image's backbone features, in RAM or on disk.

The backbone is frozen, so its features are computed once and the flows read them every epoch.
In RAM that costs each image its feature elements times the storage size (megabytes per image
at 256x256 in float32; docs/measurements.md#feature-cache-size): fine for a few hundred images,
fatal for thousands.
Past a memory budget the cache goes to disk instead: one file per scale, one fixed-size record
per image, read back batch by batch with ``os.pread``. Plain reads, not a memory map, keep the
process's resident memory flat: mapped file pages count towards RSS (and the OOM killer's view
of it), while pages read through the kernel's page cache do not belong to the process.

Records are stored channels-last, (h, w, C), so a read batch is already the channels-last
(B, C, h, w) layout the flows run fastest on. Storage in float16 halves RAM and disk; reads come
back as float32. Per-channel mean and variance are accumulated while the cache is written
(``channel_std``), so the training noise scale needs no second pass over the data.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from fastflow.core.errors import FastFlowError, is_integer
from fastflow.estimator import distributed

__all__ = [
    "DEFAULT_BUDGET",
    "STORAGE_DTYPES",
    "CacheConfig",
    "FeatureCache",
    "FeatureCaches",
    "available_memory",
    "open_caches",
    "parse_memory",
]

_log = logging.getLogger(__name__)

STORAGE_DTYPES = {"float32": torch.float32, "float16": torch.float16}
_NUMPY = {torch.float32: np.float32, torch.float16: np.float16}
# The default RAM budget: the caches of a few hundred images (a typical product's normal set)
# stay in RAM; past it a disk cache read through the page cache costs little time and keeps the
# peak RSS flat however many images there are, so a bigger default would only buy memory growth.
DEFAULT_BUDGET = 2**30
_UNITS = {
    "": 1,
    "b": 1,
    "k": 2**10,
    "kb": 2**10,
    "m": 2**20,
    "mb": 2**20,
    "g": 2**30,
    "gb": 2**30,
    "t": 2**40,
    "tb": 2**40,
}


def parse_memory(text: str) -> int:
    """'4GB', '512MB', '1.5g', '0' -> bytes (binary units: 1 GB = 2**30 bytes)."""
    cleaned = str(text).strip().lower().replace(" ", "").removesuffix("ib").removesuffix("i")
    number = cleaned.rstrip("kmgtb")
    unit = cleaned[len(number) :]
    try:
        value = float(number)
    except ValueError:
        value = -1.0
    if unit not in _UNITS or not math.isfinite(value) or value < 0:
        raise FastFlowError(
            f"bad memory size '{text}' (--max-memory); write a size like 4GB, 512MB or 0 (always on disk)"
        )
    return int(value * _UNITS[unit])


def available_memory() -> int:
    """Bytes of memory available to new allocations now (``MemAvailable``; total RAM where unknown)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


@dataclass(frozen=True)
class CacheConfig:
    """Where training keeps the backbone features: in RAM up to ``max_memory`` bytes, else on disk.

    Args:
        max_memory: RAM budget of the feature cache in bytes (``--max-memory``); ``None``:
            ``DEFAULT_BUDGET`` (1 GiB), or a quarter of the memory available when training starts
            where that is less; 0: always on disk.
        directory: parent folder of an on-disk cache (``--cache-dir``); ``None``: the system's
            temporary folder (``TMPDIR``). The cache lives in a new subfolder, removed after training.
        dtype: storage precision, ``"float32"`` (exact) or ``"float16"`` (half the bytes).
    """

    max_memory: int | None = None
    directory: Path | None = None
    dtype: str = "float32"

    def __post_init__(self) -> None:
        if self.dtype not in STORAGE_DTYPES:
            raise FastFlowError(
                f"bad cache dtype '{self.dtype}' (--cache-dtype); use one of {', '.join(STORAGE_DTYPES)}"
            )
        if self.max_memory is not None and not (is_integer(self.max_memory) and self.max_memory >= 0):
            raise FastFlowError(
                f"bad max_memory {self.max_memory!r} (--max-memory); use a size like 4GB, or 0 for always on disk"
            )

    def budget(self) -> int:
        if self.max_memory is None:
            return min(DEFAULT_BUDGET, available_memory() // 4)
        return self.max_memory


@contextlib.contextmanager
def open_caches(
    config: CacheConfig, shapes: list[tuple[int, int, int]], counts: dict[str, int]
) -> Iterator[FeatureCaches]:
    """One ``FeatureCache`` per name in ``counts`` (images each), all in RAM if they fit the
    budget together, else all on disk; ``FeatureCaches.log_placement`` logs which was taken.
    Distributed ranks share one disk folder (created by rank 0), so after
    ``FeatureCache.synchronise`` any rank reads any record. The folder is removed on exit.
    """
    dtype = STORAGE_DTYPES[config.dtype]
    needed = sum(counts.values()) * FeatureCache.bytes_per_image(shapes, dtype)
    budget = config.budget()
    folder: Path | None = None
    if needed > budget:
        parent = Path(config.directory) if config.directory is not None else None
        if distributed.is_main():
            if parent is not None:
                parent.mkdir(parents=True, exist_ok=True)
            folder = Path(tempfile.mkdtemp(prefix="fastflow-features-", dir=parent))
        folder = distributed.broadcast(folder)
    caches = FeatureCaches()
    if folder is not None:
        caches.placement = (
            f"feature cache: {needed / 2**30:.2f} GB on disk in {folder} ({config.dtype}; "
            f"over the {budget / 2**30:.2f} GB RAM budget, --max-memory)"
        )
    else:
        caches.placement = (
            f"feature cache: {needed / 2**30:.2f} GB in RAM ({config.dtype}; "
            f"RAM budget {budget / 2**30:.2f} GB, --max-memory)"
        )
    try:
        if folder is not None and not distributed.is_main():
            distributed.barrier()  # rank 0 creates the files first
        for name, count in counts.items():
            caches[name] = FeatureCache(shapes, count, dtype, folder, name, create=distributed.is_main())
        if folder is not None and distributed.is_main():
            distributed.barrier()
        yield caches
    finally:
        for cache in caches.values():
            cache.close()
        if folder is not None:
            distributed.barrier()
            if distributed.is_main():
                shutil.rmtree(folder, ignore_errors=True)


class FeatureCache:
    """Features of ``count`` images, one (C, h, w) record per image and scale, in RAM or on disk.

    Args:
        shapes: (C, h, w) of each scale (``FastFlowModel.feature_shapes``).
        count: number of images.
        dtype: storage precision, ``torch.float32`` or ``torch.float16``.
        folder: ``None`` keeps the cache in RAM; an existing folder puts it on disk there, in
            files named after ``name`` (so several caches share a folder).
        name: file name prefix on disk.
        create: create the files (``True``), or open the files another process created
            (distributed training: every rank writes the records of its own images, then
            reads any record).

    Writers fill records with ``write`` (any order, each record once); processes that wrote
    disjoint records share them with ``synchronise``. Readers take
    ``read`` (random batches) or ``slice`` (in order). ``close`` closes the files; whoever
    created the folder removes it.
    """

    def __init__(
        self,
        shapes: list[tuple[int, int, int]],
        count: int,
        dtype: torch.dtype = torch.float32,
        folder: Path | None = None,
        name: str = "features",
        create: bool = True,
    ) -> None:
        if dtype not in _NUMPY:
            raise FastFlowError(
                f"feature cache dtype {dtype} is not supported; use one of {', '.join(STORAGE_DTYPES)}"
            )
        self.shapes = [(c, h, w) for c, h, w in shapes]
        self.count, self.dtype = count, dtype
        self.itemsize = torch.empty((), dtype=dtype).element_size()
        self._record_elements = [c * h * w for c, h, w in self.shapes]
        self._record_bytes = [elements * self.itemsize for elements in self._record_elements]
        self._sums = [torch.zeros(c, dtype=torch.float64) for c, _, _ in self.shapes]
        self._squares = [torch.zeros(c, dtype=torch.float64) for c, _, _ in self.shapes]
        self._written = 0
        self._files: list[int] = []
        # Zeros, not empty: distributed ranks add up their RAM caches, each holding its own records.
        self._memory = (
            [torch.zeros((count, h, w, c), dtype=dtype) for c, h, w in self.shapes] if folder is None else []
        )
        for scale, _ in enumerate(self._record_elements if folder is not None else []):
            path = Path(str(folder)) / f"{name}.scale{scale}.bin"
            try:
                handle = os.open(path, os.O_RDWR | (os.O_CREAT | os.O_TRUNC if create else 0), 0o600)
                if create:
                    os.ftruncate(handle, count * self._record_bytes[scale])
            except OSError as error:
                raise FastFlowError(
                    f"cannot write the feature cache {path} ({error.strerror}); pass a writable --cache-dir with "
                    f"{self.nbytes / 2**30:.1f} GB free"
                ) from None
            self._files.append(handle)

    @classmethod
    def of(
        cls, features: list[Tensor], dtype: torch.dtype = torch.float32, folder: Path | None = None
    ) -> FeatureCache:
        """A cache holding ``features``, one (N, C, h, w) tensor per scale (tests, studies)."""
        shapes = [(f.shape[1], f.shape[2], f.shape[3]) for f in features]
        cache = cls(shapes, features[0].shape[0], dtype, folder)
        cache.write(list(range(features[0].shape[0])), features)
        return cache

    @staticmethod
    def bytes_per_image(shapes: list[tuple[int, int, int]], dtype: torch.dtype) -> int:
        """Storage of one image's features at ``dtype``."""
        return sum(c * h * w for c, h, w in shapes) * torch.empty((), dtype=dtype).element_size()

    @property
    def on_disk(self) -> bool:
        return not self._memory

    @property
    def nbytes(self) -> int:
        return self.count * sum(self._record_elements) * self.itemsize

    @property
    def memory(self) -> list[Tensor]:
        """The RAM storage, (count, h, w, C) per scale (empty on disk): distributed ranks sum it."""
        return self._memory

    def __len__(self) -> int:
        return self.count

    def write(self, positions: Tensor | list[int], features: list[Tensor]) -> None:
        """Store the (B, C, h, w) features of the images at ``positions`` (B record indices)."""
        positions = [int(p) for p in positions]
        for scale, feature in enumerate(features):
            records = feature.detach().to("cpu", self.dtype).permute(0, 2, 3, 1).contiguous()
            stored = records.double()
            self._sums[scale] += stored.sum(dim=(0, 1, 2))
            self._squares[scale] += stored.square().sum(dim=(0, 1, 2))
            if self._memory:
                self._memory[scale][positions] = records
                continue
            array = records.numpy().reshape(len(positions), -1)
            size = self._record_bytes[scale]
            for row, position in zip(array, positions, strict=True):
                os.pwrite(self._files[scale], row.tobytes(), position * size)
        self._written += len(positions)

    def synchronise(self) -> None:
        """After every rank wrote its own records: each rank sees all of them and the totals of
        the statistics (RAM caches are added up, disk caches share their files)."""
        if distributed.world_size() == 1:
            return
        for stored in self._memory:
            distributed.all_reduce_sum(stored)
        written = torch.tensor(float(self._written), dtype=torch.float64)
        self._written = int(distributed.all_reduce_sum(written).item())
        for values in (*self._sums, *self._squares):
            distributed.all_reduce_sum(values)
        distributed.barrier()

    def channel_std(self) -> list[Tensor]:
        """Per scale, each channel's standard deviation over every stored value, shaped (1, C, 1, 1)."""
        stds = []
        for total, squares, (_, h, w) in zip(self._sums, self._squares, self.shapes, strict=True):
            n = self._written * h * w
            variance = (squares - total * total / n) / max(n - 1, 1)
            stds.append(variance.clamp_min(0).sqrt().float().view(1, -1, 1, 1))
        return stds

    def read(self, positions: Tensor) -> list[Tensor]:
        """Features of the images at ``positions``, float32, channels-last (B, C, h, w) per scale."""
        if self._memory:
            return [_as_batch(stored[positions]) for stored in self._memory]
        index = [int(p) for p in positions]
        batches = []
        for scale, (c, h, w) in enumerate(self.shapes):
            size = self._record_bytes[scale]
            raw = b"".join(os.pread(self._files[scale], size, position * size) for position in index)
            batches.append(_as_batch(self._from_bytes(raw, (len(index), h, w, c))))
        return batches

    def slice(self, start: int, stop: int) -> list[Tensor]:
        """Features of images ``start:stop`` in order (one read per scale on disk)."""
        stop = min(stop, self.count)
        if self._memory:
            return [_as_batch(stored[start:stop]) for stored in self._memory]
        batches = []
        for scale, (c, h, w) in enumerate(self.shapes):
            size = self._record_bytes[scale]
            raw = os.pread(self._files[scale], (stop - start) * size, start * size)
            batches.append(_as_batch(self._from_bytes(raw, (stop - start, h, w, c))))
        return batches

    def _from_bytes(self, raw: bytes, shape: tuple[int, ...]) -> Tensor:
        return torch.from_numpy(np.frombuffer(raw, dtype=_NUMPY[self.dtype]).reshape(shape).copy())

    def close(self) -> None:
        """Close the files (no-op in RAM); the folder's owner removes it."""
        for handle in self._files:
            os.close(handle)
        self._files = []


class FeatureCaches(dict[str, FeatureCache]):
    """The caches of ``open_caches`` by name, and the line that says where they keep the features."""

    placement: str = ""

    def log_placement(self) -> None:
        """Log where the features went (RAM or disk, how much): once the feature pass is over, so
        that a bad image found by that pass stops a run with its error line alone."""
        _log.info("%s", self.placement)


def _as_batch(records: Tensor) -> Tensor:
    """(B, h, w, C) records -> float32 (B, C, h, w) in channels-last memory (a view of float32 records)."""
    return records.float().permute(0, 3, 1, 2)
