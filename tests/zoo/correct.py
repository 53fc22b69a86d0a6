"""Three independently written correct BatchNorms: the conformance suite must pass them.

* :data:`FromScratch` - an ``nn.Module`` in plain differentiable torch ops
  (``torch.var_mean``); autograd derives first and second order gradients.
* :data:`Float64Internal` - computes every statistic and output in float64 and casts
  back: the output in the input dtype, the running statistics in their own dtype.
* :data:`ClosedForm` - a custom ``torch.autograd.Function`` whose hand-written
  closed-form backward is itself built from differentiable ops, so double backward works.

Each is the whole torch 2.13 contract of ``torch.nn.BatchNorm1d/2d/3d``: constructor,
registration (``register_parameter(name, None)`` when absent), int64 counter, cumulative
average for ``momentum=None``, eval with running statistics (batch statistics when the
buffers are None), torch's error types and messages, N = 0, channels_last, float16 and
bfloat16 reduced in float32 (or better), ``state_dict`` keys, the reset methods.

None of them calls torch's batch norm (``F.batch_norm``, ``torch.batch_norm``,
``nn.BatchNorm*.forward``) or imports ``bnspec``: they are independent of the reference.
Each file-level name is a mapping ``{1: .., 2: .., 3: ..}`` usable as a suite target
(``--candidate tests/zoo/correct.py:FromScratch --dims 1,2,3``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

_HALF = (torch.float16, torch.bfloat16)
_FLOAT = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_RANKS = {1: ((2, 3), "2D or 3D"), 2: ((4,), "4D"), 3: ((5,), "5D")}


def _type_name(dtype: torch.dtype) -> str:
    # torch.int64 -> "torch.LongTensor" -> "Long", as in torch's message.
    return torch.empty(0, dtype=dtype).type()[len("torch."):-len("Tensor")]


def _not_implemented(x: Tensor) -> NotImplementedError:
    return NotImplementedError(f"\"batch_norm\" not implemented for '{_type_name(x.dtype)}'")


def _too_few(x: Tensor) -> ValueError:
    return ValueError(f"Expected more than 1 value per channel when training, got input size {x.size()}")


def _eps_error(eps: float, training: bool) -> ValueError | None:
    if training and eps <= 0:
        return ValueError(f"batch_norm eps must be positive during training, but got {eps}")
    if not training and eps < 0:
        return ValueError(f"batch_norm eps must be non-negative, but got {eps}")
    return None


def _pair_error(mean: Tensor | None, var: Tensor | None) -> ValueError | None:
    if (mean is None) != (var is None):
        return ValueError("running_mean and running_var must either both be None or neither be None")
    return None


def _dtype_error(x: Tensor, tensors: list[Tensor]) -> RuntimeError | None:
    """torch CPU: per-channel tensors share one dtype, the input's (or float32 for half/bf16 input)."""
    kinds = {t.dtype for t in tensors}
    ok = {x.dtype, torch.float32} if x.dtype in _HALF else {x.dtype}
    if kinds and (len(kinds) > 1 or not kinds <= ok):
        return RuntimeError(f"mixed dtype (CPU): expect parameter to have scalar type of {x.dtype}")
    return None


# ============================================================================ (a) from scratch


class _FromScratch(nn.Module):
    """Plain ops; autograd does every derivative."""

    _version = 2
    _dims = 2

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True,
                 device=None, dtype=None, *, bias=True):
        super().__init__()
        self.num_features, self.eps, self.momentum = num_features, eps, momentum
        self.affine, self.track_running_stats = affine, track_running_stats
        kw = dict(device=device, dtype=dtype)
        self.register_parameter("weight", nn.Parameter(torch.ones(num_features, **kw)) if affine else None)
        self.register_parameter("bias", nn.Parameter(torch.zeros(num_features, **kw)) if affine and bias else None)
        for name, make in (("running_mean", lambda: torch.zeros(num_features, **kw)),
                           ("running_var", lambda: torch.ones(num_features, **kw)),
                           ("num_batches_tracked", lambda: torch.zeros((), dtype=torch.int64, device=device))):
            self.register_buffer(name, make() if track_running_stats else None)

    def reset_running_stats(self):
        if self.track_running_stats:
            self.running_mean.zero_()
            self.running_var.fill_(1)
            self.num_batches_tracked.zero_()

    def reset_parameters(self):
        self.reset_running_stats()
        if self.affine:
            with torch.no_grad():
                self.weight.fill_(1)
                if self.bias is not None:
                    self.bias.zero_()

    def extra_repr(self):
        return (f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}, "
                f"bias={self.bias is not None}, track_running_stats={self.track_running_stats}")

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, *rest):
        key = prefix + "num_batches_tracked"
        if local_metadata.get("version", 1) < 2 and self.track_running_stats and key not in state_dict:
            state_dict[key] = torch.zeros((), dtype=torch.int64)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, *rest)

    def forward(self, x: Tensor) -> Tensor:
        ranks, text = _RANKS[self._dims]
        if x.dim() not in ranks:
            raise ValueError(f"expected {text} input (got {x.dim()}D input)")
        # torch's order: count the step, then validate.
        factor = self.momentum if self.momentum is not None else 0.0
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked += 1
            factor = self.momentum if self.momentum is not None else 1.0 / self.num_batches_tracked.item()
        batch_mode = self.training or (self.running_mean is None and self.running_var is None)
        n = x.numel() // x.shape[1] if x.shape[1] else x.shape[0] * math.prod(x.shape[2:])
        if batch_mode and n == 1:
            raise _too_few(x)
        err = _eps_error(self.eps, batch_mode)
        if err is not None:
            raise err
        if not x.is_floating_point() or x.dtype not in _FLOAT:
            raise _not_implemented(x)
        stats = [self.running_mean, self.running_var] if (not self.training or self.track_running_stats) else [None, None]
        named = dict(running_mean=stats[0], running_var=stats[1], weight=self.weight, bias=self.bias)
        present = [t for t in named.values() if t is not None]
        err = _pair_error(*stats) or _dtype_error(x, present)
        if err is not None:
            raise err
        for name, t in named.items():
            if t is not None and t.numel() != x.shape[1]:
                raise RuntimeError(f"{name} should contain {x.shape[1]} elements not {t.numel()}")

        work = torch.float32 if x.dtype in _HALF else x.dtype
        xw = x.to(work)
        axes = [0, *range(2, x.dim())]
        shape = [1, x.shape[1]] + [1] * (x.dim() - 2)
        if batch_mode:
            if n > 0:
                var, mean = torch.var_mean(xw, dim=axes, correction=0)
            else:  # empty batch: NaN statistics, never used (var_mean would warn)
                mean = xw.sum(dim=axes) / 0.0
                var = mean
            if stats[0] is not None and n > 0:
                with torch.no_grad():
                    unbiased = var * n / (n - 1)
                    for buf, val in ((stats[0], mean), (stats[1], unbiased)):
                        buf.copy_(buf.to(work) * (1 - factor) + val.detach() * factor)
        else:
            mean, var = stats[0].to(work), stats[1].to(work)
        y = (xw - mean.view(shape)) / torch.sqrt(var.view(shape) + self.eps)
        if self.weight is not None:
            y = y * self.weight.to(work).view(shape)
        if self.bias is not None:
            y = y + self.bias.to(work).view(shape)
        y = y.to(x.dtype)
        # channels_last in, channels_last out (the dense channels_last strides are what
        # the suite sends; C = 1 and all-1 spatial sizes are ambiguous and stay contiguous).
        if x.dim() >= 4 and x.numel() > 0:
            fmt = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
            if x.is_contiguous(memory_format=fmt) and not x.is_contiguous():
                return y.contiguous(memory_format=fmt)
        return y.contiguous()


class FromScratch1d(_FromScratch):
    _dims = 1


class FromScratch2d(_FromScratch):
    _dims = 2


class FromScratch3d(_FromScratch):
    _dims = 3


FromScratch = {1: FromScratch1d, 2: FromScratch2d, 3: FromScratch3d}


# ============================================================================ (b) float64 inside


def _bn64(x: Tensor, mean_buf: Tensor | None, var_buf: Tensor | None, weight: Tensor | None,
          bias: Tensor | None, *, batch: bool, factor: float, eps: float) -> Tensor:
    """Normalize ``x`` in float64; in batch mode update the given buffers in place."""
    x64 = x.double()
    red = tuple(d for d in range(x.dim()) if d != 1)

    def pc(v: Tensor) -> Tensor:
        return v.reshape([-1 if d == 1 else 1 for d in range(x.dim())])

    if batch:
        n = math.prod(x.shape[d] for d in red)
        mu = x64.sum(dim=red) / n
        dev = x64 - pc(mu)
        var = (dev * dev).sum(dim=red) / n
        if mean_buf is not None and n > 0:
            with torch.no_grad():
                new_mean = (1 - factor) * mean_buf.double() + factor * mu
                new_var = (1 - factor) * var_buf.double() + factor * var * (n / (n - 1))
                mean_buf.copy_(new_mean.to(mean_buf.dtype))
                var_buf.copy_(new_var.to(var_buf.dtype))
    else:
        mu, var = mean_buf.double(), var_buf.double()
        dev = x64 - pc(mu)
    out = dev * pc((var + eps).rsqrt())
    if weight is not None:
        out = out * pc(weight.double())
    if bias is not None:
        out = out + pc(bias.double())
    # Output in the input dtype (torch's dtype contract), not float64.
    return out.to(x.dtype)


def _is_channels_last(x: Tensor) -> bool:
    """c10's strides rule (C < W < H (< D) < N), and C = 1 stays contiguous (measured)."""
    if x.dim() not in (4, 5) or x.shape[1] == 1 or x.stride(1) == 0:
        return False
    order = [1, *range(x.dim() - 1, 1, -1), 0]
    lo = 0
    for d in order:
        if x.shape[d] == 0 or x.stride(d) < lo or (d == 0 and lo == x.stride(1)):
            return False
        lo = x.stride(d) * x.shape[d] if x.shape[d] > 1 else x.stride(d)
    return True


class _Float64Internal(nn.Module):
    """Every number computed in float64; results cast to the torch dtype contract."""

    _version = 2
    _ranks: tuple[int, ...] = (4,)
    _rank_text = "4D"

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True, device=None, dtype=None,
                 *, bias: bool = True) -> None:
        super().__init__()
        self.num_features = num_features
        self.eps = eps
        self.momentum = momentum
        self.affine = affine
        self.track_running_stats = track_running_stats
        opts = {"device": device, "dtype": dtype}
        self.register_parameter("weight", nn.Parameter(torch.empty(num_features, **opts)) if affine else None)
        self.register_parameter("bias", nn.Parameter(torch.empty(num_features, **opts)) if affine and bias else None)
        if track_running_stats:
            self.register_buffer("running_mean", torch.empty(num_features, **opts))
            self.register_buffer("running_var", torch.empty(num_features, **opts))
            self.register_buffer("num_batches_tracked", torch.empty((), dtype=torch.long, device=device))
        else:
            for name in ("running_mean", "running_var", "num_batches_tracked"):
                self.register_buffer(name, None)
        self.reset_parameters()

    def reset_running_stats(self) -> None:
        if self.track_running_stats:
            self.running_mean.fill_(0.0)
            self.running_var.fill_(1.0)
            self.num_batches_tracked.fill_(0)

    def reset_parameters(self) -> None:
        self.reset_running_stats()
        if self.affine:
            nn.init.constant_(self.weight, 1.0)
            if self.bias is not None:
                nn.init.constant_(self.bias, 0.0)

    def extra_repr(self) -> str:
        return (f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}, "
                f"bias={self.bias is not None}, track_running_stats={self.track_running_stats}")

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, *rest) -> None:
        version = local_metadata.get("version")
        if (version is None or version < 2) and self.track_running_stats:
            state_dict.setdefault(prefix + "num_batches_tracked", self.num_batches_tracked.clone())
        super()._load_from_state_dict(state_dict, prefix, local_metadata, *rest)

    def forward(self, input: Tensor) -> Tensor:
        if input.dim() not in self._ranks:
            raise ValueError(f"expected {self._rank_text} input (got {input.dim()}D input)")
        use_batch = self.training or (self.running_mean is None and self.running_var is None)
        tracking = self.training and self.track_running_stats
        if tracking and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)  # before validation, as torch
        if use_batch and input.numel() == input.shape[1] and input.numel() > 0:
            raise _too_few(input)
        bad = _eps_error(self.eps, use_batch)
        if bad is not None:
            raise bad
        if input.dtype not in _FLOAT:
            raise _not_implemented(input)
        mean_buf = self.running_mean if (not self.training or self.track_running_stats) else None
        var_buf = self.running_var if (not self.training or self.track_running_stats) else None
        per = {"running_mean": mean_buf, "running_var": var_buf, "weight": self.weight, "bias": self.bias}
        bad = _pair_error(mean_buf, var_buf) or _dtype_error(input, [t for t in per.values() if t is not None])
        if bad is not None:
            raise bad
        for name, t in per.items():
            if t is not None and t.numel() != input.shape[1]:
                raise RuntimeError(f"{name} should contain {input.shape[1]} elements not {t.numel()}")
        if self.momentum is None:
            factor = 1.0 / int(self.num_batches_tracked) if tracking and self.num_batches_tracked is not None else 0.0
        else:
            factor = float(self.momentum)
        y = _bn64(input, mean_buf, var_buf, self.weight, self.bias, batch=use_batch, factor=factor, eps=self.eps)
        if input.numel() == 0:
            return torch.empty_like(input).copy_(y)
        if _is_channels_last(input):
            return y.contiguous(memory_format=torch.channels_last if input.dim() == 4 else torch.channels_last_3d)
        return y.contiguous()


class Float64Internal1d(_Float64Internal):
    _ranks, _rank_text = (2, 3), "2D or 3D"


class Float64Internal2d(_Float64Internal):
    _ranks, _rank_text = (4,), "4D"


class Float64Internal3d(_Float64Internal):
    _ranks, _rank_text = (5,), "5D"


Float64Internal = {1: Float64Internal1d, 2: Float64Internal2d, 3: Float64Internal3d}


# ============================================================================ (c) closed form


def _acc(t: Tensor) -> torch.dtype:
    return torch.float32 if t.dtype in _HALF else t.dtype


def _bc(v: Tensor, ndim: int) -> Tensor:
    return v[(None, slice(None)) + (None,) * (ndim - 2)]


def _moments(xa: Tensor) -> tuple[Tensor, Tensor, list[int]]:
    """Mean and biased variance over all axes but 1 (two-pass), in xa's dtype."""
    dims = [d for d in range(xa.dim()) if d != 1]
    mean = xa.mean(dim=dims)
    c = xa - _bc(mean, xa.dim())
    return mean, (c * c).mean(dim=dims), dims


class _TrainNorm(torch.autograd.Function):
    """y = (x - mean) / sqrt(var + eps) * w + b with batch statistics.

    backward: dx = w r / n (n dy - sum dy - xhat sum(dy xhat)), dw = sum(dy xhat),
    db = sum dy; written in differentiable ops from the saved input, so autograd can
    differentiate the backward itself (double backward).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, eps):
        xa = x.to(_acc(x))
        mean, var, _ = _moments(xa)
        xhat = (xa - _bc(mean, x.dim())) * _bc(torch.rsqrt(var + eps), x.dim())
        y = xhat
        if weight is not None:
            y = y * _bc(weight.to(xa.dtype), x.dim())
        if bias is not None:
            y = y + _bc(bias.to(xa.dtype), x.dim())
        ctx.save_for_backward(x, weight)
        ctx.eps = eps
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.mark_non_differentiable(mean, var)
        return y.to(x.dtype), mean, var

    @staticmethod
    def backward(ctx, dy, _dmean, _dvar):
        x, weight = ctx.saved_tensors
        work = _acc(x)
        xa, g = x.to(work), dy.to(work)
        mean, var, dims = _moments(xa)
        k = x.dim()
        n = xa.numel() // xa.shape[1] if xa.shape[1] else 0
        r = torch.rsqrt(var + ctx.eps)
        xhat = (xa - _bc(mean, k)) * _bc(r, k)
        s1 = g.sum(dim=dims)
        s2 = (g * xhat).sum(dim=dims)
        scale = r if weight is None else r * weight.to(work)
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            dx = (_bc(scale, k) * (g - _bc(s1, k) / max(n, 1) - xhat * _bc(s2, k) / max(n, 1))).to(x.dtype)
        if weight is not None and ctx.needs_input_grad[1]:
            dw = s2.to(weight.dtype)
        if ctx.bias_dtype is not None and ctx.needs_input_grad[2]:
            db = s1.to(ctx.bias_dtype)
        return dx, dw, db, None


class _EvalNorm(torch.autograd.Function):
    """y = (x - rm) / sqrt(rv + eps) * w + b; backward dx = w r dy, dw = sum(dy xhat), db = sum dy."""

    @staticmethod
    def forward(ctx, x, rm, rv, weight, bias, eps):
        work = _acc(x)
        k = x.dim()
        r = torch.rsqrt(rv.to(work) + eps)
        y = (x.to(work) - _bc(rm.to(work), k)) * _bc(r, k)
        if weight is not None:
            y = y * _bc(weight.to(work), k)
        if bias is not None:
            y = y + _bc(bias.to(work), k)
        ctx.save_for_backward(x, rm, rv, weight)
        ctx.eps = eps
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y.to(x.dtype)

    @staticmethod
    def backward(ctx, dy):
        x, rm, rv, weight = ctx.saved_tensors
        work = _acc(x)
        k = x.dim()
        dims = [d for d in range(k) if d != 1]
        g = dy.to(work)
        r = torch.rsqrt(rv.to(work) + ctx.eps)
        xhat = (x.to(work) - _bc(rm.to(work), k)) * _bc(r, k)
        scale = r if weight is None else r * weight.to(work)
        dx = (g * _bc(scale, k)).to(x.dtype) if ctx.needs_input_grad[0] else None
        dw = (g * xhat).sum(dim=dims).to(weight.dtype) if weight is not None and ctx.needs_input_grad[3] else None
        db = g.sum(dim=dims).to(ctx.bias_dtype) if ctx.bias_dtype is not None and ctx.needs_input_grad[4] else None
        return dx, None, None, dw, db, None


class _ClosedForm(nn.Module):
    """Bookkeeping around the two autograd Functions."""

    _version = 2
    expected_dim: tuple[int, ...] = (4,)
    dim_words = "4D"

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True,
                 device=None, dtype=None, *, bias=True):
        super().__init__()
        self.num_features = num_features
        self.eps = eps
        self.momentum = momentum
        self.affine = affine
        self.track_running_stats = track_running_stats
        if affine:
            self.weight = nn.Parameter(torch.empty(num_features, device=device, dtype=dtype))
            if bias:
                self.bias = nn.Parameter(torch.empty(num_features, device=device, dtype=dtype))
            else:
                self.register_parameter("bias", None)
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        if track_running_stats:
            self.register_buffer("running_mean", torch.zeros(num_features, device=device, dtype=dtype))
            self.register_buffer("running_var", torch.ones(num_features, device=device, dtype=dtype))
            self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device))
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_var", None)
            self.register_buffer("num_batches_tracked", None)
        self.reset_parameters()

    def reset_running_stats(self):
        if self.track_running_stats:
            self.running_mean.zero_()
            self.running_var.fill_(1)
            self.num_batches_tracked.zero_()

    def reset_parameters(self):
        self.reset_running_stats()
        if self.affine:
            nn.init.ones_(self.weight)
            if self.bias is not None:
                nn.init.zeros_(self.bias)

    def extra_repr(self):
        return (f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}, "
                f"bias={self.bias is not None}, track_running_stats={self.track_running_stats}")

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, *rest):
        version = local_metadata.get("version", None)
        key = prefix + "num_batches_tracked"
        if (version is None or version < 2) and self.track_running_stats and key not in state_dict:
            state_dict[key] = torch.tensor(0, dtype=torch.long)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, *rest)

    def forward(self, input):
        if input.dim() not in self.expected_dim:
            raise ValueError(f"expected {self.dim_words} input (got {input.dim()}D input)")
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        bn_training = self.training or (self.running_mean is None and self.running_var is None)
        if bn_training:
            size = input.size()
            if size[0] * math.prod(size[2:]) == 1:
                raise _too_few(input)
        err = _eps_error(self.eps, bn_training)
        if err:
            raise err
        if input.dtype not in _FLOAT:
            raise _not_implemented(input)
        keep = not self.training or self.track_running_stats
        rm = self.running_mean if keep else None
        rv = self.running_var if keep else None
        err = _pair_error(rm, rv) or _dtype_error(input, [t for t in (rm, rv, self.weight, self.bias) if t is not None])
        if err:
            raise err
        for name, t in (("running_mean", rm), ("running_var", rv), ("weight", self.weight), ("bias", self.bias)):
            if t is not None and t.numel() != input.size(1):
                raise RuntimeError(f"{name} should contain {input.size(1)} elements not {t.numel()}")
        if bn_training:
            y, mean, var = _TrainNorm.apply(input, self.weight, self.bias, self.eps)
            n = input.numel() // max(input.size(1), 1)
            if rm is not None and rv is not None and input.numel() > 0:
                with torch.no_grad():
                    # blend in the statistics' precision (float32 for half/bf16 input)
                    rm.copy_(rm.to(mean.dtype) * (1 - factor) + mean * factor)
                    rv.copy_(rv.to(var.dtype) * (1 - factor) + var * (n / (n - 1)) * factor)
        else:
            y = _EvalNorm.apply(input, rm, rv, self.weight, self.bias, self.eps)
        if input.numel() == 0:
            return torch.empty_like(input).copy_(y)
        if input.dim() > 3 and _is_channels_last(input):
            return y.contiguous(memory_format=torch.channels_last if input.dim() == 4 else torch.channels_last_3d)
        return y.contiguous()


class ClosedForm1d(_ClosedForm):
    expected_dim, dim_words = (2, 3), "2D or 3D"


class ClosedForm2d(_ClosedForm):
    expected_dim, dim_words = (4,), "4D"


class ClosedForm3d(_ClosedForm):
    expected_dim, dim_words = (5,), "5D"


ClosedForm = {1: ClosedForm1d, 2: ClosedForm2d, 3: ClosedForm3d}
