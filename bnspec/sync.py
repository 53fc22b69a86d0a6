r"""Synced BatchNorm (SPEC.md S9): statistics over a process group, formulas from the reference.

k processes each hold a shard of the batch. Synced BatchNorm normalizes every shard with
the statistics of the concatenated batch, so k processes give exactly (up to rounding)
what one process gives on the whole batch: forward, running statistics, counter and the
input gradient. Only bookkeeping and communication live here; every formula on values is
:mod:`bnspec.reference`'s (the one source of truth), called with global sums and counts.

Per channel, shard i holds ``n_i`` values with mean ``mu_i`` and
``M2_i = sum (x - mu_i)^2``. The shards exchange ``(n_i, mu_i, M2_i)`` (one all_gather)
and merge them with Chan et al.'s parallel formula (:func:`merge_moments`). Backward
exchanges the two sums ``sum dy`` and ``sum dy xhat`` (one all_reduce).

Torch's conventions (``torch.nn.SyncBatchNorm``, measured on torch 2.13), kept here so the
module is a drop-in:

* Weight and bias gradients are the shard's own sums; summing them over processes is
  the data-parallel wrapper's job (DistributedDataParallel all-reduces every gradient).
  Summed over the k processes they equal single-process BatchNorm's.
* Eval mode never syncs: with running statistics it normalizes with them, without them
  with the shard's own batch statistics.
* No initialized process group, or a group of one process: plain BatchNorm.

Communication runs in the compute dtype of :mod:`bnspec.reference` (float32 for
float16/bfloat16 input, float64 in oracle mode), except the counts, which travel as int64:
float32 holds integers exactly only up to 2**24 (16.7 million values per channel, which a
batch of 64 images of 512x512 reaches).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from bnspec.modules import ReferenceBatchNorm, TorchBatchNorm
from bnspec.reference import Grads, Mode
from bnspec.reference_parts import (
    center, channel_vector, check_eps, check_grad_output, check_input, check_mode, check_per_channel,
    checked_stats, dx_from_sums, dy_xhat_sum, normalize, output_grads, reduce_axes, to_compute, to_output,
    two_pass_moments, values_per_channel,
)

__all__ = [
    "Moments", "SyncTrainForward", "local_moments", "merge_moments", "gather_moments",
    "sync_train_forward", "sync_train_backward", "world_size", "SyncBatchNorm",
]


class Moments(NamedTuple):
    """Per-channel moments of a set of values: how many, their mean, ``M2 = sum (x - mean)^2``."""

    count: Tensor  #: int64; shape () for one set, (k,) for k shards
    mean: Tensor  #: (C,) or (k, C)
    m2: Tensor  #: (C,) or (k, C)


class SyncTrainForward(NamedTuple):
    """Synced training-mode result: output and the GLOBAL statistics used to normalize it."""

    y: Tensor  #: this process's shard, normalized
    mean: Tensor  #: global batch mean per channel, (C,)
    var: Tensor  #: global biased variance per channel, (C,)
    count: int  #: global n, values per channel over all processes


# ----------------------------------------------------------------------------- pure functions


def local_moments(x: Tensor, *, mode: Mode = "native") -> Moments:
    r"""This shard's moments, two-pass as :func:`bnspec.reference.batch_stats`.

    .. math::
        n = \text{numel}/C, \qquad \mu = \tfrac1n \sum x, \qquad M_2 = \sum (x - \mu)^2 = n\,\sigma^2

    An empty shard gives ``n = 0`` and zeros (not NaN: its values still travel in the
    collective, and :func:`merge_moments` ignores them).
    """
    xc = to_compute(x, x, mode)
    n = values_per_channel(x)
    if n == 0:
        zeros = xc.new_zeros(x.shape[1])
        return Moments(torch.tensor(0, dtype=torch.int64, device=xc.device), zeros, zeros.clone())
    mean, var, _ = two_pass_moments(xc, x)
    return Moments(torch.tensor(n, dtype=torch.int64, device=xc.device), mean, var * n)


def merge_moments(counts: Tensor, means: Tensor, m2s: Tensor) -> Moments:
    r"""Merge k shards' moments into the moments of their concatenation (Chan, Golub and
    LeVeque 1979, the k-way form of their pairwise update).

    .. math::
        n = \sum_i n_i, \qquad
        \mu = \sum_i \frac{n_i}{n}\,\mu_i, \qquad
        M_2 = \sum_i M_{2,i} + \sum_i n_i\,(\mu_i - \mu)^2

    The second sum is the between-shard term: shards whose means differ spread the batch
    more than any shard alone. Every term is a deviation from a mean, never a raw sum of
    squares, so a large offset costs no more precision than the two-pass single-process
    formula; merging ``sum x^2`` instead (one-pass) loses ``(mu/sigma)^2`` units of roundoff.

    Shapes: ``counts (k,)`` int, ``means``/``m2s (k, C)`` -> ``Moments(count (), mean (C,),
    m2 (C,))``. Shards with ``n_i = 0`` contribute nothing, whatever their mean and M2
    hold (NaN included). All empty (``n = 0``) gives NaN mean and M2, as
    :func:`bnspec.reference.batch_stats` does for an empty batch. Symmetric in the shards:
    a permutation changes the result only by rounding.
    """
    counts = counts.reshape(-1).to(device=means.device)
    total = counts.sum()
    present = (counts > 0).reshape(-1, 1)
    # A weight n_i / n, not n_i: one shard of everything gets weight exactly 1.
    frac = (counts.to(means.dtype) / total.to(means.dtype)).reshape(-1, 1)
    mu_i = torch.where(present, means, torch.zeros_like(means))
    mean = (frac * mu_i).sum(dim=0)
    between = counts.to(means.dtype).reshape(-1, 1) * (mu_i - mean) ** 2
    within = torch.where(present, m2s, torch.zeros_like(m2s))
    return Moments(total, mean, within.sum(dim=0) + between.sum(dim=0))


# ----------------------------------------------------------------------------- communication


def world_size(group=None) -> int:
    """Processes in ``group`` (None: the default group); 1 when torch.distributed is not
    available or not initialized, where synced BatchNorm is plain BatchNorm."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


def gather_moments(local: Moments, group=None) -> tuple[Tensor, Tensor, Tensor]:
    """Every process's ``(n_i, mu_i, M2_i)``, in rank order: ``counts (k,)``, ``means``,
    ``m2s (k, C)``. all_gather, not all_reduce: the merge needs each shard's own count
    and mean (an all_reduce of sums would need the one-pass ``sum x^2``)."""
    k = world_size(group)
    count = local.count.reshape(1)
    packed = torch.stack([local.mean, local.m2])  # (2, C): one collective for both
    if k == 1:
        return count, packed[:1], packed[1:]
    stats = [torch.empty_like(packed) for _ in range(k)]
    counts = [torch.empty_like(count) for _ in range(k)]
    dist.all_gather(stats, packed.contiguous(), group=group)
    dist.all_gather(counts, count, group=group)
    stacked = torch.stack(stats)
    return torch.cat(counts), stacked[:, 0], stacked[:, 1]


def sync_train_forward(
    x: Tensor,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    *,
    eps: float = 1e-5,
    mode: Mode = "native",
    group=None,
) -> SyncTrainForward:
    r"""Training-mode forward of this process's shard, normalized with global statistics.

    .. math::
        (n, \mu, M_2) = \text{merge}_i\,(n_i, \mu_i, M_{2,i}), \qquad
        \sigma^2 = M_2 / n, \qquad
        y = \frac{x - \mu}{\sqrt{\sigma^2 + \epsilon}} \cdot w + b

    Every process of ``group`` must call it (it communicates). Shapes as
    :func:`bnspec.reference.train_forward`; a shard may be empty. As single-process
    BatchNorm on the concatenated batch: ValueError when the GLOBAL count is 1 (raised on
    every process, since all see the same count; one sample on one process is fine when
    others hold more); a globally empty batch gives NaN statistics and ``count = 0``.
    """
    check_mode(mode)
    check_input(x)
    check_eps(eps, training=True)
    check_per_channel(x, mode, weight=weight, bias=bias)
    total = merge_moments(*gather_moments(local_moments(x, mode=mode), group))
    count = int(total.count)
    if count == 1:
        raise ValueError("Expected more than 1 value per channel when training, got input size "
                         f"{x.size()} on this process and 1 value per channel over all processes")
    var = total.m2 / count if count else total.m2  # NaN for an empty global batch
    centered = center(to_compute(x, x, mode), total.mean, x)
    y = normalize(centered, torch.rsqrt(var + eps), x, channel_vector(weight, x, mode), channel_vector(bias, x, mode))
    return SyncTrainForward(to_output(y, x, mode), total.mean, var, count)


def sync_train_backward(
    dy: Tensor,
    x: Tensor,
    weight: Tensor | None,
    stats: tuple[Tensor, Tensor],
    count: int,
    *,
    eps: float = 1e-5,
    mode: Mode = "native",
    group=None,
) -> Grads:
    r"""Backward of :func:`sync_train_forward` for this shard.

    With the global ``mu``, ``sigma^2`` (``stats``) and ``n`` (``count``),
    :math:`\hat x = (x-\mu) r`, :math:`r = 1/\sqrt{\sigma^2+\epsilon}`, and sums over ALL
    processes :math:`S_1 = \sum dy`, :math:`S_2 = \sum dy\,\hat x` (one all_reduce):

    .. math::
        dx = w\,r\,\Big(dy - \frac{S_1}{n} - \hat x\,\frac{S_2}{n}\Big)

    (:func:`bnspec.reference_parts.dx_from_sums`, the closed form of
    :func:`bnspec.reference.train_backward`). ``dweight``/``dbias`` are this shard's
    ``sum dy xhat`` and ``sum dy``: torch's convention, the data-parallel wrapper sums
    them. Every process of ``group`` must call it. First order only.
    """
    check_mode(mode)
    check_input(x)
    check_per_channel(x, mode, weight=weight)
    check_grad_output(dy, x)
    mean, var = (channel_vector(s, x, mode) for s in checked_stats(stats, x))
    invstd = torch.rsqrt(var + eps)
    centered = center(to_compute(x, x, mode), mean, x)
    g = to_compute(dy, x, mode)
    local = torch.stack([g.sum(dim=reduce_axes(x)), dy_xhat_sum(g, centered, invstd, x)])  # (2, C): one collective
    total = local.clone()
    if world_size(group) > 1:
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
    # An empty global batch has zero sums: any n > 0 gives zero gradients.
    dx = dx_from_sums(g, centered, invstd, channel_vector(weight, x, mode), total[0], total[1], max(count, 1), x)
    return Grads(*output_grads(dx, local[1], local[0], x, weight, mode))


# ----------------------------------------------------------------------------- module


class _SyncTrainFunction(torch.autograd.Function):
    """y = sync_train_forward(x, w, b); backward = sync_train_backward (first order)."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps, group):
        out = sync_train_forward(x, weight, bias, eps=eps, group=group)
        ctx.save_for_backward(x, weight, out.mean, out.var)
        ctx.eps, ctx.group, ctx.count, ctx.has_bias = eps, group, out.count, bias is not None
        count = torch.tensor(out.count, dtype=torch.int64)
        ctx.mark_non_differentiable(out.mean, out.var, count)
        return out.y, out.mean, out.var, count

    @staticmethod
    @once_differentiable  # the backward communicates; a second order would need a synced double backward
    def backward(ctx, dy, _dmean, _dvar, _dcount):
        x, weight, mean, var = ctx.saved_tensors
        g = sync_train_backward(dy.contiguous(), x, weight, (mean, var), ctx.count, eps=ctx.eps, group=ctx.group)
        return g.dx, g.dweight if weight is not None else None, g.dbias if ctx.has_bias else None, None, None


class SyncBatchNorm(ReferenceBatchNorm, nn.SyncBatchNorm):
    """BatchNorm over any ``(N, C, *)`` input, statistics synced over a process group in
    training; a :class:`torch.nn.SyncBatchNorm` (same constructor, attributes, state_dict;
    isinstance-based tools see it as one) whose numbers come from :mod:`bnspec.reference`.

    Unlike torch's, it runs on any device torch.distributed has a backend for (gloo on the
    CPU, NCCL on CUDA). With no initialized process group, a group of one process, or in
    eval mode it is :class:`bnspec.BatchNorm2d` without the rank check.
    """

    @classmethod
    def convert_sync_batchnorm(cls, module: nn.Module, process_group=None) -> nn.Module:
        """Every BatchNorm in ``module`` (torch's, bnspec's, any subclass of torch's
        ``_BatchNorm``) replaced by a :class:`bnspec.SyncBatchNorm`, as
        :meth:`torch.nn.SyncBatchNorm.convert_sync_batchnorm` does with torch's class.

        As torch's: the new layer takes the old one's hyperparameters, shares its
        parameter and buffer tensors (an optimizer built before keeps working), its
        train/eval state and ``qconfig``; ``module`` is changed in place and returned,
        or, when ``module`` itself is a BatchNorm, a new layer is returned.
        """
        converted = module
        if isinstance(module, TorchBatchNorm):
            converted = cls(module.num_features, module.eps, module.momentum, module.affine,
                            module.track_running_stats, process_group, bias=module.bias is not None)
            if module.affine:
                with torch.no_grad():
                    converted.weight, converted.bias = module.weight, module.bias
            converted.running_mean, converted.running_var = module.running_mean, module.running_var
            converted.num_batches_tracked = module.num_batches_tracked
            converted.training = module.training
            if hasattr(module, "qconfig"):
                converted.qconfig = module.qconfig
        for name, child in module.named_children():
            converted.add_module(name, cls.convert_sync_batchnorm(child, process_group))
        return converted

    def _sync_group(self):
        """The group to sync over, or None when this forward is plain BatchNorm."""
        if not self.training or world_size(self.process_group) < 2:
            return None
        return self.process_group if self.process_group is not None else dist.group.WORLD

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        if input.size(1) == 0:  # torch's check and message
            raise ValueError("SyncBatchNorm number of input channels should be non-zero")
        group = self._sync_group()
        if group is None:
            return super().forward(input)
        check_input(input)
        if self.track_running_stats:  # validate before communicating: a raise leaves the state untouched
            check_per_channel(input, "native", running_mean=self.running_mean,
                                running_var=self.running_var, weight=self.weight, bias=self.bias)
        y, mean, var, count = _SyncTrainFunction.apply(input, self.weight, self.bias, self.eps, group)
        if self.track_running_stats:
            # The GLOBAL count: the unbiased variance divides by n - 1 over all processes.
            self._update(mean, var, int(count))
        return y
