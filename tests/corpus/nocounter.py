"""A correct torch-style BatchNorm2d that keeps no ``num_batches_tracked`` counter.

Imitates the many re-implementations that copy torch's constructor (``bias=`` included)
and call ``F.batch_norm`` but drop the counter as "only needed for momentum=None",
and then refuse ``momentum=None`` outright.

Conventions: none; every value, error, dtype and layout rule is torch's.
Contract gaps: no num_batches_tracked buffer (so torch's state_dict has one key more),
``momentum=None`` raises ValueError in the constructor.
"""

import torch
from torch import nn
from torch.nn import functional as F


class NoCounterBatchNorm2d(nn.Module):
    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True,
                 track_running_stats=True, device=None, dtype=None, *, bias=True):
        super().__init__()
        if momentum is None:
            raise ValueError("momentum=None (cumulative average) is not supported")
        factory = {"device": device, "dtype": dtype}
        self.num_features, self.eps, self.momentum = num_features, eps, momentum
        self.affine, self.track_running_stats = affine, track_running_stats
        self.register_parameter("weight", nn.Parameter(torch.ones(num_features, **factory)) if affine else None)
        self.register_parameter("bias", nn.Parameter(torch.zeros(num_features, **factory)) if affine and bias else None)
        if track_running_stats:
            self.register_buffer("running_mean", torch.zeros(num_features, **factory))
            self.register_buffer("running_var", torch.ones(num_features, **factory))
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_var", None)

    def reset_running_stats(self):
        if self.track_running_stats:
            self.running_mean.zero_()
            self.running_var.fill_(1)

    def reset_parameters(self):
        self.reset_running_stats()
        if self.weight is not None:
            nn.init.ones_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, x):
        if x.dim() != 4:
            raise ValueError(f"expected 4D input (got {x.dim()}D input)")
        tracking = self.training and self.track_running_stats
        batch_stats = self.training or self.running_mean is None
        return F.batch_norm(
            x,
            self.running_mean if tracking or not self.training else None,
            self.running_var if tracking or not self.training else None,
            self.weight, self.bias, batch_stats, self.momentum, self.eps)
