"""Correct BatchNorm2d layers that each lack exactly ONE piece of torch's module contract.

``PARTIAL`` maps a name in this file (a suite target ``tests/zoo/partial.py:Name``) to the
contract pieces (``bnspec.contract``'s names) that discovery must report missing. Apart
from that piece each is the zoo's correct base, so the suite must give exactly one cause
(the contract), fail no clause but S5.1, and never fail with an exception of its own
(tests/test_corpus.py drives every clause against them).
"""

from __future__ import annotations

import importlib.util
import os
import sys

import torch

if __package__:
    from .base import BaseBatchNorm2d
else:  # loaded by file path as a suite target: no package
    _name = "bnspec_zoo_base"
    if _name not in sys.modules:
        _spec = importlib.util.spec_from_file_location(_name, os.path.join(os.path.dirname(__file__), "base.py"))
        sys.modules[_name] = importlib.util.module_from_spec(_spec)
        _spec.loader.exec_module(sys.modules[_name])
    BaseBatchNorm2d = sys.modules[_name].BaseBatchNorm2d

PARTIAL: dict[str, set[str]] = {}


def lacks(*pieces: str):
    def register(cls):
        PARTIAL[cls.__name__] = set(pieces)
        return cls
    return register


@lacks("eps")
class NoEpsKeyword(BaseBatchNorm2d):
    def __init__(self, num_features, momentum=0.1, affine=True, track_running_stats=True, device=None,
                 dtype=None, *, bias=True):
        super().__init__(num_features, 1e-5, momentum, affine, track_running_stats, device, dtype, bias=bias)


@lacks("momentum", "momentum=None")
class NoMomentumKeyword(BaseBatchNorm2d):
    def __init__(self, num_features, eps=1e-5, affine=True, track_running_stats=True, device=None,
                 dtype=None, *, bias=True):
        super().__init__(num_features, eps, 0.1, affine, track_running_stats, device, dtype, bias=bias)


@lacks("affine", "affine=False")
class NoAffineKeyword(BaseBatchNorm2d):
    def __init__(self, num_features, eps=1e-5, momentum=0.1, track_running_stats=True, device=None,
                 dtype=None, *, bias=True):
        super().__init__(num_features, eps, momentum, True, track_running_stats, device, dtype, bias=bias)


@lacks("track_running_stats", "track_running_stats=False")
class NoTrackingKeyword(BaseBatchNorm2d):
    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True, device=None, dtype=None, *, bias=True):
        super().__init__(num_features, eps, momentum, affine, True, device, dtype, bias=bias)


@lacks("bias=False")
class NoBiasKeyword(BaseBatchNorm2d):
    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True,
                 device=None, dtype=None):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)


@lacks("device")
class NoDeviceKeyword(BaseBatchNorm2d):
    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True,
                 dtype=None, *, bias=True):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, None, dtype, bias=bias)


@lacks("dtype")
class NoDtypeKeyword(BaseBatchNorm2d):
    """Built in the default dtype; the suite converts it with ``.to(dtype)``."""

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True,
                 device=None, *, bias=True):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, None, bias=bias)


@lacks("momentum=None")
class NoCumulativeAverage(BaseBatchNorm2d):
    def __init__(self, *args, **kwargs):
        momentum = kwargs.get("momentum", args[2] if len(args) > 2 else 0.1)
        if momentum is None:
            raise ValueError("momentum=None (cumulative average) is not supported")
        super().__init__(*args, **kwargs)


@lacks("num_batches_tracked buffer", "momentum=None")
class NoCounter(NoCumulativeAverage):
    """Keeps no num_batches_tracked; momentum=None would need it."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        del self.num_batches_tracked

    def _counts_step(self, input):
        return False

    def reset_running_stats(self):
        if self.track_running_stats:
            self.running_mean.zero_()
            self.running_var.fill_(1)

    def _load_from_state_dict(self, state_dict, prefix, *args):
        torch.nn.Module._load_from_state_dict(self, state_dict, prefix, *args)


@lacks("reset_running_stats")
class NoResetRunningStats(BaseBatchNorm2d):
    reset_running_stats = None

    def reset_parameters(self):
        if self.track_running_stats:
            self.running_mean.zero_()
            self.running_var.fill_(1)
            self.num_batches_tracked.zero_()
        if self.affine:
            self._init_weight(self.weight)
            if self.bias is not None:
                torch.nn.init.zeros_(self.bias)


@lacks("reset_parameters")
class NoResetParameters(BaseBatchNorm2d):
    reset_parameters = None

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True,
                 device=None, dtype=None, *, bias=True):
        torch.nn.Module.__init__(self)  # the base's __init__ without its reset_parameters() call
        self.num_features, self.eps, self.momentum = num_features, eps, momentum
        self.affine, self.track_running_stats = affine, track_running_stats
        self._make_parameters(bias, device=device, dtype=dtype)
        self._make_buffers(device=device, dtype=dtype)
        BaseBatchNorm2d.reset_parameters(self)
