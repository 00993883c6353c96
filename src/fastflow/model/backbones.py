"""Frozen pretrained feature extractors built from timm.

CNNs go through timm's ``features_only`` wrapper (any timm CNN, any stage indices); vision
transformers through ``forward_intermediates`` (tokens of chosen blocks after the final norm,
reshaped to a grid). Channels and input normalisation come from timm, never from a table.

Weights come from one of three places, chosen explicitly:
- ``None``: timm's pretrained weights from the model hub (needs network or a warm cache);
- a path: a local safetensors file or a ``.pth`` state dict (loaded with ``weights_only=True``);
- ``"random"``: random initialisation, for tests only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

import timm
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import resample_abs_pos_embed
from torch import Tensor, nn
from torch.nn import functional as F

from fastflow.core.errors import FastFlowError, first_line
from fastflow.core.files import read_tensor_file

__all__ = ["RANDOM_WEIGHTS", "Backbone", "is_transformer", "load_state_dict_file"]

RANDOM_WEIGHTS = "random"

# timm modules whose models are plain token transformers with a patch grid.
_TRANSFORMER_MODULES = ("vision_transformer", "deit", "cait", "beit", "eva", "vision_transformer_relpos")


def is_transformer(name: str) -> bool:
    """Whether timm model ``name`` is a vision transformer (features from token grids)."""
    return timm.models.is_model_in_modules(name, _TRANSFORMER_MODULES)


def load_state_dict_file(path: Path) -> dict[str, Tensor]:
    """Read a safetensors or ``.pth`` state dict without unpickling arbitrary objects."""
    state = read_tensor_file(Path(path), "pass a valid .safetensors or state-dict .pth weights file")
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise FastFlowError(
            f"weights file {path} holds no state dict of tensors; save model.state_dict() instead"
        )
    return state


class Backbone(nn.Module):
    """A frozen timm backbone returning a list of (N, C, h, w) feature maps.

    Always in eval mode (``train()`` leaves it in eval) so batch-norm statistics never drift.
    """

    def __init__(
        self,
        name: str,
        layers: tuple[int, ...],
        input_size: tuple[int, int],
        weights: str | Path | None = None,
    ) -> None:
        super().__init__()
        if not timm.is_model(name):
            raise FastFlowError(f"unknown backbone '{name}'; pick a timm model name (see timm.list_models())")
        self.name = name
        self.layers = tuple(layers)
        self.transformer = is_transformer(name)
        self.model = self._create(name, weights, input_size)
        self.model.requires_grad_(False)
        self.model.eval()
        config = cast("dict[str, Any]", self.model.pretrained_cfg)  # timm sets it on every model
        self.mean = tuple(float(v) for v in config.get("mean", IMAGENET_DEFAULT_MEAN))
        self.std = tuple(float(v) for v in config.get("std", IMAGENET_DEFAULT_STD))

    def _create(self, name: str, weights: str | Path | None, input_size: tuple[int, int]) -> nn.Module:
        kwargs: dict = {}
        if self.transformer:
            # A transformer sees the image resized to the nearest whole number of patches, so the
            # token grid covers exactly the input's field of view and maps upsample back aligned.
            with torch.device("meta"):  # shapes only: no memory, no slow weight init
                # Any: timm's transformers are different classes, all with a patch_embed.
                vit: Any = timm.create_model(name, pretrained=False)
                patch = vit.patch_embed.patch_size
            self.token_input_size = tuple(
                max(step, round(size / step) * step) for size, step in zip(input_size, patch)
            )
            kwargs = {"img_size": self.token_input_size}
        else:
            kwargs = {"features_only": True, "out_indices": self.layers}
        if weights is None:
            try:
                return timm.create_model(name, pretrained=True, **kwargs)
            except Exception as error:  # noqa: BLE001 - hub/network errors come in many types
                raise FastFlowError(
                    f"no pretrained weights for backbone '{name}': the model hub failed ({first_line(error)[:120]}); "
                    "connect to the hub (or warm its cache), or pass a local weights file with --weights FILE"
                ) from None
        model = timm.create_model(name, pretrained=False, **kwargs)
        if str(weights) != RANDOM_WEIGHTS:
            self._load_local(model, Path(weights), name)
        return model

    def _load_local(self, model: nn.Module, path: Path, name: str) -> None:
        state = _match_key_layout(load_state_dict_file(path), name)
        if self.transformer and "pos_embed" in state and state["pos_embed"].shape != model.pos_embed.shape:
            prefix = 0 if getattr(model, "no_embed_class", False) else model.num_prefix_tokens
            vit: Any = model  # a timm transformer: its patch_embed has a grid_size
            state["pos_embed"] = resample_abs_pos_embed(
                state["pos_embed"], vit.patch_embed.grid_size, num_prefix_tokens=prefix
            )
        own = model.state_dict()
        # Batch-norm step counters carry no weights; files written without them are fine.
        state = {**{k: v for k, v in own.items() if k.endswith("num_batches_tracked")}, **state}
        missing = [k for k in own if k not in state]
        wrong = [k for k in own if k in state and state[k].shape != own[k].shape]
        if missing or wrong:
            example = (missing or wrong)[0]
            raise FastFlowError(
                f"weights file {path} does not fit backbone '{name}' ({len(missing)} missing and {len(wrong)} "
                f"mis-shaped tensors, e.g. '{example}'); pass the weights of '{name}' or change --backbone"
            )
        model.load_state_dict({k: state[k] for k in own})

    def train(self, mode: bool = True) -> Backbone:
        """Keep the frozen backbone in eval mode whatever the parent module does."""
        return super().train(False)

    def forward(self, images: Tensor) -> list[Tensor]:
        """``images`` (N, 3, H, W), normalised -> one (N, C, h, w) map per requested layer."""
        if self.transformer:
            if tuple(images.shape[-2:]) != self.token_input_size:
                images = F.interpolate(images, self.token_input_size, mode="bilinear", align_corners=False)
            vit: Any = self.model  # timm's transformers have forward_intermediates
            return vit.forward_intermediates(
                images, indices=list(self.layers), norm=True, stop_early=True, intermediates_only=True
            )
        # Channels-last input: oneDNN's convolutions run it faster on CPU (measured:
        # docs/measurements.md#channels-last).
        return self.model(images.contiguous(memory_format=torch.channels_last))


def _match_key_layout(state: dict[str, Tensor], name: str) -> dict[str, Tensor]:
    """Rename a state dict saved under other key names but in timm's tensor order.

    Some weight packages (e.g. the PyPI package of EfficientNet-Lite0) store exactly timm's
    tensors, in timm's order, under their own names. When the names do not match but the
    sequence of shapes does, the keys are renamed one to one; otherwise ``state`` is returned
    unchanged and the caller's fit check reports the mismatch.
    """
    with torch.device("meta"):  # names and shapes only
        reference = timm.create_model(name, pretrained=False).state_dict()
    ours = [k for k in state if not k.endswith("num_batches_tracked")]
    theirs = [k for k in reference if not k.endswith("num_batches_tracked")]
    if set(theirs) <= set(ours):
        return state
    if len(ours) != len(theirs) or any(state[a].shape != reference[b].shape for a, b in zip(ours, theirs)):
        return state
    return {b: state[a] for a, b in zip(ours, theirs)}
