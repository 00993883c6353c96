"""Tiling: the tile grid, the stitching of tile features, the tiled model and its seams."""

from __future__ import annotations

import dataclasses
import itertools
from pathlib import Path

import pytest
import torch
from support import perturb_trainable, tile_seam_ratio
from torch.nn import functional as F

from fastflow.core.errors import FastFlowError
from fastflow.model.config import FastFlowConfig, get_config
from fastflow.model.fastflow import FastFlowModel
from fastflow.model.tiling import ALIGN, TileGrid, axis_weights, tile_starts

pytestmark = pytest.mark.usefixtures("one_thread")

# ------------------------------------------------------------------------------------ tile grid


def test_tile_starts_cover_with_the_overlap_asked_with_the_fewest_tiles():
    for length in range(32, 1024 + 1, 32):
        for tile in range(32, length + 1, 32):
            for overlap in range(0, tile, 32):
                starts = tile_starts(length, tile, overlap)
                case = (length, tile, overlap, starts)
                assert starts[0] == 0 and starts[-1] + tile == length, case
                assert all(start % ALIGN == 0 for start in starts), case
                shared = [a + tile - b for a, b in itertools.pairwise(starts)]
                assert all(overlap <= width < tile for width in shared), (
                    case
                )  # covered, overlap kept, no repeat
                # One tile fewer cannot cover the length with that overlap.
                fewer = len(starts) - 1
                assert fewer == 0 or fewer * tile - (fewer - 1) * overlap < length, case


def test_tile_starts_spread_evenly():
    assert tile_starts(256, 256, 0) == (0,)
    assert tile_starts(256, 64, 0) == (0, 64, 128, 192)
    assert tile_starts(480, 256, 64) == (0, 128, 224)
    assert tile_starts(1184, 256, 64) == (0, 192, 384, 544, 736, 928)
    # The shared strips differ by at most one 32-px step.
    widths = {a + 256 - b for a, b in itertools.pairwise(tile_starts(1184, 256, 64))}
    assert max(widths) - min(widths) <= ALIGN


@pytest.mark.parametrize(
    ("length", "tile", "overlap"), [(256, 300, 0), (256, 64, 64), (250, 64, 0), (256, 64, 16)]
)
def test_tile_starts_refuse_sizes_off_the_grid(length, tile, overlap):
    with pytest.raises(ValueError, match="multiples of 32"):
        tile_starts(length, tile, overlap)


@pytest.mark.parametrize(
    ("length", "tile", "overlap", "stride"), [(256, 64, 32, 4), (480, 128, 96, 8), (224, 96, 0, 16)]
)
def test_axis_weights_sum_to_one_ramp_at_shared_edges_and_stay_one_at_borders(length, tile, overlap, stride):
    starts = tile_starts(length, tile, overlap)
    weights = axis_weights(starts, tile, length, stride)
    total = torch.zeros(length // stride)
    for start, weight in zip(starts, weights, strict=True):
        total[start // stride : start // stride + tile // stride] += weight
    torch.testing.assert_close(total, torch.ones_like(total), rtol=0, atol=1e-6)
    assert weights[0][0] == 1 and weights[-1][-1] == 1  # the image's own borders
    for index, (start, weight) in enumerate(zip(starts, weights, strict=True)):
        if index + 1 < len(starts) and starts[index + 1] < start + tile:  # shares its end: falls towards it
            assert weight[-1] < weight[-2] < 1 and weight[-1] > 0


# ------------------------------------------------------------------------------------ stitching


@pytest.mark.parametrize(
    ("size", "tile", "overlap"), [((96, 160), 64, 32), ((128, 128), 128, 0), ((160, 224), 128, 96)]
)
def test_constant_tile_features_stitch_to_that_constant(size, tile, overlap):
    grid = TileGrid(size, tile, overlap)
    for stride in (4, 16):
        features = torch.full((2 * grid.count, 3, tile // stride, tile // stride), 3.25)
        stitched = grid.stitch(features)
        assert stitched.shape == (2, 3, size[0] // stride, size[1] // stride)
        torch.testing.assert_close(stitched, torch.full_like(stitched, 3.25), rtol=1e-6, atol=0)


@pytest.mark.parametrize("stride", [1, 4, 32])
def test_a_shift_equivariant_backbone_stitches_to_its_whole_image_features(stride):
    """Average pooling at ``stride`` has no padding: its features of each tile are exactly those of
    the whole image there, so cutting, pooling and stitching must give the whole image's pooling
    (each tile in its place, each cell's weights summing to 1)."""
    grid = TileGrid((160, 224), 96, 64)
    images = torch.randn(2, 3, 160, 224)
    tiles = grid.cut(images)
    assert tiles.shape == (2 * grid.count, 3, 96, 96)
    torch.testing.assert_close(
        tiles[grid.count + 1], images[1, :, 0:96, grid.columns[1] : grid.columns[1] + 96]
    )
    stitched = grid.stitch(F.avg_pool2d(tiles, stride))
    torch.testing.assert_close(stitched, F.avg_pool2d(images, stride), rtol=0, atol=1e-5)


def test_features_on_strides_that_do_not_divide_32_are_refused():
    grid = TileGrid((128, 128), 64, 32)
    with pytest.raises(FastFlowError, match="strides dividing 32"):
        grid.stitch(torch.zeros(grid.count, 4, 5, 5))


# ------------------------------------------------------------------------------------ the tiled model


def _model(
    size: tuple[int, int], tile: int = 0, overlap: int = 0, backbone: str = "resnet18"
) -> FastFlowModel:
    config = get_config(backbone, input_size=size, flow_steps=2, tile=tile, tile_overlap=overlap)
    return FastFlowModel(config, "random").eval()


def test_one_tile_of_the_whole_input_is_the_untiled_model_bit_for_bit():
    untiled, tiled = _model((96, 96)), _model((96, 96), tile=96)
    tiled.load_state_dict(untiled.state_dict())
    pixels = torch.randint(0, 256, (2, 3, 100, 90), dtype=torch.uint8)
    with torch.no_grad():
        for a, b in zip(
            untiled(pixels)[0] + untiled.extract(pixels),
            tiled(pixels)[0] + tiled.extract(pixels),
            strict=True,
        ):
            assert torch.equal(a, b)


def test_the_flows_see_the_whole_image_grid():
    model = _model((96, 160), tile=64, overlap=32)
    assert (model.tiles.rows, model.tiles.columns) == ((0, 32), (0, 32, 64, 96))
    assert model.feature_shapes == [(64, 24, 40), (128, 12, 20), (256, 6, 10)]
    with torch.no_grad():
        features = model.extract(torch.randint(0, 256, (3, 3, 100, 170), dtype=torch.uint8))
    assert [tuple(f.shape) for f in features] == [(3, *shape) for shape in model.feature_shapes]


def test_a_transformer_backbone_cannot_be_tiled():
    with pytest.raises(FastFlowError, match="CNN backbone") as error:
        _model((384, 384), tile=192, backbone="deit_base_distilled_patch16_384")
    assert "\n" not in str(error.value) and "tile 0" in str(error.value)


@pytest.mark.parametrize(
    ("fields", "names"),
    [
        ({"tile": 100}, ["tile", "multiple of 32", "100"]),
        ({"tile": 16}, ["tile", "multiple of 32"]),
        ({"tile": -32}, ["tile", "multiple of 32"]),
        ({"tile": 64, "tile_overlap": 48}, ["tile_overlap", "multiple of 32"]),
        ({"tile": 64, "tile_overlap": 64}, ["tile_overlap", "below tile"]),
        ({"tile_overlap": 32}, ["tile_overlap", "without tiling"]),
        ({"tile": 320}, ["tile", "at most each side", "(256, 512)"]),
        ({"tile": 64, "input_size": (250, 512)}, ["input_size", "multiples of 32", "(256, 512)"]),
    ],
)
def test_bad_tiling_settings_are_one_line_errors(fields, names):
    with pytest.raises(FastFlowError) as error:
        FastFlowConfig("resnet18", **{"input_size": (256, 512), **fields})
    message = str(error.value)
    assert "\n" not in message
    for name in names:
        assert name in message, (name, message)


# ------------------------------------------------------------------------------------ seams

SEAM_SIZE = (256, 384)  # 2 x 3 tiles of 128 px without overlap: hard edges on every border
SEAM_BOUND = 0.25


def _seam_ratio(weights: Path, overlap: int) -> float:
    """``support.tile_seam_ratio`` of 128-px tiles with ``overlap`` on a uniform grey image, the
    scale a fine uniform noise texture's map; pretrained Lite0 features (a random backbone's
    padding effects are not a real one's), flows perturbed to look trained."""
    config = get_config("tf_efficientnet_lite0", input_size=SEAM_SIZE, flow_steps=2)
    untiled = FastFlowModel(config, weights).eval()
    tiled = FastFlowModel(dataclasses.replace(config, tile=128, tile_overlap=overlap), weights).eval()
    perturb_trainable(untiled, torch.Generator().manual_seed(1))
    tiled.load_state_dict(untiled.state_dict())
    generator = torch.Generator().manual_seed(1)
    texture = (108 + 40 * torch.rand(1, 3, *SEAM_SIZE, generator=generator)).round().to(torch.uint8)
    grey = torch.full((1, 3, *SEAM_SIZE), 128, dtype=torch.uint8)
    return tile_seam_ratio(untiled, tiled, grey, texture)


def test_blended_tiles_leave_no_seam_and_hard_edged_ones_do(lite0_weights):
    """The acceptance bound: within 4 px of tile borders the map strays from the untiled map by
    at most ``SEAM_BOUND`` of a normal map's spread with 64 px overlaps blended (measured 0.071;
    0.068-0.073 over the flows of seeds 0-3), and the same tiles with hard edges (no overlap)
    break it many times over (measured 1.41; 1.27-1.41)."""
    assert _seam_ratio(lite0_weights, overlap=64) <= SEAM_BOUND
    assert _seam_ratio(lite0_weights, overlap=0) > SEAM_BOUND
