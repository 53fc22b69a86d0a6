"""A blog post's BatchNorm2d ("BatchNorm from scratch, matching nn.BatchNorm2d").

Imitates the careful blog version: torch's constructor minus the factory keywords,
``register_buffer`` for the running statistics and an int64 ``num_batches_tracked``,
``momentum=None`` as the cumulative average, ``affine=False`` (weight and bias None),
``track_running_stats=False`` (buffers None, batch statistics in eval too).

Convention it follows instead of torch's:

* ``one_pass_variance``: the variance is computed in one pass,
  ``var = mean(x*x) - mean(x)**2`` (in the input's precision, float32 for half types),
  both to normalize and, times n / (n - 1), for the running variance. It cancels
  catastrophically when |mean| >> std.

Contract gaps: no device, dtype or bias keywords (so no bias=False), no
reset_running_stats / reset_parameters.
"""

import torch
from torch import nn


class BlogBatchNorm2d(nn.Module):
    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True):
        super().__init__()
        self.num_features = num_features
        self.eps = eps
        self.momentum = momentum
        self.affine = affine
        self.track_running_stats = track_running_stats
        if affine:
            self.weight = nn.Parameter(torch.ones(num_features))
            self.bias = nn.Parameter(torch.zeros(num_features))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        if track_running_stats:
            self.register_buffer("running_mean", torch.zeros(num_features))
            self.register_buffer("running_var", torch.ones(num_features))
            self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_var", None)
            self.register_buffer("num_batches_tracked", None)

    def forward(self, x):
        if x.dim() != 4:
            raise ValueError(f"expected 4D input (got {x.dim()}D input)")
        factor = 0.0
        if self.training and self.track_running_stats:
            self.num_batches_tracked += 1
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        use_batch = self.training or self.running_mean is None
        n = x.shape[0] * x.shape[2] * x.shape[3]
        if use_batch and n == 1:
            raise ValueError(f"Expected more than 1 value per channel when training, got input size {x.size()}")
        if use_batch and self.eps <= 0:
            raise ValueError(f"batch_norm eps must be positive during training, but got {self.eps}")
        if self.eps < 0:
            raise ValueError(f"batch_norm eps must be non-negative, but got {self.eps}")
        if not x.is_floating_point():
            raise NotImplementedError(f"\"batch_norm\" not implemented for '{x.type()[6:-6]}'")
        if (self.affine or self.track_running_stats) and x.shape[1] != self.num_features:
            which = "running_mean" if self.track_running_stats else "weight"
            raise RuntimeError(f"{which} should contain {x.shape[1]} elements not {self.num_features}")
        h = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x

        if use_batch:
            mean = h.mean(dim=(0, 2, 3))
            var = (h * h).mean(dim=(0, 2, 3)) - mean * mean  # one pass: E[x^2] - E[x]^2
            if self.training and self.track_running_stats and n > 0:
                with torch.no_grad():
                    self.running_mean.mul_(1 - factor).add_(factor * mean)
                    self.running_var.mul_(1 - factor).add_(factor * var * n / (n - 1))
        else:
            mean, var = self.running_mean, self.running_var
        y = (h - mean[None, :, None, None]) / torch.sqrt(var[None, :, None, None] + self.eps)
        if self.affine:
            y = y * self.weight[None, :, None, None] + self.bias[None, :, None, None]
        return y.to(x.dtype)
