"""The FastFlow model: pixels -> pre-processing -> frozen backbone -> per-scale norms -> one 2D flow per scale."""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import Tensor, nn

from fastflow.model.backbones import Backbone
from fastflow.model.flow import FlowStack
from fastflow.model.preprocess import Preprocess
from fastflow.presets import FastFlowConfig

__all__ = ["FastFlowModel"]


class FastFlowModel(nn.Module):
    """uint8 pixels -> per-scale latents ``zs`` and per-position log-determinants ``log_dets``.

    The one pipeline every caller runs: ``extract`` (``Preprocess`` -> frozen backbone) then
    ``flow`` (per-scale norms -> flows). Training caches ``extract``'s output and trains
    ``flow``; inference, the exports and the recipe study run both. Feature shapes come from
    a dry run of the backbone at ``config.input_size``, so any size (non-square, not a
    multiple of the stride) works. CNN features get a LayerNorm over (C, h, w) as in the
    reference implementation; transformer tokens are already normalised by the backbone's own
    final norm.

    Args:
        config: architecture (backbone, layers, input size, flow settings).
        weights: backbone weights: ``None`` (timm hub), a local file, or ``"random"``.
    """

    def __init__(self, config: FastFlowConfig, weights: str | Path | None = None) -> None:
        super().__init__()
        self.config = config
        self.backbone = Backbone(config.backbone, config.layers, config.input_size, weights)
        self.preprocess = Preprocess(config.input_size, self.backbone.mean, self.backbone.std)
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

    def extract(self, pixels: Tensor) -> list[Tensor]:
        """(N, 3, H, W) RGB pixels 0..255 (uint8 or float, any H, W) -> raw backbone features,
        one (N, C, h, w) map per scale, channels-last (what the flows run fastest on)."""
        with torch.no_grad():
            features = self.backbone(self.preprocess(pixels))
        return [f.contiguous(memory_format=torch.channels_last) for f in features]

    def flow(
        self, features: list[Tensor], with_norm_log_det: bool = False
    ) -> tuple[list[Tensor], list[Tensor | None]]:
        """Raw features -> ``zs`` [(N, C, h, w)] and log|det J| per position ``log_dets`` [(N, h, w)].

        With ``with_norm_log_det`` each LayerNorm's elementwise affine joins the log-determinant
        (its log|weight| summed over channels, per position), which makes ``nll_loss`` the exact
        NLL of the features (``Recipe.exact_nll``).
        """
        zs, log_dets = [], []
        for norm, flow, feature in zip(self.norms, self.flows, features, strict=True):
            z, log_det = flow(norm(feature))
            if with_norm_log_det and log_det is not None and isinstance(norm, nn.LayerNorm):
                log_det = log_det + norm.weight.abs().log().sum(dim=0)
            zs.append(z)
            log_dets.append(log_det)
        return zs, log_dets

    def forward(self, pixels: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        """``flow(extract(pixels))``: the same contract in training and evaluation."""
        return self.flow(self.extract(pixels))

    def fold(self) -> FastFlowModel:
        """This model for inference: backbone and norms shared, each flow folded (``FlowStack.fold``).

        Its latents equal this model's up to a fixed channel order (which the anomaly map
        ignores), and its flows compute no log-determinant (``flow`` returns ``None`` for it).
        """
        folded = copy.copy(self)
        folded._modules = {**self._modules, "flows": nn.ModuleList(flow.fold() for flow in self.flows)}
        return folded.eval()

    def flow_state_dict(self) -> dict[str, Tensor]:
        """Trainable state only (norms + flows): what a model file needs beyond the backbone."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("backbone.")}
