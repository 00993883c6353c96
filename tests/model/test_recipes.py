"""Recipes: the typed bundle of loss and scoring, its defaults, and where it is applied and saved."""

from __future__ import annotations

import dataclasses

import pytest

from fastflow import FastFlow, FastFlowError
from fastflow.model.config import RECIPES, FastFlowConfig, Recipe, get_recipe


def test_improved_recipe_is_the_default_and_reference_restores_the_paper_scoring():
    assert get_recipe(FastFlow().recipe) == RECIPES["improved"] == get_recipe("improved")
    improved, reference = RECIPES["improved"], RECIPES["reference"]
    # The improved recipe is the Recipe defaults: no second copy of its values anywhere.
    assert dataclasses.replace(improved, description="") == Recipe()
    assert (reference.exact_nll, reference.map_sigma, reference.score_top) == (False, 0.0, 0.0)
    assert get_recipe(FastFlow(recipe="reference").recipe) is reference
    own = Recipe("mine", exact_nll=False, map_sigma=2.0)
    assert FastFlow(recipe=own).recipe is own and get_recipe(own) is own
    # The architecture config holds no scoring settings.
    assert not {"score_top", "map_sigma", "exact_nll"} & {f.name for f in dataclasses.fields(FastFlowConfig)}


def test_recipe_round_trips_through_json():
    for recipe in RECIPES.values():
        assert Recipe.from_dict(recipe.to_dict()) == recipe
    with pytest.raises(FastFlowError, match="unknown Recipe keys"):
        Recipe.from_dict({"name": "x", "blur": 1})


def test_a_file_of_an_older_fastflow_keeps_the_training_it_was_made_with():
    older = RECIPES["improved"].to_dict()
    for key in ("lr_schedule", "batch_size", "step_budget"):
        del older[key]
    recipe = Recipe.from_dict(older)
    assert (recipe.lr_schedule, recipe.batch_size, recipe.step_budget) == ("constant", 32, None)
    assert (RECIPES["improved"].lr_schedule, RECIPES["improved"].step_budget) == ("cosine", 1000)


def test_unknown_recipe_names_the_valid_ones():
    with pytest.raises(FastFlowError, match="improved, reference"):
        _ = FastFlow(recipe="paper").config  # checked where the recipe is used: fit, or the lazy config


def test_map_blur_must_fit_inside_the_map():
    with pytest.raises(FastFlowError, match="map_sigma"):
        Recipe(map_sigma=-1.0)
    with pytest.raises(FastFlowError, match="map_sigma"):
        # radius 16 of sigma 4 reflects past the edge
        _ = FastFlow("resnet18", architecture={"input_size": (16, 64)}).config
    assert FastFlow("resnet18", architecture={"input_size": (17, 64)}).config.input_size == (17, 64)
    assert get_recipe(FastFlow().recipe).map_sigma == 4.0
    assert FastFlow(
        "resnet18", recipe="reference", architecture={"input_size": (16, 64)}
    ).config.input_size == (
        16,
        64,
    )
    with pytest.raises(FastFlowError, match="score_top"):
        Recipe(score_top=1.0)


def test_training_noise_must_be_a_non_negative_number_and_the_reference_has_none():
    assert RECIPES["reference"].feature_noise == RECIPES["reference"].pixel_noise == 0.0
    for name in ("feature_noise", "pixel_noise"):
        for bad in (-0.1, "0.1", True):
            with pytest.raises(FastFlowError, match=name):
                Recipe(**{name: bad})
    assert RECIPES["reference"].pixel_jpeg == 0
    for bad in (-1, 101, 80.0, True):
        with pytest.raises(FastFlowError, match="pixel_jpeg"):
            Recipe(pixel_jpeg=bad)
    with pytest.raises(FastFlowError, match="pixel_jpeg"):
        Recipe(pixel_noise=0.0, pixel_jpeg=75)  # the round trip is made on the noisy copy
    for bad in (0.0, 1.5, "0.5", True):
        with pytest.raises(FastFlowError, match="pixel_jpeg_share"):
            Recipe(pixel_jpeg=75, pixel_jpeg_share=bad)


def test_recipe_architecture_sets_context_options_that_detector_options_override():
    pooled = Recipe("pooled", architecture={"context_pool": 3, "positional_channels": 8})
    assert FastFlow("resnet18", recipe=pooled).config.context_pool == 3
    assert FastFlow("resnet18", recipe=pooled, architecture={"context_pool": 1}).config.context_pool == 1
    assert (
        FastFlow("resnet18", recipe=pooled, architecture={"context_pool": None}).config.positional_channels
        == 8
    )
    # A whole config is the user's model: the recipe does not edit it.
    assert FastFlow(FastFlowConfig("resnet18"), recipe=pooled).config.context_pool == 1
    assert RECIPES["reference"].architecture == {}
    # The improved default conditions the flows on position; the reference keeps the paper's model.
    assert FastFlow("resnet18").config.positional_channels == 16
    assert FastFlow("resnet18", recipe="reference").config.positional_channels == 0
    assert Recipe.from_dict(pooled.to_dict()) == pooled
    with pytest.raises(FastFlowError, match="architecture"):
        Recipe(architecture={"input_size": (64, 64)})  # a recipe gives context, not the model's size
    with pytest.raises(FastFlowError, match="context_pool"):
        Recipe(architecture={"context_pool": 4})
