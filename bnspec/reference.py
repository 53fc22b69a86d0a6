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

The argument checks and the pieces the formulas share live in
:mod:`bnspec.reference_parts`, the internal layer this module is built from.
"""

from __future__ import annotations

import math
from numbers import Real
from typing import Literal, NamedTuple

import torch
from torch import Tensor

from bnspec.reference_parts import (
    FLOATS, center, channel_vector, check_batch_size, check_eps, check_grad_output, check_input,
    check_mode, check_per_channel, check_running_given, checked_stats, dx_from_sums, dy_xhat_sum,
    normalize, output_grads, per_channel, reduce_axes, to_compute, to_output, two_pass_moments,
    values_per_channel,
)

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


# ----------------------------------------------------------------------------- forward


def batch_stats(x: Tensor, *, mode: Mode = "native") -> tuple[Tensor, Tensor]:
    r"""Per-channel batch mean and biased variance, two-pass.

    .. math::
        \mu_c = \frac{1}{n}\sum_{i} x_{i,c}, \qquad
        \sigma^2_c = \frac{1}{n}\sum_{i} (x_{i,c} - \mu_c)^2

    where ``i`` runs over N and the spatial axes. Shapes: ``x (N, C, *)`` ->
    ``mean (C,)``, ``var (C,)`` in the compute dtype. An empty batch (n = 0) gives NaN.
    """
    check_mode(mode)
    check_input(x)
    mean, var, _ = two_pass_moments(to_compute(x, x, mode), x)
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
    check_mode(mode)
    check_input(x)
    check_eps(eps, training=True)
    check_batch_size(x)
    check_per_channel(x, mode, weight=weight, bias=bias)
    mean, var, centered = two_pass_moments(to_compute(x, x, mode), x)
    y = normalize(centered, torch.rsqrt(var + eps), x,
                  channel_vector(weight, x, mode), channel_vector(bias, x, mode))
    return TrainForward(to_output(y, x, mode), mean, var)


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
    check_mode(mode)
    check_input(x)
    check_eps(eps, training=False)
    check_running_given(running_mean, running_var, "eval_forward")
    check_per_channel(
        x, mode, running_mean=running_mean, running_var=running_var, weight=weight, bias=bias
    )
    rm, rv = channel_vector(running_mean, x, mode), channel_vector(running_var, x, mode)
    centered = center(to_compute(x, x, mode), rm, x)
    y = normalize(centered, torch.rsqrt(rv + eps), x,
                  channel_vector(weight, x, mode), channel_vector(bias, x, mode))
    return to_output(y, x, mode)


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
        if t is not None and t.dtype not in FLOATS:
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
    ``a dy + b (x - mu) + c`` (:func:`bnspec.reference_parts.dx_from_sums`). The batch
    statistics are recomputed from x, in differentiable torch ops, so autograd through this
    function gives the second-order gradients. ``stats=(mean, var)`` from :func:`train_forward`
    skips that recomputation; they are then constants to autograd (first order only).
    Shapes: ``dy``, ``x (N, C, *)``, ``weight (C,)`` or None -> ``dx`` like ``x`` in its
    dtype (native) or float64 (oracle); ``dweight``, ``dbias (C,)``.
    """
    check_mode(mode)
    check_input(x)
    check_eps(eps, training=True)
    check_batch_size(x)
    check_per_channel(x, mode, weight=weight)
    check_grad_output(dy, x)
    n = max(values_per_channel(x), 1)  # an empty batch has zero sums: any n > 0 gives zero gradients
    xc = to_compute(x, x, mode)
    if stats is None:
        _, var, centered = two_pass_moments(xc, x)
    else:
        mean, var = (channel_vector(s, x, mode) for s in checked_stats(stats, x))
        centered = center(xc, mean, x)
    invstd = torch.rsqrt(var + eps)
    g = to_compute(dy, x, mode)
    sum_dy = g.sum(dim=reduce_axes(x))
    sum_dy_xhat = dy_xhat_sum(g, centered, invstd, x)
    dx = dx_from_sums(g, centered, invstd, channel_vector(weight, x, mode), sum_dy, sum_dy_xhat, n, x)
    return Grads(*output_grads(dx, sum_dy_xhat, sum_dy, x, weight, mode))


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
    check_mode(mode)
    check_input(x)
    check_eps(eps, training=False)
    check_running_given(running_mean, running_var, "eval_backward")
    check_per_channel(x, mode, running_mean=running_mean, running_var=running_var, weight=weight)
    check_grad_output(dy, x)
    rm, rv = channel_vector(running_mean, x, mode), channel_vector(running_var, x, mode)
    invstd = per_channel(torch.rsqrt(rv + eps), x)
    g = to_compute(dy, x, mode)
    xhat = center(to_compute(x, x, mode), rm, x) * invstd
    scale = invstd if weight is None else invstd * per_channel(channel_vector(weight, x, mode), x)
    return Grads(*output_grads(scale * g, (g * xhat).sum(dim=reduce_axes(x)), g.sum(dim=reduce_axes(x)),
                               x, weight, mode))
