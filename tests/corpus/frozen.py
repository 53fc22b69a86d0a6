"""A frozen, inference-only BatchNorm2d (the style of detection libraries' backbones).

Imitates the layer detection code swaps in for a pretrained backbone's BatchNorm:
weight, bias, running_mean and running_var are all BUFFERS (weight ones, bias zeros,
mean zeros, var ones), so no optimizer touches them and they load from a checkpoint;
forward folds them into one per-channel scale and shift.

Convention it follows instead of torch's:

* ``running_stats_in_training``: the running statistics normalize in training mode
  too, and nothing is ever updated (no batch statistics, no counter).

Values are torch's eval values (computed in float32 or better, output in the input
dtype); torch's rank, channel-count, eps and integer-input checks. Contract gaps: constructor
``(num_features, eps)`` only (no momentum, affine, track_running_stats, device, dtype,
bias, nor their variants), weight and bias are not parameters, no num_batches_tracked,
no reset_running_stats / reset_parameters.
"""

import torch
from torch import nn


class FrozenBatchNorm2d(nn.Module):
    def __init__(self, num_features, eps=1e-5):
        super().__init__()
        self.num_features = num_features
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def forward(self, x):
        if x.dim() != 4:
            raise ValueError(f"expected 4D input (got {x.dim()}D input)")
        if self.eps < 0:
            raise ValueError(f"batch_norm eps must be non-negative, but got {self.eps}")
        if not x.is_floating_point():
            raise NotImplementedError(f"\"batch_norm\" not implemented for '{x.type()[6:-6]}'")
        if x.shape[1] != self.num_features:
            raise RuntimeError(f"running_mean should contain {x.shape[1]} elements not {self.num_features}")
        # same in training and eval: fold the frozen statistics into scale and shift
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        shift = self.bias - self.running_mean * scale
        h = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        return (h * scale.reshape(1, -1, 1, 1) + shift.reshape(1, -1, 1, 1)).to(x.dtype)
