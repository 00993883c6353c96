"""``fit`` shapes a CNN's input to the training images' aspect ratio at the preset's pixel count,
unless the recipe, the user or a given config says otherwise; the size travels with the model."""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

import pytest
import torch

from fastflow import FastFlow, TrainConfig
from fastflow.apps.synthetic import make_textures
from fastflow.estimator.data import DataError
from fastflow.model.config import FastFlowConfig, get_config

pytestmark = pytest.mark.usefixtures("one_thread")

# 46x113 (height x width): the aspect of a 460x1130 photograph, at 65,536 pixels 160x416.
WIDE = (46, 113)
WIDE_INPUT = (160, 416)


def _detector(backbone: str | FastFlowConfig = "resnet18", **params: Any) -> FastFlow:
    architecture = params.pop("architecture", {"flow_steps": 2})
    training = TrainConfig(max_epochs=1, batch_size=4)
    return FastFlow(backbone, weights="random", training=training, architecture=architecture, **params)


def _test_images(root: Path) -> list[Path]:
    return sorted((root / "test" / "good").iterdir())


@pytest.fixture(scope="module")
def wide(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("aspect") / "wide"
    return make_textures(root, n_train=6, n_test_good=2, n_test_defect=1, size=WIDE)


@pytest.fixture(scope="module")
def fitted(wide: Path) -> FastFlow:
    return _detector().fit(wide)


def test_fit_on_wide_images_picks_a_wide_input_at_the_preset_pixel_count(
    wide: Path, caplog: pytest.LogCaptureFixture
) -> None:
    detector = _detector()
    assert detector.config.input_size == (256, 256)  # before fit, no image seen: the preset's
    assert detector.config_for(wide).input_size == WIDE_INPUT
    with caplog.at_level(logging.INFO, logger="fastflow"):
        detector.fit(wide)
    assert detector.config_.input_size == detector.model_.config.input_size == WIDE_INPUT
    assert detector.config == detector.config_for(wide)  # what fit built is what config_for said
    assert detector.config_.flow_steps == 2  # the other given fields still apply
    notes = [r.getMessage() for r in caplog.records if r.getMessage().startswith("input ")]
    assert notes == [
        (
            "input 160x416: the training images' median aspect (height/width) 0.41 at the preset's 65,536 pixels; "
            "input_size (--input-size) overrides"
        )
    ]
    assert detector.anomaly_map(_test_images(wide)).shape == (2, *WIDE_INPUT)


def test_square_images_keep_the_preset_size(tmp_path: Path) -> None:
    root = make_textures(tmp_path / "square", n_train=3, n_test_good=1, n_test_defect=1, size=(90, 90))
    assert (
        _detector().config_for(root)
        == _detector().config
        == get_config("resnet18", flow_steps=2, positional_channels=16)
    )


def test_the_reference_recipe_keeps_the_preset_size(wide: Path) -> None:
    assert _detector(recipe="reference").config_for(wide).input_size == (256, 256)


def test_a_given_input_size_wins(wide: Path) -> None:
    detector = _detector(architecture={"input_size": (64, 64), "flow_steps": 2}).fit(wide)
    assert detector.config_.input_size == (64, 64)
    # None means "not given", as for every architecture field.
    assert _detector(architecture={"input_size": None}).config_for(wide).input_size == WIDE_INPUT


def test_a_given_config_and_a_transformer_are_used_as_they_are(wide: Path) -> None:
    config = FastFlowConfig("resnet18", input_size=(96, 96), flow_steps=2)
    assert _detector(config, architecture=None).config_for(wide) == config
    # A vision transformer's input is its patch grid's: the preset's square.
    vit = FastFlow("deit_base_distilled_patch16_384", weights="random")
    assert vit.config_for(wide).input_size == (384, 384)


def test_saved_and_loaded_model_keeps_the_shaped_size(fitted: FastFlow, wide: Path, tmp_path: Path) -> None:
    loaded = FastFlow.load(fitted.save(tmp_path / "model.safetensors"))
    assert loaded.config == fitted.config_ and loaded.config.input_size == WIDE_INPUT
    assert loaded.recipe_.input_size_from_data is True
    images = _test_images(wide)
    torch.testing.assert_close(
        torch.from_numpy(loaded.decision_function(images)), torch.from_numpy(fitted.decision_function(images))
    )


def test_a_refit_on_images_of_another_aspect_keeps_the_backbone(fitted: FastFlow, tmp_path: Path) -> None:
    """Without weights a refit reuses the backbone it holds (a CNN's weights fit any input size),
    rather than reaching for the model hub."""
    tall = make_textures(tmp_path / "tall", n_train=4, n_test_good=1, n_test_defect=1, size=(113, 46))
    detector = copy.deepcopy(fitted).set_params(weights=None).fit(tall)
    assert detector.config_.input_size == (416, 160)
    for key, value in fitted.model_.backbone.state_dict().items():
        assert torch.equal(detector.model_.backbone.state_dict()[key], value), key


def test_an_unreadable_image_is_named_before_any_training(wide: Path, tmp_path: Path) -> None:
    root = tmp_path / "broken"
    root.mkdir()
    for image in sorted((wide / "train" / "good").iterdir())[:3]:
        (root / image.name).write_bytes(image.read_bytes())
    (root / "zz_bad.png").write_bytes(b"not an image at all")
    for call in (_detector().config_for, _detector().fit):
        with pytest.raises(DataError, match=r"corrupt image .*zz_bad\.png"):
            call(root)


def test_tiles_without_an_input_size_see_the_images_at_their_own_size(tmp_path: Path) -> None:
    """100x250 images: their own size rounded to 32 is 96x256, not the 160x416 pixel budget; the
    reference recipe, which keeps the preset's size untiled, tiles them at their size too."""
    root = make_textures(tmp_path / "big", n_train=5, n_test_good=1, n_test_defect=1, size=(100, 250))
    tiled = {"flow_steps": 2, "tile": 64, "tile_overlap": 32}
    for recipe in ("improved", "reference"):
        detector = _detector(architecture=tiled, recipe=recipe)
        assert detector.config.input_size == (64, 64)  # before fit: one tile
        assert detector.config_for(root).input_size == (96, 256)
    small = make_textures(tmp_path / "small", n_train=5, n_test_good=1, n_test_defect=1, size=(40, 200))
    assert _detector(architecture=tiled).config_for(small).input_size == (64, 192)  # at least a tile high
