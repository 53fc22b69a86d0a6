"""A lecture's from-scratch BatchNorm2d (the style of a "build it yourself" lesson).

Imitates the layer a teacher types live in a notebook: gamma and beta as parameters,
mean and variance straight from ``x.mean`` / ``x.var``, the running buffers blended
under ``torch.no_grad()``, ``self.training`` choosing batch or running statistics.

Convention it follows instead of torch's:

* ``unbiased_normalization``: ``x.var(...)`` keeps its default correction (n - 1), so the
  batch is normalized with the UNBIASED variance (torch normalizes with the biased one).
  The running variance also gets the unbiased variance, which is what torch stores.

Everything else is torch's: momentum weights the new value, eval uses the running
statistics, float16/bfloat16 are reduced in float32, torch's input checks.
Contract gaps: constructor ``(num_features, eps, momentum)`` only (no affine,
track_running_stats, device, dtype, bias; momentum=None unsupported), no
num_batches_tracked, no reset_running_stats / reset_parameters.
"""

import torch
from torch import nn


class LectureBatchNorm2d(nn.Module):
    def __init__(self, num_features, eps=1e-5, momentum=0.1):
        super().__init__()
        self.num_features = num_features
        self.eps = eps
        self.momentum = momentum
        self.weight = nn.Parameter(torch.ones(num_features))   # gamma
        self.bias = nn.Parameter(torch.zeros(num_features))    # beta
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def forward(self, x):
        # torch's input checks, so that only the convention above differs
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
            xmean = h.mean(dim=(0, 2, 3), keepdim=True)
            xvar = h.var(dim=(0, 2, 3), keepdim=True)  # default correction: unbiased
        else:
            xmean = self.running_mean.view(1, -1, 1, 1)
            xvar = self.running_var.view(1, -1, 1, 1)
        xhat = (h - xmean) / torch.sqrt(xvar + self.eps)
        out = self.weight.view(1, -1, 1, 1) * xhat + self.bias.view(1, -1, 1, 1)

        if self.training and n > 0:
            with torch.no_grad():
                m = self.momentum
                self.running_mean.copy_((1 - m) * self.running_mean + m * xmean.flatten())
                self.running_var.copy_((1 - m) * self.running_var + m * xvar.flatten())
        return out.to(x.dtype)
