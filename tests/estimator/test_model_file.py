"""Model files: round trip, atomic writes, and clear errors for wrong files."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from fastflow.core.errors import FastFlowError
from fastflow.estimator.model_file import FORMAT_VERSION, atomic_write, load_model, save_model
from fastflow.model.config import get_config
from fastflow.model.fastflow import FastFlowModel


@pytest.fixture
def model() -> FastFlowModel:
    net = FastFlowModel(get_config("resnet18", input_size=(72, 56), flow_steps=2), weights="random").eval()
    with torch.no_grad():
        for p in net.flows.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return net


def test_round_trip_is_exact_and_keeps_extra(model, tmp_path):
    path = save_model(tmp_path / "m.safetensors", model, {"threshold": -0.25})
    loaded, extra = load_model(path)
    assert extra == {"threshold": -0.25} and loaded.config == model.config
    x = torch.randn(2, 3, 72, 56)
    with torch.no_grad():
        for a, b in zip(model(x)[0], loaded(x)[0], strict=True):
            assert torch.equal(a, b)


def test_file_holds_no_pickle_and_names_its_format(model, tmp_path):
    path = save_model(tmp_path / "m.safetensors", model)
    header_size = int.from_bytes(path.read_bytes()[:8], "little")
    metadata = json.loads(path.read_bytes()[8 : 8 + header_size])["__metadata__"]
    assert metadata["format"] == "fastflow-model" and metadata["format_version"] == str(FORMAT_VERSION)
    assert json.loads(metadata["config"])["backbone"] == "resnet18"


def test_failed_write_keeps_previous_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")

    def fail(tmp):
        tmp.write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_write(target, fail)
    assert target.read_text() == "old" and list(tmp_path.iterdir()) == [target]


def test_corrupt_file(model, tmp_path):
    path = save_model(tmp_path / "m.safetensors", model)
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(FastFlowError, match="corrupt"):
        load_model(path)


def test_foreign_safetensors_and_other_format_version(model, tmp_path):
    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, str(foreign))
    with pytest.raises(FastFlowError, match="not a fastflow model file"):
        load_model(foreign)
    path = save_model(tmp_path / "m.safetensors", model)
    state = {k: v for k, v in __import__("safetensors.torch").torch.load_file(str(path)).items()}
    header_size = int.from_bytes(path.read_bytes()[:8], "little")
    metadata = json.loads(path.read_bytes()[8 : 8 + header_size])["__metadata__"]
    save_file(state, str(tmp_path / "v99.safetensors"), metadata={**metadata, "format_version": "99"})
    with pytest.raises(FastFlowError, match="format version 99"):
        load_model(tmp_path / "v99.safetensors")


def test_weights_that_do_not_fit_the_config(model, tmp_path):
    path = save_model(tmp_path / "m.safetensors", model)
    from safetensors.torch import load_file

    header_size = int.from_bytes(path.read_bytes()[:8], "little")
    metadata = json.loads(path.read_bytes()[8 : 8 + header_size])["__metadata__"]
    config = json.loads(metadata["config"])
    config["flow_steps"] = 3  # the file holds 2 steps per flow
    save_file(
        load_file(str(path)),
        str(tmp_path / "bad.safetensors"),
        metadata={**metadata, "config": json.dumps(config)},
    )
    with pytest.raises(FastFlowError, match="do not fit its config"):
        load_model(tmp_path / "bad.safetensors")


def test_missing_file_points_to_train(tmp_path):
    with pytest.raises(FastFlowError, match="does not exist"):
        load_model(tmp_path / "nothing.safetensors")


def test_files_from_before_feature_noise_and_shaped_inputs_read_as_trained_without_them(model, tmp_path):
    recipe = {"name": "improved", "exact_nll": True, "map_sigma": 4.0, "score_top": 0.001, "description": ""}
    path = save_model(tmp_path / "m.safetensors", model, {"recipe": recipe})
    _, extra = load_model(path)
    assert extra["recipe"] == {
        **recipe,
        "feature_noise": 0.0,
        "pixel_noise": 0.0,
        "pixel_jpeg": 0,
        "input_size_from_data": False,  # trained at the preset's size (its config holds the size)
    }
    saved = {
        "recipe": {
            **recipe,
            "feature_noise": 0.3,
            "pixel_noise": 2.0,
            "pixel_jpeg": 75,
            "input_size_from_data": True,
        }
    }
    assert load_model(save_model(tmp_path / "n.safetensors", model, saved))[1] == saved


def test_tiling_survives_the_round_trip_and_files_from_before_it_load_untiled(model, tmp_path):
    config = get_config("resnet18", input_size=(96, 160), flow_steps=2, tile=64, tile_overlap=32)
    tiled = FastFlowModel(config, weights="random").eval()
    loaded, _ = load_model(save_model(tmp_path / "tiled.safetensors", tiled))  # built on the meta device
    assert loaded.config == config and loaded.tiles == tiled.tiles
    x = torch.randint(0, 256, (2, 3, 100, 150), dtype=torch.uint8)
    with torch.no_grad():
        for a, b in zip(tiled(x)[0], loaded(x)[0], strict=True):
            assert torch.equal(a, b)
    # A file written before tiling existed: no tile fields in its config.
    path = save_model(tmp_path / "old.safetensors", model)
    header = json.loads(path.read_bytes()[8 : 8 + int.from_bytes(path.read_bytes()[:8], "little")])
    metadata = header["__metadata__"]
    fields = json.loads(metadata["config"])
    assert fields.pop("tile") == 0 and fields.pop("tile_overlap") == 0
    save_file(load_file(str(path)), str(path), metadata={**metadata, "config": json.dumps(fields)})
    old, _ = load_model(path)
    assert old.config == model.config and old.tiles is None
