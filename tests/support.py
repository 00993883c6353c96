"""Scaffolding shared by the tests and the benchmarks; not part of the library.

Imported as ``support`` (pytest puts ``tests/`` on the path; the benchmarks add it).
"""

from __future__ import annotations

import contextlib
import io
import os
import socket
import struct
import threading
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from fastflow.apps.synthetic import DEFECTS, _check_fmt, _prepare_root, _render, _save, _save_mask, _style
from fastflow.model.config import get_config
from fastflow.model.fastflow import FastFlowModel
from fastflow.model.scoring import anomaly_map

__all__ = [
    "bad_requests",
    "calibrated_run",
    "free_port",
    "loopback_server",
    "make_folder_dataset",
    "perturb_trainable",
    "png_claiming",
    "serve_images",
    "tile_seam_ratio",
]


# The smallest model ``fastflow train`` builds (random ResNet-18 weights, 64 px), for tests of
# what happens around training rather than of what it learns.
TINY_RESNET_ARGS = ["--backbone", "resnet18", "--weights", "random", "--input-size", "64"]


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


def tile_seam_ratio(
    untiled: FastFlowModel, tiled: FastFlowModel, image: torch.Tensor, texture: torch.Tensor, band: int = 4
) -> float:
    """How far ``tiled``'s anomaly map of ``image`` strays, within ``band`` px of a tile border
    inside the image, from ``untiled``'s (the same weights, the whole image at once: no tile
    borders); as a share of the spread (1st to 99th percentile) of ``untiled``'s map of
    ``texture``, a normal image, whose map variation is the scale a seam must stay well below.

    The maps are unblurred (the reference scorer), as a blur would hide seams. ``image`` and
    ``texture``: (1, 3, H, W) uint8 at the models' input size.
    """
    size = untiled.config.input_size
    assert tiled.tiles is not None and tiled.config.input_size == size
    with torch.no_grad():
        normal = anomaly_map(untiled(texture)[0], size)[0]
        whole = anomaly_map(untiled(image)[0], size)[0]
        stitched = anomaly_map(tiled(image)[0], size)[0]
    spread = float(normal.quantile(0.99) - normal.quantile(0.01))
    tile = tiled.tiles.tile
    rows = {edge for top in tiled.tiles.rows for edge in (top, top + tile)} - {0, size[0]}
    columns = {edge for left in tiled.tiles.columns for edge in (left, left + tile)} - {0, size[1]}
    near = torch.zeros(size, dtype=torch.bool)
    for row in rows:
        near[row - band : row + band] = True
    for column in columns:
        near[:, column - band : column + band] = True
    return float((stitched - whole)[near].abs().max()) / spread


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


def png_claiming(width: int, height: int) -> bytes:
    """A 60-byte PNG whose header says ``width`` x ``height`` (a decompression bomb's header)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


def bad_requests(good: bytes, max_body_bytes: int) -> dict[str, tuple[bytes, str, str, int, str]]:
    """Uploads ``fastflow serve`` must refuse with a 4xx, built around one ``good`` image's bytes
    for a server whose body limit is ``max_body_bytes``: name -> (body, content type, query,
    expected status, words the error must contain). ``tests/test_serve.py`` and
    ``benchmarks/serve.py`` send these."""
    gif = io.BytesIO()
    Image.new("RGB", (32, 32)).save(gif, format="GIF")
    return {
        "not an image": (b"hello, this is text" * 10, "image/png", "", 400, "not a PNG, JPEG, BMP or TIFF"),
        "truncated": (good[: len(good) // 2], "image/png", "", 400, "truncated"),
        "zero bytes": (b"", "image/png", "", 400, "empty"),
        "decompression bomb": (png_claiming(100_000, 100_000), "image/png", "", 400, "decompression bomb"),
        "over the body limit": (os.urandom(max_body_bytes + 1), "image/png", "", 413, "over the limit"),
        "wrong content type": (good, "application/json", "", 415, "content type"),
        "text content type": (good, "text/plain", "", 415, "content type"),
        "GIF": (gif.getvalue(), "image/gif", "", 400, "not a PNG"),
        "multipart without a file": (
            b"--b\r\nContent-Disposition: form-data; name=x\r\n\r\n1\r\n--b--\r\n",
            "multipart/form-data; boundary=b",
            "",
            400,
            "no file",
        ),
        "bad heatmap flag": (good, "image/png", "?heatmap=maybe", 422, "heatmap"),
        "false_alarm_rate out of range": (good, "image/png", "?false_alarm_rate=2", 422, "false_alarm_rate"),
        "false_alarm_rate not a number": (
            good,
            "image/png",
            "?false_alarm_rate=often",
            422,
            "false_alarm_rate",
        ),
    }


# ---------------------------------------------------------------------------- fastflow serve


def serve_images(root: Path) -> list[Path]:
    """10 images for serving tests (6 normal, then 4 anomalous): mixed sizes (200..320 px), PNG,
    JPEG, BMP and TIFF, colour and grayscale (index 2)."""
    folder = make_folder_dataset(root, n_normal=6, n_anomalous=4)
    paths = sorted((folder / "normal").iterdir()) + sorted((folder / "anomalous").iterdir())
    for index, suffix in ((1, ".bmp"), (2, ".tiff")):
        converted = paths[index].with_suffix(suffix)
        Image.open(paths[index]).save(converted)
        paths[index].unlink()
        paths[index] = converted
    return paths


def calibrated_run(images: list[Path], folder: Path, rate: float = 0.5, seed: int = 1) -> Path:
    """A saved small random-backbone detector with perturbed flows (no training), calibrated on
    ``images`` at ``rate``: at 0.5 on 10 images its threshold is their 6th smallest score
    (ceil(11 x 0.5)), so 4 of them score above it and both verdicts occur."""
    from fastflow import FastFlow

    model = FastFlowModel(get_config("resnet18", input_size=(96, 80), flow_steps=2), "random").eval()
    perturb_trainable(model, torch.Generator().manual_seed(seed))
    scores = FastFlow.from_model(model, 0.0).decision_function(images)
    assert scores.std() > 1e-4  # scores that tell the images apart
    detector = FastFlow.from_model(model, 0.0, map_floor=float(scores.min()) - 0.1, false_alarm_rate=rate)
    detector.calibrate(images)
    if rate == 0.5 and len(images) == 10:
        assert detector.threshold_ == np.sort(scores)[5]
    detector.save(folder / "model.safetensors")
    return folder


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def loopback_server(app: Any) -> Iterator[str]:
    """Run the ASGI ``app`` with uvicorn in a thread on a free 127.0.0.1 port; yields its base
    URL (``http://127.0.0.1:PORT``) once it accepts connections, and stops it after."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.05)
        assert server.started, "uvicorn did not start within 30 s"
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
