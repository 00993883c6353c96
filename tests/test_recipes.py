"""Recipes: the improved defaults and the selectable reference recipe."""

from __future__ import annotations

import dataclasses

import pytest

from fastflow import FastFlow, FastFlowError, TrainConfig
from fastflow.presets import PRESETS, RECIPES, FastFlowConfig, get_config


def test_improved_recipe_is_the_default_and_reference_restores_the_paper_scoring():
    for name, preset in PRESETS.items():
        assert get_config(name) == preset  # presets carry the improved recipe's values
    defaults = FastFlowConfig("x")
    assert {k: getattr(defaults, k) for k in RECIPES["improved"].model} == RECIPES["improved"].model
    for name in PRESETS:
        reference = get_config(name, "reference")
        assert (reference.score_top, reference.map_sigma) == (0.0, 0.0)  # the unblurred map's maximum
        assert dataclasses.replace(reference, **RECIPES["improved"].model) == PRESETS[name]
    # explicit overrides win over the recipe
    assert get_config("resnet18", "reference", score_top=0.05).score_top == 0.05


def test_recipe_fills_only_unset_training_fields():
    assert FastFlow().training.exact_nll is True
    assert FastFlow(recipe="reference").training.exact_nll is False
    assert FastFlow(recipe="reference", training=TrainConfig(exact_nll=True)).training.exact_nll is True
    assert FastFlow(training=TrainConfig(max_epochs=5)).training == TrainConfig(max_epochs=5, exact_nll=True)


def test_unknown_recipe_names_the_valid_ones():
    with pytest.raises(FastFlowError, match="improved, reference"):
        FastFlow(recipe="paper")


def test_map_blur_must_fit_inside_the_map():
    with pytest.raises(ValueError, match="map_sigma"):
        FastFlowConfig("x", map_sigma=-1.0)
    with pytest.raises(ValueError, match="map_sigma"):
        FastFlowConfig("x", input_size=(16, 64), map_sigma=4.0)  # radius 16 reflects past the edge
    assert FastFlowConfig("x", input_size=(17, 64), map_sigma=4.0).map_sigma == 4.0
