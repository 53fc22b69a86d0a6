r"""Error bounds for comparing a candidate with the float64 oracle (SPEC.md, Error bounds).

No fixed atol/rtol: for every compared element we bound the error a *correct*
implementation can make, from the unit roundoff ``u`` of the dtype it computes in, the
reduction length ``n`` and the conditioning of the channel (``|mean| / std``, variance
near ``eps``). The verdict is ``error / bound <= 1``. Derivation (notebook 05):

* A sum of n terms computed in precision ``u`` errs by at most ``(n-1) u sum|t|``
  (recursive summation, Higham 2002, section 4.2); pairwise and blocked orders do better.
  Random-walk estimates (``~ sqrt(n) u``) are NOT safe here: with a narrow
  distribution at a large offset the rounding errors of a sequential sum all lean the
  same way, and torch's own CPU kernel for (N, C) input at offset 1e4 with n = 1e5 errs
  by 0.12 n u (measured), beyond any ``sqrt(n)`` allowance. So we take the worst case,
  ``U = u (C0 + n)``: it never flags a correct implementation, whatever its order.
* Mean: ``e_mu = U (|mu| + sigma)`` (mean |x| <= |mu| + sigma).
* Variance: errors LINEAR in the conditioning ``kappa = |mu|/sigma`` are unavoidable
  (the rounded mean, Welford's update, a fused ``x*scale + shift``):
  ``e_var = U (var + 2 |mu| sigma) + e_mu^2``. One-pass ``E[x^2] - E[x]^2`` errs by
  ``U (mu^2 + var)``, QUADRATIC in kappa, and so fails once kappa is large.
* Output ``y = (x - mu) r w + b`` with ``r = 1/sqrt(var + eps)``:
  ``e_y = |w| (e_mu r + |xhat| e_var / (2 (var + eps))) + C1 u (|w xhat| + |b|)``
  ``+ C_OUT u_out (|w xhat| + |b|)`` where ``u_out`` is the output dtype's roundoff
  (float16/bfloat16 reduce in float32, so ``u = u(float32)`` there: accumulating in half
  precision errs by ``~ u_half`` per step and fails).
* Gradients follow by propagating these through the closed form (see the functions).

All inputs are float64 oracle quantities; all outputs are float64 bound tensors.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "C0", "C1", "C_OUT",
    "unit_roundoff", "compute_dtype", "summation_factor",
    "stats_bounds", "train_forward_bound", "eval_forward_bound",
    "running_stats_bound", "train_backward_bound", "eval_backward_bound",
    "ratio",
]

C0 = 8.0  #: roundings outside the reductions (subtract, rsqrt, scale, shift)
C1 = 8.0  #: elementwise roundings in the compute dtype
C_OUT = 3.0  #: roundings in the output dtype (the cast, and an affine done in it)


def unit_roundoff(dtype: torch.dtype) -> float:
    """u = eps/2 of a floating dtype (2^-24 for float32, 2^-11 for float16)."""
    return torch.finfo(dtype).eps / 2


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype torch reduces in: float32 for float16/bfloat16, else the dtype itself."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def summation_factor(n: int, dtype: torch.dtype) -> float:
    """U = u (C0 + n), the relative error allowance of an n-term reduction (worst case)."""
    return unit_roundoff(compute_dtype(dtype)) * (C0 + max(n, 1))


def _pc(v: Tensor, like: Tensor) -> Tensor:
    return v.reshape(1, -1, *([1] * (like.dim() - 2)))


def _axes(t: Tensor) -> tuple[int, ...]:
    return (0, *range(2, t.dim()))


def stats_bounds(mean: Tensor, var: Tensor, n: int, dtype: torch.dtype,
                 param_dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
    """Per-channel bounds ``(e_mu, e_var)`` on a correct implementation's batch statistics.

    Besides the reduction error, the statistics may be rounded once to the input or
    parameter dtype before use (torch's CPU float16/bfloat16 kernels subtract a mean
    rounded to the input dtype): ``u_stat (|mu|, var)`` with the larger of the two u.
    """
    big_u = summation_factor(n, dtype)
    u_stat = max(unit_roundoff(dtype), unit_roundoff(param_dtype or dtype))
    sigma = var.clamp_min(0).sqrt()
    e_mu = big_u * (mean.abs() + sigma) + u_stat * mean.abs()
    e_var = big_u * (var + 2 * mean.abs() * sigma) + e_mu * e_mu + u_stat * var
    return e_mu, e_var


def train_forward_bound(x: Tensor, mean: Tensor, var: Tensor, weight: Tensor | None,
                        bias: Tensor | None, *, eps: float, dtype: torch.dtype,
                        param_dtype: torch.dtype | None = None) -> Tensor:
    """Elementwise bound on ``|y - y_oracle|`` in training mode (float64, shape of x).

    ``dtype`` is the input's, ``param_dtype`` the weight's (default: the input's).
    """
    n = x.numel() // max(x.shape[1], 1)
    e_mu, e_var = stats_bounds(mean, var, n, dtype, param_dtype)
    r = torch.rsqrt(var + eps)
    xhat = (x - _pc(mean, x)) * _pc(r, x)
    e_xhat = _pc(e_mu * r, x) + xhat.abs() * _pc(e_var / (2 * (var + eps)), x)
    w = torch.ones_like(mean) if weight is None else weight
    b = torch.zeros_like(mean) if bias is None else bias
    scale = (xhat * _pc(w, x)).abs() + _pc(b.abs(), x)
    u, u_out = unit_roundoff(compute_dtype(dtype)), unit_roundoff(dtype)
    return _pc(w.abs(), x) * e_xhat + (C1 * u + C_OUT * u_out) * scale


def eval_forward_bound(x: Tensor, running_mean: Tensor, running_var: Tensor,
                       weight: Tensor | None, bias: Tensor | None, *, eps: float,
                       dtype: torch.dtype, param_dtype: torch.dtype | None = None) -> Tensor:
    """Elementwise bound in eval mode: no reductions, a few roundings per element.

    Covers the fused form ``x * scale + shift`` with ``shift = b - mean * scale``, whose
    error scales with ``|x| + |mean|`` rather than ``|x - mean|``.
    """
    r = torch.rsqrt(running_var + eps)
    w = torch.ones_like(running_mean) if weight is None else weight
    b = torch.zeros_like(running_mean) if bias is None else bias
    spread = (x.abs() + _pc(running_mean.abs(), x)) * _pc((w * r).abs(), x)
    y = (x - _pc(running_mean, x)) * _pc(w * r, x)
    u = max(unit_roundoff(compute_dtype(dtype)), unit_roundoff(param_dtype or dtype))
    u_out = unit_roundoff(dtype)
    return C1 * u * (spread + _pc(b.abs(), x)) + C_OUT * u_out * (y.abs() + _pc(b.abs(), x))


def running_stats_bound(old_mean: Tensor, old_var: Tensor, mean: Tensor, var: Tensor,
                        n: int, factor: float, *, dtype: torch.dtype,
                        stat_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Bounds on one update ``(1-f) old + f new`` of running mean and (unbiased) var.

    ``dtype`` is the input's (it sets the statistics' error), ``stat_dtype`` the running
    buffers' (it sets the rounding of the blend).
    """
    e_mu, e_var = stats_bounds(mean, var, n, dtype, stat_dtype)
    corr = n / (n - 1) if n > 1 else 1.0
    u = C1 * max(unit_roundoff(compute_dtype(dtype)), unit_roundoff(stat_dtype))
    keep, take = abs(1 - factor), abs(factor)
    bm = take * e_mu + u * (keep * old_mean.abs() + take * mean.abs())
    bv = take * corr * e_var + u * (keep * old_var.abs() + take * corr * var.abs())
    return bm, bv


def train_backward_bound(dy: Tensor, x: Tensor, mean: Tensor, var: Tensor,
                         weight: Tensor | None, *, eps: float, dtype: torch.dtype,
                         param_dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor, Tensor]:
    r"""Bounds on ``(dx, dweight, dbias)`` in training mode.

    With ``S1 = sum dy``, ``S2 = sum dy xhat`` and ``e_xhat`` from the forward analysis:
    ``e_S1 = U sum|dy|``, ``e_S2 = U sum|dy xhat| + sum |dy| e_xhat``,
    ``e_dx = |w| r / n (e_S1 + |xhat| e_S2 + e_xhat |S2|) + |dx| e_r
    + (C1 u + C_OUT u_out) |w| r (|dy| + |S1|/n + |xhat S2|/n)``.
    On constant channels ``r = 1/sqrt(eps)`` amplifies ``e_mu``: a correct float32
    gradient there can differ from float64 by 1e-2, and the bound says so.
    """
    n = x.numel() // max(x.shape[1], 1)
    nn_ = max(n, 1)
    big_u = summation_factor(n, dtype)
    e_mu, e_var = stats_bounds(mean, var, n, dtype, param_dtype)
    r = torch.rsqrt(var + eps)
    e_r = e_var / (2 * (var + eps))
    xhat = (x - _pc(mean, x)) * _pc(r, x)
    e_xhat = _pc(e_mu * r, x) + xhat.abs() * _pc(e_r, x)
    ax = _axes(x)
    s1, s2 = dy.sum(ax), (dy * xhat).sum(ax)
    e_s1 = big_u * dy.abs().sum(ax)
    e_s2 = big_u * (dy * xhat).abs().sum(ax) + (dy.abs() * e_xhat).sum(ax)
    w = torch.ones_like(mean) if weight is None else weight
    wr = _pc((w * r).abs(), x)
    dx = _pc(w * r, x) / nn_ * (nn_ * dy - _pc(s1, x) - xhat * _pc(s2, x))
    terms = dy.abs() + _pc(s1.abs(), x) / nn_ + (xhat * _pc(s2, x)).abs() / nn_
    u, u_out = unit_roundoff(compute_dtype(dtype)), unit_roundoff(dtype)
    e_dx = (wr / nn_ * (_pc(e_s1, x) + xhat.abs() * _pc(e_s2, x) + e_xhat * _pc(s2.abs(), x))
            + dx.abs() * _pc(e_r, x) + (C1 * u + C_OUT * u_out) * wr * terms)
    u_param = unit_roundoff(param_dtype or dtype)
    return e_dx, e_s2 + C_OUT * u_param * s2.abs(), e_s1 + C_OUT * u_param * s1.abs()


def eval_backward_bound(dy: Tensor, x: Tensor, running_mean: Tensor, running_var: Tensor,
                        weight: Tensor | None, *, eps: float, dtype: torch.dtype,
                        param_dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Bounds on ``(dx, dweight, dbias)`` in eval mode: ``dx = w r dy`` is elementwise."""
    n = x.numel() // max(x.shape[1], 1)
    big_u = summation_factor(n, dtype)
    r = torch.rsqrt(running_var + eps)
    w = torch.ones_like(running_mean) if weight is None else weight
    u, u_out = unit_roundoff(compute_dtype(dtype)), unit_roundoff(dtype)
    e_dx = (C1 * u + C_OUT * u_out) * (dy * _pc(w * r, x)).abs()
    spread = (dy.abs() * (x.abs() + _pc(running_mean.abs(), x))).sum(_axes(x)) * r
    e_dw = big_u * spread + C1 * u * spread
    e_db = big_u * dy.abs().sum(_axes(x))
    u_param = unit_roundoff(param_dtype or dtype)
    dw = (dy * (x - _pc(running_mean, x))).sum(_axes(x)) * r
    return e_dx, e_dw + C_OUT * u_param * dw.abs(), e_db + C_OUT * u_param * dy.sum(_axes(x)).abs()


def ratio(observed: Tensor, oracle: Tensor, bound: Tensor) -> float:
    """Worst ``|observed - oracle| / bound`` over finite oracle entries (inf if none fits).

    Special values must match exactly: a NaN where the oracle has one (and only there),
    the same infinity. Any mismatch gives ``inf``. A zero bound with zero error is 0.
    """
    obs = observed.detach().to(device="cpu", dtype=torch.float64)
    ref = oracle.detach().to(device="cpu", dtype=torch.float64)
    bnd = bound.detach().to(device="cpu", dtype=torch.float64).expand_as(ref)
    if obs.shape != ref.shape:
        return math.inf
    finite = torch.isfinite(ref)
    same_special = torch.equal(torch.isnan(obs), torch.isnan(ref)) and torch.equal(
        obs[~finite & ~torch.isnan(ref)], ref[~finite & ~torch.isnan(ref)])
    if not same_special or not torch.isfinite(obs[finite]).all():
        return math.inf
    if not finite.any():
        return 0.0
    err = (obs[finite] - ref[finite]).abs()
    b = bnd[finite]
    tiny = torch.finfo(torch.float64).tiny
    q = torch.where(err == 0, torch.zeros_like(err), err / b.clamp_min(tiny))
    return float(q.max())
