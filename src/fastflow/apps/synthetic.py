"""Procedurally generated anomaly-detection datasets.

Used by ``fastflow demo`` (a dataset that needs no download) and as a second, fully
controlled benchmark next to MVTec AD.

Normal images are a smooth periodic texture: a sum of a few oriented sinusoids whose
frequencies, orientations, amplitudes and colours are fixed per dataset (by ``seed``),
plus fine pixel noise.  Every normal image draws its own phases (a random shift of each
wave), a slight orientation/frequency jitter and a small brightness/contrast change, so a
model has to learn a *distribution* of textures, not memorise one image.

Defects are visible, *local* anomalies with exact binary masks, so pixel-level metrics
(pixel AUROC, PRO) are meaningful:

* ``scratch`` - a thin dark or bright line segment,
* ``spot`` - an irregular blob of a different colour/intensity,
* ``distortion`` - a patch where the texture has a different orientation and frequency.

Everything is vectorised numpy and deterministic given ``seed``: the same call writes the
same bytes.  Each image has its own random stream keyed by (seed, split, defect, index),
so changing ``n_train`` does not change the test images.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import numpy as np
from PIL import Image

from fastflow.estimator.data import DataError

__all__ = ["DEFECTS", "PAINTED_DEFECTS", "make_textures", "paint_defect", "write_layout"]

DEFECTS: tuple[str, ...] = ("scratch", "spot", "distortion")
_FORMATS = {"png": "PNG", "jpg": "JPEG", "jpeg": "JPEG", "bmp": "BMP", "tif": "TIFF", "tiff": "TIFF"}
_LUMA = np.array([0.299, 0.587, 0.114])
_MIXED_RANGE = (200, 320)  # inclusive side lengths for mixed sizes
_BACKDROP = 0.08  # grey level (0..1) of the flat surround of ``backdrop`` images


@dataclass(frozen=True)
class _Style:
    """Dataset-level texture parameters (the "product" being inspected)."""

    base: np.ndarray  # (3,) mean colour
    freqs: np.ndarray  # (K,) cycles per pixel
    thetas: np.ndarray  # (K,) wave orientation, radians
    amps: np.ndarray  # (K,)
    colors: np.ndarray  # (K, 3) per-channel weight of each wave


def _style(seed: int) -> _Style:
    rng = np.random.default_rng([seed, 0])
    k = 4
    return _Style(
        base=rng.uniform(0.35, 0.6, 3).astype(np.float32),
        freqs=rng.uniform(1 / 28, 1 / 10, k),
        thetas=rng.uniform(0, np.pi, k),
        amps=rng.uniform(0.05, 0.1, k),
        colors=rng.uniform(0.5, 1.0, (k, 3)),
    )


def _waves(
    yy: np.ndarray, xx: np.ndarray, style: _Style, freqs: np.ndarray, thetas: np.ndarray, phases: np.ndarray
) -> np.ndarray:
    """Sum of coloured sinusoids on the pixel grid -> (H, W, 3) float32 around zero.

    ``yy`` is (H, 1) and ``xx`` (1, W).  Uses sin(ax + by + p) = sin(ax + p)cos(by) +
    cos(ax + p)sin(by), so trigonometry is evaluated on H + W values instead of H * W.
    """
    a = (2 * np.pi * freqs * np.cos(thetas))[:, None, None]
    b = (2 * np.pi * freqs * np.sin(thetas))[:, None, None]
    ax = (a * xx + phases[:, None, None]).astype(np.float32)
    by = (b * yy).astype(np.float32)
    s = np.sin(ax) * np.cos(by) + np.cos(ax) * np.sin(by)  # (K, H, W)
    k, h, w = s.shape
    weights = (style.amps[:, None] * style.colors).astype(np.float32)  # (K, 3)
    return (s.reshape(k, h * w).T @ weights).reshape(h, w, 3)


def _normal(rng: np.random.Generator, style: _Style, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    """One normal texture (float, no noise yet) with per-image jitter."""
    k = len(style.freqs)
    freqs = style.freqs * (1 + rng.normal(0, 0.03, k))
    thetas = style.thetas + rng.normal(0, 0.03, k)
    phases = rng.uniform(0, 2 * np.pi, k)
    contrast = 1 + rng.normal(0, 0.05)
    brightness = rng.normal(0, 0.03)
    return style.base + brightness + contrast * _waves(yy, xx, style, freqs, thetas, phases)


def _blend(img: np.ndarray, alpha: np.ndarray, content: np.ndarray) -> np.ndarray:
    a = alpha[..., None]
    return img * (1 - a) + content * a


def _scratch(
    img: np.ndarray, rng: np.random.Generator, style: _Style, yy: np.ndarray, xx: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Thin anti-aliased line segment, clearly darker or brighter than the texture."""
    h, w = yy.shape[0], xx.shape[1]
    side = min(h, w)
    cy, cx = rng.uniform(0.2, 0.8) * h, rng.uniform(0.2, 0.8) * w
    length = rng.uniform(0.25, 0.5) * side
    angle = rng.uniform(0, np.pi)
    width = rng.uniform(1.5, 3.5)
    dy, dx = np.sin(angle) * length / 2, np.cos(angle) * length / 2
    p0 = np.array([cy - dy, cx - dx])
    seg = np.array([2 * dy, 2 * dx])
    t = ((yy - p0[0]) * seg[0] + (xx - p0[1]) * seg[1]) / (seg @ seg)
    t = np.clip(t, 0, 1)
    dist = np.hypot(yy - (p0[0] + t * seg[0]), xx - (p0[1] + t * seg[1]))
    alpha = np.clip(width / 2 + 0.5 - dist, 0, 1)
    color = style.base * 0.2 if rng.random() < 0.5 else np.minimum(style.base + 0.45, 0.97)
    return _blend(img, alpha, color), alpha > 0.25


def _spot(
    img: np.ndarray, rng: np.random.Generator, style: _Style, yy: np.ndarray, xx: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Irregular soft-edged blob (stain) of a different colour and intensity."""
    h, w = yy.shape[0], xx.shape[1]
    side = min(h, w)
    cy, cx = rng.uniform(0.15, 0.85) * h, rng.uniform(0.15, 0.85) * w
    radius = rng.uniform(0.03, 0.07) * side
    ang = np.arctan2(yy - cy, xx - cx)
    a2, a3 = rng.uniform(0, 0.2, 2)
    p2, p3 = rng.uniform(0, 2 * np.pi, 2)
    edge = radius * (1 + a2 * np.cos(2 * ang + p2) + a3 * np.cos(3 * ang + p3))
    alpha = np.clip((edge - np.hypot(yy - cy, xx - cx)) / 1.5 + 0.5, 0, 1)
    shift = rng.uniform(0.25, 0.4) * (1 if rng.random() < 0.5 else -1)
    color = np.clip(style.base + shift + rng.uniform(-0.1, 0.1, 3), 0.02, 0.98)
    return _blend(img, alpha * 0.9, color), alpha > 0.5


def _distortion(
    img: np.ndarray, rng: np.random.Generator, style: _Style, yy: np.ndarray, xx: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Elliptic patch whose texture is rotated and finer than the normal texture."""
    h, w = yy.shape[0], xx.shape[1]
    side = min(h, w)
    cy, cx = rng.uniform(0.2, 0.8) * h, rng.uniform(0.2, 0.8) * w
    ry, rx = rng.uniform(0.08, 0.14, 2) * side
    k = len(style.freqs)
    freqs = style.freqs * rng.uniform(1.6, 2.2)
    thetas = style.thetas + np.pi / 2 + rng.uniform(-0.3, 0.3)
    patch = style.base + _waves(yy, xx, style, freqs, thetas, rng.uniform(0, 2 * np.pi, k)) * 1.3
    r = np.hypot((yy - cy) / ry, (xx - cx) / rx)  # 1 on the ellipse border
    alpha = np.clip((1 - r) * min(ry, rx) / 2 + 0.5, 0, 1)  # ~2 px soft border
    return _blend(img, alpha, patch), alpha > 0.5


_DEFECT_FNS = {"scratch": _scratch, "spot": _spot, "distortion": _distortion}


def _cutpaste(
    img: np.ndarray, rng: np.random.Generator, style: _Style, yy: np.ndarray, xx: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """A rectangle of the image itself, rotated by a quarter turn and pasted elsewhere."""
    del style
    h, w = yy.shape[0], xx.shape[1]
    side = int(rng.uniform(0.08, 0.16) * min(h, w))
    sy, sx, ty, tx = (int(rng.integers(0, limit - side)) for limit in (h, w, h, w))
    patch = np.rot90(img[sy : sy + side, sx : sx + side], k=int(rng.integers(1, 4)))
    out = img.copy()
    out[ty : ty + side, tx : tx + side] = patch
    mask = np.zeros((h, w), dtype=bool)
    mask[ty : ty + side, tx : tx + side] = (
        np.abs(patch - img[ty : ty + side, tx : tx + side]).max(axis=-1) > 0.02
    )
    return out, mask


PAINTED_DEFECTS: tuple[str, ...] = ("scratch", "spot", "cutpaste")


def paint_defect(image: np.ndarray, kind: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Paint a synthetic defect of ``kind`` (one of ``PAINTED_DEFECTS``) on any normal image.

    ``image`` is float (H, W, 3) in [0, 1]; returns the defective copy and its boolean mask.
    Defects painted on held-out *normal* images give a validation set with pixel truth, so
    recipe settings can be compared without touching a single real test image.
    """
    if kind not in PAINTED_DEFECTS:
        raise ValueError(f"unknown painted defect {kind!r}; use one of {PAINTED_DEFECTS}")
    h, w = image.shape[:2]
    yy, xx = np.ogrid[0:h, 0:w]
    yy, xx = yy.astype(np.float32), xx.astype(np.float32)
    empty = np.zeros(0)
    style = _Style(image.reshape(-1, 3).mean(axis=0), empty, empty, empty, empty)
    painter = _cutpaste if kind == "cutpaste" else _DEFECT_FNS[kind]
    out, mask = painter(image.astype(np.float32), rng, style, yy, xx)
    return np.clip(out, 0, 1), mask


def _render(
    seed: int,
    key: tuple[int, ...],
    size: tuple[int, int] | None,
    mixed_sizes: bool,
    style: _Style,
    defect: str | None,
    opacity: float = 1.0,
    noise: float = 0.015,
    backdrop: bool = False,
) -> tuple[np.ndarray, np.ndarray | None]:
    """One image as float (H, W, 3) in [0, 1] plus its mask (None for normal images)."""
    rng = np.random.default_rng([seed, *key])
    if mixed_sizes or size is None:
        h, w = (int(v) for v in rng.integers(_MIXED_RANGE[0], _MIXED_RANGE[1] + 1, 2))
    else:
        h, w = size
    yy, xx = np.ogrid[0:h, 0:w]
    yy, xx = yy.astype(np.float32), xx.astype(np.float32)
    img = _normal(rng, style, yy, xx)
    if backdrop:
        outside = (yy - (h - 1) / 2) ** 2 + (xx - (w - 1) / 2) ** 2 > (0.4 * min(h, w)) ** 2
        img = np.where(outside[..., None], np.float32(_BACKDROP), img)
    mask = None
    if defect is not None:
        defective, mask = _DEFECT_FNS[defect](img, rng, style, yy, xx)
        img = defective if opacity == 1.0 else img + opacity * (defective - img)
    img = img + noise * rng.standard_normal((h, w, 1), dtype=np.float32)
    img = img + noise / 3 * rng.standard_normal((h, w, 3), dtype=np.float32)
    return np.clip(img, 0, 1), mask


def _save(img: np.ndarray, path: Path, grayscale: bool, fmt: str) -> None:
    """Write float ``img`` in [0, 1], (H, W, 3) or already grey (H, W), as 8-bit ``fmt``."""
    if img.ndim == 2:
        pil = Image.fromarray(np.round(img * 255).astype(np.uint8), "L")
    elif grayscale:
        arr = np.round((img @ _LUMA) * 255).astype(np.uint8)
        pil = Image.fromarray(arr, "L")
    else:
        pil = Image.fromarray(np.round(img * 255).astype(np.uint8), "RGB")
    # Low PNG compression: the fine noise hardly compresses, and level 6 triples the run time.
    options = {"JPEG": {"quality": 95}, "PNG": {"compress_level": 1}}.get(_FORMATS[fmt], {})
    pil.save(path, _FORMATS[fmt], **options)


def _save_mask(mask: np.ndarray, path: Path) -> None:
    Image.fromarray(mask.astype(np.uint8) * 255, "L").save(path, "PNG")


def _prepare_root(root: str | os.PathLike[str]) -> Path:
    """Refuse to write into a non-empty folder: mixing with old files would corrupt the set."""
    root = Path(root)
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise DataError(f"{root} exists and is not an empty folder; choose a new output path or delete it")
    root.mkdir(parents=True, exist_ok=True)
    return root


def _check_fmt(fmt: str) -> str:
    fmt = fmt.lower().lstrip(".")
    if fmt not in _FORMATS:
        raise DataError(f"unsupported image format {fmt!r}; use one of {sorted(_FORMATS)}")
    return fmt


def make_textures(
    root: str | os.PathLike[str],
    *,
    n_train: int = 60,
    n_test_good: int = 10,
    n_test_defect: int = 10,
    seed: int = 0,
    grayscale: bool = False,
    mixed_sizes: bool = False,
    fmt: str = "png",
    size: tuple[int, int] = (256, 256),
    defect_opacity: float = 1.0,
    noise: float = 0.015,
    backdrop: bool = False,
) -> Path:
    """Write an MVTec-AD-layout texture dataset into the new/empty folder ``root``.

    Layout: ``train/good``, ``test/good``, ``test/<defect>`` for each of :data:`DEFECTS`
    (``n_test_defect`` images *per defect type*) and ``ground_truth/<defect>/<stem>_mask.png``.
    Images are ``size`` = (H, W), or random sizes in 200..320 per side with ``mixed_sizes``;
    ``grayscale`` writes L-mode images; ``fmt`` is the image format (masks are always PNG);
    ``defect_opacity`` < 1 blends each defect with the normal texture, for fainter defects.
    ``noise`` is the std of the fine pixel noise (0..1 scale; 0.015 is about 4 grey levels):
    with 0 the images are as clean as a studio camera's, the case in which a flow trained
    without ``Recipe.feature_noise`` learns to amplify a single grey level of sensor noise.
    ``backdrop`` keeps the texture inside a centred disk (radius 0.4 of the shorter side) on
    a flat dark surround, as a part photographed on a plain table; defects may fall on either.
    Returns ``root``.
    """
    if not 0.0 < defect_opacity <= 1.0:
        raise ValueError(f"defect_opacity must be in (0, 1], got {defect_opacity}")
    fmt = _check_fmt(fmt)
    root = _prepare_root(root)
    style = _style(seed)
    image_size = cast("tuple[int, int]", tuple(size))  # a (height, width) pair, whatever sequence came

    def render(code: int, index: int, defect: str | None) -> tuple[np.ndarray, np.ndarray | None]:
        return _render(
            seed, (1, code, index), image_size, mixed_sizes, style, defect, defect_opacity, noise, backdrop
        )

    return write_layout(root, DEFECTS, (n_train, n_test_good, n_test_defect), render, grayscale, fmt)


Renderer = Callable[[int, int, "str | None"], tuple[np.ndarray, "np.ndarray | None"]]


def write_layout(
    root: Path,
    defects: tuple[str, ...],
    counts: tuple[int, int, int],
    render: Renderer,
    grayscale: bool,
    fmt: str,
) -> Path:
    """Write a generated dataset in MVTec AD layout into the prepared folder ``root``.

    ``counts`` are (training normals, test normals, test images per defect kind); ``render(code,
    index, defect)`` gives one image and its mask (None for normal images), where ``code`` is the
    group (0 train, 1 test normals, 2 + k the k-th defect kind), so each generator keys its own
    random streams by group and index. One writer for every generated set, so they share a layout.
    """
    n_train, n_test_good, n_test_defect = counts
    groups: list[tuple[Path, int, str | None, int]] = [
        (root / "train" / "good", 0, None, n_train),
        (root / "test" / "good", 1, None, n_test_good),
    ]
    groups += [(root / "test" / d, 2 + i, d, n_test_defect) for i, d in enumerate(defects)]
    for folder, code, defect, count in groups:
        folder.mkdir(parents=True, exist_ok=True)
        if defect is not None:
            (root / "ground_truth" / defect).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            img, mask = render(code, i, defect)
            _save(img, folder / f"{i:03d}.{fmt}", grayscale, fmt)
            if mask is not None:
                _save_mask(mask, root / "ground_truth" / str(defect) / f"{i:03d}_mask.png")
    return root
