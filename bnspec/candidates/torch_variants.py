"""Built-in torch candidates besides the native modules (imported in the child only).

* ``torch-functional``: bnspec's module bookkeeping (torch's constructor, parameters and buffers)
  whose forward calls ``torch.nn.functional.batch_norm`` with them. The module does the
  bookkeeping torch's module does around the kernel (rank check, counter, momentum=None
  factor, batch statistics in eval without buffers); the numbers are the functional's.
* ``torch-compile``: ``torch.compile(nn.BatchNormNd(...), dynamic=True)`` (an
  ``OptimizedModule``; what it does to ``state_dict`` keys and attribute access is its own).
  The first compile takes 20-40 s on a cold cache, more than the default call time limit,
  so the loader compiles once while the candidate starts (the start's own limit); dynamo
  recompiles on new flags/dtypes/ranks and falls back to eager after its recompile
  limit, as it does for users.
* ``torch-channels-last``: ``nn.BatchNormNd`` converted with
  ``.to(memory_format=torch.channels_last)``, converting each 4-D/5-D input to channels_last
  before the kernel (so a contiguous input gives a channels_last output). BatchNorm1d has
  no channels_last format: the 1-d family is torch's plain module.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

import bnspec

from bnspec.candidates.protocol import FULL, Capabilities
from bnspec.candidates.torch_module import TorchModuleAdapter

# -- torch-functional -------------------------------------------------------------------------


class _Functional:
    """bnspec's module bookkeeping (constructor, buffers, state_dict, resets) with the
    computation left to ``F.batch_norm``: torch's functional kernel behind torch's module
    contract."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        batch = self.training or (self.running_mean is None and self.running_var is None)
        keep = not self.training or self.track_running_stats
        return F.batch_norm(input, self.running_mean if keep else None, self.running_var if keep else None,
                            self.weight, self.bias, batch, factor, self.eps)


class FunctionalBatchNorm1d(_Functional, bnspec.BatchNorm1d):
    pass


class FunctionalBatchNorm2d(_Functional, bnspec.BatchNorm2d):
    pass


class FunctionalBatchNorm3d(_Functional, bnspec.BatchNorm3d):
    pass


def torch_functional(device: str = "cpu") -> TorchModuleAdapter:
    return TorchModuleAdapter({1: FunctionalBatchNorm1d, 2: FunctionalBatchNorm2d, 3: FunctionalBatchNorm3d},
                              FULL, device=device)


# -- torch-compile ----------------------------------------------------------------------------

COMPILE_CAPS = Capabilities(notes=(
    "torch.compile(module, dynamic=True); one warm-up compile runs while the candidate loads "
    "(20-40 s cold), later recompiles take about a second each",
    "dynamo recompiles for new flags/dtypes/ranks and falls back to eager after its recompile limit",
))


def _wrapped(cls, wrap, prefix: str):
    """A factory with torch's constructor signature: ``wrap(cls(...))``. ``bias`` is passed
    only when False, so a torch without the keyword still builds the default module."""
    def factory(num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True,
                device=None, dtype=None, *, bias=True):
        kw = dict(eps=eps, momentum=momentum, affine=affine, track_running_stats=track_running_stats,
                  device=device, dtype=dtype)
        if not bias:
            kw["bias"] = False
        return wrap(cls(num_features, **kw))

    factory.__name__ = factory.__qualname__ = f"{prefix}_{cls.__name__}"
    return factory


def _compiled(cls):
    return _wrapped(cls, lambda m: torch.compile(m, dynamic=True), "compiled")


def _warm_up(device: str) -> None:
    """Compile once while the candidate loads (the start has its own, longer time limit), so
    the process-wide one-time cost (dynamo/inductor start, the C++ compiler) does not land
    on the first call's limit. Modules made later are compiled by torch.compile as usual."""
    m = torch.compile(nn.BatchNorm2d(2, device=device), dynamic=True)
    m(torch.randn(2, 2, 3, 3, device=device))


def torch_compile(device: str = "cpu") -> TorchModuleAdapter:
    _warm_up(device)
    return TorchModuleAdapter({1: _compiled(nn.BatchNorm1d), 2: _compiled(nn.BatchNorm2d),
                               3: _compiled(nn.BatchNorm3d)}, COMPILE_CAPS, device=device)


# -- torch-channels-last ------------------------------------------------------------------------


class _ChannelsLast:
    """Mixin: convert 4-D/5-D inputs to channels_last before torch's kernel."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        fmt = {4: torch.channels_last, 5: torch.channels_last_3d}.get(input.dim())
        if fmt is not None:
            input = input.contiguous(memory_format=fmt)
        return super().forward(input)


class ChannelsLastBatchNorm1d(_ChannelsLast, nn.BatchNorm1d):
    pass


class ChannelsLastBatchNorm2d(_ChannelsLast, nn.BatchNorm2d):
    pass


class ChannelsLastBatchNorm3d(_ChannelsLast, nn.BatchNorm3d):
    pass


def _channels_last(cls):
    fmt = torch.channels_last_3d if cls is ChannelsLastBatchNorm3d else torch.channels_last
    return _wrapped(cls, lambda m: m.to(memory_format=fmt), "channels_last")


CHANNELS_LAST_CAPS = Capabilities(notes=(
    "every 4-D/5-D input is converted to channels_last, so contiguous input gives channels_last output",
    "BatchNorm1d has no channels_last format: the 1-d family is torch's plain module",
))


def torch_channels_last(device: str = "cpu") -> TorchModuleAdapter:
    return TorchModuleAdapter({1: _channels_last(ChannelsLastBatchNorm1d), 2: _channels_last(ChannelsLastBatchNorm2d),
                               3: _channels_last(ChannelsLastBatchNorm3d)}, CHANNELS_LAST_CAPS, device=device)
