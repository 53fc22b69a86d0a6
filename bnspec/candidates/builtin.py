"""Built-in torch-module candidates (imported in the child only)."""

from __future__ import annotations

from bnspec.candidates.protocol import FULL
from bnspec.candidates.torch_module import TorchModuleAdapter


def torch_modules(device: str = "cpu") -> TorchModuleAdapter:
    import torch.nn as nn

    return TorchModuleAdapter({1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}, FULL, device=device)


def bnspec_modules(device: str = "cpu") -> TorchModuleAdapter:
    import bnspec

    return TorchModuleAdapter({1: bnspec.BatchNorm1d, 2: bnspec.BatchNorm2d, 3: bnspec.BatchNorm3d}, FULL, device=device)
