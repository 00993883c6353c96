"""The inference graph: raw image pixels in, anomaly map, image score and label out.

``InferenceGraph`` is the one definition of inference. ``FastFlow`` runs it in Python (engine
"torch"), and ``fastflow.export`` traces this very module to ONNX and OpenVINO, so every
engine computes the same function: ``Preprocess`` (resize + normalise) -> frozen backbone ->
per-scale norms -> flows (latent ``z`` only) -> anomaly map (the reference's, optionally
blurred) -> image score (the mean of the map's top ``score_top`` share, or its maximum) ->
label (score above the calibrated threshold, which is stored in the graph).

By default the flows are ``FoldedFlow``: the same function as ``FlowStack`` with what is
constant at inference folded away (see its docstring); ``fold=False`` keeps the training-time
flows for comparison.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from fastflow.model.fastflow import FastFlowModel
from fastflow.model.flow import _SUBNET_OUTPUT_SCALE, CouplingStep, FlowStack, _softplus_global_scale
from fastflow.model.preprocess import Preprocess
from fastflow.scoring import anomaly_map, image_score

__all__ = ["FoldedFlow", "InferenceGraph", "float32_threshold"]


class _FoldedStep(nn.Module):
    """One coupling step with its constants folded (see ``FoldedFlow``)."""

    def __init__(self, step: CouplingStep, last: bool) -> None:
        super().__init__()
        self.passive, self.active, self.clamp = step.passive, step.active, step.clamp
        conv1, conv2 = step.subnet[0], step.subnet[2]
        with torch.no_grad():
            scale = _softplus_global_scale(step.global_scale).flatten()
            offset = step.global_offset.flatten()
            passive_scale, active_scale = scale[: self.passive], scale[self.passive :]
            passive_offset, active_offset = offset[: self.passive], offset[self.passive :]
            # conv2 output a = 0.1 * (W x + b): log-scale rows keep 0.1; shift rows also take the
            # global affine of the active half: (0.1 (W x + b)) * scale + offset.
            weight = conv2.weight.detach().clone() * _SUBNET_OUTPUT_SCALE
            bias = conv2.bias.detach().clone() * _SUBNET_OUTPUT_SCALE
            weight[self.active :] *= active_scale.view(-1, 1, 1, 1)
            bias[self.active :] = bias[self.active :] * active_scale + active_offset
        self.conv1 = _copy_conv(conv1)
        self.conv2 = _copy_conv(conv2, weight, bias)
        # exp(s) * scale = exp(s + log(scale)): the active half's global scale joins the log-scale.
        self.register_buffer("log_active_scale", torch.log(active_scale).view(1, -1, 1, 1))
        self.register_buffer("passive_scale", passive_scale.view(1, -1, 1, 1))
        self.register_buffer("passive_offset", passive_offset.view(1, -1, 1, 1))
        # The permutation is not applied to the whole output: the next step's two halves are
        # gathered straight from it (no permuted copy to split), and the last step skips it.
        permutation = step.permutation.clone()
        self.register_buffer("next_passive", None if last else permutation[: step.passive])
        self.register_buffer("next_active", None if last else permutation[step.passive :])

    def forward(self, x1: Tensor, x2: Tensor) -> tuple[Tensor, Tensor]:
        """Halves of the input -> halves of the next step's input (or of the unpermuted ``z``)."""
        a = self.conv2(F.relu(self.conv1(x1)))
        log_scale = self.clamp * torch.tanh(a[:, : self.active]) + self.log_active_scale
        y2 = x2 * torch.exp(log_scale) + a[:, self.active :]
        y1 = x1 * self.passive_scale + self.passive_offset
        if self.next_passive is None:
            return y1, y2
        y = torch.cat((y1, y2), dim=1)
        return y.index_select(1, self.next_passive), y.index_select(1, self.next_active)


def _copy_conv(conv: nn.Conv2d, weight: Tensor | None = None, bias: Tensor | None = None) -> nn.Conv2d:
    """A detached copy of ``conv`` (optionally with new weight and bias), channels-last."""
    copy = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, padding=conv.padding)
    with torch.no_grad():
        copy.weight.copy_(conv.weight if weight is None else weight)
        copy.bias.copy_(conv.bias if bias is None else bias)
    copy.requires_grad_(False)
    return copy.to(memory_format=torch.channels_last)


class FoldedFlow(nn.Module):
    """``FlowStack`` for inference: the same latent ``z`` up to a fixed channel order, less work.

    Folded at construction, exactly (tests compare with ``FlowStack`` to 1e-5):
    - the subnet's output factor 0.1 into the second convolution's weights and bias;
    - the active half's global affine (scale, offset) into that convolution's shift rows, and
      its scale into the log-scale as ``+ log(scale)``;
    - each step's channel permutation into the next step's split: the next step gathers its
      passive and active halves directly; the last step's permutation is dropped, so ``z``
      comes out in the order ``output_permutation`` describes (the anomaly map averages over
      channels, so it does not care);
    - no log-determinant is computed.
    The passive half's global offset is not folded into the next convolution: with zero padding
    a 3x3 convolution of ``x + offset`` differs from ``conv(x) + conv(offset)`` at the borders.
    """

    def __init__(self, flow: FlowStack) -> None:
        super().__init__()
        steps = list(flow.steps)
        self.passive = steps[0].passive
        self.steps = nn.ModuleList(
            _FoldedStep(step, last=i == len(steps) - 1) for i, step in enumerate(steps)
        )
        # The last step's permutation, not applied: FlowStack's z == this module's z[:, output_permutation].
        self.register_buffer("output_permutation", steps[-1].permutation.clone())

    def forward(self, x: Tensor) -> Tensor:
        """``x`` (N, C, h, w) -> ``z`` (N, C, h, w); ``z[:, self.output_permutation]`` is ``FlowStack``'s ``z``."""
        x1, x2 = x[:, : self.passive], x[:, self.passive :]
        for step in self.steps:
            x1, x2 = step(x1, x2)
        return torch.cat((x1, x2), dim=1)


def float32_threshold(threshold: float) -> float:
    """The largest float32 <= ``threshold``: for float32 scores ``s``, ``s > it`` iff ``s > threshold``."""
    value = np.float32(threshold)
    if float(value) > threshold:
        value = np.nextafter(value, np.float32(-np.inf))
    return float(value)


class InferenceGraph(nn.Module):
    """Raw images -> (anomaly_map, score, label), the function every inference engine runs.

    Args:
        model: a trained ``FastFlowModel``; its backbone and norms are shared, its flows copied
            (folded, or as they are with ``fold=False``).
        threshold: calibrated deployment threshold; label = score > threshold.
        fold: run ``FoldedFlow`` instead of the training-time ``FlowStack``.

    ``forward(images)``: (N, 3, H, W) RGB, uint8 or float with values 0..255, any H, W ->
    ``anomaly_map`` (N, height, width) float32 at the model's input size, ``score`` (N,) float32
    (higher = more anomalous), ``label`` (N,) int64 (1 = anomalous).
    """

    def __init__(self, model: FastFlowModel, threshold: float, fold: bool = True) -> None:
        super().__init__()
        self.config = model.config
        self.input_size = tuple(model.config.input_size)
        self.preprocess = Preprocess(self.input_size, model.mean, model.std)
        self.backbone = model.backbone
        self.norms = model.norms
        self.flows = nn.ModuleList(FoldedFlow(flow) for flow in model.flows) if fold else model.flows
        self.fold = fold
        self.register_buffer("threshold", torch.tensor(float32_threshold(threshold), dtype=torch.float32))
        self.eval()

    def set_threshold(self, threshold: float) -> None:
        """Replace the stored deployment threshold."""
        self.threshold.fill_(float32_threshold(threshold))

    def latents(self, features: list[Tensor]) -> list[Tensor]:
        """Raw backbone features -> per-scale latents ``z`` (channel order irrelevant to the map)."""
        zs = []
        for norm, flow, feature in zip(self.norms, self.flows, features, strict=True):
            x = norm(feature).contiguous(memory_format=torch.channels_last)
            zs.append(flow(x) if self.fold else flow(x)[0])
        return zs

    def score_latents(self, zs: list[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """Latents -> (anomaly_map, score, label) with the scorer of ``fastflow.scoring``."""
        amap = anomaly_map(zs, self.input_size, self.config.map_sigma)
        score = image_score(amap, self.config.score_top)
        return amap, score, (score > self.threshold).to(torch.int64)

    def score_features(self, features: list[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """Raw backbone features (e.g. cached during training) -> (anomaly_map, score, label)."""
        return self.score_latents(self.latents(features))

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(N, 3, H, W) pixels 0..255 -> anomaly_map (N, height, width), score (N,), label (N,)."""
        return self.score_features(self.backbone(self.preprocess(images)))

