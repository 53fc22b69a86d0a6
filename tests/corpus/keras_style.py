"""A port of Keras' BatchNormalization to a torch BatchNorm2d (axis=1, channels first).

Imitates code moved from Keras by hand, keeping Keras' names for the hyper-parameters
and Keras' update rule: ``moving = moving * momentum + batch * (1 - momentum)``.

Conventions it follows instead of torch's:

* ``momentum_on_old``: momentum weights the old value (default 0.99, i.e. torch's 0.01);
* ``biased_running_var``: the moving variance blends in the biased batch variance.

Constructor-default difference: ``eps=1e-3`` (Keras' epsilon) instead of torch's 1e-5.
Otherwise torch's values (biased variance to normalize, self.training chooses batch
or moving statistics, float32 reduction for float16/bfloat16, torch's input checks).
Contract gaps: constructor ``(num_features, eps, momentum)`` only (no affine,
track_running_stats, device, dtype, bias; momentum=None unsupported), no
num_batches_tracked, no reset_running_stats / reset_parameters.
"""

import torch
from torch import nn


class KerasStyleBatchNorm2d(nn.Module):
    def __init__(self, num_features, eps=1e-3, momentum=0.99):
        super().__init__()
        self.num_features, self.eps, self.momentum = num_features, eps, momentum
        self.weight = nn.Parameter(torch.ones(num_features))             # gamma
        self.bias = nn.Parameter(torch.zeros(num_features))              # beta
        self.register_buffer("running_mean", torch.zeros(num_features))  # moving_mean
        self.register_buffer("running_var", torch.ones(num_features))    # moving_variance

    def forward(self, inputs):
        if inputs.dim() != 4:
            raise ValueError(f"expected 4D input (got {inputs.dim()}D input)")
        n = inputs.shape[0] * inputs.shape[2] * inputs.shape[3]
        if self.training and n == 1:
            raise ValueError(f"Expected more than 1 value per channel when training, got input size {inputs.size()}")
        if self.training and self.eps <= 0:
            raise ValueError(f"batch_norm eps must be positive during training, but got {self.eps}")
        if self.eps < 0:
            raise ValueError(f"batch_norm eps must be non-negative, but got {self.eps}")
        if not inputs.is_floating_point():
            raise NotImplementedError(f"\"batch_norm\" not implemented for '{inputs.type()[6:-6]}'")
        if inputs.shape[1] != self.num_features:
            raise RuntimeError(f"running_mean should contain {inputs.shape[1]} elements not {self.num_features}")
        x = inputs.float() if inputs.dtype in (torch.float16, torch.bfloat16) else inputs

        if self.training:
            mean = x.mean(dim=(0, 2, 3))
            variance = ((x - mean.view(1, -1, 1, 1)) ** 2).mean(dim=(0, 2, 3))
            if n > 0:
                with torch.no_grad():
                    m = self.momentum
                    self.running_mean.copy_(self.running_mean * m + mean * (1 - m))
                    self.running_var.copy_(self.running_var * m + variance * (1 - m))
        else:
            mean, variance = self.running_mean, self.running_var
        inv = torch.rsqrt(variance + self.eps)
        y = (x - mean.view(1, -1, 1, 1)) * inv.view(1, -1, 1, 1)
        return (y * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)).to(inputs.dtype)
