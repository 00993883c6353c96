"""The FastFlow model: frozen backbone -> per-scale normalisation -> one 2D flow per scale."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from fastflow.model.backbones import Backbone
from fastflow.model.flow import FlowStack
from fastflow.presets import FastFlowConfig

__all__ = ["FastFlowModel"]


class FastFlowModel(nn.Module):
    """Images -> per-scale latents ``zs`` and per-position log-determinants ``log_dets``.

    The forward contract is the same in training and evaluation; scoring lives in
    ``fastflow.scoring``. Feature shapes come from a dry run of the backbone at
    ``config.input_size``, so any size (non-square, not a multiple of the stride) works.
    CNN features get a LayerNorm over (C, h, w) as in the reference implementation; transformer
    tokens are already normalised by the backbone's own final norm.

    Args:
        config: architecture (backbone, layers, input size, flow settings).
        weights: backbone weights: ``None`` (timm hub), a local file, or ``"random"``.
    """

    def __init__(self, config: FastFlowConfig, weights: str | Path | None = None) -> None:
        super().__init__()
        self.config = config
        self.backbone = Backbone(config.backbone, config.layers, config.input_size, weights)
        with torch.no_grad():
            probe = self.backbone(torch.zeros(1, 3, *config.input_size))
        self.feature_shapes = [tuple(f.shape[1:]) for f in probe]
        self.norms = nn.ModuleList(
            nn.Identity() if self.backbone.transformer else nn.LayerNorm(list(shape))
            for shape in self.feature_shapes
        )
        kernels = (3,) if config.conv3x3_only else (3, 1)
        self.flows = nn.ModuleList(
            FlowStack(shape[0], config.flow_steps, config.hidden_ratio, kernels, config.clamp, seed=index)
            for index, shape in enumerate(self.feature_shapes)
        )
        self.use_channels_last()

    def use_channels_last(self) -> FastFlowModel:
        """Store the flows' convolutions channels-last: oneDNN runs them about twice as fast on CPUs.

        Called after construction and after loading weights (which replaces the tensors), so a
        trained and a reloaded model run the same kernels and give bit-identical scores.
        """
        self.flows.to(memory_format=torch.channels_last)
        return self

    @property
    def mean(self) -> tuple[float, ...]:
        """Per-channel input mean the backbone was trained with."""
        return self.backbone.mean

    @property
    def std(self) -> tuple[float, ...]:
        """Per-channel input std the backbone was trained with."""
        return self.backbone.std

    def features(self, images: Tensor) -> list[Tensor]:
        """Normalised backbone features, one (N, C, h, w) map per scale; never trains the backbone."""
        with torch.no_grad():
            raw = self.backbone(images)
        return [norm(feature) for norm, feature in zip(self.norms, raw, strict=True)]

    def forward(self, images: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        """``images`` (N, 3, H, W), normalised -> ``zs`` [(N, C, h, w)], ``log_dets`` [(N, h, w)]."""
        zs, log_dets = [], []
        for flow, feature in zip(self.flows, self.features(images), strict=True):
            z, log_det = flow(feature)
            zs.append(z)
            log_dets.append(log_det)
        return zs, log_dets

    def flow_state_dict(self) -> dict[str, Tensor]:
        """Trainable state only (norms + flows): what a model file needs beyond the backbone."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("backbone.")}
