"""``input_size_for``: the training images' median aspect ratio at a pixel budget, sides in multiples of 32."""

from __future__ import annotations

import math

import pytest
import timm
import torch

from fastflow import FastFlowError
from fastflow.model.config import PRESETS, RECIPES, Recipe, input_size_for, median_aspect

BUDGET = 256 * 256


@pytest.mark.parametrize("side", [16, 256, 900, 1024])
def test_square_images_give_the_preset_square_exactly(side: int) -> None:
    # MVTec bottle (900x900) and every square dataset keep the paper's 256x256, so nothing changes.
    assert input_size_for([(side, side)] * 5, BUDGET) == (256, 256)
    for name, preset in PRESETS.items():
        height, width = preset.input_size
        assert input_size_for([(side, side)], height * width) == preset.input_size, name


def test_a_wide_photograph_keeps_its_proportions_at_the_same_pixel_count() -> None:
    # 460x1130: aspect 0.407 -> 163.3 x 401.3 exactly, rounded to multiples of 32.
    assert input_size_for([(460, 1130)], BUDGET) == (160, 416)
    assert input_size_for([(1130, 460)], BUDGET) == (416, 160)  # portrait: the transpose
    # Each side is the exact one rounded: within half a multiple of sqrt(pixels x aspect).
    aspect = 460 / 1130
    exact = (math.sqrt(BUDGET * aspect), math.sqrt(BUDGET / aspect))
    for side, ideal in zip(input_size_for([(460, 1130)], BUDGET), exact, strict=True):
        assert abs(side - ideal) <= 16


def test_mixed_sizes_take_the_median_aspect_ratio() -> None:
    sizes = [(100, 200), (100, 100), (100, 300)]  # aspects 1/2, 1, 1/3: the median is 1/2
    assert median_aspect(sizes) == pytest.approx(0.5)
    assert input_size_for(sizes, BUDGET) == (192, 352)  # 181.0 x 362.0, rounded
    # One odd image among many does not move it (a mean of the aspects would).
    assert input_size_for([(460, 1130)] * 9 + [(4000, 10)], BUDGET) == (160, 416)
    # 2:1 and 1:2 weigh alike (logarithms): the median of an even pair is the square.
    assert median_aspect([(100, 200), (200, 100)]) == pytest.approx(1.0)


def test_sides_are_rounded_to_the_nearest_multiple_and_never_below_it() -> None:
    assert input_size_for([(460, 1130)], BUDGET, multiple=16) == (160, 400)  # 163.3 x 401.3
    assert input_size_for([(460, 1130)], BUDGET, multiple=1) == (163, 401)
    assert input_size_for([(10, 1000)], BUDGET) == (32, 2560)  # 25.6 rounds up to the minimum 32
    assert input_size_for([(12, 12)], 100) == (32, 32)  # a budget below one multiple: one multiple


def test_tiny_images_are_shaped_like_large_ones() -> None:
    # Only the aspect ratio counts: 20x49 images get the input of 460x1130 ones.
    assert input_size_for([(20, 49)] * 3, BUDGET) == input_size_for([(460, 1130)], BUDGET)
    assert input_size_for([(1, 1)], BUDGET) == (256, 256)


def test_bad_arguments_are_one_line_errors() -> None:
    with pytest.raises(FastFlowError, match="image_sizes must be a non-empty list"):
        input_size_for([], BUDGET)
    with pytest.raises(FastFlowError, match="image_sizes"):
        input_size_for([(0, 10)], BUDGET)
    with pytest.raises(FastFlowError, match="pixels must be an integer >= 1"):
        input_size_for([(10, 10)], 0)
    with pytest.raises(FastFlowError, match="multiple"):
        input_size_for([(10, 10)], BUDGET, multiple=0)


@pytest.mark.parametrize("backbone", ["resnet18", "tf_efficientnet_lite0"])
def test_multiples_of_32_tile_every_stage_of_the_cnn_presets(backbone: str) -> None:
    """The docstring's reason for 32: stages 1-4 have strides 4..32, so every feature grid covers
    a 32-multiple input exactly; a side that is not a multiple of 16 leaves a stage-3 position
    partly on padding."""
    model = timm.create_model(backbone, pretrained=False, features_only=True, out_indices=(1, 2, 3, 4))
    assert model.feature_info.reduction() == [4, 8, 16, 32]
    height, width = input_size_for([(460, 1130)], BUDGET)
    with torch.no_grad():
        grids = [f.shape[2:] for f in model(torch.zeros(1, 3, height, width))]
        ragged = [f.shape[2:] for f in model(torch.zeros(1, 3, 168, 400))]  # 168 = 10.5 x 16
    assert [tuple(g) for g in grids] == [(height // s, width // s) for s in (4, 8, 16, 32)]
    assert ragged[2][0] == math.ceil(168 / 16) != 168 / 16


def test_the_improved_recipe_shapes_the_input_and_the_reference_keeps_the_preset() -> None:
    assert RECIPES["improved"].input_size_from_data is True and Recipe().input_size_from_data is True
    assert RECIPES["reference"].input_size_from_data is False
    assert Recipe.from_dict(RECIPES["reference"].to_dict()).input_size_from_data is False
    with pytest.raises(FastFlowError, match="input_size_from_data must be true or false"):
        Recipe(input_size_from_data="yes")  # type: ignore[arg-type]
