"""Writing files so that a failure never leaves half-written output, and reading tensor files safely.

Every save of the project goes through ``atomic_write`` (one file), ``staged_folder`` (a set
of files added to a folder) or ``replaced_folder`` (a folder written whole); every weights or checkpoint file is read by ``read_tensor_file``, which never
unpickles anything but tensors and plain containers.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from fastflow.core.errors import FastFlowError, first_line

__all__ = ["atomic_write", "read_tensor_file", "replaced_folder", "staged_folder"]


def atomic_write(path: Path, write: Callable[[Path], object]) -> Path:
    """Run ``write(tmp)`` on a temporary file beside ``path``, then rename it into place.

    A crash or error mid-write leaves any previous file at ``path`` untouched and no partial file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        with open(tmp, "rb") as written:
            os.fsync(written.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


@contextlib.contextmanager
def staged_folder(destination: Path) -> Iterator[Path]:
    """A temporary folder beside ``destination`` whose files move into it once the block succeeds.

    Files keep their relative paths and replace same-named ones in ``destination``; other
    files there stay. If the block raises, nothing in ``destination`` changes.
    """
    destination = Path(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=destination.parent, prefix=f".{destination.name}."))
    try:
        yield staging
        for path in sorted(staging.rglob("*")):
            if path.is_file():
                target = destination / path.relative_to(staging)
                target.parent.mkdir(parents=True, exist_ok=True)
                os.replace(path, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


@contextlib.contextmanager
def replaced_folder(destination: Path) -> Iterator[Path]:
    """A temporary folder beside ``destination`` that is renamed to it once the block succeeds.

    Unlike ``staged_folder`` nothing of a previous ``destination`` stays, so no stale file of
    an older run lingers beside the new ones. If the block raises, ``destination`` is untouched.
    """
    destination = Path(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=destination.parent, prefix=f".{destination.name}."))
    umask = os.umask(0)
    os.umask(umask)
    staging.chmod(0o777 & ~umask)  # mkdtemp's folder is private; the result should not be
    previous = staging.with_name(staging.name + ".old")
    try:
        yield staging
        if destination.exists():
            os.rename(destination, previous)
        try:
            os.rename(staging, destination)
        except OSError:
            if previous.exists():
                os.rename(previous, destination)
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(previous, ignore_errors=True)


def read_tensor_file(path: Path, fix: str) -> Any:
    """The content of a ``.safetensors`` file, or of a torch file loaded with ``weights_only=True``.

    Any failure is a one-line ``FastFlowError`` naming ``path`` and ending with ``fix``.
    """
    path = Path(path)
    if not path.is_file():
        raise FastFlowError(f"file {path} does not exist; {fix}")
    try:
        if path.suffix == ".safetensors":
            return load_file(str(path))
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise FastFlowError(
            f"{path} holds objects that only an unsafe unpickling could load; {fix}"
        ) from None
    except Exception as error:  # noqa: BLE001 - any decoding failure means the same to the user
        raise FastFlowError(f"cannot read {path} ({first_line(error)[:100]}); {fix}") from None
