"""The FastFlow model: pixels -> pre-processing -> frozen backbone -> per-scale norms -> one 2D flow per scale.

The context options of ``FastFlowConfig`` (neighbourhood average, scale fusion, positional
encoding; ``fastflow.model.context``) slot into this one pipeline, so training, inference and
the exports all run them.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import cast

import torch
from torch import Tensor, nn

from fastflow.core.errors import FastFlowError
from fastflow.model.backbones import Backbone, is_transformer
from fastflow.model.config import FastFlowConfig
from fastflow.model.context import fuse_to_finest, local_average, positional_encoding
from fastflow.model.flow import FlowStack
from fastflow.model.preprocess import Preprocess
from fastflow.model.tiling import TileGrid

__all__ = ["FastFlowModel"]


# The in-place form doubles a step's multiply-adds (about channels^2 x positions) to save a
# fixed cost per node, so it pays where steps are small and an engine has a cost per node:
# OpenVINO bf16 ran Lite0's flows (24 x 64^2, 40 x 32^2, 112 x 16^2 at 256 px: 1.6-3.2 M) faster
# in place, and ResNet-18's (64 x 64^2 and alike: 16.8 M each) slower (measured:
# docs/measurements.md#in-place-flows).
IN_PLACE_MAX_WORK = 2**23


class FastFlowModel(nn.Module):
    """uint8 pixels -> per-scale latents ``zs`` and per-position log-determinants ``log_dets``.

    The one pipeline every caller runs: ``extract`` (``Preprocess`` -> frozen backbone) then
    ``flow`` (per-scale norms -> flows). Training caches ``extract``'s output and trains
    ``flow``; inference, the exports and the recipe study run both. Feature shapes come from
    a dry run of the backbone at ``config.input_size``, so any size (non-square, not a
    multiple of the stride) works. CNN features get a LayerNorm over (C, h, w) as in the
    reference implementation; transformer tokens are already normalised by the backbone's own
    final norm. ``config.context_pool`` averages neighbourhoods inside ``extract`` (so training
    caches and perturbs what the flows see); ``config.fuse_scales`` joins the normalised scales
    into one flow; ``config.positional_channels`` conditions every flow on its grid position.
    ``config.tile`` runs the backbone on tiles of the image and stitches their features into
    the whole image's grid (``features``), so everything after the backbone is unchanged.

    Args:
        config: architecture (backbone, layers, input size, flow settings).
        weights: backbone weights: ``None`` (timm hub), a local file, or ``"random"``.
    """

    def __init__(self, config: FastFlowConfig, weights: str | Path | None = None) -> None:
        super().__init__()
        self.config = config
        if config.tile and is_transformer(config.backbone):
            raise FastFlowError(
                f"tile {config.tile} needs a CNN backbone; '{config.backbone}' is a vision transformer, "
                "whose token grid is fixed: set tile 0 or pick a CNN backbone"
            )
        # Plain data, not a module: nothing to save, and old model files (no tile) load as before.
        self.tiles = TileGrid(config.input_size, config.tile, config.tile_overlap) if config.tile else None
        self.backbone = Backbone(config.backbone, config.layers, config.input_size, weights)
        self.preprocess = Preprocess(config.input_size, self.backbone.mean, self.backbone.std)
        with torch.no_grad():
            probe = self.features(torch.zeros(1, 3, *config.input_size))
        self.feature_shapes = [(f.shape[1], f.shape[2], f.shape[3]) for f in probe]
        self.norms = nn.ModuleList(
            nn.Identity() if self.backbone.transformer else nn.LayerNorm(list(shape))
            for shape in self.feature_shapes
        )
        if config.fuse_scales:
            finest = fuse_to_finest([f[:, :1] for f in probe]).shape[-2:]
            self.flow_shapes = [(sum(shape[0] for shape in self.feature_shapes), *finest)]
        else:
            self.flow_shapes = list(self.feature_shapes)
        kernels = (3,) if config.conv3x3_only else (3, 1)
        self.flows = nn.ModuleList(
            FlowStack(
                shape[0],
                config.flow_steps,
                config.hidden_ratio,
                kernels,
                config.clamp,
                seed=index,
                condition_channels=config.positional_channels,
                permutation=config.permutation,
            )
            for index, shape in enumerate(self.flow_shapes)
        )
        self.use_channels_last()

    def positions(self, device: torch.device | str = "cpu") -> list[Tensor | None]:
        """Each flow's condition: its positional encoding (1, P, h, w), or ``None`` without one.

        A fixed function of the grid (``positional_encoding``, computed once per shape) rather
        than a buffer: model files do not carry it, and a model built on the meta device gets it too.
        """
        channels = self.config.positional_channels
        return [
            positional_encoding(channels, height, width).to(device) if channels else None
            for _, height, width in self.flow_shapes
        ]

    def use_channels_last(self) -> FastFlowModel:
        """Store the flows' convolutions channels-last: oneDNN runs them faster on CPUs.

        Called after construction and after loading weights (which replaces the tensors), so a
        trained and a reloaded model run the same kernels and give bit-identical scores. Only
        the convolutions: a (1, C, 1, 1) global affine is both layouts at once, but strided as
        channels-last its gradient's strides differ from its own, which costs DDP a copy.
        Measured: docs/measurements.md#channels-last.
        """
        for module in self.flows.modules():
            if isinstance(module, nn.Conv2d):
                module.to(memory_format=torch.channels_last)
        return self

    def extract(self, pixels: Tensor) -> list[Tensor]:
        """(N, 3, H, W) RGB pixels 0..255 (uint8 or float, any H, W) -> raw backbone features,
        one (N, C, h, w) map per scale (neighbourhood-averaged with ``config.context_pool``),
        channels-last (what the flows run fastest on)."""
        with torch.no_grad():
            return self.with_context(self.features(self.preprocess(pixels)))

    def features(self, images: Tensor) -> list[Tensor]:
        """Normalised (N, 3, height, width) images at ``config.input_size`` -> the backbone's
        features of the whole image, one (N, C, h, w) map per scale.

        Without tiles, the backbone's own outputs. With ``config.tile``, the backbone sees the
        images' tiles, all in one batch (N x tiles images: its memory grows with both), and each
        scale's tile features are stitched into the whole image's grid (``TileGrid.stitch``).
        """
        if self.tiles is None:
            return self.backbone(images)
        return [self.tiles.stitch(feature) for feature in self.backbone(self.tiles.cut(images))]

    def with_context(self, features: list[Tensor]) -> list[Tensor]:
        """``features``' outputs -> ``extract``'s: neighbourhood-averaged, channels-last.

        Apart from ``extract`` so that callers running ``features`` their own way (in bf16, say)
        hand the flows the same kind of features.
        """
        pooled = [local_average(f, self.config.context_pool) for f in features]
        return [f.contiguous(memory_format=torch.channels_last) for f in pooled]

    def flow(
        self, features: list[Tensor], with_norm_log_det: bool = False
    ) -> tuple[list[Tensor], list[Tensor | None]]:
        """Raw features -> ``zs`` [(N, C, h, w)] and log|det J| per position ``log_dets`` [(N, h, w)],
        one per flow (one per scale, or a single one with ``config.fuse_scales``).

        With ``with_norm_log_det`` each LayerNorm's elementwise affine joins the log-determinant
        (its log|weight| summed over channels, per position), which makes ``nll_loss`` the exact
        NLL of the features (``Recipe.exact_nll``). With fused scales the coarse norms' terms are
        upsampled like their features: upsampling is not a bijection, so there the loss is the
        exact NLL of the fused map, with the norms' scales still paid for.
        """
        normed = [norm(feature) for norm, feature in zip(self.norms, features, strict=True)]
        norm_log_dets = (
            [
                norm.weight.abs().log().sum(dim=0, keepdim=True)[None]
                if isinstance(norm, nn.LayerNorm)
                else None
                for norm in self.norms
            ]
            if with_norm_log_det
            else [None] * len(self.norms)
        )
        if self.config.fuse_scales:
            normed = [fuse_to_finest(normed)]
            terms = [t for t in norm_log_dets if t is not None]
            norm_log_dets = [fuse_to_finest(terms).sum(dim=1, keepdim=True) if terms else None]
        zs, log_dets = [], []
        conditions = self.positions(normed[0].device)
        for flow, x, condition, norm_term in zip(self.flows, normed, conditions, norm_log_dets, strict=True):
            z, log_det = flow(x, condition)
            if log_det is not None and norm_term is not None:
                log_det = log_det + norm_term[:, 0]
            zs.append(z)
            log_dets.append(log_det)
        return zs, log_dets

    def forward(self, pixels: Tensor) -> tuple[list[Tensor], list[Tensor | None]]:
        """``flow(extract(pixels))``: the same contract in training and evaluation."""
        return self.flow(self.extract(pixels))

    def fold(self, in_place: bool = False, conv_permutation: bool = False) -> FastFlowModel:
        """This model for inference: backbone and norms shared, each flow folded (``FlowStack.fold``).

        Its latents equal this model's up to a fixed channel order (which the anomaly map
        ignores), and its flows compute no log-determinant (``flow`` returns ``None`` for it).
        ``in_place``: flows whose steps are small (``IN_PLACE_MAX_WORK``) and gather channels
        (random permutations) take the in-place form, for engines with fast arithmetic and a cost
        per node (OpenVINO bf16); swapped halves gather nothing, so they stay split.
        ``conv_permutation``: the split flows hand channels on by 1x1 convolutions instead of
        gathers (``FoldedFlow``), for engines that gather slowly (OpenVINO).
        """
        folded = copy.copy(self)
        conditions = self.positions(next(self.flows.parameters()).device)
        in_place = in_place and self.config.permutation == "random"
        flows = nn.ModuleList(
            cast(FlowStack, flow).fold(
                condition, in_place and channels**2 * height * width <= IN_PLACE_MAX_WORK, conv_permutation
            )
            for flow, condition, (channels, height, width) in zip(
                self.flows, conditions, self.flow_shapes, strict=True
            )
        )
        folded._modules = {**self._modules, "flows": flows}
        return folded.eval()

    def flow_state_dict(self) -> dict[str, Tensor]:
        """Trainable state only (norms + flows): what a model file needs beyond the backbone."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("backbone.")}
