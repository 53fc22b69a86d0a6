"""A textbook's function-plus-module BatchNorm2d (the style of "Dive into Deep Learning").

A pure function ``batch_norm`` does the work and a thin module owns the state, the way a
textbook chapter builds it up. Conventions it follows instead of torch's:

* ``stats_by_grad_mode``: the function asks ``torch.is_grad_enabled()``, not
  ``module.training``: under ``torch.no_grad()`` it normalizes with the moving
  statistics (and updates nothing), with gradients enabled it uses the batch statistics
  and updates the moving ones, in train and eval mode alike.
* ``momentum_on_old``: ``moving = momentum * moving + (1 - momentum) * batch``; the
  default momentum 0.9 on the old value is torch's 0.1 on the new one.
* ``biased_running_var``: the moving variance blends in the biased batch variance.

Otherwise torch's values (biased variance to normalize, float32 reduction for
float16/bfloat16, torch's input checks). Contract gaps: constructor
``(num_features, eps, momentum)`` only (no affine, track_running_stats, device, dtype,
bias; momentum=None unsupported), no num_batches_tracked, no reset methods.
"""

import torch
from torch import nn


def batch_norm(X, gamma, beta, moving_mean, moving_var, eps, momentum):
    if not torch.is_grad_enabled():
        # prediction: use the moving averages
        X_hat = (X - moving_mean) / torch.sqrt(moving_var + eps)
    else:
        # training: mean and (biased) variance over batch and spatial positions
        mean = X.mean(dim=(0, 2, 3), keepdim=True)
        var = ((X - mean) ** 2).mean(dim=(0, 2, 3), keepdim=True)
        X_hat = (X - mean) / torch.sqrt(var + eps)
        moving_mean = momentum * moving_mean + (1.0 - momentum) * mean
        moving_var = momentum * moving_var + (1.0 - momentum) * var
    Y = gamma * X_hat + beta
    return Y, moving_mean.data, moving_var.data


class TextbookBatchNorm2d(nn.Module):
    def __init__(self, num_features, eps=1e-5, momentum=0.9):
        super().__init__()
        self.num_features = num_features
        self.eps = eps
        self.momentum = momentum
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def forward(self, X):
        # torch's input checks, with "training" read as the function reads it
        if X.dim() != 4:
            raise ValueError(f"expected 4D input (got {X.dim()}D input)")
        batch_stats, n = torch.is_grad_enabled(), X.shape[0] * X.shape[2] * X.shape[3]
        if batch_stats and n == 1:
            raise ValueError(f"Expected more than 1 value per channel when training, got input size {X.size()}")
        if batch_stats and self.eps <= 0:
            raise ValueError(f"batch_norm eps must be positive during training, but got {self.eps}")
        if self.eps < 0:
            raise ValueError(f"batch_norm eps must be non-negative, but got {self.eps}")
        if not X.is_floating_point():
            raise NotImplementedError(f"\"batch_norm\" not implemented for '{X.type()[6:-6]}'")
        if X.shape[1] != self.num_features:
            raise RuntimeError(f"running_mean should contain {X.shape[1]} elements not {self.num_features}")
        H = X.float() if X.dtype in (torch.float16, torch.bfloat16) else X

        shape = (1, -1, 1, 1)
        Y, moving_mean, moving_var = batch_norm(
            H, self.weight.view(shape), self.bias.view(shape),
            self.running_mean.view(shape), self.running_var.view(shape),
            eps=self.eps, momentum=self.momentum)
        if n > 0:  # an empty batch has no statistics to blend in
            self.running_mean.copy_(moving_mean.flatten())
            self.running_var.copy_(moving_var.flatten())
        return Y.to(X.dtype)
