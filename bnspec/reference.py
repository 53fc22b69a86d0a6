r"""Reference Batch Normalization: pure functions, the only place the formulas live.

Every function here takes tensors and returns new tensors; none keeps state or writes
to its arguments. None of them calls torch's own batch norm (``F.batch_norm``,
``torch.batch_norm``, ``torch.native_batch_norm``, ``nn.BatchNorm*``), so the oracle
stays right even when a candidate replaces those functions at run time.

Shapes: ``x`` is ``(N, C)`` or ``(N, C, *spatial)`` with 0 to 3 spatial axes (ranks 2
to 5: BatchNorm1d, 2d, 3d). Per-channel tensors (``weight``, ``bias``, running
statistics, batch statistics) hold ``C`` elements. ``n = numel(x) / C`` is the number of
values each channel is reduced over.

Two precision modes:

* ``"native"`` follows torch's dtype rules: float16 and bfloat16 inputs are reduced in
  float32 and the output is returned in the input dtype; float32 and float64 compute
  in their own dtype.
* ``"oracle"`` accumulates and returns float64 whatever the input dtype, on the input's
  device, or on the CPU where the device has no float64.
"""

from __future__ import annotations

import math
from functools import lru_cache
from numbers import Real
from typing import Literal, NamedTuple

import torch
from torch import Tensor

__all__ = [
    "Mode",
    "TrainForward",
    "RunningStats",
    "Grads",
    "batch_stats",
    "train_forward",
    "eval_forward",
    "update_running_stats",
    "train_backward",
    "eval_backward",
]

Mode = Literal["native", "oracle"]
_MODES = ("native", "oracle")
_LOW_PRECISION = (torch.float16, torch.bfloat16)
_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class TrainForward(NamedTuple):
    """Training-mode result: output and the batch statistics used to normalize it."""

    y: Tensor  #: normalized output, shape of x
    mean: Tensor  #: batch mean per channel, shape (C,)
    var: Tensor  #: biased batch variance per channel, shape (C,)


class RunningStats(NamedTuple):
    """Running statistics after one training step."""

    mean: Tensor | None
    var: Tensor | None
    num_batches_tracked: Tensor | None  #: 0-dim int64


class Grads(NamedTuple):
    """Gradients of a loss with respect to the input, weight and bias."""

    dx: Tensor
    dweight: Tensor  #: shape (C,); the gradient for an implicit weight of ones if None
    dbias: Tensor  #: shape (C,)


# ----------------------------------------------------------------------------- checks


def _check_input(x: object) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"input must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _FLOATS:
        # torch's type and message: "batch_norm" not implemented for 'Long'
        scalar_name = torch.empty(0, dtype=x.dtype).type().removeprefix("torch.").removesuffix("Tensor")
        raise NotImplementedError(f'"batch_norm" not implemented for \'{scalar_name}\'')
    if not 2 <= x.dim() <= 5:
        raise ValueError(
            f"expected 2D to 5D input (N, C, *spatial), got {x.dim()}D input "
            f"of shape {tuple(x.shape)}"
        )


def _check_eps(eps: object, *, training: bool) -> None:
    if isinstance(eps, bool) or not isinstance(eps, Real) or math.isnan(eps):
        raise TypeError(f"eps must be a real number, got {eps!r}")
    # Same rule and message as torch 2.13's F.batch_norm.
    if training and eps <= 0:
        raise ValueError(f"batch_norm eps must be positive during training, but got {eps}")
    if not training and eps < 0:
        raise ValueError(f"batch_norm eps must be non-negative, but got {eps}")


def _check_batch_size(x: Tensor) -> None:
    # Same rule and message as torch's F.batch_norm in training; N = 0 is legal.
    if _count(x) == 1:
        raise ValueError(
            f"Expected more than 1 value per channel when training, got input size {x.size()}"
        )


def _check_mode(mode: object) -> None:
    if mode not in _MODES:
        raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")


def _check_running_given(running_mean: object, running_var: object, caller: str) -> None:
    if running_mean is None or running_var is None:
        missing = "running_mean" if running_mean is None else "running_var"
        raise TypeError(
            f"{caller} needs running_mean and running_var ({missing} is None); with no running "
            "statistics BatchNorm normalizes with batch statistics (use train_forward/train_backward)"
        )


def _checked_stats(stats: object, x: Tensor) -> tuple[Tensor, Tensor]:
    """``stats`` must be the (mean, var) pair from train_forward: two tensors of C elements."""
    if not isinstance(stats, (tuple, list)) or len(stats) != 2 or not all(isinstance(s, Tensor) for s in stats):
        raise TypeError(f"stats must be a (mean, var) pair of tensors from train_forward or None, "
                        f"got {type(stats).__name__}")
    for name, s in zip(("stats mean", "stats var"), stats):
        if s.numel() != x.shape[1]:
            raise RuntimeError(f"{name} should contain {x.shape[1]} elements not {s.numel()}")
        if s.device != x.device:
            raise RuntimeError(f"{name} is on {s.device} but input is on {x.device}")
    return stats[0], stats[1]


def _check_per_channel(x: Tensor, mode: str, **named: Tensor | None) -> None:
    """Per-channel tensors: numel C, same device, and (native mode) torch's dtype rule."""
    channels = x.shape[1]
    dtypes = set()
    for name, t in named.items():
        if t is None:
            continue
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor or None, got {type(t).__name__}")
        if t.numel() != channels:
            # torch: "running_mean should contain 3 elements not 4"
            raise RuntimeError(f"{name} should contain {channels} elements not {t.numel()}")
        if t.dtype not in _FLOATS:
            raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
        if t.device != x.device:
            raise RuntimeError(f"{name} is on {t.device} but input is on {x.device}")
        dtypes.add(t.dtype)
    if mode == "native" and dtypes:
        # torch CPU: parameters and statistics share one dtype, which is the input's,
        # or float32 for a float16/bfloat16 input ("mixed dtype (CPU)").
        allowed = {x.dtype, torch.float32} if x.dtype in _LOW_PRECISION else {x.dtype}
        if len(dtypes) > 1 or not dtypes <= allowed:
            got = ", ".join(f"{k}={v.dtype}" for k, v in named.items() if v is not None)
            raise RuntimeError(
                f"mixed dtype: for {x.dtype} input, weight, bias and running statistics "
                f"must all be {' or all '.join(sorted(map(str, allowed)))}; got {got}"
            )


# ----------------------------------------------------------------------------- helpers


@lru_cache(maxsize=None)
def _has_float64(device_type: str) -> bool:
    try:
        torch.zeros(1, dtype=torch.float64, device=device_type)
    except (TypeError, RuntimeError):
        return False
    return True


def _compute(t: Tensor | None, x: Tensor, mode: str) -> Tensor | None:
    """``t`` in the dtype (and device) the reductions run in."""
    if t is None:
        return None
    if mode == "oracle":
        device = x.device if _has_float64(x.device.type) else torch.device("cpu")
        # The copy is made anyway: dense, in the layout the output will have (channels_last
        # input gives channels_last output), so no second copy reorders the result.
        layout = _layout(x) if t.dim() == x.dim() else torch.contiguous_format
        return t.to(device=device, dtype=torch.float64, memory_format=layout)
    dtype = torch.float32 if x.dtype in _LOW_PRECISION else x.dtype
    # .to() would return t itself too; asking first saves a dispatch (small inputs are
    # dominated by per-op overhead, a dozen of these calls per step).
    return t if t.dtype == dtype else t.to(dtype)


def _channel(t: Tensor | None, x: Tensor, mode: str) -> Tensor | None:
    """A per-channel tensor (any shape with C elements, as torch accepts) as (C,) in the compute dtype."""
    return None if t is None else _compute(t, x, mode).reshape(-1)


def _axes(x: Tensor) -> tuple[int, ...]:
    """Every axis but the channel axis 1."""
    return (0, *range(2, x.dim()))


def _per_channel(v: Tensor, x: Tensor) -> Tensor:
    """(C,) -> (1, C, 1, ...) so it broadcasts against x."""
    return v.reshape(1, -1, *([1] * (x.dim() - 2)))


def _count(x: Tensor) -> int:
    """n = numel / C, the number of values per channel."""
    return x.shape[0] * math.prod(x.shape[2:])


def _strides_like_channels_last(x: Tensor) -> bool:
    """torch's rule (c10 is_channels_last_strides_2d/3d): strides ordered C < W < H (< D) < N.

    Ambiguous cases fall back to contiguous: a zero channel stride, an empty axis, and
    N whose stride equals C's. Measured: torch 2.13 also keeps C = 1 contiguous.
    """
    if x.dim() not in (4, 5) or x.shape[1] == 1 or x.stride(1) == 0:
        return False
    order = (1, 3, 2, 0) if x.dim() == 4 else (1, 4, 3, 2, 0)
    low = 0
    for d in order:
        if x.shape[d] == 0 or x.stride(d) < low or (d == 0 and low == x.stride(1)):
            return False
        low = x.stride(d) * (x.shape[d] if x.shape[d] > 1 else 1)
    return True


def _layout(x: Tensor) -> torch.memory_format:
    """The memory format of the results for input x: channels_last(_3d) or contiguous."""
    if _strides_like_channels_last(x):
        return torch.channels_last if x.dim() == 4 else torch.channels_last_3d
    return torch.contiguous_format


def _output(y: Tensor, x: Tensor, mode: str) -> Tensor:
    """Cast to the output dtype; channels_last input gives channels_last output."""
    if mode == "native":
        y = y.to(x.dtype)
    return y.contiguous(memory_format=_layout(x))


def _moments(xc: Tensor, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Two-pass mean and biased variance of ``xc`` (x in the compute dtype), and ``xc - mean``."""
    mean = xc.mean(dim=_axes(x))
    centered = _centered(xc, mean, x)
    return mean, (centered * centered).mean(dim=_axes(x)), centered


def _centered(xc: Tensor, mean: Tensor, x: Tensor) -> Tensor:
    """``xc - mean`` per channel, for ``xc = _compute(x, x, mode)``. When that is a copy of
    x (oracle mode, half-precision input) it is centered in place: a full-size tensor less
    to allocate, which costs as much as the pass itself on large inputs; autograd allows
    it, since neither the copy nor the mean keeps xc's values for its backward."""
    return xc.sub_(_per_channel(mean, x)) if xc is not x else xc - _per_channel(mean, x)


def _normalize(centered: Tensor, invstd: Tensor, x: Tensor, weight: Tensor | None,
               bias: Tensor | None) -> Tensor:
    """``centered * (invstd * w) + b``: the per-channel scale is folded before the big multiply."""
    scale = _per_channel(invstd if weight is None else invstd * weight, x)
    return centered * scale if bias is None else torch.addcmul(_per_channel(bias, x), centered, scale)


# ----------------------------------------------------------------------------- forward


def batch_stats(x: Tensor, *, mode: Mode = "native") -> tuple[Tensor, Tensor]:
    r"""Per-channel batch mean and biased variance, two-pass.

    .. math::
        \mu_c = \frac{1}{n}\sum_{i} x_{i,c}, \qquad
        \sigma^2_c = \frac{1}{n}\sum_{i} (x_{i,c} - \mu_c)^2

    where ``i`` runs over N and the spatial axes. Shapes: ``x (N, C, *)`` ->
    ``mean (C,)``, ``var (C,)`` in the compute dtype. An empty batch (n = 0) gives NaN.
    """
    _check_mode(mode)
    _check_input(x)
    mean, var, _ = _moments(_compute(x, x, mode), x)
    return mean, var


def train_forward(
    x: Tensor,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    *,
    eps: float = 1e-5,
    mode: Mode = "native",
) -> TrainForward:
    r"""Training-mode forward: normalize with the batch's own statistics.

    .. math::
        y = \frac{x - \mu}{\sqrt{\sigma^2 + \epsilon}} \cdot w + b

    with ``mu``, biased ``sigma^2`` from :func:`batch_stats`; ``eps`` is inside the
    square root. Shapes: ``x (N, C, *)``, ``weight``/``bias (C,)`` or None ->
    ``y`` like ``x`` (channels_last kept), ``mean``/``var (C,)``.

    Raises ValueError for ``eps <= 0`` and for one value per channel (n = 1, where the
    output would be ``b`` whatever x is). An empty batch gives an empty output (and NaN
    statistics, which :func:`update_running_stats` never uses since ``count`` is 0).
    """
    _check_mode(mode)
    _check_input(x)
    _check_eps(eps, training=True)
    _check_batch_size(x)
    _check_per_channel(x, mode, weight=weight, bias=bias)
    mean, var, centered = _moments(_compute(x, x, mode), x)
    y = _normalize(centered, torch.rsqrt(var + eps), x, _channel(weight, x, mode), _channel(bias, x, mode))
    return TrainForward(_output(y, x, mode), mean, var)


def eval_forward(
    x: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    *,
    eps: float = 1e-5,
    mode: Mode = "native",
) -> Tensor:
    r"""Eval-mode forward: normalize with the given running statistics.

    .. math::
        y = \frac{x - \hat\mu}{\sqrt{\hat\sigma^2 + \epsilon}} \cdot w + b

    Each sample's output depends only on that sample. Shapes: ``x (N, C, *)``,
    ``running_mean``/``running_var``/``weight``/``bias (C,)`` -> ``y`` like ``x``.
    Raises ValueError for ``eps < 0`` (``eps = 0`` is allowed in eval, as in torch).
    """
    _check_mode(mode)
    _check_input(x)
    _check_eps(eps, training=False)
    _check_running_given(running_mean, running_var, "eval_forward")
    _check_per_channel(
        x, mode, running_mean=running_mean, running_var=running_var, weight=weight, bias=bias
    )
    rm, rv = _channel(running_mean, x, mode), _channel(running_var, x, mode)
    centered = _centered(_compute(x, x, mode), rm, x)
    y = _normalize(centered, torch.rsqrt(rv + eps), x, _channel(weight, x, mode), _channel(bias, x, mode))
    return _output(y, x, mode)


# ----------------------------------------------------------------------------- running stats


def update_running_stats(
    running_mean: Tensor | None,
    running_var: Tensor | None,
    num_batches_tracked: Tensor | None,
    batch_mean: Tensor,
    batch_var: Tensor,
    count: int,
    *,
    momentum: float | None,
) -> RunningStats:
    r"""One training step's update of the running statistics.

    .. math::
        t \leftarrow t + 1, \qquad
        f = \begin{cases} \text{momentum} \\ 1/t & \text{momentum is None}\end{cases}

        \hat\mu \leftarrow (1-f)\,\hat\mu + f\,\mu, \qquad
        \hat\sigma^2 \leftarrow (1-f)\,\hat\sigma^2 + f\,\sigma^2 \frac{n}{n-1}

    ``batch_var`` is the biased variance :func:`train_forward` normalized with; the
    running variance tracks the unbiased one. ``count`` is ``n``: 0 (an empty batch
    leaves the statistics unchanged but still counts a step) or at least 2. Momentum
    outside [0, 1] is accepted and extrapolates, as in torch. Results keep the dtype and
    device of the running statistics; ``num_batches_tracked`` is a 0-dim int64 tensor.
    A running statistic given as None stays None.
    """
    if momentum is not None and (
        isinstance(momentum, bool) or not isinstance(momentum, Real) or math.isnan(momentum)
    ):
        raise TypeError(f"momentum must be a real number or None, got {momentum!r}")
    if isinstance(count, bool) or not isinstance(count, int) or count < 0 or count == 1:
        raise ValueError(
            f"count must be 0 (empty batch) or an int >= 2 (the unbiased variance divides "
            f"by count - 1), got {count!r}"
        )
    for name, t in (("batch_mean", batch_mean), ("batch_var", batch_var)):
        if not isinstance(t, Tensor) or t.dim() != 1:
            raise TypeError(f"{name} must be a 1-D tensor of per-channel values")
    channels = batch_mean.numel()
    for name, t in (("batch_var", batch_var), ("running_mean", running_mean), ("running_var", running_var)):
        if t is not None and (not isinstance(t, Tensor) or t.numel() != channels):
            raise RuntimeError(f"{name} should contain {channels} elements not "
                               f"{t.numel() if isinstance(t, Tensor) else type(t).__name__}")
        if t is not None and t.dtype not in _FLOATS:
            raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if num_batches_tracked is None:
        if momentum is None:
            raise ValueError("momentum=None (cumulative average) needs num_batches_tracked")
        steps = None
    else:
        if (not isinstance(num_batches_tracked, Tensor) or num_batches_tracked.numel() != 1
                or num_batches_tracked.dtype.is_floating_point or num_batches_tracked.dtype.is_complex
                or num_batches_tracked.dtype == torch.bool):
            raise TypeError("num_batches_tracked must be a one-element integer tensor (a count of steps) "
                            f"or None, got {num_batches_tracked!r}")
        steps = num_batches_tracked.to(torch.int64).reshape(()) + 1
    factor = momentum if momentum is not None else 1.0 / float(steps)

    def blend(old: Tensor | None, new: Tensor) -> Tensor | None:
        if old is None:
            return None
        if count == 0:
            return old.clone()
        work = torch.promote_types(old.dtype, new.dtype)
        mixed = (1 - factor) * old.to(work) + factor * new.to(device=old.device, dtype=work)
        return mixed.to(old.dtype)

    unbiased = batch_var * (count / (count - 1)) if count else batch_var
    return RunningStats(blend(running_mean, batch_mean), blend(running_var, unbiased), steps)


# ----------------------------------------------------------------------------- backward


def train_backward(
    dy: Tensor,
    x: Tensor,
    weight: Tensor | None = None,
    *,
    eps: float = 1e-5,
    mode: Mode = "native",
    stats: tuple[Tensor, Tensor] | None = None,
) -> Grads:
    r"""Closed-form training-mode backward.

    With :math:`\hat x = (x-\mu)\,r`, :math:`r = 1/\sqrt{\sigma^2+\epsilon}`, sums over
    the n values of a channel:

    .. math::
        \frac{\partial L}{\partial x} = \frac{w\,r}{n}\Big(n\,dy - \sum dy
            - \hat x \sum dy\,\hat x\Big), \quad
        \frac{\partial L}{\partial w} = \sum dy\,\hat x, \quad
        \frac{\partial L}{\partial b} = \sum dy

    that is ``w r (dy - mean(dy) - xhat mean(dy xhat))``, computed per channel as
    ``a dy + b (x - mu) + c`` (:func:`_dx_from_sums`). The batch statistics are
    recomputed from x, in differentiable torch ops, so autograd through this function
    gives the second-order gradients. ``stats=(mean, var)`` from :func:`train_forward`
    skips that recomputation; they are then constants to autograd (first order only).
    Shapes: ``dy``, ``x (N, C, *)``, ``weight (C,)`` or None -> ``dx`` like ``x`` in its
    dtype (native) or float64 (oracle); ``dweight``, ``dbias (C,)``.
    """
    _check_mode(mode)
    _check_input(x)
    _check_eps(eps, training=True)
    _check_batch_size(x)
    _check_per_channel(x, mode, weight=weight)
    _check_grad_output(dy, x)
    n = max(_count(x), 1)  # an empty batch has zero sums: any n > 0 gives zero gradients
    xc = _compute(x, x, mode)
    if stats is None:
        _, var, centered = _moments(xc, x)
    else:
        mean, var = (_channel(s, x, mode) for s in _checked_stats(stats, x))
        centered = _centered(xc, mean, x)
    invstd = torch.rsqrt(var + eps)
    g = _compute(dy, x, mode)
    sum_dy = g.sum(dim=_axes(x))
    sum_dy_xhat = _sum_dy_xhat(g, centered, invstd, x)
    dx = _dx_from_sums(g, centered, invstd, _channel(weight, x, mode), sum_dy, sum_dy_xhat, n, x)
    return _grads(dx, sum_dy_xhat, sum_dy, x, weight, mode)


def _sum_dy_xhat(g: Tensor, centered: Tensor, invstd: Tensor, x: Tensor) -> Tensor:
    """``sum dy xhat = r sum dy (x - mu)``: ``xhat = (x - mu) r`` is never stored (one pass
    less). An empty batch (NaN statistics) sums to zero, as ``sum dy xhat`` itself does."""
    total = (g * centered).sum(dim=_axes(x))
    return total if x.numel() == 0 else total * invstd


def _dx_from_sums(g: Tensor, centered: Tensor, invstd: Tensor, w: Tensor | None, sum_dy: Tensor,
                  sum_dy_xhat: Tensor, n: int, x: Tensor) -> Tensor:
    """``dx = w r (dy - S1/n - xhat S2/n)`` from the channel sums ``S1 = sum dy``, ``S2 = sum dy xhat``
    over n values and ``centered = x - mu`` (``xhat = centered r``); a synced BatchNorm
    (bnspec.sync) passes sums and n over all processes.

    Per channel dx is ``a dy + b (x - mu) + c`` with ``a = w r``, ``b = -a r S2/n``,
    ``c = -a S1/n``: two fused multiply-adds, two passes over the data instead of four.
    """
    a = invstd if w is None else invstd * w
    b, c = a * invstd * sum_dy_xhat / -n, a * sum_dy / -n
    # addcmul_ writes into the first addcmul's fresh result, which autograd does not save.
    return torch.addcmul(_per_channel(c, x), g, _per_channel(a, x)).addcmul_(centered, _per_channel(b, x))


def eval_backward(
    dy: Tensor,
    x: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    weight: Tensor | None = None,
    *,
    eps: float = 1e-5,
    mode: Mode = "native",
) -> Grads:
    r"""Closed-form eval-mode backward (the statistics are constants).

    With :math:`r = 1/\sqrt{\hat\sigma^2+\epsilon}`:

    .. math::
        \frac{\partial L}{\partial x} = w\,r\,dy, \quad
        \frac{\partial L}{\partial w} = \sum dy\,(x-\hat\mu)\,r, \quad
        \frac{\partial L}{\partial b} = \sum dy

    Shapes as in :func:`train_backward`.
    """
    _check_mode(mode)
    _check_input(x)
    _check_eps(eps, training=False)
    _check_running_given(running_mean, running_var, "eval_backward")
    _check_per_channel(x, mode, running_mean=running_mean, running_var=running_var, weight=weight)
    _check_grad_output(dy, x)
    rm, rv = _channel(running_mean, x, mode), _channel(running_var, x, mode)
    invstd = _per_channel(torch.rsqrt(rv + eps), x)
    g = _compute(dy, x, mode)
    xhat = _centered(_compute(x, x, mode), rm, x) * invstd
    scale = invstd if weight is None else invstd * _per_channel(_channel(weight, x, mode), x)
    return _grads(scale * g, (g * xhat).sum(dim=_axes(x)), g.sum(dim=_axes(x)), x, weight, mode)


def _check_grad_output(dy: object, x: Tensor) -> None:
    if not isinstance(dy, Tensor) or dy.shape != x.shape:
        got = tuple(dy.shape) if isinstance(dy, Tensor) else type(dy).__name__
        raise ValueError(f"grad_output must be a tensor of the input's shape {tuple(x.shape)}, got {got}")
    if dy.device != x.device:
        raise RuntimeError(f"grad_output is on {dy.device} but input is on {x.device}")


def _grads(dx: Tensor, dweight: Tensor, dbias: Tensor, x: Tensor, weight: Tensor | None, mode: str) -> Grads:
    if mode == "native":
        param_dtype = weight.dtype if weight is not None else dweight.dtype
        dweight, dbias = dweight.to(param_dtype), dbias.to(param_dtype)
    return Grads(_output(dx, x, mode), dweight, dbias)
