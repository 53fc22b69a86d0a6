"""The internal layer :mod:`bnspec.reference` is built from: argument checks, the dtype,
device and layout rules, and the pieces the formulas share (two-pass moments, the
normalization, the sums of the closed-form backward).

Used by :mod:`bnspec.reference` (the public formulas), :mod:`bnspec.modules` (the drop-in
modules validate with the same checks before they touch their state) and
:mod:`bnspec.sync` (synced BatchNorm calls the same pieces with sums and counts over all
processes, so the formulas stay in one place). NOT public API: names and signatures
follow the reference's needs; outside bnspec use the functions of :mod:`bnspec.reference`.

Like the reference, nothing here calls torch's own batch norm, keeps state or writes to
its arguments (except :func:`center`'s in-place subtraction on a copy it was given).
``mode`` is the reference's precision mode, ``"native"`` or ``"oracle"``; ``x`` is the
``(N, C, *spatial)`` input every per-channel quantity refers to.
"""

from __future__ import annotations

import math
from functools import lru_cache
from numbers import Real

import torch
from torch import Tensor

__all__ = [
    "MODES", "LOW_PRECISION", "FLOATS",
    "check_mode", "check_input", "check_eps", "check_batch_size", "check_running_given",
    "checked_stats", "check_per_channel", "check_grad_output",
    "to_compute", "channel_vector", "reduce_axes", "per_channel", "values_per_channel",
    "output_layout", "to_output",
    "two_pass_moments", "center", "normalize",
    "dy_xhat_sum", "dx_from_sums", "output_grads",
]

MODES = ("native", "oracle")  #: the reference's precision modes (bnspec.reference.Mode)
LOW_PRECISION = (torch.float16, torch.bfloat16)  #: reduced in float32 in native mode
FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)  #: the input dtypes BatchNorm takes


# ----------------------------------------------------------------------------- checks


def check_mode(mode: object) -> None:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


def check_input(x: object) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"input must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOATS:
        # torch's type and message: "batch_norm" not implemented for 'Long'
        scalar_name = torch.empty(0, dtype=x.dtype).type().removeprefix("torch.").removesuffix("Tensor")
        raise NotImplementedError(f'"batch_norm" not implemented for \'{scalar_name}\'')
    if not 2 <= x.dim() <= 5:
        raise ValueError(
            f"expected 2D to 5D input (N, C, *spatial), got {x.dim()}D input "
            f"of shape {tuple(x.shape)}"
        )


def check_eps(eps: object, *, training: bool) -> None:
    if isinstance(eps, bool) or not isinstance(eps, Real) or math.isnan(eps):
        raise TypeError(f"eps must be a real number, got {eps!r}")
    # Same rule and message as torch 2.13's F.batch_norm.
    if training and eps <= 0:
        raise ValueError(f"batch_norm eps must be positive during training, but got {eps}")
    if not training and eps < 0:
        raise ValueError(f"batch_norm eps must be non-negative, but got {eps}")


def check_batch_size(x: Tensor) -> None:
    # Same rule and message as torch's F.batch_norm in training; N = 0 is legal.
    if values_per_channel(x) == 1:
        raise ValueError(
            f"Expected more than 1 value per channel when training, got input size {x.size()}"
        )


def check_running_given(running_mean: object, running_var: object, caller: str) -> None:
    if running_mean is None or running_var is None:
        missing = "running_mean" if running_mean is None else "running_var"
        raise TypeError(
            f"{caller} needs running_mean and running_var ({missing} is None); with no running "
            "statistics BatchNorm normalizes with batch statistics (use train_forward/train_backward)"
        )


def checked_stats(stats: object, x: Tensor) -> tuple[Tensor, Tensor]:
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


def check_per_channel(x: Tensor, mode: str, **named: Tensor | None) -> None:
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
        if t.dtype not in FLOATS:
            raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
        if t.device != x.device:
            raise RuntimeError(f"{name} is on {t.device} but input is on {x.device}")
        dtypes.add(t.dtype)
    if mode == "native" and dtypes:
        # torch CPU: parameters and statistics share one dtype, which is the input's,
        # or float32 for a float16/bfloat16 input ("mixed dtype (CPU)").
        allowed = {x.dtype, torch.float32} if x.dtype in LOW_PRECISION else {x.dtype}
        if len(dtypes) > 1 or not dtypes <= allowed:
            got = ", ".join(f"{k}={v.dtype}" for k, v in named.items() if v is not None)
            raise RuntimeError(
                f"mixed dtype: for {x.dtype} input, weight, bias and running statistics "
                f"must all be {' or all '.join(sorted(map(str, allowed)))}; got {got}"
            )


def check_grad_output(dy: object, x: Tensor) -> None:
    if not isinstance(dy, Tensor) or dy.shape != x.shape:
        got = tuple(dy.shape) if isinstance(dy, Tensor) else type(dy).__name__
        raise ValueError(f"grad_output must be a tensor of the input's shape {tuple(x.shape)}, got {got}")
    if dy.device != x.device:
        raise RuntimeError(f"grad_output is on {dy.device} but input is on {x.device}")


# ----------------------------------------------------------------------------- dtypes, devices and layouts


@lru_cache(maxsize=None)
def _has_float64(device_type: str) -> bool:
    try:
        torch.zeros(1, dtype=torch.float64, device=device_type)
    except (TypeError, RuntimeError):
        return False
    return True


def to_compute(t: Tensor | None, x: Tensor, mode: str) -> Tensor | None:
    """``t`` in the dtype (and device) the reductions run in."""
    if t is None:
        return None
    if mode == "oracle":
        device = x.device if _has_float64(x.device.type) else torch.device("cpu")
        # The copy is made anyway: dense, in the layout the output will have (channels_last
        # input gives channels_last output), so no second copy reorders the result.
        layout = output_layout(x) if t.dim() == x.dim() else torch.contiguous_format
        return t.to(device=device, dtype=torch.float64, memory_format=layout)
    dtype = torch.float32 if x.dtype in LOW_PRECISION else x.dtype
    # .to() would return t itself too; asking first saves a dispatch (small inputs are
    # dominated by per-op overhead, a dozen of these calls per step).
    return t if t.dtype == dtype else t.to(dtype)


def channel_vector(t: Tensor | None, x: Tensor, mode: str) -> Tensor | None:
    """A per-channel tensor (any shape with C elements, as torch accepts) as (C,) in the compute dtype."""
    return None if t is None else to_compute(t, x, mode).reshape(-1)


def reduce_axes(x: Tensor) -> tuple[int, ...]:
    """Every axis but the channel axis 1."""
    return (0, *range(2, x.dim()))


def per_channel(v: Tensor, x: Tensor) -> Tensor:
    """(C,) -> (1, C, 1, ...) so it broadcasts against x."""
    return v.reshape(1, -1, *([1] * (x.dim() - 2)))


def values_per_channel(x: Tensor) -> int:
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


def output_layout(x: Tensor) -> torch.memory_format:
    """The memory format of the results for input x: channels_last(_3d) or contiguous."""
    if _strides_like_channels_last(x):
        return torch.channels_last if x.dim() == 4 else torch.channels_last_3d
    return torch.contiguous_format


def to_output(y: Tensor, x: Tensor, mode: str) -> Tensor:
    """Cast to the output dtype; channels_last input gives channels_last output."""
    if mode == "native":
        y = y.to(x.dtype)
    return y.contiguous(memory_format=output_layout(x))


# ----------------------------------------------------------------------------- forward pieces


def two_pass_moments(xc: Tensor, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Two-pass mean and biased variance of ``xc`` (x in the compute dtype), and ``xc - mean``."""
    mean = xc.mean(dim=reduce_axes(x))
    centered = center(xc, mean, x)
    return mean, (centered * centered).mean(dim=reduce_axes(x)), centered


def center(xc: Tensor, mean: Tensor, x: Tensor) -> Tensor:
    """``xc - mean`` per channel, for ``xc = to_compute(x, x, mode)``. When that is a copy of
    x (oracle mode, half-precision input) it is centered in place: a full-size tensor less
    to allocate, which costs as much as the pass itself on large inputs; autograd allows
    it, since neither the copy nor the mean keeps xc's values for its backward."""
    return xc.sub_(per_channel(mean, x)) if xc is not x else xc - per_channel(mean, x)


def normalize(centered: Tensor, invstd: Tensor, x: Tensor, weight: Tensor | None,
              bias: Tensor | None) -> Tensor:
    """``centered * (invstd * w) + b``: the per-channel scale is folded before the big multiply."""
    scale = per_channel(invstd if weight is None else invstd * weight, x)
    return centered * scale if bias is None else torch.addcmul(per_channel(bias, x), centered, scale)


# ----------------------------------------------------------------------------- backward pieces


def dy_xhat_sum(g: Tensor, centered: Tensor, invstd: Tensor, x: Tensor) -> Tensor:
    """``sum dy xhat = r sum dy (x - mu)``: ``xhat = (x - mu) r`` is never stored (one pass
    less). An empty batch (NaN statistics) sums to zero, as ``sum dy xhat`` itself does."""
    total = (g * centered).sum(dim=reduce_axes(x))
    return total if x.numel() == 0 else total * invstd


def dx_from_sums(g: Tensor, centered: Tensor, invstd: Tensor, w: Tensor | None, sum_dy: Tensor,
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
    return torch.addcmul(per_channel(c, x), g, per_channel(a, x)).addcmul_(centered, per_channel(b, x))


def output_grads(dx: Tensor, dweight: Tensor, dbias: Tensor, x: Tensor, weight: Tensor | None,
                 mode: str) -> tuple[Tensor, Tensor, Tensor]:
    """``(dx, dweight, dbias)`` as returned: dx in the output dtype and layout, the parameter
    gradients in the weight's dtype (native mode; the compute dtype without a weight)."""
    if mode == "native":
        param_dtype = weight.dtype if weight is not None else dweight.dtype
        dweight, dbias = dweight.to(param_dtype), dbias.to(param_dtype)
    return to_output(dx, x, mode), dweight, dbias
