"""Import FastFlow models trained with anomalib.

anomalib's ``FastflowModel`` and ours compute the same function (same timm backbone, same
LayerNorms, FrEIA ``AllInOneBlock`` steps that ``CouplingStep`` reproduces), so migrating is a
renaming of tensors plus one conversion: anomalib stores each step's channel permutation as a
(C, C, 1, 1) 0/1 matrix applied by ``conv2d`` (``out[i] = x[idx[i]]``), we store the indices.

Nothing is guessed silently: every tensor of the source must land in the model and every tensor
of the model must come from the source, with equal shapes; otherwise a ``FastFlowError`` names
one offending key. Files are read with ``weights_only=True`` so a checkpoint cannot run code.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import timm
import torch
from torch import Tensor

from fastflow.core.errors import FastFlowError
from fastflow.core.files import read_tensor_file
from fastflow.model.backbones import RANDOM_WEIGHTS, is_transformer
from fastflow.model.config import PRESETS, FastFlowConfig
from fastflow.model.fastflow import FastFlowModel

__all__ = ["from_anomalib"]

# The only backbones anomalib's FastFlow builds; it reads the features of their presets (CNN
# stages 1-3, or the tokens after block 7 of DeiT / 40 of CaiT and the final norm).
ANOMALIB_BACKBONES = ("resnet18", "wide_resnet50_2", "deit_base_distilled_patch16_384", "cait_m48_448")
# anomalib's constructor defaults for fields a checkpoint's hyper_parameters lack: the same as
# FastFlowConfig's defaults (not the presets', which follow the paper per backbone).
_ANOMALIB_FIELDS = ("flow_steps", "conv3x3_only", "hidden_ratio")
_ANOMALIB_CLAMP = 2.0  # create_fast_flow_block never changes FrEIA's affine clamping
_CONFIG_HINT = "pass config=get_config(BACKBONE, input_size=(H, W)) (CLI: --backbone/--input-size)"
_EXPORT_HINT = (
    "export the weights in anomalib (model = Fastflow.load_from_checkpoint(...); "
    "torch.save(model.model.state_dict(), 'fastflow_state.pth')) and pass that file with "
    "config=get_config(BACKBONE, input_size=(H, W))"
)


def from_anomalib(
    source: str | Path | Mapping[str, Tensor], config: FastFlowConfig | None = None
) -> FastFlowModel:
    """Build a ``FastFlowModel`` (eval mode) holding the weights of an anomalib FastFlow model.

    anomalib scores like the ``reference`` recipe: ``FastFlow.from_model(model, threshold,
    "reference")`` gives a detector with its anomaly maps.

    Args:
        source: a Lightning checkpoint (``.ckpt``, whose ``state_dict`` holds the model under
            ``model.``), or an anomalib ``FastflowModel`` state dict: a mapping, or a ``.pth`` /
            ``.safetensors`` file of one.
        config: the architecture; when ``None`` it is read from the checkpoint's
            ``hyper_parameters`` (a bare state dict carries none, so then it is required).
    """
    name = "the given state dict" if isinstance(source, Mapping) else str(source)
    state, hparams = _read(source, name)
    if config is None:
        config = _infer_config(state, hparams, name)
    _check_config(config, name)
    model = FastFlowModel(config, weights=RANDOM_WEIGHTS)
    model.load_state_dict(_translate(state, model.state_dict(), name))
    return model.eval()


def _read(source: str | Path | Mapping[str, Tensor], name: str) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The FastflowModel's tensors (``model.`` prefix removed) and the hyper-parameters, if any."""
    hparams: Any = {}
    if isinstance(source, Mapping):
        raw: Any = source
    else:
        raw = read_tensor_file(Path(source), _EXPORT_HINT)
    if isinstance(raw, Mapping) and isinstance(raw.get("state_dict"), Mapping):
        hparams = raw.get("hyper_parameters") or {}
        raw = raw["state_dict"]
    if not isinstance(raw, Mapping) or not all(isinstance(v, Tensor) for v in raw.values()):
        raise FastFlowError(f"{name} is not a state dict of tensors; {_EXPORT_HINT}")
    if not isinstance(hparams, Mapping):
        hparams = {}
    # A Lightning module holds the FastflowModel as `model`, next to pre/post-processor state.
    if any(k.startswith("model.") for k in raw):
        raw = {k.removeprefix("model."): v for k, v in raw.items() if k.startswith("model.")}
    if not any(k.startswith("fast_flow_blocks.") for k in raw):
        raise FastFlowError(f"{name} holds no anomalib FastFlow (no 'fast_flow_blocks.*'); {_EXPORT_HINT}")
    return dict(raw), dict(hparams)


def _infer_config(state: Mapping[str, Tensor], hparams: Mapping[str, Any], name: str) -> FastFlowConfig:
    """The config anomalib built its model with, from Lightning's saved init arguments.

    anomalib 2.x does not save the input size (it lives in the pre-processor), so it is derived
    from the model itself: a ViT only runs at its timm default size (anomalib never changes
    ``img_size``), and a CNN's first LayerNorm is (C, H / r, W / r) for stage reduction r.
    """
    backbone = hparams.get("backbone")
    if not isinstance(backbone, str):
        raise FastFlowError(f"{name} does not record its backbone; {_CONFIG_HINT}")
    if backbone not in ANOMALIB_BACKBONES:
        raise FastFlowError(
            f"{name} uses backbone '{backbone}', which anomalib's FastFlow does not build "
            f"({', '.join(ANOMALIB_BACKBONES)}); {_CONFIG_HINT}"
        )
    layers = PRESETS[backbone].layers
    input_size = hparams.get("input_size")
    if input_size is None:
        with torch.device("meta"):  # shapes only
            if is_transformer(backbone):
                vit: Any = timm.create_model(backbone, pretrained=False)  # a timm transformer
                input_size = vit.patch_embed.img_size
            elif "norms.0.weight" in state:
                # Any: a timm features_only wrapper, with its feature_info.
                cnn: Any = timm.create_model(
                    backbone, pretrained=False, features_only=True, out_indices=layers
                )
                reduction = cnn.feature_info.reduction()[0]
                input_size = tuple(int(n) * reduction for n in state["norms.0.weight"].shape[1:])
        if input_size is None:
            raise FastFlowError(f"cannot tell the input size of {name}; {_CONFIG_HINT}")
    defaults = {f.name: f.default for f in dataclasses.fields(FastFlowConfig)}
    fields = {k: hparams.get(k, defaults[k]) for k in _ANOMALIB_FIELDS}
    try:
        return FastFlowConfig(backbone, layers, tuple(input_size), clamp=_ANOMALIB_CLAMP, **fields)
    except (TypeError, ValueError) as error:
        raise FastFlowError(f"{name} records unusable hyper-parameters ({error}); {_CONFIG_HINT}") from None


def _check_config(config: FastFlowConfig, name: str) -> None:
    """Reject settings that change the function without changing any tensor shape."""
    expected = PRESETS[config.backbone].layers if config.backbone in ANOMALIB_BACKBONES else None
    if expected is not None and config.layers != expected:
        raise FastFlowError(
            f"anomalib's FastFlow reads layers {expected} of '{config.backbone}' but the config for {name} "
            f"has {config.layers}; pass config=get_config('{config.backbone}', ...) with layers={expected}"
        )
    if config.clamp != _ANOMALIB_CLAMP:
        raise FastFlowError(
            f"anomalib's FastFlow clamps with {_ANOMALIB_CLAMP} but the config for {name} has clamp="
            f"{config.clamp}; pass a config with clamp={_ANOMALIB_CLAMP}"
        )


def _anomalib_key(key: str) -> str:
    """The anomalib FastflowModel name of one of our state-dict keys."""
    if key.startswith("backbone.model."):
        return "feature_extractor." + key.removeprefix("backbone.model.")
    key = re.sub(r"^flows\.(\d+)\.steps\.(\d+)\.", r"fast_flow_blocks.\1.module_list.\2.", key)
    key = re.sub(r"\.inverse_permutation$", ".w_perm_inv", key)
    return re.sub(r"\.permutation$", ".w_perm", key)


def _permutation_indices(matrix: Tensor, key: str, name: str) -> Tensor:
    """Indices ``idx`` of a hard permutation matrix ``w[i, idx[i]] = 1`` stored as (C, C, 1, 1)."""
    square = matrix.dim() == 4 and matrix.shape[0] == matrix.shape[1] and tuple(matrix.shape[2:]) == (1, 1)
    w = matrix[:, :, 0, 0].float() if square else None
    if w is None or not (((w == 0) | (w == 1)).all() and (w.sum(0) == 1).all() and (w.sum(1) == 1).all()):
        raise FastFlowError(
            f"'{key}' in {name} is not a channel permutation matrix; only anomalib FastFlow's hard "
            "permutations (permute_soft=False, no householder reflections) can be migrated"
        )
    return w.argmax(dim=1)


def _translate(state: Mapping[str, Tensor], own: Mapping[str, Tensor], name: str) -> dict[str, Tensor]:
    """anomalib tensors renamed to our keys, all checked: none unused, none missing, shapes equal."""
    sources = {_anomalib_key(k): k for k in own}
    unused = [k for k in state if k not in sources]
    if unused:
        householder = [k for k in unused if k.endswith(("vk_householder", "w_0"))]
        if householder:
            raise FastFlowError(
                f"{name} uses learned householder permutations ('{householder[0]}'), which FastFlow "
                "does not support; only anomalib FastFlow's hard permutations can be migrated"
            )
        raise FastFlowError(
            f"{name} has {len(unused)} tensors this model has no place for, e.g. '{unused[0]}'; "
            "the config differs from the anomalib model's; pass the matching "
            "config=get_config(BACKBONE, input_size=(H, W), flow_steps=...)"
        )
    # Batch-norm step counters carry no weights; a source without them is fine.
    missing = [a for a, k in sources.items() if a not in state and not k.endswith("num_batches_tracked")]
    if missing:
        raise FastFlowError(
            f"{name} lacks {len(missing)} tensors of the model, e.g. '{missing[0]}'; pass the complete "
            "anomalib FastflowModel state dict and a config matching it (backbone, flow_steps, ...)"
        )
    out = {k: v for k, v in own.items() if k.endswith("num_batches_tracked")}
    for anomalib_key, key in sources.items():
        if anomalib_key not in state:
            continue
        tensor = state[anomalib_key]
        if key.endswith("permutation"):
            tensor = _permutation_indices(tensor, anomalib_key, name)
        if tensor.shape != own[key].shape:
            raise FastFlowError(
                f"'{anomalib_key}' in {name} has shape {tuple(tensor.shape)} but the model built from the "
                f"config needs {tuple(own[key].shape)}; the config differs from the anomalib model's "
                "(check input_size, flow_steps, conv3x3_only, hidden_ratio)"
            )
        out[key] = tensor
    for key, inverse in out.items():
        if key.endswith(".inverse_permutation"):
            forward = out[key.removesuffix("inverse_permutation") + "permutation"]
            if not torch.equal(inverse, torch.argsort(forward)):
                raise FastFlowError(f"'{_anomalib_key(key)}' in {name} is not the inverse of its w_perm")
    return out
