"""A full-contract BatchNorm2d with a memory-layout bug: it reads the input's storage
as if it were a contiguous NCHW tensor.

Imitates code written for (and only tested on) freshly allocated contiguous tensors,
e.g. a layer that hands ``data_ptr()`` / ``storage_offset()`` to a kernel assuming
row-major NCHW, here in plain torch as
``torch.as_strided(x, x.shape, <contiguous strides>, x.storage_offset())``.

A contiguous input is exactly torch's (values, gradients, running statistics, errors).
A channels_last input, a strided slice such as ``big[:, :, ::2]`` or a transposed view
gives WRONG values: the elements are read in the wrong order (as_strided stays
differentiable, so gradients flow, to the wrong places). The output keeps torch's
memory format (channels_last for channels_last input), so only the values are wrong.
An input with zero strides (``expand``) may read past its storage and raise.

Conventions: none. Contract gaps: none. Layout bug: yes.
"""

import torch
from torch import nn
from torch.nn import functional as F


class ContiguousMemoryBatchNorm2d(nn.Module):
    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True,
                 track_running_stats=True, device=None, dtype=None, *, bias=True):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.num_features, self.eps, self.momentum = num_features, eps, momentum
        self.affine, self.track_running_stats = affine, track_running_stats
        self.register_parameter("weight", nn.Parameter(torch.ones(num_features, **factory)) if affine else None)
        self.register_parameter("bias", nn.Parameter(torch.zeros(num_features, **factory)) if affine and bias else None)
        if track_running_stats:
            self.register_buffer("running_mean", torch.zeros(num_features, **factory))
            self.register_buffer("running_var", torch.ones(num_features, **factory))
            self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device))
        else:
            for name in ("running_mean", "running_var", "num_batches_tracked"):
                self.register_buffer(name, None)

    def reset_running_stats(self):
        if self.track_running_stats:
            self.running_mean.zero_()
            self.running_var.fill_(1)
            self.num_batches_tracked.zero_()

    def reset_parameters(self):
        self.reset_running_stats()
        if self.weight is not None:
            nn.init.ones_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, x):
        if x.dim() != 4:
            raise ValueError(f"expected 4D input (got {x.dim()}D input)")
        # THE BUG: reinterpret the memory as contiguous NCHW, whatever x's strides are
        flat = torch.as_strided(x, x.shape, torch.empty(x.shape, device="meta").stride(), x.storage_offset())

        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                factor = 1.0 / float(self.num_batches_tracked)
        batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        use_buffers = not self.training or self.track_running_stats
        y = F.batch_norm(flat, self.running_mean if use_buffers else None,
                         self.running_var if use_buffers else None,
                         self.weight, self.bias, batch_stats, factor, self.eps)
        like = torch.empty_like(x, device="meta")  # torch's output layout: channels_last stays channels_last
        if like.is_contiguous(memory_format=torch.channels_last) and not like.is_contiguous():
            y = y.contiguous(memory_format=torch.channels_last)
        return y
