"""Scaffolding shared by the tests and the benchmarks; not part of the library.

Imported as ``support`` (pytest puts ``tests/`` on the path; the benchmarks add it).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from fastflow.synthetic import DEFECTS, _check_fmt, _prepare_root, _render, _save, _save_mask, _style

__all__ = ["make_folder_dataset", "perturb_trainable"]


def perturb_trainable(module: torch.nn.Module, generator: torch.Generator) -> None:
    """Move every trainable tensor (norms, flows; frozen backbones and permutations stay) away
    from its often symmetric initial value, so that a misplaced tensor, a transposed permutation
    or a wrong fold changes the output: global scales ~1 +- 5 %, small offsets (they add up over
    the steps, and latents far from 0 give a map of zeros), norms +- 0.3, subnet weights spread
    by about sqrt(2)."""
    with torch.no_grad():
        for name, param in module.named_parameters():
            if not param.requires_grad:
                continue
            noise = torch.randn(param.shape, generator=generator)
            if name.endswith("global_scale"):
                param.add_(0.5 * noise)
            elif name.endswith("global_offset"):
                param.copy_(0.1 * noise)
            elif name.startswith("norms."):
                param.add_(0.3 * noise)
            else:
                param.add_(noise * param.std())


def make_folder_dataset(
    root: str | os.PathLike[str],
    *,
    n_normal: int = 20,
    n_anomalous: int = 9,
    seed: int = 0,
    formats: tuple[str, ...] = ("png", "jpg"),
    grayscale_every: int = 3,
) -> Path:
    """Write the same kind of textures in the generic folder layout into new/empty ``root``.

    ``normal/`` and ``anomalous/`` hold images of mixed sizes and aspect ratios (200..320 per
    side); the format cycles through ``formats`` and every ``grayscale_every``-th image is
    grayscale, to exercise loaders on heterogeneous real-world folders.  ``masks/`` holds
    ``<stem>_mask.png`` for every anomalous image; defect types cycle through :data:`DEFECTS`.
    ``load_samples(root, "train")`` reads ``normal/``; ``load_samples(root, "test")`` reads
    ``normal/`` + ``anomalous/`` + ``masks/``.  Returns ``root``.
    """
    formats = tuple(_check_fmt(f) for f in formats)
    root = _prepare_root(root)
    style = _style(seed)
    for name in ("normal", "anomalous", "masks"):
        (root / name).mkdir()
    for i in range(n_normal + n_anomalous):
        anomalous = i >= n_normal
        j = i - n_normal if anomalous else i
        defect = DEFECTS[j % len(DEFECTS)] if anomalous else None
        img, mask = _render(seed, (2, int(anomalous), j), None, True, style, defect)
        fmt = formats[i % len(formats)]
        gray = grayscale_every > 0 and i % grayscale_every == 0
        stem = f"{j:03d}"
        _save(img, root / ("anomalous" if anomalous else "normal") / f"{stem}.{fmt}", gray, fmt)
        if mask is not None:
            _save_mask(mask, root / "masks" / f"{stem}_mask.png")
    return root
