"""The zoo's base: a correct BatchNorm written from scratch in plain torch ops.

It follows ``torch.nn.BatchNorm1d/2d/3d`` of torch 2.13 (constructor, registration,
checks, messages, dtype and layout rules, running statistics) without calling torch's
batch norm and without importing :mod:`bnspec.reference`. Gradients (first and second
order) come from autograd through the plain ops.

The forward is cut into small methods so that each mutant in :mod:`tests.zoo.mutants`
overrides exactly ONE of them (or one conceptual piece). The order of the steps is
torch's (``torch/nn/modules/batchnorm.py`` then ``F.batch_norm``):

1. rank check (the module's ``_check_input_dim``);
2. ``num_batches_tracked += 1`` in training with tracking, and the blend factor;
3. in batch-statistics mode: "more than 1 value per channel"; then the eps rule;
4. dtype and per-channel size checks (the kernel's);
5. normalize with batch or running statistics; update the running statistics;
6. cast to the input dtype and keep channels_last.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

LOW_PRECISION = (torch.float16, torch.bfloat16)
FLOATING = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def per_channel(v: Tensor, like: Tensor) -> Tensor:
    """(C,) -> (1, C, 1, ...) broadcasting against ``like``."""
    return v.reshape(1, -1, *([1] * (like.dim() - 2)))


def reduce_axes(x: Tensor) -> tuple[int, ...]:
    """Every axis but the channel axis."""
    return (0, *range(2, x.dim()))


def count(x: Tensor) -> int:
    """n: values per channel."""
    return x.shape[0] * math.prod(x.shape[2:])


def scalar_type_name(dtype: torch.dtype) -> str:
    """torch's C++ scalar type name: torch.int64 -> 'Long' (for the error message)."""
    return torch.empty(0, dtype=dtype).type().rsplit(".", 1)[-1].removesuffix("Tensor")


def strides_like_channels_last(x: Tensor) -> bool:
    """c10's is_channels_last_strides_2d/3d: strides ordered C < W < H (< D) < N.

    Measured on torch 2.13: BatchNorm's output is channels_last exactly for these
    inputs, and stays contiguous for C = 1 (where both layouts coincide).
    """
    if x.dim() not in (4, 5) or x.shape[1] == 1 or x.stride(1) == 0:
        return False
    order = (1, 3, 2, 0) if x.dim() == 4 else (1, 4, 3, 2, 0)
    minimum = 0
    for d in order:
        if x.shape[d] == 0 or x.stride(d) < minimum:
            return False
        if d == 0 and minimum == x.stride(1):
            return False
        minimum = x.stride(d) * (x.shape[d] if x.shape[d] > 1 else 1)
    return True


class BaseBatchNorm(nn.Module):
    """BatchNorm over ``(N, C, H, W)`` (the 2-D family); see :func:`family` for 1-D/3-D."""

    _version = 2  # torch's state_dict version (2 added num_batches_tracked)
    ranks: tuple[int, ...] = (4,)
    rank_text = "4D"

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True, device=None, dtype=None,
                 *, bias: bool = True) -> None:
        super().__init__()
        self.num_features = num_features
        self.eps = eps
        self.momentum = momentum
        self.affine = affine
        self.track_running_stats = track_running_stats
        self._make_parameters(bias, device=device, dtype=dtype)
        self._make_buffers(device=device, dtype=dtype)
        self.reset_parameters()

    # -- construction ----------------------------------------------------------------------
    def _make_parameters(self, bias: bool, **factory) -> None:
        if self.affine:
            self.weight = nn.Parameter(torch.empty(self.num_features, **factory))
            if bias:
                self.bias = nn.Parameter(torch.empty(self.num_features, **factory))
            else:
                self.register_parameter("bias", None)
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)

    def _make_buffers(self, **factory) -> None:
        if self.track_running_stats:
            self.register_buffer("running_mean", torch.zeros(self.num_features, **factory))
            self.register_buffer("running_var", torch.ones(self.num_features, **factory))
            self.register_buffer("num_batches_tracked", self._new_counter(factory.get("device")))
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_var", None)
            self.register_buffer("num_batches_tracked", None)

    def _new_counter(self, device) -> Tensor:
        return torch.tensor(0, dtype=torch.long, device=device)

    def _init_weight(self, weight: Tensor) -> None:
        nn.init.ones_(weight)

    def reset_running_stats(self) -> None:
        if self.track_running_stats:
            self.running_mean.zero_()
            self.running_var.fill_(1)
            self.num_batches_tracked.zero_()

    def reset_parameters(self) -> None:
        self.reset_running_stats()
        if self.affine:
            self._init_weight(self.weight)
            if self.bias is not None:
                nn.init.zeros_(self.bias)

    def extra_repr(self) -> str:
        return (f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}, "
                f"bias={self.bias is not None}, track_running_stats={self.track_running_stats}")

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, *args) -> None:
        # As torch: a version-1 state_dict has no counter; keep ours (or 0).
        version = local_metadata.get("version", None)
        key = prefix + "num_batches_tracked"
        if (version is None or version < 2) and self.track_running_stats and key not in state_dict:
            kept = self.num_batches_tracked
            state_dict[key] = kept if kept is not None and kept.device.type != "meta" else torch.tensor(0)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, *args)

    # -- forward -------------------------------------------------------------------------
    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        factor = 0.0 if self.momentum is None else self.momentum
        if self._counts_step(input) and self.num_batches_tracked is not None:
            self._increment_counter()
            factor = self._blend_factor()
        use_batch = self._uses_batch_stats()
        if use_batch:
            self._check_batch_size(input)
        self._check_eps(use_batch)
        self._check_dtype(input)
        # torch passes the buffers to the kernel in eval, and in training only when tracking.
        passed = not self.training or self.track_running_stats
        rm, rv = (self.running_mean, self.running_var) if passed else (None, None)
        if (rm is None) != (rv is None):
            raise ValueError("running_mean and running_var must either both be None or neither be None")
        self._check_channels(input, running_mean=rm, running_var=rv, weight=self.weight, bias=self.bias)
        if use_batch:
            y, mean, var = self._normalize_batch(input)
            if rm is not None and rv is not None:
                self._update_running(mean, var, count(input), factor)
        else:
            y = self._normalize_running(input, rm, rv)
        return self._output(y, input)

    # -- bookkeeping pieces ---------------------------------------------------------------
    def _counts_step(self, input: Tensor) -> bool:
        return self.training and self.track_running_stats

    def _increment_counter(self) -> None:
        self.num_batches_tracked.add_(1)

    def _blend_factor(self) -> float:
        if self.momentum is None:  # cumulative moving average
            return 1.0 / float(self.num_batches_tracked)
        return self.momentum

    def _uses_batch_stats(self) -> bool:
        return self.training or (self.running_mean is None and self.running_var is None)

    # -- checks --------------------------------------------------------------------------
    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() not in self.ranks:
            raise ValueError(f"expected {self.rank_text} input (got {input.dim()}D input)")

    def _check_batch_size(self, input: Tensor) -> None:
        if count(input) == 1:
            raise ValueError(f"Expected more than 1 value per channel when training, got input size {input.size()}")

    def _check_eps(self, training: bool) -> None:
        if training and self.eps <= 0:
            raise ValueError(f"batch_norm eps must be positive during training, but got {self.eps}")
        if not training and self.eps < 0:
            raise ValueError(f"batch_norm eps must be non-negative, but got {self.eps}")

    def _check_dtype(self, input: Tensor) -> None:
        if input.dtype not in FLOATING:
            raise NotImplementedError(f"\"batch_norm\" not implemented for '{scalar_type_name(input.dtype)}'")
        per = [t.dtype for t in (self.weight, self.bias, self.running_mean, self.running_var) if t is not None]
        allowed = {input.dtype, torch.float32} if input.dtype in LOW_PRECISION else {input.dtype}
        if per and (len(set(per)) > 1 or not set(per) <= allowed):
            raise RuntimeError(f"mixed dtype (CPU): input {input.dtype}, parameters/statistics {sorted(map(str, set(per)))}")

    def _check_channels(self, input: Tensor, **named: Tensor | None) -> None:
        c = input.shape[1]
        for name, t in named.items():
            if t is not None and t.numel() != c:
                raise RuntimeError(f"{name} should contain {c} elements not {t.numel()}")

    # -- arithmetic pieces ----------------------------------------------------------------
    def _compute_dtype(self, input: Tensor) -> torch.dtype:
        return torch.float32 if input.dtype in LOW_PRECISION else input.dtype

    def _to_compute(self, input: Tensor) -> Tensor:
        return input.to(self._compute_dtype(input))

    def _sum(self, t: Tensor, axes: tuple[int, ...]) -> Tensor:
        return t.sum(dim=axes)

    def _mean(self, xc: Tensor) -> Tensor:
        return self._sum(xc, reduce_axes(xc)) / count(xc)

    def _variance(self, xc: Tensor, mean: Tensor) -> Tensor:
        """Biased variance, two-pass."""
        d = xc - per_channel(mean, xc)
        return self._sum(d * d, reduce_axes(xc)) / self._divisor(count(xc))

    def _divisor(self, n: int) -> int:
        return n

    def _batch_stats(self, xc: Tensor) -> tuple[Tensor, Tensor]:
        mean = self._mean(xc)
        return mean, self._variance(xc, mean)

    def _normalizing_var(self, var: Tensor, n: int) -> Tensor:
        """The variance the training output is normalized with: the biased one."""
        return var

    def _invstd(self, var: Tensor) -> Tensor:
        return torch.rsqrt(var + self.eps)

    def _center(self, xc: Tensor, mean: Tensor) -> Tensor:
        return xc - per_channel(mean, xc)

    def _affine(self, xhat: Tensor) -> Tensor:
        y = xhat if self.weight is None else xhat * per_channel(self.weight.to(xhat.dtype), xhat)
        return y if self.bias is None else y + per_channel(self.bias.to(xhat.dtype), xhat)

    def _normalize_batch(self, input: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Training-mode output in the compute dtype, and the batch mean and biased var."""
        xc = self._to_compute(input)
        mean, var = self._batch_stats(xc)
        invstd = self._invstd(self._normalizing_var(var, count(xc)))
        xhat = self._center(xc, mean) * per_channel(invstd, xc)
        return self._affine(xhat), mean, var

    def _eval_statistics(self, xc: Tensor, rm: Tensor, rv: Tensor) -> tuple[Tensor, Tensor]:
        return rm.to(xc.dtype), rv.to(xc.dtype)

    def _eval_invstd(self, var: Tensor) -> Tensor:
        return self._invstd(var)

    def _normalize_running(self, input: Tensor, rm: Tensor, rv: Tensor) -> Tensor:
        """Eval-mode output in the compute dtype."""
        xc = self._to_compute(input)
        mean, var = self._eval_statistics(xc, rm, rv)
        xhat = self._center(xc, mean) * per_channel(self._eval_invstd(var), xc)
        return self._affine(xhat)

    # -- running statistics ---------------------------------------------------------------
    def _skips_update(self, n: int) -> bool:
        return n == 0  # an empty batch leaves the statistics unchanged

    def _unbiased(self, var: Tensor, n: int) -> Tensor:
        return var * (n / max(n - 1, 1))

    def _blend(self, old: Tensor, new: Tensor, factor: float) -> Tensor:
        return (1 - factor) * old + factor * new

    def _update_running(self, mean: Tensor, var: Tensor, n: int, factor: float) -> None:
        if self._skips_update(n):
            return
        with torch.no_grad():
            for buf, new in ((self.running_mean, mean), (self.running_var, self._unbiased(var, n))):
                cdt = torch.promote_types(buf.dtype, new.dtype)
                buf.copy_(self._blend(buf.to(cdt), new.detach().to(cdt), factor))

    # -- output --------------------------------------------------------------------------
    def _output_dtype(self, input: Tensor, y: Tensor) -> torch.dtype:
        return input.dtype

    def _layout(self, y: Tensor, input: Tensor) -> Tensor:
        if input.numel() == 0:  # measured: torch gives an empty output with the input's strides
            return torch.empty_like(input, dtype=y.dtype).copy_(y)
        if strides_like_channels_last(input):
            return y.contiguous(memory_format=torch.channels_last if input.dim() == 4 else torch.channels_last_3d)
        return y.contiguous()

    def _output(self, y: Tensor, input: Tensor) -> Tensor:
        return self._layout(y.to(self._output_dtype(input, y)), input)


class BaseBatchNorm1d(BaseBatchNorm):
    ranks, rank_text = (2, 3), "2D or 3D"


class BaseBatchNorm2d(BaseBatchNorm):
    ranks, rank_text = (4,), "4D"


class BaseBatchNorm3d(BaseBatchNorm):
    ranks, rank_text = (5,), "5D"


Base = {1: BaseBatchNorm1d, 2: BaseBatchNorm2d, 3: BaseBatchNorm3d}
