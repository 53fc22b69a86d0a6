"""Known deviations from torch's BatchNorm, named, so a failing verdict can say what a
candidate does instead. These are NOT the reference (that is :mod:`bnspec.reference`);
each is a documented convention of another framework or a common mistake.

Every function returns float64 values of the quantity the suite compares.
"""

from __future__ import annotations

import torch
from torch import Tensor

from bnspec import reference as R

#: name -> who follows it (shown in verdicts and reports)
CONVENTIONS = {
    "momentum_on_old": "momentum weights the old value (ONNX, Keras, Flax, Paddle: new = m*old + (1-m)*batch)",
    "biased_running_var": "biased variance in the running statistics (ONNX, Keras, Flax, Paddle)",
    "eps_outside_root": "eps outside the square root, (x-mean)/(sqrt(var)+eps) (the source document's hand check)",
    "one_pass_variance": "one-pass variance E[x^2]-E[x]^2 (Flax's default use_fast_variance=True)",
    "unbiased_normalization": "unbiased variance used to normalize (torch uses the biased one)",
    "no_error_one_value": "no error for one value per channel in training",
    "nan_stats_empty_batch": "an empty batch updates the running statistics with its NaN mean and variance",
    "float32_for_float64": "float64 results only as accurate as float32 (computed in float32, or with float32 "
                           "statistics or attributes)",
    "own_defaults": "constructor defaults other than torch's eps=1e-5, momentum=0.1 (e.g. Keras' eps=1e-3, "
                    "momentum=0.99 on the old value): values at the defaults follow the candidate's own",
    "stats_by_grad_mode": "statistics chosen by torch.is_grad_enabled() instead of module.training (batch "
                          "statistics whenever autograd is on, in eval too; running statistics under no_grad)",
    "running_stats_in_training": "running statistics used to normalize in training, and never updated (a frozen "
                                 "layer)",
    "variance_stop_gradient": "no gradient through the mean inside the variance (tf.nn.moments's "
                              "stop_gradient): first-order gradients are right, second-order are not "
                              "(Keras 3 on tensorflow)",
}


def _pc(v: Tensor, x: Tensor) -> Tensor:
    return v.reshape(1, -1, *([1] * (x.dim() - 2)))


def _affine(xhat: Tensor, x: Tensor, w: Tensor | None, b: Tensor | None) -> Tensor:
    y = xhat if w is None else xhat * _pc(w.double(), x)
    return y if b is None else y + _pc(b.double(), x)


def train_forward_alternatives(x: Tensor, w: Tensor | None, b: Tensor | None, *, eps: float,
                               running: tuple[Tensor, Tensor] | None = None) -> dict[str, Tensor]:
    """Outputs other conventions give for a training forward (``running``: the running
    statistics the module held before it, for the frozen layer's convention)."""
    out = {"eps_outside_root": _eps_outside_forward(x, w, b, eps=eps),
           "unbiased_normalization": _unbiased_forward(x, w, b, eps=eps),
           "one_pass_variance": _one_pass_forward(x, w, b, eps=eps)}
    if x.dtype == torch.float64:
        axes = (0, *range(2, x.dim()))
        xf = x.float()
        mf, vf = xf.mean(axes), ((xf - _pc(xf.mean(axes), x)) ** 2).mean(axes)
        wf = None if w is None else w.float()
        bf = None if b is None else b.float()
        yf = (xf - _pc(mf, x)) * _pc(torch.rsqrt(vf + eps), x)
        yf = yf if wf is None else yf * _pc(wf, x)
        out["float32_for_float64"] = (yf if bf is None else yf + _pc(bf, x)).double()
    if running is not None:
        rm, rv = (t.double() for t in running)
        out["running_stats_in_training"] = R.eval_forward(x.double(), rm, rv, None if w is None else w.double(),
                                                          None if b is None else b.double(), eps=eps, mode="oracle")
    return out


def _eps_outside_forward(x: Tensor, w: Tensor | None, b: Tensor | None, *, eps: float) -> Tensor:
    """``(x - mean) / (sqrt(var) + eps)`` in float64 (differentiable)."""
    mean, var = R.batch_stats(x, mode="oracle")
    return _affine((x.double() - _pc(mean, x)) / (_pc(var.sqrt(), x) + eps), x, w, b)


def _unbiased_forward(x: Tensor, w: Tensor | None, b: Tensor | None, *, eps: float) -> Tensor:
    """``(x - mean) / sqrt(var * n/(n-1) + eps)`` in float64 (differentiable)."""
    mean, var = R.batch_stats(x, mode="oracle")
    n = x.numel() // max(x.shape[1], 1)
    return _affine((x.double() - _pc(mean, x)) * _pc(torch.rsqrt(var * n / max(n - 1, 1) + eps), x), x, w, b)


def _one_pass_moments(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(x, mean, E[x^2]-E[x]^2) in the input's working precision (float32 for half types)."""
    work = torch.float32 if x.dtype not in (torch.float64, torch.float32) else x.dtype
    xw = x.to(work)
    axes = (0, *range(2, x.dim()))
    m1 = xw.mean(axes)
    return xw, m1, (xw * xw).mean(axes) - m1 * m1


def one_pass_stats(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel mean and one-pass variance E[x^2]-E[x]^2, computed in the input's working
    precision (float32 for half types), returned in float64."""
    _, m1, v1 = _one_pass_moments(x.detach())
    return m1.double(), v1.double()


def _one_pass_forward(x: Tensor, w: Tensor | None, b: Tensor | None, *, eps: float) -> Tensor:
    """The training forward with the one-pass variance, in the input's working precision
    (differentiable: the backward alternatives take its autograd gradient)."""
    xw, m1, v1 = _one_pass_moments(x)
    return _affine(((xw - _pc(m1, x)) * _pc(torch.rsqrt(v1 + eps), x)).double(), x, w, b)


def train_backward_alternatives(x: Tensor, dy: Tensor, w: Tensor | None, *, eps: float,
                                running: tuple[Tensor, Tensor] | None = None) -> dict[str, Tensor]:
    """dx (float64) under the forward conventions of a training step: the autograd gradient of
    each convention's forward (one-pass in the input's working precision, like the forward
    alternative), and, with ``running``, the frozen layer's eval formula ``w*rsqrt(rv+eps)*dy``."""
    def grad(forward, xr: Tensor) -> Tensor:
        xr = xr.detach().clone().requires_grad_(True)
        (g,) = torch.autograd.grad(forward(xr, w, None, eps=eps), xr, dy.double())
        return g.double()

    out = {"eps_outside_root": grad(_eps_outside_forward, x.double()),
           "unbiased_normalization": grad(_unbiased_forward, x.double())}
    if x.dtype in (torch.float32, torch.float64):  # one-pass in the input's own precision
        out["one_pass_variance"] = grad(_one_pass_forward, x)
    if running is not None:
        rv = running[1].double()
        scale = torch.rsqrt(rv + eps) * (1.0 if w is None else w.double())
        out["running_stats_in_training"] = dy.double() * _pc(scale, x)
    return out


def running_alternatives(old_mean: Tensor, old_var: Tensor, mean: Tensor, var: Tensor, n: int,
                         factor: float, x: Tensor | None = None) -> dict[str, tuple[Tensor, Tensor]]:
    """(running_mean, running_var) other conventions give after one step (``x``, the batch,
    for the one-pass variance)."""
    om, ov, m, v = old_mean.double(), old_var.double(), mean.double(), var.double()
    unb = v * n / (n - 1) if n > 1 else v
    f = factor
    extra = {}
    if x is not None and n > 1 and x.is_floating_point():
        m1, v1 = one_pass_stats(x)
        extra["one_pass_variance"] = ((1 - f) * om + f * m1, (1 - f) * ov + f * v1 * n / (n - 1))
    return {
        **extra,
        "momentum_on_old": (f * om + (1 - f) * m, f * ov + (1 - f) * unb),
        "biased_running_var": ((1 - f) * om + f * m, (1 - f) * ov + f * v),
        "momentum_on_old+biased_running_var": (f * om + (1 - f) * m, f * ov + (1 - f) * v),
        "running_stats_in_training": (om, ov),
    }


def unknown_conventions(raw: str | None) -> str | None:
    """None when every comma-separated name in ``raw`` is a known convention, else the
    one-line usage problem (the known names listed)."""
    names = [n.strip() for n in (raw or "").split(",") if n.strip()]
    bad = [n for n in names if n not in CONVENTIONS]
    if raw is not None and not names:
        return "--accept: give at least one convention name"
    if bad:
        return f"--accept: unknown convention(s) {', '.join(bad)}; known: {', '.join(CONVENTIONS)}"
    return None


def describe(name: str) -> str:
    """Words for a convention name: ``a+b`` both at once, ``a|b`` either (the same value here)."""
    if "|" in name:
        return " OR ".join(describe(p) for p in name.split("|"))
    parts = name.split("+")
    return "; ".join(CONVENTIONS.get(p, p) for p in parts)


def atoms(name: str) -> list[list[str]]:
    """``a+b|c`` -> [["a", "b"], ["c"]]: the alternatives, each a set of conventions at once."""
    return [alt.split("+") for alt in name.split("|")]


def stop_gradient_variance_forward(x: Tensor, w: Tensor | None, b: Tensor | None, *, eps: float) -> Tensor:
    """The training forward with ``var = mean((x - stop_gradient(mean))^2)`` (tf.nn.moments):
    the same values as the reference, but autograd sees no path from the variance to the
    mean. ``d var / d mean = -2 mean(x - mean) = 0`` at the batch mean, so first-order
    gradients are unchanged; the second-order ones lose the terms of that path."""
    axes = (0, *range(2, x.dim()))
    mean = x.mean(axes, keepdim=True)
    var = ((x - mean.detach()) ** 2).mean(axes, keepdim=True)
    return _affine((x - mean) * torch.rsqrt(var + eps), x, w, b)


#: convention -> a float64 training forward whose second-order gradients it gives
SECOND_ORDER_FORWARDS = {"variance_stop_gradient": stop_gradient_variance_forward}
