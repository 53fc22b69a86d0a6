"""bnspec.swap: every BatchNorm of a model swapped for bnspec's reference modules with
its whole state, and back, without changing any output."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import bnspec
from bnspec import swap

F64 = torch.float64


class KernelBatchNorm2d(nn.BatchNorm2d):
    """A user's subclass (a custom kernel would override forward): swapped like torch's."""


def _model() -> nn.Module:
    """BatchNorm1d/2d/3d, torch's SyncBatchNorm and a subclass, in float64 with
    non-default parameters and running statistics (after two training steps)."""
    gen = torch.Generator().manual_seed(3)
    model = nn.Sequential(
        nn.Conv3d(2, 3, 1), nn.BatchNorm3d(3), nn.Flatten(1, 2),
        nn.Conv2d(6, 4, 1), KernelBatchNorm2d(4), nn.SyncBatchNorm(4), nn.ReLU(),
        nn.Flatten(), nn.Linear(64, 5), nn.BatchNorm1d(5, momentum=None),
    ).to(F64)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen, dtype=F64))
    for _ in range(2):
        model(_x(seed=7))
    return model


def _x(seed: int = 0) -> torch.Tensor:
    return torch.randn((6, 2, 2, 4, 4), generator=torch.Generator().manual_seed(seed), dtype=F64)


def _outputs(model: nn.Module, x: torch.Tensor):
    """Output and the gradients of every parameter and of the input, in the model's mode."""
    x = x.clone().requires_grad_(True)
    y = model(x)
    params = [p for p in model.parameters()]
    grads = torch.autograd.grad((y * y).sum(), [x, *params])
    return [y.detach(), *grads]


def _batchnorm_types(model):
    return [type(m) for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_round_trip_changes_no_output_and_the_reference_agrees_with_torch(training):
    model = _model().train(training)
    model[5].train(not training)  # one layer in the other mode: per-layer state carried
    kinds = _batchnorm_types(model)
    params = list(model.parameters())
    state = {k: v.clone() for k, v in model.state_dict().items()}
    want = _outputs(model, _x())
    want_state = {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(state)  # back to before the step (a training step moves the statistics)

    model = swap.to_reference(model)
    assert _batchnorm_types(model) == [bnspec.BatchNorm3d, bnspec.BatchNorm2d, bnspec.SyncBatchNorm,
                                       bnspec.BatchNorm1d]
    assert list(model.parameters()) == params  # the same tensors: an optimizer keeps working
    assert [m.training for m in model.modules()] == [training] * 6 + [not training] + [training] * 4
    got = _outputs(model, _x())
    for a, b in zip(got, want):
        # float64, at most 96 values per channel: torch's kernel and the reference are both
        # within ~100 u = 2e-14 (relative) of the exact values; a formula difference is O(1).
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    model.load_state_dict(state)

    model = swap.from_reference(model)
    assert _batchnorm_types(model) == kinds
    assert not any(hasattr(m, swap.REPLACED_CLASS) for m in model.modules())
    for a, b in zip(_outputs(model, _x()), want):
        assert torch.equal(a, b)  # torch's kernels again, bit for bit
    assert all(torch.equal(v, want_state[k]) for k, v in model.state_dict().items())


def test_device_dtype_and_hooks_carried_and_a_batchnorm_itself_is_returned_replaced():
    bn = nn.BatchNorm2d(3, dtype=torch.float16).eval()
    seen = []
    bn.register_forward_hook(lambda m, args, out: seen.append(type(m)))
    ref = swap.to_reference(bn)
    assert type(ref) is bnspec.BatchNorm2d and ref is not bn and not ref.training
    assert ref.weight.dtype == ref.running_mean.dtype == torch.float16 and ref.weight.device == bn.weight.device
    ref(torch.ones(2, 3, 2, 2, dtype=torch.float16))
    assert seen == [bnspec.BatchNorm2d]
    assert type(swap.from_reference(ref)) is nn.BatchNorm2d
    # bnspec's own modules are left as they are, and go back to torch's class of their kind
    mine = bnspec.BatchNorm1d(3)
    assert swap.to_reference(mine) is mine and type(swap.from_reference(mine)) is nn.BatchNorm1d


def test_a_shared_layer_stays_shared():
    bn = nn.BatchNorm1d(4)
    model = nn.Sequential(bn, nn.Linear(4, 4), bn)
    model = swap.to_reference(model)
    assert model[0] is model[2] and type(model[0]) is bnspec.BatchNorm1d


def test_a_batchnorm_of_no_known_kind_raises_before_anything_changes():
    model = nn.Sequential(nn.BatchNorm1d(3), nn.LazyBatchNorm2d())
    with pytest.raises(TypeError, match="LazyBatchNorm2d is a BatchNorm of no known kind"):
        swap.to_reference(model)
    assert type(model[0]) is nn.BatchNorm1d
