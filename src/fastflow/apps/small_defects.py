"""A generated benchmark of small defects on large, non-square images of a machined part.

Real inspection images are often large and elongated (a photographed shaft, rail or bracket)
while a defect covers a fraction of a percent of the picture. ``textures``
(:mod:`fastflow.apps.synthetic`) has square-ish images with large defects; this set has
480 x 1200 (H x W) images whose defects cover 0.05-0.5 % of the image each, so what a squeeze
to a small square input loses (a 2-px scratch shrinks below a pixel across the width) shows in
the metrics.

Normal images are one part, aligned as by a fixture: a brushed metal bar (streaks along its
length, a lit band across it, vignetting) on a dark table, with a groove, a row of
countersunk holes and a printed data-matrix code. Each image draws its own streaks, a shift of
the part by a few pixels, a slight tilt, per-feature jitter, illumination and brightness /
contrast changes, ink density and sensor noise: a distribution to learn, not one image.

Defects, each with an exact boolean mask (the defect's opacity at least 0.5):

* ``scratch`` - a thin (1.2-3 px), slightly curved, anti-aliased bright or dark line,
* ``pinhole`` - one to six small dark round pits close together,
* ``stain`` - a soft irregular blob of a rusty, oily or chalky tone with a darker rim.

They fall on the bare surface, away from the structural features, and every mask covers
0.05-0.5 % of the image. Deterministic given ``seed``: each image has its own random streams,
keyed by (seed, split and defect, index), so changing a count does not change other images,
and a defective image is its normal twin (same key) plus the defect.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fastflow.apps.synthetic import _LUMA, _check_fmt, _prepare_root, write_layout
from fastflow.estimator.data import DataError

__all__ = ["MASK_FRACTION", "SMALL_DEFECTS", "make_small_defects"]

SMALL_DEFECTS: tuple[str, ...] = ("scratch", "pinhole", "stain")
MASK_FRACTION = (0.0005, 0.005)  # every defect's mask area / image area lies in this range
# Per kind, the range the target area fraction is drawn from (log-uniform), inside MASK_FRACTION.
_TARGET = {"scratch": (0.0006, 0.003), "pinhole": (0.0006, 0.002), "stain": (0.0008, 0.0045)}
_MIN_SIDE = 64
_TRIES = 200
# Part geometry as fractions of the image height (y) or width (x).
_TOP, _BOTTOM, _GROOVE, _HOLES_Y, _HOLE_R = 0.08, 0.92, 0.27, 0.64, 0.05
_CODE_Y, _CODE_X, _CODE_CELLS = 0.42, 0.84, 12
_TABLE = 0.07  # grey level of the dark table around the part
_PAD = 16  # px of profile beyond the image, for the part's shift and tilt
_SUB = 16  # profile samples per px

# Stain tones: grey-level factor and colour (rust, oil film, chalky residue).
_STAIN_TONES = ((0.72, (1.08, 0.97, 0.84)), (0.78, (0.97, 1.0, 1.06)), (1.2, (1.02, 1.02, 1.0)))

# A box: its slices and the absolute (rows, 1) / (1, cols) coordinates of its pixels.
_Box = tuple[tuple[slice, slice], np.ndarray, np.ndarray]
# A painter draws one defect: (rng, keep-out, centre (y, x), target area in px) -> a _Mark, or
# None when the geometry leaves the image or, by a cheap early test, meets the keep-out.
# A _Mark is (window, touched, mask, paint): the window's slices, the pixels the defect changes,
# its mask, and crop -> painted crop.
_Mark = tuple[tuple[slice, slice], np.ndarray, np.ndarray, Callable[[np.ndarray], np.ndarray]]


@dataclass(frozen=True)
class _Style:
    """Dataset-level parameters (the product): metal tone and tint, hole layout, code bits."""

    base: float
    tint: np.ndarray  # (3,) per-channel gain
    holes_x: np.ndarray  # (n,) hole centres as fractions of the width
    bits: np.ndarray  # (cells, cells) bool, the printed code


def _style(seed: int) -> _Style:
    rng = np.random.default_rng([seed, 0])
    n_holes = int(rng.integers(3, 5))
    bits = rng.random((_CODE_CELLS, _CODE_CELLS)) < 0.5
    bits[:, 0] = bits[-1, :] = True  # a data matrix's L-shaped finder
    bits[0, ::2] = bits[1::2, -1] = True  # and its clock tracks
    bits[0, 1::2] = bits[::2, -1] = False
    return _Style(
        base=float(rng.uniform(0.42, 0.52)),
        tint=1 + rng.uniform(-0.03, 0.03, 3).astype(np.float32),
        holes_x=np.linspace(0.12, 0.66, n_holes) + rng.uniform(-0.03, 0.03, n_holes),
        bits=bits,
    )


def _window(y0: float, y1: float, x0: float, x1: float, h: int, w: int) -> _Box | None:
    """The box of pixels from (y0, x0) to (y1, x1); None if it leaves the (h, w) image."""
    top, left = int(np.floor(y0)), int(np.floor(x0))
    bottom, right = int(np.ceil(y1)) + 1, int(np.ceil(x1)) + 1
    if top < 0 or left < 0 or bottom > h or right > w:
        return None
    yy = np.arange(top, bottom, dtype=np.float32)[:, None]
    xx = np.arange(left, right, dtype=np.float32)[None, :]
    return (slice(top, bottom), slice(left, right)), yy, xx


def _feature_box(y0: float, y1: float, x0: float, x1: float, shape: tuple[int, ...]) -> _Box:
    """:func:`_window` for a structural feature, which the size check guarantees to fit."""
    box = _window(y0, y1, x0, x1, shape[0], shape[1])
    assert box is not None, f"a feature at y {y0:.0f}-{y1:.0f}, x {x0:.0f}-{x1:.0f} leaves the {shape} image"
    return box


def _channels(rgb: tuple[float, ...] | np.ndarray, channels: int) -> np.ndarray:
    """A colour as (3,) for a colour image, or its luma as (1,) for a grey one."""
    colour = np.asarray(rgb, dtype=np.float32)
    return colour if channels == 3 else np.array([colour @ _LUMA], dtype=np.float32)


def _streaks(rng: np.random.Generator, h: int, w: int, length: float) -> np.ndarray:
    """Unit noise smeared along x over about ``length`` px: brushing marks, one row each."""
    knots = rng.standard_normal((h, int(w / length) + 2)).astype(np.float32)
    pos = np.arange(w, dtype=np.float32) / length
    i0 = pos.astype(np.intp)
    frac = pos - np.floor(pos)  # float32 (pos - i0 would be float64)
    return knots[:, i0] * (1 - frac) + knots[:, i0 + 1] * frac


def _across(
    h: int, top: float, bottom: float, groove: float, light: float, base: float, margin: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Profiles across the part on a 1/_SUB-px grid of part rows: gain, offset and keep-out.

    A pixel's grey level is gain * shading along x * (1 + brushing) + offset, read at the grid row
    nearest to its row in part coordinates (shifted and tilted): evaluating the edges, bevels,
    groove and lit band on _SUB * H rows instead of H * W pixels keeps an image at a few
    milliseconds, and a 1/16-px grid keeps the edges anti-aliased.
    """
    s = h / 480
    y = (np.arange(-_PAD * _SUB, (h + _PAD) * _SUB, dtype=np.float32) + 0.5) / _SUB
    cover = np.clip(y - top + 0.5, 0, 1) * np.clip(bottom - y + 0.5, 0, 1)
    band = 1 + 0.12 * np.exp(-(((y - light) / (0.18 * h)) ** 2))
    bevel = 0.16 * np.exp(-(((y - top - 2 * s) / (1.3 * s)) ** 2)) - 0.12 * np.exp(
        -(((y - bottom + 2 * s) / (1.5 * s)) ** 2)
    )
    d = y - groove  # the groove: shadowed upper wall, lit lower lip
    cut = -0.22 * np.exp(-((d / (3 * s)) ** 2)) + 0.12 * np.exp(-(((d - 4.5 * s) / (1.5 * s)) ** 2))
    offset = _TABLE + cover * (base * (bevel + cut) - _TABLE)
    keep = (y < top + margin) | (y > bottom - margin) | (np.abs(d) < 8 * s + margin)
    return cover * base * band, offset, keep


def _normal(
    rng: np.random.Generator, style: _Style, h: int, w: int, channels: int
) -> tuple[np.ndarray, np.ndarray]:
    """One normal image, float (H, W, channels), and where defects must not go (bool (H, W)).

    Scalars are drawn one at a time, as Python floats: a NumPy float64 scalar would turn the
    float32 arrays into float64, twice the time.
    """
    s = h / 480
    dy, dx = rng.normal(0, 2.0 * s), rng.normal(0, 2.0 * s)  # the part's placement in the fixture
    tilt = rng.normal(0, 0.6 * s)  # px at either end
    margin = max(6 * s, 3)
    gain, offset, keep = _across(
        h,
        _TOP * h,
        _BOTTOM * h,
        _GROOVE * h + rng.normal(0, 0.7 * s),
        0.4 * h + rng.normal(0, 6 * s),
        style.base,
        margin,
    )
    yy = np.arange(h, dtype=np.float32)[:, None]
    xx = np.arange(w, dtype=np.float32)[None, :]
    row = ((yy + (_PAD - dy)) * _SUB - (tilt * _SUB / (w / 2)) * (xx - w / 2)).astype(np.int32)
    np.clip(row, 0, len(gain) - 1, out=row)  # each pixel's profile sample
    shading = (
        1 - rng.uniform(0.08, 0.14) * ((xx - w / 2) / (w / 2)) ** 2 + rng.normal(0, 0.03) * (xx / w - 0.5)
    )
    texture = 1 + 0.025 * _streaks(rng, h, w, 28 * s) + 0.012 * rng.standard_normal((h, 1), dtype=np.float32)
    gray = gain[row] * shading * texture + offset[row]
    keepout = keep[row]
    keepout[:, : int(margin)] = keepout[:, w - int(margin) :] = True
    for hx in style.holes_x.tolist():
        cy, cx = _HOLES_Y * h + dy + rng.normal(0, 0.7 * s), hx * w + dx + rng.normal(0, 0.7 * s)
        _hole(gray, keepout, cy, cx, _HOLE_R * h, 4 * s, margin, style.base)
    _code(gray, keepout, rng, style.bits, _CODE_Y * h + dy, _CODE_X * w + dx, 4 * s, margin)
    contrast, brightness = 1 + rng.normal(0, 0.04), rng.normal(0, 0.025)
    gray = (gray - 0.45) * contrast + (0.45 + brightness)
    noise = rng.standard_normal((h, w), dtype=np.float32)
    gray += noise * 0.012  # sensor noise, the same in the three channels: the metal is grey
    # The colour as a matmul: a broadcast to 3 channels takes several times as long.
    return (gray.reshape(-1, 1) @ _channels(style.tint, channels)[None]).reshape(h, w, channels), keepout


def _hole(
    gray: np.ndarray,
    keepout: np.ndarray,
    cy: float,
    cx: float,
    r: float,
    chamfer: float,
    margin: float,
    base: float,
) -> None:
    """A dark countersunk hole whose chamfer is lit on its lower side (light from the top), in place."""
    reach = r + chamfer + margin + 1
    window, yy, xx = _feature_box(cy - reach, cy + reach, cx - reach, cx + reach, gray.shape)
    dist = np.hypot(yy - cy, xx - cx)
    inside = np.clip(r + 0.5 - dist, 0, 1)
    ring = np.clip(r + chamfer + 0.5 - dist, 0, 1) - inside
    lit = base * (1 + 0.45 * (yy - cy) / np.maximum(dist, 1e-3))
    crop = gray[window]
    gray[window] = crop * (1 - ring - inside) + ring * lit + inside * (0.05 + 0.04 * dist / r)
    keepout[window] |= dist < r + chamfer + margin


def _code(
    gray: np.ndarray,
    keepout: np.ndarray,
    rng: np.random.Generator,
    bits: np.ndarray,
    y0: float,
    x0: float,
    cell: float,
    margin: float,
) -> None:
    """The printed data-matrix code, 4x4 supersampled for anti-aliased cell edges, in place."""
    y0, x0 = y0 + rng.normal(0, 0.5), x0 + rng.normal(0, 0.5)
    n = bits.shape[0]
    window, yy, xx = _feature_box(y0 - 1, y0 + n * cell + 1, x0 - 1, x0 + n * cell + 1, gray.shape)
    sub = (np.arange(4, dtype=np.float32) - 1.5) / 4
    u = np.floor((yy.ravel()[:, None] + sub - y0) / cell).astype(np.int64)  # (rows, 4) cell index
    v = np.floor((xx.ravel()[:, None] + sub - x0) / cell).astype(np.int64)
    inside = ((u >= 0) & (u < n))[:, :, None, None] & ((v >= 0) & (v < n))[None, None]
    ink = (bits[np.clip(u, 0, n - 1)[:, :, None, None], np.clip(v, 0, n - 1)[None, None]] & inside).mean(
        axis=(1, 3)
    )
    density = rng.uniform(0.75, 0.88)
    gray[window] = gray[window] * (1 - density * ink) + 0.08 * density * ink
    keepout[
        max(int(y0 - margin), 0) : int(y0 + n * cell + margin) + 1,
        int(x0 - margin) : int(x0 + n * cell + margin) + 1,
    ] = True


def _polyline_distance(points: np.ndarray, yy: np.ndarray, xx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distance of each pixel to a polyline (N, 2) of (y, x) points, and the position (0..1) along it."""
    a, b = points[:-1, :, None, None], points[1:, :, None, None]
    seg = b - a
    t = np.clip(((yy - a[:, 0]) * seg[:, 0] + (xx - a[:, 1]) * seg[:, 1]) / (seg**2).sum(axis=1), 0, 1)
    dist = np.hypot(yy - a[:, 0] - t * seg[:, 0], xx - a[:, 1] - t * seg[:, 1])  # (N-1, rows, cols)
    k = dist.argmin(axis=0)
    along = (k + np.take_along_axis(t, k[None], 0)[0]) / len(seg)
    return np.take_along_axis(dist, k[None], 0)[0], along


def _clear(keepout: np.ndarray, points: np.ndarray) -> bool:
    """Whether all (y, x) ``points`` lie in the image and off the keep-out: a cheap early test."""
    yx = np.round(points).astype(np.int64)
    inside = (yx >= 0).all() and (yx[:, 0] < keepout.shape[0]).all() and (yx[:, 1] < keepout.shape[1]).all()
    return bool(inside and not keepout[yx[:, 0], yx[:, 1]].any())


def _curve(centre: np.ndarray, length: float, angle: float, bend: float, n: int) -> np.ndarray:
    """``n`` points (y, x) along a segment bent into a parabola ``bend`` px deep at its middle."""
    t = np.linspace(0, 1, n)[:, None]
    direction, normal = np.array([np.sin(angle), np.cos(angle)]), np.array([np.cos(angle), -np.sin(angle)])
    return centre + (t - 0.5) * length * direction + 4 * t * (1 - t) * bend * normal


def _scratch(rng: np.random.Generator, keepout: np.ndarray, centre: np.ndarray, area: float) -> _Mark | None:
    width = rng.uniform(1.2, 3.0)
    length = min(area / width, 0.35 * keepout.shape[1])
    angle, bend = rng.uniform(0, np.pi), rng.normal(0, 0.06) * length
    if not _clear(keepout, _curve(centre, length, angle, bend, int(length / 2) + 2)):
        return None
    points = _curve(centre, length, angle, bend, 9)
    pad = width / 2 + 2
    (y0, x0), (y1, x1) = points.min(axis=0) - pad, points.max(axis=0) + pad
    box = _window(y0, y1, x0, x1, *keepout.shape)
    if box is None:
        return None
    window, yy, xx = box
    dist, along = _polyline_distance(points, yy, xx)
    taper = np.clip(np.minimum(along, 1 - along) * length / (2 * width), 0, 1)  # the ends fade out
    alpha = np.clip(width / 2 + 0.5 - dist, 0, 1) * taper
    delta = rng.uniform(0.12, 0.24) if rng.random() < 0.6 else -rng.uniform(0.1, 0.18)  # bare metal or dirt
    return window, alpha > 0, alpha >= 0.5, lambda crop: crop + (alpha * delta)[..., None]


def _pinhole(rng: np.random.Generator, keepout: np.ndarray, centre: np.ndarray, area: float) -> _Mark | None:
    s = keepout.shape[0] / 480
    r = rng.uniform(3.5, 8.0) * s
    n = int(np.clip(round(area / (np.pi * r * r)), 1, 6))
    r = max(np.sqrt(area / (n * np.pi)), 1.0)
    spread = 2.5 * r * np.sqrt(n - 1)
    centres = centre + rng.uniform(-spread, spread, (n, 2))
    radii = r * rng.uniform(0.8, 1.2, n)
    pad = radii.max() + 3
    (y0, x0), (y1, x1) = centres.min(axis=0) - pad, centres.max(axis=0) + pad
    box = _window(y0, y1, x0, x1, *keepout.shape)
    if not _clear(keepout, centres) or box is None:
        return None
    window, yy, xx = box
    rel = (
        (yy - centres[:, 0, None, None]) / radii[:, None, None],
        (xx - centres[:, 1, None, None]) / radii[:, None, None],
    )
    dist = np.hypot(*rel)  # (n, rows, cols), 1 on each pit's edge
    alpha = np.clip((1 - dist) * radii[:, None, None] + 0.5, 0, 1).max(axis=0)
    depth = rng.uniform(0.45, 0.7) * (1 - 0.3 * dist.min(axis=0) ** 2)  # darkest at the bottom of a pit
    rim = 0.25 * np.clip(1 - np.abs(dist - 1.15) * radii[:, None, None], 0, 1) * np.clip(rel[0], 0, 1)
    rim = rim.max(axis=0) * (1 - alpha)  # the lit far wall, just outside the pit's edge
    return (
        window,
        (alpha > 0) | (rim > 0),
        alpha >= 0.5,
        lambda crop: crop * (1 - alpha * depth + rim)[..., None],
    )


def _stain(rng: np.random.Generator, keepout: np.ndarray, centre: np.ndarray, area: float) -> _Mark | None:
    radius = np.sqrt(area / np.pi)
    soft = rng.uniform(1.5, 3.0) * max(keepout.shape[0] / 480, 0.5)
    cy, cx = centre
    reach = radius * 1.6 + soft + 2
    box = _window(cy - reach, cy + reach, cx - reach, cx + reach, *keepout.shape)
    if box is None:
        return None
    window, yy, xx = box
    angle = np.arctan2(yy - cy, xx - cx)
    k = np.arange(2, 6)[:, None, None]
    wobble = (
        rng.uniform(0, 0.3, 4)[:, None, None]
        / k
        * np.cos(k * angle + rng.uniform(0, 2 * np.pi, 4)[:, None, None])
    ).sum(0)
    inside = radius * (1 + wobble) - np.hypot(yy - cy, xx - cx)  # px inside the edge
    shape = np.clip(inside / soft + 0.5, 0, 1)
    factor, tint = _STAIN_TONES[int(rng.integers(len(_STAIN_TONES)))]
    rim = 1 - 0.1 * np.exp(-((inside / (1.5 * soft)) ** 2))  # darker where the edge dried
    opacity = shape[..., None] * rng.uniform(0.6, 0.9)

    def paint(crop: np.ndarray) -> np.ndarray:
        colour = factor * _channels(tint, crop.shape[-1]) * rim[..., None]
        return crop * (1 - opacity + opacity * colour)

    return window, shape > 0, shape >= 0.5, paint


_PAINTERS: dict[str, Callable[[np.random.Generator, np.ndarray, np.ndarray, float], _Mark | None]] = {
    "scratch": _scratch,
    "pinhole": _pinhole,
    "stain": _stain,
}


def _add_defect(rng: np.random.Generator, img: np.ndarray, keepout: np.ndarray, kind: str) -> np.ndarray:
    """Paint one ``kind`` defect on the bare surface, in place; its mask, sized within MASK_FRACTION."""
    h, w = keepout.shape
    low, high = _TARGET[kind]
    free = np.flatnonzero(~keepout)  # centres are drawn uniformly over the bare surface
    for _ in range(_TRIES):
        centre = np.array(divmod(int(free[rng.integers(len(free))]), w)) + rng.uniform(-0.5, 0.5, 2)
        mark = _PAINTERS[kind](rng, keepout, centre, h * w * np.exp(rng.uniform(np.log(low), np.log(high))))
        if mark is None:
            continue
        window, touched, mask, paint = mark
        fraction = mask.sum() / (h * w)
        if MASK_FRACTION[0] <= fraction <= MASK_FRACTION[1] and not keepout[window][touched].any():
            img[window] = paint(img[window])
            full = np.zeros((h, w), dtype=bool)
            full[window] = mask
            return full
    raise DataError(f"could not place a {kind} on a {h}x{w} image; use a larger size")


def _render(
    seed: int,
    key: tuple[int, int],
    style: _Style,
    size: tuple[int, int],
    defect: str | None,
    channels: int = 3,
) -> tuple[np.ndarray, np.ndarray | None]:
    """One image, float (H, W, channels) in [0, 1], and its mask (None for normal images).

    The part comes from one stream, the defect from another, so the same key without
    ``defect`` gives the defective image's normal twin, sensor noise included.
    """
    img, keepout = _normal(np.random.default_rng([seed, 1, *key, 0]), style, *size, channels)
    mask = (
        None
        if defect is None
        else _add_defect(np.random.default_rng([seed, 1, *key, 1]), img, keepout, defect)
    )
    return np.clip(img, 0, 1, out=img), mask


def make_small_defects(
    root: str | os.PathLike[str],
    *,
    n_train: int = 120,
    n_test_good: int = 30,
    n_test_defect: int = 15,
    seed: int = 0,
    size: tuple[int, int] = (480, 1200),
    grayscale: bool = False,
    fmt: str = "png",
) -> Path:
    """Write the small-defects dataset, MVTec AD layout, into the new/empty folder ``root``.

    Layout: ``train/good``, ``test/good``, ``test/<defect>`` for each of :data:`SMALL_DEFECTS`
    (``n_test_defect`` images *per defect type*) and ``ground_truth/<defect>/<stem>_mask.png``.
    Images are ``size`` = (H, W), H at least 64 and W at least 2 H (the part's geometry scales
    with H, the defects keep their area fractions); ``grayscale`` writes L-mode images (a
    monochrome inspection camera); ``fmt`` is the image format (masks are always PNG).
    Returns ``root``.
    """
    h, w = (int(v) for v in size)
    if h < _MIN_SIDE or w < 2 * h:
        raise DataError(
            f"size {h}x{w} does not fit the part; use H >= {_MIN_SIDE} and W >= 2H, e.g. 480x1200"
        )
    fmt = _check_fmt(fmt)
    root = _prepare_root(root)
    style = _style(seed)

    def render(code: int, index: int, defect: str | None) -> tuple[np.ndarray, np.ndarray | None]:
        img, mask = _render(seed, (code, index), style, (h, w), defect, 1 if grayscale else 3)
        return (img[..., 0] if grayscale else img), mask

    return write_layout(root, SMALL_DEFECTS, (n_train, n_test_good, n_test_defect), render, grayscale, fmt)
