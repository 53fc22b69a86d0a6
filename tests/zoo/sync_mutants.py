"""Deliberately broken synced BatchNorms: ``bnspec check --world-size K`` must fail each
(tests/test_sync.py). Targets ``tests/zoo/sync_mutants.py:Name``, with
``torch.nn.SyncBatchNorm``'s constructor and any input rank.

The two statistics mutants run the forward in plain differentiable torch ops with the
statistics as constants, so their gradients are wrong too; each is written to break the
forward (S9.1). The other two break the process, not the numbers.
"""

from __future__ import annotations

import os
import signal
import time

import torch
import torch.distributed as dist
from torch import Tensor, nn

from bnspec import SyncBatchNorm
from bnspec import reference as R
from bnspec.reference_parts import values_per_channel
from bnspec.sync import gather_moments, local_moments


class _Mutant(nn.Module):
    """Parameters and buffers as torch.nn.SyncBatchNorm; ``stats`` decides the bug."""

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True,
                 process_group=None, device=None, dtype=None):
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        self.eps, self.momentum = eps, momentum
        self.weight = nn.Parameter(torch.ones(num_features, **kw))
        self.bias = nn.Parameter(torch.zeros(num_features, **kw))
        self.register_buffer("running_mean", torch.zeros(num_features, **kw))
        self.register_buffer("running_var", torch.ones(num_features, **kw))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device))

    def stats(self, x: Tensor) -> tuple[Tensor, Tensor, int]:
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        if not self.training:
            return R.eval_forward(x, self.running_mean, self.running_var, self.weight, self.bias, eps=self.eps)
        mean, var, count = self.stats(x)
        shape = (1, -1, *([1] * (x.dim() - 2)))
        xc = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        scale = (torch.rsqrt(var + self.eps) * self.weight.to(xc.dtype)).reshape(shape)
        y = (xc - mean.reshape(shape)) * scale + self.bias.to(xc.dtype).reshape(shape)
        with torch.no_grad():
            new = R.update_running_stats(self.running_mean, self.running_var, self.num_batches_tracked,
                                         mean, var, count, momentum=self.momentum)
            for name, value in zip(("running_mean", "running_var", "num_batches_tracked"), new):
                getattr(self, name).copy_(value)
        return y.to(x.dtype)


class LocalStats(_Mutant):
    """Normalizes each shard with its OWN statistics: no communication at all."""

    def stats(self, x):
        mean, var = R.batch_stats(x.detach())
        return mean, var, values_per_channel(x)


class NoBetweenTerm(_Mutant):
    """Syncs, but merges the variances as ``sum M2_i / n``: drops ``sum n_i (mu_i - mu)^2``."""

    def stats(self, x):
        counts, means, m2s = gather_moments(local_moments(x.detach()))
        n = int(counts.sum())
        weights = (counts.to(means.dtype) / n).reshape(-1, 1)
        present = (counts > 0).reshape(-1, 1)
        mean = (weights * torch.where(present, means, torch.zeros_like(means))).sum(0)
        return mean, torch.where(present, m2s, torch.zeros_like(m2s)).sum(0) / n, n


class HangOnRank1(SyncBatchNorm):
    """Correct, except that rank 1's first training forward never returns."""

    def forward(self, x):
        if self.training and dist.is_initialized() and dist.get_rank() == 1:
            time.sleep(3600)
        return super().forward(x)


class CrashOnRank1(SyncBatchNorm):
    """Correct, except that rank 1's process is killed in its first training forward."""

    def forward(self, x):
        if self.training and dist.is_initialized() and dist.get_rank() == 1:
            os.kill(os.getpid(), signal.SIGKILL)
        return super().forward(x)
