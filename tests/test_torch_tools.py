"""torch's isinstance-based tools see bnspec's modules as BatchNorms (issue: bnspec's
modules were plain nn.Modules, invisible to them), and bnspec.SyncBatchNorm's own
convert_sync_batchnorm. Every number still comes from bnspec.reference: the test that
patches every torch batch-norm entry point is tests/test_reference.py's
test_reference_never_calls_torch_batch_norm."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import bnspec
from bnspec import reference as R

TORCH_BATCHNORM = nn.modules.batchnorm._BatchNorm  # the class torch's tools test for
PAIRS = [(bnspec.BatchNorm1d, nn.BatchNorm1d), (bnspec.BatchNorm2d, nn.BatchNorm2d),
         (bnspec.BatchNorm3d, nn.BatchNorm3d), (bnspec.SyncBatchNorm, nn.SyncBatchNorm)]


def _model(dtype=torch.float64) -> nn.Module:
    """A small CNN with bnspec's BatchNorm1d/2d/3d, some parameters given non-default values."""
    gen = torch.Generator().manual_seed(14)
    model = nn.Sequential(
        nn.Conv3d(2, 3, 1), bnspec.BatchNorm3d(3), nn.Flatten(1, 2),  # (N, 3*D, H, W)
        nn.Conv2d(6, 4, 3), bnspec.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(16, 5),
        bnspec.BatchNorm1d(5),
    ).to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen, dtype=dtype))
    return model


def _x(dtype=torch.float64) -> torch.Tensor:
    return torch.randn((6, 2, 2, 4, 4), generator=torch.Generator().manual_seed(1), dtype=dtype)


@pytest.mark.parametrize("ours, theirs", PAIRS, ids=lambda c: c.__name__)
def test_bnspec_modules_are_instances_of_torchs_classes(ours, theirs):
    m = ours(4)
    assert isinstance(m, theirs) and isinstance(m, TORCH_BATCHNORM)
    assert type(m).forward is not theirs.forward  # the forward is bnspec's


def test_torchs_convert_sync_batchnorm_converts_bnspec_modules():
    model = _model()
    before = [m for m in model.modules() if isinstance(m, bnspec.BatchNorm2d)][0]
    converted = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    syncs = [m for m in converted.modules() if isinstance(m, nn.SyncBatchNorm)]
    assert len(syncs) == 3 and all(type(m) is nn.SyncBatchNorm for m in syncs)
    assert syncs[1].weight is before.weight and syncs[1].running_mean is before.running_mean


def test_bnspec_convert_sync_batchnorm_gives_bnspec_syncbatchnorm_with_the_same_state():
    model = _model()
    model.train()
    model[4].eval()  # a per-layer mode, carried over
    x = _x()
    old = [m for m in model.modules() if isinstance(m, TORCH_BATCHNORM)]
    with torch.no_grad():
        y_before = model(x)  # training layers use the batch's statistics; the eval one its unchanged buffers
    converted = bnspec.SyncBatchNorm.convert_sync_batchnorm(model)
    new = [m for m in converted.modules() if isinstance(m, TORCH_BATCHNORM)]
    assert [type(m) for m in new] == [bnspec.SyncBatchNorm] * 3
    for o, n in zip(old, new):
        assert n.weight is o.weight and n.bias is o.bias and n.running_var is o.running_var
        assert n.num_batches_tracked is o.num_batches_tracked and n.training == o.training
    with torch.no_grad():
        # No process group: bnspec.SyncBatchNorm is the same reference forward, bit for bit.
        assert torch.equal(converted(x), y_before)
    # A BatchNorm itself is returned as a new module, as torch's does.
    bn = bnspec.BatchNorm2d(3, momentum=None, affine=False)
    sync = bnspec.SyncBatchNorm.convert_sync_batchnorm(bn, process_group=None)
    assert type(sync) is bnspec.SyncBatchNorm and sync.momentum is None and sync.weight is None


def test_torch_func_replace_all_batch_norm_modules_():
    model = _model()
    torch.func.replace_all_batch_norm_modules_(model)
    bns = [m for m in model.modules() if isinstance(m, TORCH_BATCHNORM)]
    assert len(bns) == 3
    assert all(not m.track_running_stats and m.running_mean is None and m.num_batches_tracked is None for m in bns)
    # Without running statistics every mode normalizes with the batch's: the reference's train_forward.
    model.eval()
    x = torch.randn((4, 5), generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    bn = model[8]
    assert torch.equal(bn(x), R.train_forward(x, bn.weight, bn.bias, eps=bn.eps).y)


def _freeze_batchnorm(model: nn.Module) -> list[nn.Parameter]:
    """A freeze helper as model libraries write it (torchvision, mmcv, timm): eval mode
    and no gradients for every isinstance(m, _BatchNorm); returns the frozen parameters."""
    frozen = []
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()
            for p in m.parameters():
                p.requires_grad_(False)
                frozen.append(p)
    return frozen


def test_a_freeze_helper_freezes_bnspec_modules():
    model = _model()
    model.train()
    frozen = _freeze_batchnorm(model)
    assert len(frozen) == 6  # weight and bias of the three BatchNorms
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    model(_x()).sum().backward()
    assert all(torch.equal(v, buffers[k]) for k, v in model.named_buffers())  # eval: nothing updated
    assert all(p.grad is None for p in frozen)
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_weight_decay_exclusion_finds_bnspec_parameters():
    """The optimizer recipe that keeps norm weights out of weight decay."""
    model = _model()
    norm = {id(p) for m in model.modules() if isinstance(m, TORCH_BATCHNORM) for p in m.parameters()}
    groups = [{"params": [p for p in model.parameters() if id(p) not in norm], "weight_decay": 1e-4},
              {"params": [p for p in model.parameters() if id(p) in norm], "weight_decay": 0.0}]
    assert len(groups[1]["params"]) == 6
    torch.optim.SGD(groups, lr=0.1).step()  # a valid partition of the parameters
