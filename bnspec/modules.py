"""Drop-in ``BatchNorm1d/2d/3d`` built on :mod:`bnspec.reference`.

The modules are subclasses of torch's (``bnspec.BatchNorm2d`` is a ``torch.nn.BatchNorm2d``),
so tools that recognise a BatchNorm by isinstance treat them as one. They keep torch's
bookkeeping (constructor, parameters, buffers, the train/eval switch, state_dict
loading) and replace ``forward``: every number comes from the reference functions. Gradients come from the
closed-form backward through a custom ``autograd.Function`` whose backward is itself
written in differentiable ops, so second-order gradients are right too.

One deliberate difference from torch: torch increments ``num_batches_tracked`` before it
validates the input, so a call that raises still counts a step; these modules validate
first and leave the state untouched when they raise.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from bnspec import reference
from bnspec.reference_parts import check_input, check_per_channel, values_per_channel

__all__ = ["ReferenceBatchNorm", "BatchNorm1d", "BatchNorm2d", "BatchNorm3d"]

#: torch's base class of every BatchNorm (BatchNorm1d/2d/3d, SyncBatchNorm, lazy ones);
#: isinstance on it is how torch and model libraries recognise a BatchNorm layer.
TorchBatchNorm = nn.modules.batchnorm._BatchNorm


class _TrainFunction(torch.autograd.Function):
    """y = train_forward(x, w, b); backward = train_backward (differentiable)."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps):
        out = reference.train_forward(x, weight, bias, eps=eps)
        ctx.save_for_backward(x, weight, out.mean, out.var)
        ctx.eps, ctx.has_bias = eps, bias is not None
        ctx.mark_non_differentiable(out.mean, out.var)
        return tuple(out)

    @staticmethod
    def backward(ctx, dy, _dmean, _dvar):
        x, weight, mean, var = ctx.saved_tensors
        # Under create_graph the statistics must be recomputed from x so that autograd
        # sees how they depend on it; otherwise the forward's statistics save a pass.
        stats = None if torch.is_grad_enabled() else (mean, var)
        g = reference.train_backward(dy, x, weight, eps=ctx.eps, stats=stats)
        return g.dx, g.dweight if weight is not None else None, g.dbias if ctx.has_bias else None, None


class _EvalFunction(torch.autograd.Function):
    """y = eval_forward(x, stats, w, b); backward = eval_backward (differentiable)."""

    @staticmethod
    def forward(ctx, x, running_mean, running_var, weight, bias, eps):
        y = reference.eval_forward(x, running_mean, running_var, weight, bias, eps=eps)
        ctx.save_for_backward(x, running_mean, running_var, weight)
        ctx.eps, ctx.has_bias = eps, bias is not None
        return y

    @staticmethod
    def backward(ctx, dy):
        x, running_mean, running_var, weight = ctx.saved_tensors
        g = reference.eval_backward(dy, x, running_mean, running_var, weight, eps=ctx.eps)
        dweight = g.dweight if weight is not None else None
        return g.dx, None, None, dweight, g.dbias if ctx.has_bias else None, None


class ReferenceBatchNorm(TorchBatchNorm):
    """The forward of bnspec's BatchNorm modules: every number from :mod:`bnspec.reference`.

    A subclass of torch's ``_BatchNorm``, the class torch's own tools look for
    (``SyncBatchNorm.convert_sync_batchnorm``, ``torch.func.replace_all_batch_norm_modules_``,
    freeze-BatchNorm helpers, weight-decay exclusions), so they see these modules too.
    The constructor, parameters, buffers, ``reset_*``, ``extra_repr``, ``state_dict``
    loading and the rank check are torch's bookkeeping, inherited; ``forward`` is
    replaced, so torch's batch-norm kernel is never called.
    """

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        check_input(input)
        # As torch: batch statistics in training, and in eval when there are no buffers.
        use_batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        tracking = self.training and self.track_running_stats
        if tracking or not use_batch_stats:
            check_per_channel(input, "native", running_mean=self.running_mean,
                              running_var=self.running_var, weight=self.weight, bias=self.bias)
        if not use_batch_stats:
            return _EvalFunction.apply(input, self.running_mean, self.running_var,
                                       self.weight, self.bias, self.eps)
        y, mean, var = _TrainFunction.apply(input, self.weight, self.bias, self.eps)
        if tracking:
            self._update(mean, var, values_per_channel(input))
        return y

    def _update(self, mean: Tensor, var: Tensor, count: int) -> None:
        momentum = self.momentum
        if momentum is None and self.num_batches_tracked is None:
            momentum = 0.0  # torch's factor when there is no counter to average by
        new = reference.update_running_stats(
            self.running_mean, self.running_var, self.num_batches_tracked,
            mean.detach(), var.detach(), count, momentum=momentum,
        )
        with torch.no_grad():
            for name, value in zip(("running_mean", "running_var", "num_batches_tracked"), new):
                if value is not None:
                    getattr(self, name).copy_(value)


# Reference first: its forward comes before torch's in the method order; torch's class
# gives the constructor and the rank check (torch's messages).
class BatchNorm1d(ReferenceBatchNorm, nn.BatchNorm1d):
    """BatchNorm over ``(N, C)`` or ``(N, C, L)``; a :class:`torch.nn.BatchNorm1d` whose
    numbers come from :mod:`bnspec.reference`."""


class BatchNorm2d(ReferenceBatchNorm, nn.BatchNorm2d):
    """BatchNorm over ``(N, C, H, W)``; a :class:`torch.nn.BatchNorm2d` whose numbers come
    from :mod:`bnspec.reference`."""


class BatchNorm3d(ReferenceBatchNorm, nn.BatchNorm3d):
    """BatchNorm over ``(N, C, D, H, W)``; a :class:`torch.nn.BatchNorm3d` whose numbers
    come from :mod:`bnspec.reference`."""
