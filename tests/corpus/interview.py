"""Interview notes' BatchNorm2d (the "implement BatchNorm on a whiteboard" answer).

The compact answer: biased batch variance to normalize (right), momentum on the new
value (right), but the running variance is fed the same BIASED variance.

Convention it follows instead of torch's:

* ``biased_running_var``: ``running_var = (1 - m) * running_var + m * var_biased``
  (torch stores the unbiased variance, var * n / (n - 1)).

Otherwise torch's values and input checks (float32 reduction for float16/bfloat16).
Contract gaps: constructor ``(num_features, eps, momentum)`` only (no affine,
track_running_stats, device, dtype, bias; momentum=None unsupported), no
num_batches_tracked, no reset_running_stats / reset_parameters.
"""

import torch
from torch import nn


class InterviewBatchNorm2d(nn.Module):
    def __init__(self, num_features, eps=1e-5, momentum=0.1):
        super().__init__()
        self.num_features, self.eps, self.momentum = num_features, eps, momentum
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def forward(self, x):
        if x.dim() != 4:
            raise ValueError(f"expected 4D input (got {x.dim()}D input)")
        n = x.shape[0] * x.shape[2] * x.shape[3]
        if self.training and n == 1:
            raise ValueError(f"Expected more than 1 value per channel when training, got input size {x.size()}")
        if self.training and self.eps <= 0:
            raise ValueError(f"batch_norm eps must be positive during training, but got {self.eps}")
        if self.eps < 0:
            raise ValueError(f"batch_norm eps must be non-negative, but got {self.eps}")
        if not x.is_floating_point():
            raise NotImplementedError(f"\"batch_norm\" not implemented for '{x.type()[6:-6]}'")
        if x.shape[1] != self.num_features:
            raise RuntimeError(f"running_mean should contain {x.shape[1]} elements not {self.num_features}")
        h = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x

        if self.training:
            mu = h.mean(dim=(0, 2, 3))
            var = ((h - mu.view(1, -1, 1, 1)) ** 2).mean(dim=(0, 2, 3))  # biased
            if n > 0:
                with torch.no_grad():
                    self.running_mean.mul_(1 - self.momentum).add_(self.momentum * mu)
                    self.running_var.mul_(1 - self.momentum).add_(self.momentum * var)  # biased!
        else:
            mu, var = self.running_mean, self.running_var
        out = (h - mu.view(1, -1, 1, 1)) / torch.sqrt(var.view(1, -1, 1, 1) + self.eps)
        return (out * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)).to(x.dtype)
