"""Migration from anomalib: a migrated model computes anomalib's anomaly maps and scores.

anomalib is a test-only dependency. Its flows and norms are perturbed away from their
initialisation (scales, offsets, LayerNorm affine, subnet weights) so that a tensor copied to
the wrong place, or a permutation read transposed, changes the output.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor

pytest.importorskip("anomalib")

from anomalib.models.image.fastflow.lightning_model import Fastflow
from support import perturb_trainable

from fastflow.core.errors import FastFlowError
from fastflow.estimator.anomalib_import import from_anomalib
from fastflow.model.config import get_config
from fastflow.model.scoring import anomaly_map, image_score

# The two backbone families anomalib supports, at the presets' sizes and flow settings.
BACKBONES = ["resnet18", "deit_base_distilled_patch16_384"]
_CASES: dict[str, dict[str, Any]] = {}


def _case(backbone: str) -> dict[str, Any]:
    """A perturbed anomalib Lightning module for ``backbone`` and its outputs on a fixed batch."""
    if backbone not in _CASES:
        preset = get_config(backbone)
        lightning = Fastflow(
            backbone=backbone,
            pre_trained=False,
            flow_steps=preset.flow_steps,
            conv3x3_only=preset.conv3x3_only,
            hidden_ratio=preset.hidden_ratio,
            pre_processor=Fastflow.configure_pre_processor(image_size=preset.input_size),
        )
        generator = torch.Generator().manual_seed(1)
        perturb_trainable(lightning.model, generator)
        images = torch.randn(2, 3, *preset.input_size, generator=generator)
        # One eval-mode pass (a ViT forward is seconds on CPU); hooks keep each flow's (z, log|J|).
        flow_outputs: list[tuple[Tensor, Tensor]] = []
        hooks = [
            block.register_forward_hook(lambda _module, _inputs, output: flow_outputs.append(output))
            for block in lightning.model.fast_flow_blocks
        ]
        with torch.no_grad():
            prediction = lightning.model.eval()(images)
        for hook in hooks:
            hook.remove()
        zs, log_jacobians = zip(*flow_outputs, strict=True)
        amap = prediction.anomaly_map
        assert amap.shape == (2, 1, *preset.input_size)
        assert amap.std() > 1e-3, "perturbed model gives a flat map: the comparison would not be sharp"
        _CASES[backbone] = {
            "lightning": lightning,
            "images": images,
            "zs": zs,
            "log_jacobians": log_jacobians,
            "anomaly_map": amap[:, 0],
            "pred_score": prediction.pred_score.flatten(),
        }
    return _CASES[backbone]


def _state_dict(backbone: str) -> dict[str, Tensor]:
    return dict(_case(backbone)["lightning"].model.state_dict())


def _write_checkpoint(lightning: Fastflow, path: Path) -> Path:
    """What Lightning's ModelCheckpoint writes for an anomalib module (minus trainer loop state)."""
    checkpoint: dict[str, Any] = {
        "epoch": 0,
        "global_step": 0,
        "pytorch-lightning_version": "2.5.0",
        "state_dict": lightning.state_dict(),  # model.* plus post_processor.* buffers
        "hparams_name": "kwargs",
        "hyper_parameters": dict(lightning.hparams),
    }
    lightning.on_save_checkpoint(checkpoint)  # anomalib's plain-data component configs
    torch.save(checkpoint, path)
    return path


@pytest.mark.parametrize("backbone", BACKBONES)
def test_migrated_model_matches_anomalib(backbone: str, tmp_path: Path) -> None:
    case = _case(backbone)
    # Lightning checkpoint: the config is inferred (hyper_parameters + tensor shapes) and, as
    # anomalib was run with the preset's settings, must come out as the preset (scored as anomalib
    # scores: the reference recipe's unblurred map and its maximum).
    model = from_anomalib(_write_checkpoint(case["lightning"], tmp_path / "fastflow.ckpt"))
    assert model.config == get_config(backbone)
    # Bare state dict + explicit config: the very same model (so one forward pass checks both).
    twin = from_anomalib(_state_dict(backbone), config=get_config(backbone))
    twin_state = twin.state_dict()
    assert twin.config == model.config and twin_state.keys() == model.state_dict().keys()
    for key, tensor in model.state_dict().items():
        assert torch.equal(tensor, twin_state[key]), key

    with torch.no_grad():
        # anomalib's model takes normalised tensors: they go straight to the backbone.
        zs, log_dets = model.flow(model.backbone(case["images"]))
    amap = anomaly_map(zs, model.config.input_size)
    scores = image_score(amap)

    for z, expected in zip(zs, case["zs"], strict=True):
        torch.testing.assert_close(z, expected, atol=1e-4, rtol=1e-4)
    for log_det, expected in zip(log_dets, case["log_jacobians"], strict=True):
        torch.testing.assert_close(log_det.flatten(1).sum(1), expected, atol=1e-2, rtol=1e-5)
    map_diff = (amap - case["anomaly_map"]).abs().max().item()
    score_diff = (scores - case["pred_score"]).abs().max().item()
    print(f"{backbone}: max |anomaly map diff| {map_diff:.2e}, max |image score diff| {score_diff:.2e}")
    assert map_diff < 1e-4
    assert score_diff < 1e-4


def test_missing_key_is_named() -> None:
    state = _state_dict("resnet18")
    key = "fast_flow_blocks.1.module_list.3.global_offset"
    del state[key]
    with pytest.raises(FastFlowError, match=re.escape(key)):
        from_anomalib(state, config=get_config("resnet18"))


def test_unused_key_is_named() -> None:
    state = _state_dict("resnet18")
    state["fast_flow_blocks.0.module_list.8.global_offset"] = torch.zeros(1, 64, 1, 1)
    with pytest.raises(FastFlowError, match=re.escape("fast_flow_blocks.0.module_list.8.global_offset")):
        from_anomalib(state, config=get_config("resnet18"))


def test_soft_permutation_is_rejected() -> None:
    state = _state_dict("resnet18")
    key = "fast_flow_blocks.2.module_list.0.w_perm"
    rotation = torch.linalg.qr(torch.randn(256, 256))[0]  # orthogonal, not a permutation
    state[key] = rotation.view(256, 256, 1, 1)
    with pytest.raises(FastFlowError, match=re.escape(key) + ".*not a channel permutation"):
        from_anomalib(state, config=get_config("resnet18"))


def test_mismatched_config_is_rejected() -> None:
    with pytest.raises(FastFlowError, match="shape"):  # preset is 3x3-only, this model is not
        from_anomalib(_state_dict("resnet18"), config=get_config("resnet18", conv3x3_only=False))


def test_state_dict_without_config_asks_for_one() -> None:
    with pytest.raises(FastFlowError, match=r"get_config\(BACKBONE, input_size"):
        from_anomalib(_state_dict("resnet18"))


class _NotAllowlisted:
    """Stands for objects Lightning may pickle into hyper_parameters (configs, transforms)."""


def test_unsafe_checkpoint_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "unsafe.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"transform": _NotAllowlisted()}}, path)
    with pytest.raises(FastFlowError, match=re.escape("torch.save(model.model.state_dict()")):
        from_anomalib(path)
