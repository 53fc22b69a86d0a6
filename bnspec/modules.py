"""Drop-in ``BatchNorm1d/2d/3d`` built on :mod:`bnspec.reference`.

The modules only do bookkeeping (parameters, buffers, the train/eval switch, the
counter); every number comes from the reference functions. Gradients come from the
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
from bnspec.reference import _check_input, _check_per_channel, _count

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d"]


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


class _BatchNorm(nn.Module):
    """Shared bookkeeping of BatchNorm1d/2d/3d; torch's constructor and attributes."""

    _version = 2  # torch's state_dict version: 2 added num_batches_tracked
    _ranks: tuple[int, ...] = ()
    _rank_text = ""

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device=None,
        dtype=None,
        *,
        bias: bool = True,
    ) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.num_features = num_features
        self.eps = eps
        self.momentum = momentum
        self.affine = affine
        self.track_running_stats = track_running_stats
        if affine:
            self.weight = nn.Parameter(torch.empty(num_features, **factory))
            if bias:
                self.bias = nn.Parameter(torch.empty(num_features, **factory))
            else:
                self.register_parameter("bias", None)
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        if track_running_stats:
            self.register_buffer("running_mean", torch.zeros(num_features, **factory))
            self.register_buffer("running_var", torch.ones(num_features, **factory))
            self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device))
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_var", None)
            self.register_buffer("num_batches_tracked", None)
        self.reset_parameters()

    def reset_running_stats(self) -> None:
        """running_mean = 0, running_var = 1, num_batches_tracked = 0."""
        if self.track_running_stats:
            self.running_mean.zero_()
            self.running_var.fill_(1)
            self.num_batches_tracked.zero_()

    def reset_parameters(self) -> None:
        """Reset the running statistics; weight = 1, bias = 0."""
        self.reset_running_stats()
        if self.affine:
            nn.init.ones_(self.weight)
            if self.bias is not None:
                nn.init.zeros_(self.bias)

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, "
            f"affine={self.affine}, bias={self.bias is not None}, "
            f"track_running_stats={self.track_running_stats}"
        )

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, *args) -> None:
        # Same as torch: a version-1 state_dict has no counter; keep ours (0 if none).
        version = local_metadata.get("version", None)
        key = prefix + "num_batches_tracked"
        if (version is None or version < 2) and self.track_running_stats and key not in state_dict:
            kept = self.num_batches_tracked
            usable = kept is not None and kept.device != torch.device("meta")
            state_dict[key] = kept if usable else torch.tensor(0, dtype=torch.long)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, *args)

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() not in self._ranks:
            raise ValueError(f"expected {self._rank_text} input (got {input.dim()}D input)")

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        _check_input(input)
        # As torch: batch statistics in training, and in eval when there are no buffers.
        use_batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        tracking = self.training and self.track_running_stats
        if tracking or not use_batch_stats:
            _check_per_channel(input, "native", running_mean=self.running_mean,
                               running_var=self.running_var, weight=self.weight, bias=self.bias)
        if not use_batch_stats:
            return _EvalFunction.apply(input, self.running_mean, self.running_var,
                                       self.weight, self.bias, self.eps)
        y, mean, var = _TrainFunction.apply(input, self.weight, self.bias, self.eps)
        if tracking:
            self._update(mean, var, _count(input))
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


class BatchNorm1d(_BatchNorm):
    """BatchNorm over ``(N, C)`` or ``(N, C, L)``; see :class:`torch.nn.BatchNorm1d`."""

    _ranks, _rank_text = (2, 3), "2D or 3D"


class BatchNorm2d(_BatchNorm):
    """BatchNorm over ``(N, C, H, W)``; see :class:`torch.nn.BatchNorm2d`."""

    _ranks, _rank_text = (4,), "4D"


class BatchNorm3d(_BatchNorm):
    """BatchNorm over ``(N, C, D, H, W)``; see :class:`torch.nn.BatchNorm3d`."""

    _ranks, _rank_text = (5,), "5D"
