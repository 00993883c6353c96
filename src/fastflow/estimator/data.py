"""Datasets and image loading for FastFlow.

Two on-disk layouts are supported:

* **MVTec AD** (one category folder)::

      root/train/good/*.png
      root/test/good/*.png
      root/test/<defect>/*.png
      root/ground_truth/<defect>/<stem>_mask.png

* **Generic folders**: a folder of normal images, optionally a folder of anomalous
  images and a folder of masks matched to the anomalous images by file stem
  (see :func:`folder_samples` and :func:`load_samples`).

Every problem with the input data raises :class:`DataError` with a one-line message
that names the offending file or folder *and* says how to fix it, because the users
are QC engineers who need to act on the message, not read a traceback.  Listing checks
what needs no pixels (layouts, mask pairing, mask sizes from the file headers); the pixels
are decoded once, by :func:`image_loader`, which feeds the model: a file that cannot be
decoded (or a mask whose size is not its image's) raises there, in sample order, and the
callers write nothing until every image went through (``fit`` fails before its first
checkpoint, ``predict`` writes into a staged folder).  :func:`validate_samples` decodes
everything up front, for callers that want the check without the model.
"""

from __future__ import annotations

import collections
import io
import os
import random
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, TypeVar

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, default_collate

from fastflow.core.errors import FastFlowError, first_line, is_integer, is_real, require

__all__ = [
    "IMAGE_SUFFIXES",
    "PIL_PIXEL_CEILING",
    "UPLOAD_FORMATS",
    "DataError",
    "ImageDataset",
    "Sample",
    "ShapeLimits",
    "check_holdout_fraction",
    "check_shapes",
    "decode_bytes",
    "decode_image",
    "detect_layout",
    "folder_samples",
    "image_loader",
    "image_size",
    "list_images",
    "load_mask",
    "load_samples",
    "mvtec_samples",
    "split_holdout",
    "validate_samples",
]

IMAGE_SUFFIXES: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
# PIL formats of IMAGE_SUFFIXES: the only decoders ``decode_bytes`` lets untrusted uploads reach.
UPLOAD_FORMATS: tuple[str, ...] = ("PNG", "JPEG", "BMP", "TIFF")
# PIL refuses to open an image of more pixels than this (its DecompressionBombError) before any
# caller sees the size; ``decode_bytes``'s own ``max_pixels`` must stay at or below it, so that
# every refusal can name the caller's limit rather than PIL's.
PIL_PIXEL_CEILING: int = 2 * (Image.MAX_IMAGE_PIXELS or 2**62)

Split = Literal["train", "test"]
T = TypeVar("T")

_MVTEC_LAYOUT = (
    "expected MVTec AD layout root/train/good/*.png, root/test/<defect or good>/*.png, "
    "root/ground_truth/<defect>/<stem>_mask.png"
)
_SUFFIX_TEXT = "/".join(IMAGE_SUFFIXES)
# Folder names under a generic test root that never hold anomalous images.
_NORMAL_NAMES = ("good", "normal")
_MASK_NAMES = ("masks", "ground_truth")


class DataError(FastFlowError):
    """Bad input data; the message names the file/folder and the fix, on one line.

    A :class:`~fastflow.core.errors.FastFlowError` (hence a ``ValueError``), so the CLI prints it
    as a one-line message instead of a traceback.
    """

    def __init__(self, message: str) -> None:
        # One line keeps CLI output and log greps readable even when PIL's text has newlines.
        super().__init__(" ".join(str(message).splitlines()))


@dataclass(frozen=True)
class Sample:
    """One image of a dataset.

    ``label`` is 0 for normal, 1 for anomalous.  ``mask`` is the pixel ground truth of an
    anomalous image; ``None`` means "no mask" (normal, or anomalous counted at image level
    only).  ``defect`` is the defect type ("good" for normal images).  ``size`` is the
    image's (width, height) once :func:`validate_samples` has decoded it (``None`` before:
    :func:`image_loader` takes the size from the pixels it decodes).
    """

    path: Path
    label: int
    mask: Path | None = None
    defect: str = "good"
    size: tuple[int, int] | None = field(default=None, compare=False)


# --------------------------------------------------------------------------- listing


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".") and path.is_file()


def list_images(folder: Path) -> list[Path]:
    """Image files directly in ``folder``, sorted by name; hidden and non-image files skipped.

    Sorting makes every listing, split and report reproducible across machines.
    """
    return sorted(p for p in Path(folder).iterdir() if _is_image(p))


def _subfolders(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _require_dir(folder: Path, what: str, fix: str) -> None:
    if not folder.is_dir():
        state = "is not a folder" if folder.exists() else "does not exist"
        raise DataError(f"{what} {folder} {state}; {fix}")


def _nonempty_images(folder: Path, what: str) -> list[Path]:
    """List images of ``folder`` and fail with a helpful message when there are none."""
    images = list_images(folder)
    if not images:
        others = [p for p in folder.iterdir() if not p.name.startswith(".")]
        hint = f" (it holds {len(others)} other entries)" if others else ""
        raise DataError(f"no images in {what} {folder}{hint}; add {what} images with suffix {_SUFFIX_TEXT}")
    return images


def mvtec_samples(root: str | os.PathLike[str], split: Split) -> list[Sample]:
    """List an MVTec AD category folder.

    ``train`` returns the normal images of ``train/good``.  ``test`` returns ``test/good``
    as normal and every other ``test/<defect>`` folder as anomalous, each paired with
    ``ground_truth/<defect>/<stem>_mask.png``; a missing mask is an error because the
    MVTec protocol scores every defect image at pixel level.
    """
    root = Path(root)
    _require_dir(root, "dataset folder", f"pass an MVTec AD category folder; {_MVTEC_LAYOUT}")
    if split == "train":
        good = root / "train" / "good"
        _require_dir(good, "training folder", f"{root} is not an MVTec AD category; {_MVTEC_LAYOUT}")
        return [Sample(p, 0) for p in _nonempty_images(good, "normal")]
    if split != "test":
        raise DataError(f"unknown split {split!r} for {root}; use 'train' or 'test'")

    test = root / "test"
    _require_dir(test, "test folder", f"{root} is not an MVTec AD category; {_MVTEC_LAYOUT}")
    folders = _subfolders(test)
    if not folders:
        raise DataError(f"test folder {test} has no subfolders; {_MVTEC_LAYOUT}")
    samples: list[Sample] = []
    for folder in folders:
        defect = folder.name
        what = "normal" if defect == "good" else f"'{defect}' defect"
        for image in _nonempty_images(folder, what):
            if defect == "good":
                samples.append(Sample(image, 0))
                continue
            mask = root / "ground_truth" / defect / f"{image.stem}_mask.png"
            if not mask.is_file():
                raise DataError(
                    f"missing mask {mask} for anomalous image {image}; "
                    f"add the mask or move the image out of {folder}"
                )
            samples.append(Sample(image, 1, mask, defect))
    _check_mask_sizes(samples)
    return samples


def _mask_key(mask: Path, image_stems: set[str]) -> str:
    """Image stem a mask belongs to: ``<stem>.<ext>`` or ``<stem>_mask.<ext>``."""
    if mask.stem in image_stems:
        return mask.stem
    if mask.stem.endswith("_mask"):
        return mask.stem[: -len("_mask")]
    return mask.stem


def _anomalous_samples(anomalous_dir: Path, mask_dir: Path | None) -> list[Sample]:
    """Anomalous images of one folder, paired with masks by stem when ``mask_dir`` is given."""
    _require_dir(anomalous_dir, "anomalous folder", "pass an existing folder of anomalous images")
    images = _nonempty_images(anomalous_dir, "anomalous")
    defect = anomalous_dir.name
    if mask_dir is None:
        return [Sample(p, 1, None, defect) for p in images]

    _require_dir(mask_dir, "mask folder", "pass an existing folder of masks or omit it")
    by_stem: dict[str, Path] = {}
    for image in images:
        if image.stem in by_stem:
            raise DataError(
                f"images {by_stem[image.stem]} and {image} share the stem '{image.stem}', so masks "
                "cannot be matched; rename one of them"
            )
        by_stem[image.stem] = image
    masks: dict[str, Path] = {}
    for mask in list_images(mask_dir):
        key = _mask_key(mask, set(by_stem))
        if key not in by_stem:
            raise DataError(
                f"mask {mask} has no matching image {anomalous_dir}/{key}.<ext>; "
                "remove the mask or add the image (masks are matched by file stem)"
            )
        if key in masks:
            raise DataError(
                f"masks {masks[key]} and {mask} both match image {by_stem[key]}; remove one of them"
            )
        masks[key] = mask
    samples = [Sample(p, 1, masks.get(p.stem), defect) for p in images]
    _check_mask_sizes(samples)
    return samples


def folder_samples(
    normal_dir: str | os.PathLike[str],
    anomalous_dir: str | os.PathLike[str] | None = None,
    mask_dir: str | os.PathLike[str] | None = None,
) -> list[Sample]:
    """List a generic layout: normal images, optional anomalous images and masks.

    Masks are matched to anomalous images by file stem: ``masks/<stem>.<ext>`` or
    ``masks/<stem>_mask.<ext>``.  An anomalous image without a mask is allowed (it counts
    at image level only), but a mask without an image, or with a different size than its
    image, is an error: both mean the masks do not describe these images.
    """
    normal_dir = Path(normal_dir)
    _require_dir(normal_dir, "normal folder", "pass an existing folder of normal images")
    samples = [Sample(p, 0) for p in _nonempty_images(normal_dir, "normal")]
    if anomalous_dir is None:
        if mask_dir is not None:
            raise DataError(f"mask folder {mask_dir} given without an anomalous folder; pass both")
        return samples
    return samples + _anomalous_samples(Path(anomalous_dir), None if mask_dir is None else Path(mask_dir))


def detect_layout(root: str | os.PathLike[str]) -> Literal["mvtec", "folder"]:
    """``"mvtec"`` when ``root/train/good`` exists, otherwise ``"folder"``."""
    root = Path(root)
    _require_dir(root, "dataset folder", "pass an existing dataset folder")
    return "mvtec" if (root / "train" / "good").is_dir() else "folder"


def _folder_normal_dir(root: Path) -> Path | None:
    for name in _NORMAL_NAMES:
        if (root / name).is_dir():
            return root / name
    return None


def load_samples(root: str | os.PathLike[str], split: Split) -> list[Sample]:
    """List the samples of one DATA path as given to ``fastflow train`` / ``fastflow test``.

    * MVTec AD category (``root/train/good`` exists): :func:`mvtec_samples`.
    * Folder layout, ``train``: normal images from ``root/good`` or ``root/normal`` if one
      exists, otherwise the images directly in ``root``.
    * Folder layout, ``test``: normal images from ``root/good`` or ``root/normal``; every
      other subfolder ``root/<name>`` (except ``masks``/``ground_truth``) holds anomalous
      images of defect type ``<name>``.  Optional masks, matched by stem, live in
      ``root/masks/<name>/`` or, when there is a single anomalous folder, directly in
      ``root/masks/``.
    """
    root = Path(root)
    if split not in ("train", "test"):
        raise DataError(f"unknown split {split!r} for {root}; use 'train' or 'test'")
    if detect_layout(root) == "mvtec":
        return mvtec_samples(root, split)

    normal = _folder_normal_dir(root)
    if split == "train":
        if normal is None and not list_images(root):
            raise DataError(
                f"no training images in {root}; put normal images directly in it or in {root}/good, "
                f"or use the MVTec layout ({_MVTEC_LAYOUT})"
            )
        return folder_samples(normal if normal is not None else root)

    if normal is None:
        raise DataError(
            f"test folder {root} has no good/ (or normal/) subfolder; put normal test images in "
            f"{root}/good and anomalous ones in {root}/<defect>, optional masks in {root}/masks"
        )
    skip = {normal.name, *_MASK_NAMES}
    anomalous = [p for p in _subfolders(root) if p.name not in skip]
    masks_root = root / "masks"
    samples = folder_samples(normal)
    for folder in anomalous:
        mask_dir: Path | None = None
        if (masks_root / folder.name).is_dir():
            mask_dir = masks_root / folder.name
        elif len(anomalous) == 1 and masks_root.is_dir():
            mask_dir = masks_root
        samples += _anomalous_samples(folder, mask_dir)
    return samples


# --------------------------------------------------------------------------- decoding


def _corrupt(path: Path, kind: str, err: BaseException) -> DataError:
    if isinstance(err, FileNotFoundError):
        return DataError(f"{kind} not found: {path}; check the path or list the dataset again")
    if isinstance(err, PermissionError):
        return DataError(f"{kind} {path} is not readable (permission denied); fix its permissions")
    return DataError(f"corrupt {kind} {path}: cannot be decoded (PIL: {err}); remove or replace the file")


_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)


def _decoded(path: Path, kind: str, use: Callable[[Image.Image], T]) -> T:
    """Open and fully decode an image, then return ``use(image)`` while the file is open.

    PIL decodes lazily, so ``load`` must happen inside the try to catch corrupt data; doing
    the work inside the ``with`` avoids copying pixels out of a closing image.
    """
    try:
        with Image.open(path) as img:
            img.load()
            return use(img)
    except _DECODE_ERRORS as err:
        raise _corrupt(path, kind, err) from err


def image_size(path: str | os.PathLike[str], kind: str = "image") -> tuple[int, int]:
    """``(width, height)`` from the header only: cheap enough to check every mask at listing."""
    path = Path(path)
    try:
        with Image.open(path) as img:
            return img.size
    except _DECODE_ERRORS as err:
        raise _corrupt(path, kind, err) from err


def _to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB.

    16-bit and 32-bit integer grayscale are scaled from the 0..65535 range (PIL's own
    ``convert`` would clip them to white); float images are taken as 0..1 when their
    maximum is <= 1, else 0..255.  Alpha is dropped, the pixel grid is kept as stored
    (no EXIF rotation) so images stay aligned with their masks.
    """
    if img.mode.startswith("I"):
        arr = np.asarray(img, dtype=np.float64) / 257.0
        img = Image.fromarray(np.clip(arr, 0, 255).round().astype(np.uint8), "L")
    elif img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        if arr.size and np.nanmax(arr) <= 1.0:
            arr = arr * 255.0
        img = Image.fromarray(np.clip(np.nan_to_num(arr), 0, 255).round().astype(np.uint8), "L")
    elif img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    return img if img.mode == "RGB" else img.convert("RGB")


def _as_hw(size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    h, w = (int(s) for s in size)
    if h <= 0 or w <= 0:
        raise ValueError(f"image size must be positive (H, W), got {tuple(size)}")
    return h, w


def decode_image(path: str | os.PathLike[str]) -> torch.Tensor:
    """Decode ``path`` to an 8-bit RGB (3, H, W) uint8 tensor: the raw input of an exported model."""
    arr = _decoded(Path(path), "image", lambda img: np.array(_to_rgb(img), dtype=np.uint8))
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


@dataclass(frozen=True)
class ShapeLimits:
    """The image shapes worth scoring: a shorter side of at least ``min_side`` px and a longer
    side at most ``max_aspect`` times the shorter one.

    The model resizes every image to its input size, so a 3x3 image becomes a blur of nine
    colours and a 20000x20 strip is squeezed a thousandfold along one axis: either would get a
    score, and the score would mean nothing. ``fastflow serve`` (``--min-side``,
    ``--max-aspect``) and ``fastflow predict`` (the same flags) refuse such images with this one
    check, from the size alone (a file's header), before any pixel is decoded.
    """

    min_side: int = 32
    max_aspect: float = 20.0

    def __post_init__(self) -> None:
        require(
            is_integer(self.min_side) and self.min_side >= 1,
            "min_side (--min-side)",
            "an integer >= 1",
            self.min_side,
        )
        require(
            is_real(self.max_aspect) and 1 <= self.max_aspect < float("inf"),
            "max_aspect (--max-aspect)",
            "a number >= 1 (longer side / shorter side)",
            self.max_aspect,
        )

    def check(self, width: int, height: int, what: str) -> None:
        """Raise a one-line :class:`DataError` naming ``what`` (e.g. ``image a.png``), its size
        and each limit it breaks, unless ``width`` x ``height`` is within both."""
        short, long = min(width, height), max(width, height)
        problems, fixes = [], []
        if short < self.min_side:
            problems.append(f"a side under the minimum of {self.min_side} px (--min-side)")
            fixes.append("use a larger image or lower --min-side")
        if long > self.max_aspect * short and short > 0:
            ratio = f"{long / short:.2f}".rstrip("0").rstrip(".")
            problems.append(
                f"a side ratio of {ratio}:1, over the limit of {self.max_aspect:g}:1 (--max-aspect)"
            )
            fixes.append("crop it into less elongated pieces or raise --max-aspect")
        if problems:
            raise DataError(
                f"{what} is {width}x{height} px, with {' and '.join(problems)}; resized to the model's "
                f"input size it would hold nothing to score: {', and '.join(fixes)}"
            )


def check_shapes(samples: Sequence[Sample], limits: ShapeLimits) -> None:
    """Check every sample's size against ``limits`` from its file header (cheap: no decoding),
    in sample order, so that a run stops on its first unscorable image before it writes anything."""
    for sample in samples:
        width, height = image_size(sample.path)
        limits.check(width, height, f"image {sample.path}")


def decode_bytes(data: bytes, max_pixels: int, limits: ShapeLimits | None = None) -> torch.Tensor:
    """Decode an uploaded image (PNG, JPEG, BMP or TIFF bytes) exactly as ``decode_image`` decodes a file.

    Untrusted bytes: only the ``UPLOAD_FORMATS`` decoders are tried, and the pixel count
    (``max_pixels``, the server's ``--max-megapixels``; at most ``PIL_PIXEL_CEILING``) and the
    ``limits`` are checked from the header before any pixel is decoded, so a small file that
    would decompress to gigabytes (a decompression bomb) is refused cheaply. Every problem is a
    one-line :class:`DataError`; ``(3, H, W)`` uint8 RGB otherwise.
    """
    if not data:
        raise DataError("the upload is empty (0 bytes); send the bytes of a PNG, JPEG, BMP or TIFF image")
    over = (
        f"over the server's limit of {max_pixels} pixels (--max-megapixels {max_pixels / 1e6:g}; a "
        "decompression bomb?); send a smaller image or start the server with a larger --max-megapixels"
    )
    try:
        with Image.open(io.BytesIO(data), formats=UPLOAD_FORMATS) as img:
            width, height = img.size
            if width * height > max_pixels:
                raise DataError(f"image of {width}x{height} pixels is {over}")
            if limits is not None:
                limits.check(width, height, "the image")
            img.load()
            arr = np.array(_to_rgb(img), dtype=np.uint8)
    except DataError:  # a ValueError, like some of PIL's decoding errors below
        raise
    except Image.UnidentifiedImageError:
        raise DataError(
            "the upload is not a PNG, JPEG, BMP or TIFF image; send one of those formats"
        ) from None
    except Image.DecompressionBombError:
        # PIL refused it on opening, above PIL_PIXEL_CEILING >= max_pixels: over ours too.
        raise DataError(f"image refused: its header claims a size {over}") from None
    except _DECODE_ERRORS as err:
        raise DataError(
            f"the image is corrupt or truncated (PIL: {first_line(err)}); send the complete file"
        ) from None
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def _mask_bool(img: Image.Image) -> np.ndarray:
    """Anomalous pixels of a mask in any mode.

    8-bit masks (L, RGB, ...) use > 127 so JPEG-ish noise around 0/255 is ignored; 1-bit,
    16/32-bit and float masks use > 0; palette masks use index > 0 (index 0 = background),
    because a dark class colour would otherwise vanish under a luminance threshold.
    """
    if img.mode == "1" or img.mode.startswith("I") or img.mode == "F":
        return np.asarray(img) > 0
    if img.mode == "P":
        return np.asarray(img) > 0
    if img.mode == "L":
        return np.asarray(img) > 127
    return np.asarray(img.convert("RGB")).max(axis=2) > 127


def load_mask(path: str | os.PathLike[str], size: int | tuple[int, int]) -> torch.Tensor:
    """Decode a ground-truth mask and resize it (nearest) to ``size`` = (H, W) -> bool tensor."""
    return _resized_mask(_decoded(Path(path), "mask", _mask_bool), size)


def _resized_mask(binary: np.ndarray, size: int | tuple[int, int]) -> torch.Tensor:
    """A decoded (H, W) bool mask resized (nearest) to ``size`` = (H, W)."""
    h, w = _as_hw(size)
    if binary.shape != (h, w):
        small = Image.fromarray(binary.astype(np.uint8) * 255, "L").resize((w, h), Image.Resampling.NEAREST)
        binary = np.asarray(small) > 0
    return torch.from_numpy(np.ascontiguousarray(binary))


# --------------------------------------------------------------------------- dataset


class ImageDataset(Dataset):
    """Torch dataset over :class:`Sample` items, returning default-collate friendly dicts.

    Keys: ``image`` the decoded (3, height, width) uint8 RGB picture at its own size (the input
    of ``FastFlowModel`` and of exported models; :func:`image_loader` batches same-size ones),
    ``label`` int, ``mask`` (H, W) bool at ``mask_size`` (all False when there is no mask),
    ``has_mask`` bool (False for anomalous images without a mask, so pixel metrics can skip
    them), ``path`` str and ``defect`` str.
    """

    def __init__(self, samples: Sequence[Sample], mask_size: int | tuple[int, int]) -> None:
        self.samples = list(samples)
        self.mask_size = _as_hw(mask_size)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        """The item of ``samples[index]``: its image and mask decoded once each; a mask whose
        size is not its image's raises the :class:`DataError` listing would."""
        sample = self.samples[index]
        image = decode_image(sample.path)
        if sample.mask is not None:
            binary = _decoded(sample.mask, "mask", _mask_bool)
            height, width = image.shape[1:]
            _check_mask_size(sample, (width, height), (binary.shape[1], binary.shape[0]))
            mask = _resized_mask(binary, self.mask_size)
        else:
            mask = torch.zeros(self.mask_size, dtype=torch.bool)
        return {
            "image": image,
            "label": int(sample.label),
            "mask": mask,
            # Normal images have a trivially known (empty) mask.
            "has_mask": sample.mask is not None or sample.label == 0,
            "path": str(sample.path),
            "defect": sample.defect,
        }


def image_loader(
    samples: Sequence[Sample],
    mask_size: int | tuple[int, int],
    batch_size: int,
    workers: int | None = None,
) -> Iterator[dict[str, Any]]:
    """Batches (collated :class:`ImageDataset` items) of ``samples`` in order, each of at most
    ``batch_size`` images of one size.

    Every image is decoded once, here: a batch ends where the decoded size changes, so its
    images stack into one tensor and predictions stay in order. ``workers`` threads (default
    up to 8; PIL releases the GIL) decode ahead, about one batch, while the caller uses the
    last one. A file that cannot be decoded raises its :class:`DataError` when its turn comes,
    so the first bad file in sample order is the one reported (after the batches before it).
    """
    dataset = ImageDataset(samples, mask_size)
    workers = workers or min(8, os.cpu_count() or 1)
    batch: list[dict[str, Any]] = []
    for item in _decoded_ahead(dataset.__getitem__, len(dataset), workers, batch_size + workers):
        if batch and (len(batch) >= batch_size or item["image"].shape != batch[0]["image"].shape):
            yield default_collate(batch)
            batch = []
        batch.append(item)
    if batch:
        yield default_collate(batch)


def _decoded_ahead(load: Callable[[int], T], count: int, workers: int, ahead: int) -> Iterator[T]:
    """``load(0)``, ..., ``load(count - 1)`` in order, up to ``ahead`` of them computed early by
    ``workers`` threads; an exception of ``load(i)`` raises when ``i``'s turn comes."""
    if workers <= 1:
        yield from (load(index) for index in range(count))
        return
    with ThreadPoolExecutor(max_workers=workers) as pool:
        pending: collections.deque[Future[T]] = collections.deque()
        try:
            for index in range(count):
                pending.append(pool.submit(load, index))
                if len(pending) > ahead:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:  # stopped early (an error, or the caller's): no more decoding
            for future in pending:
                future.cancel()


# --------------------------------------------------------------------------- checks


def _check_mask_sizes(samples: Sequence[Sample]) -> None:
    """Mask and image must have the same pixel grid, or pixel metrics are meaningless."""
    for s in samples:
        if s.mask is None:
            continue
        _check_mask_size(s, image_size(s.path), image_size(s.mask, "mask"))


def _check_mask_size(sample: Sample, img_size: tuple[int, int], mask_size: tuple[int, int]) -> None:
    if mask_size != img_size:
        raise DataError(
            f"mask {sample.mask} is {mask_size[0]}x{mask_size[1]} but its image {sample.path} is "
            f"{img_size[0]}x{img_size[1]}; export the mask at the image's size"
        )


def _size(img: Image.Image) -> tuple[int, int]:
    return img.size


def _check_one(sample: Sample) -> Sample:
    img_size = _decoded(sample.path, "image", _size)
    if sample.mask is not None:
        _check_mask_size(sample, img_size, _decoded(sample.mask, "mask", _size))
    return replace(sample, size=img_size)


def validate_samples(samples: Sequence[Sample], workers: int | None = None) -> list[Sample]:
    """Fully decode every image and mask; raise :class:`DataError` for the first bad one.

    A check without the model: ``fit`` and ``predict`` do not call it, as the decode that
    feeds their model (:func:`image_loader`) raises the same errors.  A full decode is
    needed because ``verify()`` misses truncated data; threads
    help because PIL releases the GIL while decoding.  "First" is in sample order, so the
    reported file does not depend on thread timing.  Returns the samples with their
    ``size`` filled in.
    """
    samples = list(samples)
    if not samples:
        raise DataError("no images to validate; check the dataset path")
    workers = workers or min(8, os.cpu_count() or 1)
    if workers <= 1:
        return [_check_one(s) for s in samples]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = [pool.submit(_check_one, s) for s in samples]
        try:
            return [future.result() for future in futures]
        finally:
            for future in futures:
                future.cancel()


def check_holdout_fraction(fraction: float) -> None:
    """The held-out share must leave images on both sides of the split."""
    require(
        is_real(fraction) and 0 < fraction < 1,
        "holdout_fraction (--holdout)",
        "between 0 and 1, both excluded",
        fraction,
    )


def split_holdout(
    samples: Sequence[Sample], fraction: float = 0.1, seed: int = 0
) -> tuple[list[Sample], list[Sample]]:
    """Deterministically split normal training images into (train, held-out).

    The held-out normals calibrate score thresholds on images the flow never saw.  At least
    one image is held out and at least one kept; both parts keep the input order.
    """
    samples = list(samples)
    check_holdout_fraction(fraction)
    anomalous = [s for s in samples if s.label != 0]
    if anomalous:
        raise DataError(
            f"training images must be normal, but {anomalous[0].path} is labelled anomalous; "
            "train on normal images only"
        )
    if len(samples) < 2:
        where = samples[0].path.parent if samples else "the training folder"
        raise DataError(
            f"only {len(samples)} normal training image(s) in {where}; add more normal images "
            "(at least 2, ideally dozens)"
        )
    n_hold = min(len(samples) - 1, max(1, round(len(samples) * fraction)))
    order = list(range(len(samples)))
    random.Random(seed).shuffle(order)
    held = set(order[:n_hold])
    train = [s for i, s in enumerate(samples) if i not in held]
    holdout = [s for i, s in enumerate(samples) if i in held]
    return train, holdout
