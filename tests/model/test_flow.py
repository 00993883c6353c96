"""Flow maths: parity with FrEIA's AllInOneBlock, invertibility, log-det against autograd."""

from __future__ import annotations

import pytest
import torch

from fastflow.model.flow import CouplingStep, FlowStack

FrEIA = pytest.importorskip("FrEIA")
from FrEIA.framework import SequenceINN
from FrEIA.modules import AllInOneBlock


def freia_flow(channels: int, height: int, width: int, steps: int, kernels, hidden_ratio: float):
    """The reference: FrEIA's SequenceINN of AllInOneBlocks as FastFlow builds it."""

    def constructor(kernel):
        def make(c_in, c_out):
            hidden = int(c_in * hidden_ratio)
            return torch.nn.Sequential(
                torch.nn.Conv2d(c_in, hidden, kernel, padding="same"),
                torch.nn.ReLU(),
                torch.nn.Conv2d(hidden, c_out, kernel, padding="same"),
            )

        return make

    flow = SequenceINN(channels, height, width)
    for i in range(steps):
        flow.append(
            AllInOneBlock,
            subnet_constructor=constructor(kernels[i % len(kernels)]),
            affine_clamping=2.0,
            permute_soft=False,
        )
    return flow


def copy_reference_weights(reference, ours: FlowStack) -> None:
    """Give our flow the reference's weights, randomising the global affine away from init."""
    for block, step in zip(reference.module_list, ours.steps, strict=True):
        with torch.no_grad():
            block.global_scale.add_(0.3 * torch.randn_like(block.global_scale))
            block.global_offset.add_(0.3 * torch.randn_like(block.global_offset))
            step.subnet.load_state_dict(block.subnet.state_dict())
            step.global_scale.copy_(block.global_scale)
            step.global_offset.copy_(block.global_offset)
            permutation = block.w_perm.squeeze(-1).squeeze(-1).argmax(dim=1)
            step.permutation.copy_(permutation)
            step.inverse_permutation.copy_(torch.argsort(permutation))


@pytest.mark.parametrize(
    ("channels", "kernels", "hidden_ratio"),
    [(64, (3,), 1.0), (40, (3, 1), 1.0), (33, (3, 1), 0.16), (768, (3, 1), 0.16)],
)
def test_parity_with_freia_all_in_one_block(channels, kernels, hidden_ratio):
    height, width, steps = 7, 9, 4
    reference = freia_flow(channels, height, width, steps, kernels, hidden_ratio)
    ours = FlowStack(channels, steps, hidden_ratio, kernels)
    copy_reference_weights(reference, ours)
    x = torch.randn(3, channels, height, width)

    z_ref, log_det_ref = reference(x)
    z, log_det = ours(x)

    torch.testing.assert_close(z, z_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(log_det.sum(dim=(1, 2)), log_det_ref, atol=1e-5, rtol=1e-5)
    assert log_det.shape == (3, height, width)


def test_parity_fails_when_a_permutation_differs():
    """The parity check is sharp: one swapped permutation breaks it."""
    reference = freia_flow(16, 5, 5, 2, (3, 1), 1.0)
    ours = FlowStack(16, 2, 1.0, (3, 1))
    copy_reference_weights(reference, ours)
    ours.steps[1].permutation.copy_(ours.steps[1].permutation.roll(1))
    x = torch.randn(2, 16, 5, 5)
    assert not torch.allclose(ours(x)[0], reference(x)[0], atol=1e-3)


def test_inverse_round_trip():
    flow = FlowStack(24, 8, 1.0, (3, 1))
    with torch.no_grad():  # move away from the identity-like init
        for p in flow.parameters():
            p.add_(0.1 * torch.randn_like(p))
    x = torch.randn(2, 24, 11, 6)
    z, _ = flow(x)
    torch.testing.assert_close(flow.inverse(z), x, atol=1e-4, rtol=1e-4)


def test_log_det_matches_autograd_jacobian():
    torch.set_default_dtype(torch.float64)
    try:
        step = CouplingStep(4, kernel_size=3, hidden_ratio=2.0)
        with torch.no_grad():
            for p in step.parameters():
                p.add_(0.5 * torch.randn_like(p))
        x = torch.randn(1, 4, 3, 2)
        jacobian = torch.autograd.functional.jacobian(lambda t: step(t)[0], x).reshape(x.numel(), x.numel())
        _, expected = torch.linalg.slogdet(jacobian)
        _, log_det = step(x)
        torch.testing.assert_close(log_det.sum(), expected)
    finally:
        torch.set_default_dtype(torch.float32)


def test_odd_channel_split_and_size_independence():
    """Only channels are fixed at construction: any spatial size runs through the same flow."""
    flow = FlowStack(5, 3)
    for shape in [(1, 5, 4, 4), (2, 5, 17, 3)]:
        z, log_det = flow(torch.randn(shape))
        assert z.shape == shape and log_det.shape == (shape[0], *shape[2:])


def test_swapped_halves_trade_places_and_invert():
    flow = FlowStack(6, 3, permutation="swap")
    assert flow.steps[0].permutation.tolist() == [3, 4, 5, 0, 1, 2]
    with torch.no_grad():
        for p in flow.parameters():
            p.add_(0.1 * torch.randn_like(p))
    x = torch.randn(2, 6, 5, 4)
    z, _ = flow(x)
    torch.testing.assert_close(flow.inverse(z), x, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(("permutation", "gathers"), [("random", True), ("swap", False)])
def test_a_folded_flow_with_swapped_halves_gathers_no_channel(permutation, gathers):
    """What makes "swap" fast: its folded graph has no channel gather for an engine to reorder around."""
    folded = FlowStack(8, 4, permutation=permutation).fold()
    with torch.no_grad():
        graph = torch.jit.trace(
            lambda x: folded(x)[0], torch.randn(1, 8, 6, 6), check_trace=False
        ).inlined_graph
    assert ("aten::index_select" in str(graph)) is gathers
