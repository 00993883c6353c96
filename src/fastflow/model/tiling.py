"""Tiling: where the backbone's tiles lie in the whole image and how their features are stitched.

With ``FastFlowConfig.tile`` the backbone sees square tiles of the whole working image, while
the flows, the positional condition and the scorer see ONE feature grid of the whole image.
Stitching features rather than anomaly maps is the point: the map is computed once, on the
whole grid, so it has no seams of its own, the flows' convolutions run across tile borders and
the positional condition means the position in the whole image.

A tile's features near its edges are not those of the whole image there: the backbone's zero
padding reaches in from every edge. So neighbouring tiles overlap, and each tile's features are
weighted by a separable window that falls linearly towards an edge it shares with another tile
(and stays 1 at the image's borders, where the whole image has the same edge); the weights of
all tiles covering a position sum to 1 there. Along each axis they are normalised on their own,
so their products, the 2D weights, sum to 1 too.

Every size here is a multiple of ``ALIGN`` = 32 px (``FastFlowConfig`` checks it): the CNN
presets' feature strides (4, 8, 16 for stages 1-3, 32 for stage 4) all divide 32, so a tile
starting at a multiple of 32 px starts on a whole cell of every scale, and a CNN (equivariant
to shifts by multiples of its stride) computes the same features there as on the whole image,
apart from the edges. Cutting and stitching are fixed slices, products with constant weights,
sums and concatenations: everything is known from the sizes, so an exported graph holds it as
constants (the input is resized to the whole working size before it is cut).
"""

from __future__ import annotations

import functools
import itertools
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from fastflow.core.errors import FastFlowError

__all__ = ["ALIGN", "TileGrid", "axis_weights", "tile_starts"]

ALIGN = 32


def tile_starts(length: int, tile: int, overlap: int, align: int = ALIGN) -> tuple[int, ...]:
    """Where the tiles of one axis start: the fewest tiles of side ``tile`` that cover ``length``
    with at least ``overlap`` pixels shared by neighbours, their starts spread evenly from 0 to
    ``length - tile`` and rounded to multiples of ``align`` (first at 0, last ending at the border).

    All three sizes must be multiples of ``align``, with ``0 <= overlap < tile <= length``. Even
    spreading keeps every shared strip about as wide as the others (at least ``overlap``: the
    spread step is at most ``tile - overlap``, a multiple of ``align``, so rounding never makes
    a step longer than that), rather than one thin strip at the end.
    """
    if any(size % align for size in (length, tile, overlap)) or not 0 <= overlap < tile <= length:
        raise ValueError(
            f"tiles need multiples of {align} with 0 <= overlap < tile <= length, got "
            f"length {length}, tile {tile}, overlap {overlap}"
        )
    if tile == length:
        return (0,)
    count = math.ceil((length - overlap) / (tile - overlap))
    span = (length - tile) // align  # the last start, in units of align
    gaps = count - 1
    # i * span / gaps rounded half up, in integers (exact, no float ties).
    return tuple(align * ((2 * i * span + gaps) // (2 * gaps)) for i in range(count))


def axis_weights(starts: tuple[int, ...], tile: int, length: int, stride: int) -> tuple[Tensor, ...]:
    """Each tile's blending weights along one axis, one float32 vector of ``tile // stride`` cells
    per tile, normalised so that the tiles covering a cell of the whole axis sum to 1 there.

    Before normalisation a tile's weight at a cell centre ``c`` (in cells from its start) ramps
    from 0 to 1 across the strip it shares with the previous tile (``c / shared``) and back down
    across the strip shared with the next one; elsewhere, and at the image's borders, it is 1.
    Two neighbours' ramps add up to 1 across their strip; where three tiles meet (steps under
    half a tile) the normalisation makes them sum to 1.
    """
    cells, count = tile // stride, len(starts)
    centres = torch.arange(cells, dtype=torch.float64, device="cpu") + 0.5
    raw = []
    for index, start in enumerate(starts):
        weight = torch.ones(cells, dtype=torch.float64, device="cpu")
        if index > 0:
            shared = (starts[index - 1] + tile - start) / stride
            weight = torch.minimum(weight, centres / shared)
        if index < count - 1:
            shared = (start + tile - starts[index + 1]) / stride
            weight = torch.minimum(weight, (cells - centres) / shared)
        raw.append(weight)
    total = torch.zeros(length // stride, dtype=torch.float64, device="cpu")
    for start, weight in zip(starts, raw, strict=True):
        total[start // stride : start // stride + cells] += weight
    return tuple(
        (weight / total[start // stride : start // stride + cells]).float()
        for start, weight in zip(starts, raw, strict=True)
    )


@functools.lru_cache(maxsize=32)
def _tile_weights(grid: TileGrid, stride: int) -> tuple[Tensor | None, ...]:
    """Per tile (row-major), its 2D weights (1, 1, cells, cells) at ``stride``, or ``None`` where
    they are all 1 (a tile that shares no cell with another), which then needs no product.
    On the CPU whatever device is current, so a model built on the meta device gets real ones;
    ordinary tensors even when first asked for under ``inference_mode`` (an engine), since the
    cache outlives it."""
    with torch.inference_mode(False):
        rows = axis_weights(grid.rows, grid.tile, grid.size[0], stride)
        columns = axis_weights(grid.columns, grid.tile, grid.size[1], stride)
        products = [row[:, None] * column[None, :] for row in rows for column in columns]
    return tuple(None if bool((both == 1).all()) else both[None, None] for both in products)


@dataclass(frozen=True)
class TileGrid:
    """The tiles of a whole working image of ``size`` = (height, width): square, of side ``tile``,
    neighbours sharing at least ``overlap`` pixels (``tile_starts`` along each axis), row-major.

    ``cut`` makes the backbone's batch of tiles; ``stitch`` turns one scale of its features back
    into the whole image's feature grid.
    """

    size: tuple[int, int]
    tile: int
    overlap: int

    @property
    def rows(self) -> tuple[int, ...]:
        """Start of each row of tiles, in pixels from the top."""
        return tile_starts(self.size[0], self.tile, self.overlap)

    @property
    def columns(self) -> tuple[int, ...]:
        """Start of each column of tiles, in pixels from the left."""
        return tile_starts(self.size[1], self.tile, self.overlap)

    @property
    def count(self) -> int:
        """Tiles per image."""
        return len(self.rows) * len(self.columns)

    def cut(self, images: Tensor) -> Tensor:
        """(N, C, height, width) -> (N * count, C, tile, tile): each image's tiles in a row,
        row-major, image after image."""
        tiles = [
            images[:, :, top : top + self.tile, left : left + self.tile]
            for top in self.rows
            for left in self.columns
        ]
        return torch.stack(tiles, dim=1).reshape(-1, images.shape[1], self.tile, self.tile)

    def stride(self, features: Tensor) -> int:
        """The stride (input pixels per cell) of ``cut``'s tiles' features (N * count, C, h, w).

        It must divide ``ALIGN``, so every tile starts on a whole cell of the whole grid.
        """
        height, width = int(features.shape[-2]), int(features.shape[-1])
        stride = self.tile // height if height else 0
        if stride == 0 or height != width or stride * height != self.tile or ALIGN % stride:
            raise FastFlowError(
                f"tiling needs backbone features at strides dividing {ALIGN} px, but a {self.tile}-px "
                f"tile gave a {height}x{width} grid; set tile 0 for this backbone or pick other layers"
            )
        return stride

    def stitch(self, features: Tensor) -> Tensor:
        """(N * count, C, h, w) features of ``cut``'s tiles -> (N, C, height / s, width / s), the
        whole image's grid at their stride ``s``: each tile weighted by its window (``axis_weights``),
        the weighted tiles summed where they overlap.

        Stitched along the columns within each row of tiles, then along the rows, from fixed
        slices: each cell of each tile is read once.
        """
        stride = self.stride(features)
        cells = self.tile // stride
        tiles = features.reshape(-1, self.count, *features.shape[1:])
        weighted = [
            tiles[:, index] if weight is None else tiles[:, index] * _like(weight, features)
            for index, weight in enumerate(_tile_weights(self, stride))
        ]
        per_row = len(self.columns)
        columns = [start // stride for start in self.columns]
        rows = [
            _stitch_axis(weighted[first : first + per_row], columns, cells, self.size[1] // stride, -1)
            for first in range(0, self.count, per_row)
        ]
        return _stitch_axis(rows, [start // stride for start in self.rows], cells, self.size[0] // stride, -2)


def _like(weight: Tensor, features: Tensor) -> Tensor:
    """``weight`` on ``features``' device and in its dtype; itself (no node in a trace) when it is."""
    if weight.device == features.device and weight.dtype == features.dtype:
        return weight
    return weight.to(device=features.device, dtype=features.dtype)


def _stitch_axis(parts: list[Tensor], starts: list[int], cells: int, length: int, dim: int) -> Tensor:
    """Weighted ``parts`` (``cells`` long along ``dim``, starting at ``starts``) summed into one
    tensor ``length`` long along ``dim``: cut where any part starts or ends, the parts covering
    each piece added, the pieces concatenated."""
    if len(parts) == 1:
        return parts[0]
    bounds = sorted({0, length, *starts, *(start + cells for start in starts)})
    pieces = []
    for low, high in itertools.pairwise(bounds):
        covering = [
            part.narrow(dim, low - start, high - low)
            for part, start in zip(parts, starts, strict=True)
            if start <= low and high <= start + cells
        ]
        pieces.append(functools.reduce(torch.add, covering))
    return torch.cat(pieces, dim)
