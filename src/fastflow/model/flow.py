"""Invertible 2D flows: affine coupling steps on feature maps.

Each ``CouplingStep`` has the semantics of FrEIA's ``AllInOneBlock(permute_soft=False,
affine_clamping=clamp)`` with its default global affine (softplus, init 1.0), which is what the
FastFlow reference uses; ``tests/model/test_flow.py`` proves parity weight for weight. The code
is ours because FrEIA is unmaintained, and because FastFlow needs things FrEIA does not give:
shapes are not fixed at construction (only channels), direction is a method rather than a flag,
and the log-determinant is returned per feature position ``(N, H, W)`` so scorers can use it.
A step may take a fixed condition (a positional encoding, ``condition_channels``), which its
subnet sees beside the passive half, as in CFlow-AD and MSFlow.
``FlowStack.fold()`` gives the same latent for inference with its constants folded away.
"""

from __future__ import annotations

import math
from typing import cast

import torch
from torch import Tensor, nn
from torch.nn import functional as F

__all__ = ["CouplingStep", "FlowStack", "FoldedFlow", "subnet"]

# A step's fixed channel permutation (``CouplingStep``).
PERMUTATIONS = ("random", "swap")

# FrEIA scales the subnet output by 0.1 "for stability and easier initialization".
_SUBNET_OUTPUT_SCALE = 0.1


def subnet(in_channels: int, out_channels: int, kernel_size: int, hidden_ratio: float) -> nn.Sequential:
    """conv -> ReLU -> conv predicting the coupling's log-scale and shift (paper Fig. 2)."""
    hidden = int(in_channels * hidden_ratio)
    return nn.Sequential(
        nn.Conv2d(in_channels, hidden, kernel_size, padding="same"),
        nn.ReLU(),
        nn.Conv2d(hidden, out_channels, kernel_size, padding="same"),
    )


def _softplus_global_scale(raw: Tensor) -> Tensor:
    """FrEIA's 'SOFTPLUS' global-affine activation: 0.1 * softplus(raw, beta=0.5)."""
    return 0.1 * F.softplus(raw, beta=0.5)


class CouplingStep(nn.Module):
    """One flow step: affine coupling, learned per-channel affine, fixed channel permutation.

    Forward, for input ``x`` split into ``x1`` (first ``C - C//2`` channels) and ``x2``, and an
    optional fixed ``condition`` (1, P, H, W) with ``P = condition_channels``:
        ``a = 0.1 * subnet(concat(x1, condition))``, ``s = clamp * tanh(a[:, :C//2])``, ``t = a[:, C//2:]``,
        ``u = concat(x1, x2 * exp(s) + t)``, ``z = (u * scale + offset)[:, permutation]``,
    with ``scale = 0.1 * softplus(global_scale, beta=0.5)``.

    ``permutation``: ``"random"`` (FrEIA's and the paper's, from ``generator``) or ``"swap"``, the
    halves trading places (RealNVP's alternation), which a folded flow runs with no channel
    gather at all (``_FoldedStep``).
    """

    permutation: Tensor
    inverse_permutation: Tensor

    def __init__(
        self,
        channels: int,
        kernel_size: int = 3,
        hidden_ratio: float = 1.0,
        clamp: float = 2.0,
        generator: torch.Generator | None = None,
        condition_channels: int = 0,
        permutation: str = "random",
    ) -> None:
        super().__init__()
        if channels < 2:
            raise ValueError(f"a coupling step needs at least 2 channels, got {channels}")
        self.channels = channels
        self.clamp = clamp
        self.passive = channels - channels // 2  # x1: conditions the subnet, passes unchanged
        self.active = channels // 2  # x2: gets scaled and shifted
        self.condition_channels = condition_channels
        self.subnet = subnet(self.passive + condition_channels, 2 * self.active, kernel_size, hidden_ratio)
        # Raw value whose softplus activation gives a global scale of exactly 1.0 at init.
        init = 2.0 * math.log(math.exp(0.5 * 10.0 * 1.0) - 1.0)
        self.global_scale = nn.Parameter(torch.full((1, channels, 1, 1), init))
        self.global_offset = nn.Parameter(torch.zeros(1, channels, 1, 1))
        if permutation not in PERMUTATIONS:
            raise ValueError(f"permutation must be one of {PERMUTATIONS}, got {permutation!r}")
        if permutation == "swap":  # the active half first: with even channels the halves trade places
            order = torch.cat((torch.arange(self.passive, channels), torch.arange(self.passive)))
        else:
            order = torch.randperm(channels, generator=generator)
        self.register_buffer("permutation", order)
        self.register_buffer("inverse_permutation", torch.argsort(order))

    def _scale_shift(self, x1: Tensor, condition: Tensor | None) -> tuple[Tensor, Tensor]:
        if self.condition_channels:
            assert condition is not None, "a conditioned step needs its condition"
            x1 = torch.cat((x1, condition.expand(x1.shape[0], -1, -1, -1)), dim=1)
        raw_log_scale, shift = (self.subnet(x1) * _SUBNET_OUTPUT_SCALE).split(
            (self.active, self.active), dim=1
        )
        return self.clamp * torch.tanh(raw_log_scale), shift

    def forward(self, x: Tensor, condition: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``x`` (N, C, H, W) -> ``z`` (N, C, H, W) and log|det J| per position (N, H, W)."""
        # split and index_select rather than slices and advanced indexing: the same values and
        # gradients, but their backward passes concatenate and gather instead of filling zeros and
        # scattering, which made a Lite0 training step in bf16 faster (measured:
        # docs/measurements.md#split-couplings).
        x1, x2 = x.split((self.passive, self.active), dim=1)
        log_scale, shift = self._scale_shift(x1, condition)
        u = torch.cat((x1, x2 * torch.exp(log_scale) + shift), dim=1)
        scale = _softplus_global_scale(self.global_scale)
        z = (u * scale + self.global_offset).index_select(1, self.permutation)
        log_det = log_scale.sum(dim=1) + torch.log(scale).sum()
        return z, log_det

    def inverse(self, z: Tensor, condition: Tensor | None = None) -> Tensor:
        """Exact inverse of ``forward``: ``inverse(forward(x, c)[0], c) == x``."""
        scale = _softplus_global_scale(self.global_scale)
        u = (z.index_select(1, self.inverse_permutation) - self.global_offset) / scale
        x1, y2 = u.split((self.passive, self.active), dim=1)
        log_scale, shift = self._scale_shift(x1, condition)
        return torch.cat((x1, (y2 - shift) * torch.exp(-log_scale)), dim=1)


class FlowStack(nn.Module):
    """A FastFlow 2D flow: ``steps`` coupling steps on one feature scale.

    Kernels cycle through ``kernels`` (3x3 then 1x1 in the paper's default, 3x3 only for its
    ResNet-18 setting). Permutations come from a generator seeded with ``seed`` so a model is
    reproducible; they are saved as buffers, so loading never depends on the seed. With
    ``condition_channels`` every step's subnet also sees the fixed condition passed to ``forward``
    (``permutation``: see ``CouplingStep``).
    """

    def __init__(
        self,
        channels: int,
        steps: int,
        hidden_ratio: float = 1.0,
        kernels: tuple[int, ...] = (3, 1),
        clamp: float = 2.0,
        seed: int = 0,
        condition_channels: int = 0,
        permutation: str = "random",
    ) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.steps = nn.ModuleList(
            CouplingStep(
                channels,
                kernels[i % len(kernels)],
                hidden_ratio,
                clamp,
                generator,
                condition_channels,
                permutation,
            )
            for i in range(steps)
        )

    def forward(self, x: Tensor, condition: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``x`` (N, C, H, W) -> latent ``z`` (N, C, H, W) and log|det J| per position (N, H, W)."""
        log_det = x.new_zeros(x.shape[0], *x.shape[2:])
        for step in self.steps:
            x, step_log_det = step(x, condition)
            log_det = log_det + step_log_det
        return x, log_det

    def inverse(self, z: Tensor, condition: Tensor | None = None) -> Tensor:
        """Latent ``z`` back to features: the steps' inverses in reverse order."""
        for step in reversed(self.steps):
            z = cast(CouplingStep, step).inverse(z, condition)
        return z

    def fold(
        self, condition: Tensor | None = None, in_place: bool = False, conv_permutation: bool = False
    ) -> FoldedFlow:
        """This flow for inference, its constants (and ``condition``) folded: a detached copy, see
        ``FoldedFlow`` (``in_place``, ``conv_permutation``: its form)."""
        return FoldedFlow(self, condition, in_place, conv_permutation)


class _FoldedStep(nn.Module):
    """One coupling step with its constants folded (see ``FoldedFlow``)."""

    condition_bias: Tensor | None
    log_active_scale: Tensor
    passive_scale: Tensor
    passive_offset: Tensor
    next_passive: Tensor | None
    next_active: Tensor | None

    def __init__(
        self, step: CouplingStep, last: bool, condition: Tensor | None, conv_permutation: bool
    ) -> None:
        super().__init__()
        self.passive, self.active, self.clamp = step.passive, step.active, step.clamp
        conv1, conv2 = cast(nn.Conv2d, step.subnet[0]), cast(nn.Conv2d, step.subnet[2])
        assert conv1.bias is not None and conv2.bias is not None  # subnet() builds them with biases
        # The condition is fixed, so its part of the first convolution (bias included) is a
        # constant map: conv(concat(x1, c)) = conv_x1(x1) + conv_c(c), zero padding alike.
        condition_bias = None
        if step.condition_channels:
            assert condition is not None  # FoldedFlow checks it
            with torch.no_grad():
                condition_bias = F.conv2d(
                    condition.float(), conv1.weight[:, step.passive :], conv1.bias, padding=conv1.padding
                )
            self.conv1 = _copy_conv(conv1, conv1.weight[:, : step.passive], torch.zeros_like(conv1.bias))
        else:
            self.conv1 = _copy_conv(conv1)
        self.register_buffer("condition_bias", condition_bias)
        with torch.no_grad():
            scale = _softplus_global_scale(step.global_scale).flatten()
            offset = step.global_offset.detach().flatten().clone()  # a copy, not a view of the parameter
            passive_scale, active_scale = scale[: self.passive], scale[self.passive :]
            passive_offset, active_offset = offset[: self.passive], offset[self.passive :]
            # conv2 output a = 0.1 * (W x + b): log-scale rows keep 0.1; shift rows also take the
            # global affine of the active half: (0.1 (W x + b)) * scale + offset.
            weight = conv2.weight.detach().clone() * _SUBNET_OUTPUT_SCALE
            bias = conv2.bias.detach().clone() * _SUBNET_OUTPUT_SCALE
            weight[self.active :] *= active_scale.view(-1, 1, 1, 1)
            bias[self.active :] = bias[self.active :] * active_scale + active_offset
        # Two convolutions, log-scale rows and shift rows, instead of one sliced in two: each
        # output then feeds its elementwise ops whole, which engines fuse into the convolution
        # (OpenVINO bf16 ran the tanh of a sliced output unfused: 28 % of Lite0's time).
        self.conv_log_scale = _copy_conv(conv2, weight[: self.active], bias[: self.active])
        self.conv_shift = _copy_conv(conv2, weight[self.active :], bias[self.active :])
        # exp(s) * scale = exp(s + log(scale)): the active half's global scale joins the log-scale.
        self.register_buffer("log_active_scale", torch.log(active_scale).view(1, -1, 1, 1))
        self.register_buffer("passive_scale", passive_scale.view(1, -1, 1, 1))
        self.register_buffer("passive_offset", passive_offset.view(1, -1, 1, 1))
        # The permutation is not applied to the whole output: the next step's two halves are
        # gathered straight from it (no permuted copy to split), and the last step skips it.
        permutation = step.permutation.clone()
        # Halves that trade places need no gather: this step's outputs are the next one's inputs.
        self.swaps = (
            not last
            and step.passive == step.active
            and torch.equal(
                permutation,
                torch.cat((torch.arange(step.passive, step.channels), torch.arange(step.passive))),
            )
        )
        gathers = not (last or self.swaps)
        self.register_buffer("next_passive", permutation[: step.passive] if gathers else None)
        self.register_buffer("next_active", permutation[step.passive :] if gathers else None)
        # The same hand-over as two 1x1 convolutions with 0/1 weights (as anomalib permutes), for
        # engines that run a channel gather slowly: OpenVINO gathers in a plain layout, with a
        # layout conversion before and after, so there the convolutions were faster (measured:
        # docs/measurements.md#conv-permutation).
        # Exact: each output is one input times 1 plus zeros.
        self.conv_permutation = gathers and conv_permutation
        if self.conv_permutation:
            self.to_next_passive = _selection_conv(permutation[: step.passive], step.channels)
            self.to_next_active = _selection_conv(permutation[step.passive :], step.channels)

    def forward(self, x1: Tensor, x2: Tensor) -> tuple[Tensor, Tensor]:
        """Halves of the input -> halves of the next step's input (or of the unpermuted ``z``)."""
        hidden = self.conv1(x1)
        if self.condition_bias is not None:
            hidden = hidden + self.condition_bias
        hidden = F.relu(hidden)
        log_scale = self.clamp * torch.tanh(self.conv_log_scale(hidden)) + self.log_active_scale
        y2 = x2 * torch.exp(log_scale) + self.conv_shift(hidden)
        y1 = x1 * self.passive_scale + self.passive_offset
        if self.swaps:
            return y2, y1
        if self.next_passive is None or self.next_active is None:  # both or neither
            return y1, y2
        y = torch.cat((y1, y2), dim=1)
        if self.conv_permutation:
            return self.to_next_passive(y), self.to_next_active(y)
        return y.index_select(1, self.next_passive), y.index_select(1, self.next_active)


class _InPlaceStep(nn.Module):
    """A ``_FoldedStep`` on the whole tensor, with no split, concatenation or channel gather.

    The step's passive and active halves are fixed sets of physical channels (``passive``,
    ``active``): the first convolution reads all channels with zero weights on the active ones,
    and both output convolutions write every channel, the passive rows being constants
    (log-scale ``log(passive scale)``, shift ``passive offset``), so the step is one update
    ``y = y * exp(S) + T``. Exact: the zero weights add exact zeros.
    """

    condition_bias: Tensor | None
    log_scale_offset: Tensor

    def __init__(self, step: _FoldedStep, passive: Tensor, active: Tensor) -> None:
        super().__init__()
        channels = len(passive) + len(active)
        self.clamp = step.clamp
        conv1, log_scale, shift = step.conv1, step.conv_log_scale, step.conv_shift
        assert log_scale.bias is not None and shift.bias is not None  # _copy_conv gives biases
        with torch.no_grad():
            weight1 = conv1.weight.new_zeros(conv1.weight.shape[0], channels, *conv1.kernel_size)
            weight1[:, passive] = conv1.weight
            rows = log_scale.weight.new_zeros(channels, *log_scale.weight.shape[1:])
            weight_log_scale, weight_shift = rows.clone(), rows.clone()
            weight_log_scale[active], weight_shift[active] = log_scale.weight, shift.weight
            bias_log_scale, bias_shift = rows.new_zeros(channels), rows.new_zeros(channels)
            bias_log_scale[active], bias_shift[active] = log_scale.bias, shift.bias
            bias_shift[passive] = step.passive_offset.flatten()
            # tanh(0) = 0 on the passive rows, so their log-scale is this constant alone.
            log_scale_offset = rows.new_zeros(1, channels, 1, 1)
            log_scale_offset[:, active] = step.log_active_scale
            log_scale_offset[:, passive] = torch.log(step.passive_scale)
        self.conv1 = _copy_conv(conv1, weight1)
        self.conv_log_scale = _copy_conv(log_scale, weight_log_scale, bias_log_scale)
        self.conv_shift = _copy_conv(shift, weight_shift, bias_shift)
        self.register_buffer("condition_bias", step.condition_bias)
        self.register_buffer("log_scale_offset", log_scale_offset)

    def forward(self, y: Tensor) -> Tensor:
        hidden = self.conv1(y)
        if self.condition_bias is not None:
            hidden = hidden + self.condition_bias
        hidden = F.relu(hidden)
        log_scale = self.clamp * torch.tanh(self.conv_log_scale(hidden)) + self.log_scale_offset
        return y * torch.exp(log_scale) + self.conv_shift(hidden)


def _selection_conv(channels: Tensor, total: int) -> nn.Conv2d:
    """A 1x1 convolution whose output channel ``i`` is input channel ``channels[i]`` of ``total``."""
    conv = nn.Conv2d(total, len(channels), 1, bias=False)
    with torch.no_grad():
        conv.weight.copy_(F.one_hot(channels, total).float()[:, :, None, None])
    conv.requires_grad_(False)
    return conv.to(memory_format=torch.channels_last)


def _copy_conv(conv: nn.Conv2d, weight: Tensor | None = None, bias: Tensor | None = None) -> nn.Conv2d:
    """A detached copy of ``conv`` (optionally with new weight and bias), channels-last."""
    weight = conv.weight if weight is None else weight
    bias = conv.bias if bias is None else bias
    assert bias is not None, "only convolutions with a bias are copied"
    # A Conv2d's kernel_size and padding are pairs (or a padding string); its stubs say any tuple.
    kernel_size = cast("tuple[int, int]", conv.kernel_size)
    padding = cast("str | tuple[int, int]", conv.padding)
    copy = nn.Conv2d(weight.shape[1], weight.shape[0], kernel_size, padding=padding)
    assert copy.bias is not None
    with torch.no_grad():
        copy.weight.copy_(weight)
        copy.bias.copy_(bias)
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
    - a fixed condition's share of each first convolution into a constant bias map;
    - no log-determinant is computed.
    The passive half's global offset is not folded into the next convolution: with zero padding
    a 3x3 convolution of ``x + offset`` differs from ``conv(x) + conv(offset)`` at the borders.

    ``in_place`` goes further: no step splits, concatenates or gathers channels
    (``_InPlaceStep``); each permutation only renames which physical channels the next step
    treats as passive, and ``z`` comes out in physical order. That doubles the subnets'
    multiply-adds and removes about a third of the nodes an engine runs, which pays where the
    steps are small and the arithmetic is fast (``FastFlowModel.fold`` says where).
    ``conv_permutation`` (split form only) hands the halves to the next step through 1x1
    convolutions with 0/1 weights instead of channel gathers (``_FoldedStep``).
    """

    output_permutation: Tensor

    def __init__(
        self,
        flow: FlowStack,
        condition: Tensor | None = None,
        in_place: bool = False,
        conv_permutation: bool = False,
    ) -> None:
        super().__init__()
        steps = cast("list[CouplingStep]", list(flow.steps))
        if steps[0].condition_channels and condition is None:
            raise ValueError("this flow is conditioned: fold it with the condition it was trained with")
        self.passive = steps[0].passive
        self.in_place = in_place
        self.conv_permutation = conv_permutation and not in_place
        folded = [
            _FoldedStep(step, i == len(steps) - 1, condition, self.conv_permutation)
            for i, step in enumerate(steps)
        ]
        if not self.in_place:
            self.steps = nn.ModuleList(folded)
            # The last step's permutation, not applied: FlowStack's z == this module's z[:, output_permutation].
            self.register_buffer("output_permutation", steps[-1].permutation.clone())
            return
        physical = torch.arange(steps[0].channels)  # physical channel of each of a step's input channels
        in_place_steps = []
        for step, folded_step in zip(steps, folded, strict=True):
            in_place_steps.append(
                _InPlaceStep(folded_step, physical[: step.passive], physical[step.passive :])
            )
            physical = physical[step.permutation]
        self.steps = nn.ModuleList(in_place_steps)
        self.register_buffer("output_permutation", physical)

    def forward(self, x: Tensor, condition: Tensor | None = None) -> tuple[Tensor, None]:
        """``x`` (N, C, h, w) -> (``z`` (N, C, h, w), no log-determinant); ``condition`` is
        already folded in and ignored.

        ``z[:, self.output_permutation]`` is ``FlowStack``'s ``z``; the pair keeps the one
        contract of a flow, so ``FastFlowModel.flow`` runs folded and training flows alike.
        """
        if self.in_place:
            for step in self.steps:
                x = step(x)
            return x, None
        x1, x2 = x[:, : self.passive], x[:, self.passive :]
        for step in self.steps:
            x1, x2 = step(x1, x2)
        return torch.cat((x1, x2), dim=1), None
