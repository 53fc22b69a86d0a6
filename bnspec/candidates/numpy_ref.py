"""``numpy``: a plain NumPy BatchNorm, the educational reference people copy -- done right.

Two-pass statistics accumulated in float64 (mean, then the mean of squared deviations),
torch's running-statistics convention (``new = (1 - m) * old + m * batch``, unbiased
variance in the running average), closed-form backward, and the input checks torch makes
(rank, channel count, eps, one value per channel, integer input; an empty batch leaves
the statistics alone). Written from the formulas with NumPy only, it is an independent
implementation the suite should find conformant wherever it has the capability: it has
no autograd (so no second-order gradients), no torch module contract, and NumPy has no
bfloat16.
"""

from __future__ import annotations

import numpy as np

from bnspec.candidates.functional import BNState, FunctionalAdapter, torch_signature
from bnspec.candidates.protocol import Capabilities, as_given, native_facts


def _axes(x: np.ndarray) -> tuple[int, ...]:
    return (0, *range(2, x.ndim))


def _pc(v: np.ndarray, x: np.ndarray) -> np.ndarray:
    """A per-channel vector shaped to broadcast against x (N, C, *spatial)."""
    return v.reshape(1, -1, *([1] * (x.ndim - 2)))


def batch_stats(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """Two-pass float64 mean and biased variance per channel, and n = numel / C."""
    x64 = x.astype(np.float64)
    axes = _axes(x)
    n = x.size // x.shape[1]
    mean = x64.mean(axis=axes)
    xc = x64 - _pc(mean, x)
    var = (xc * xc).mean(axis=axes)
    return mean, var, n


def normalize(x: np.ndarray, mean: np.ndarray, var: np.ndarray, weight, bias, eps: float) -> np.ndarray:
    """y = (x - mean) / sqrt(var + eps) * weight + bias, in float64, returned in x's dtype."""
    xhat = (x.astype(np.float64) - _pc(mean, x)) / np.sqrt(_pc(var, x) + eps)
    y = xhat if weight is None else xhat * _pc(weight.astype(np.float64), x)
    y = y if bias is None else y + _pc(bias.astype(np.float64), x)
    return y.astype(x.dtype)


RANKS = {1: (2, 3), 2: (4,), 3: (5,)}


def check_input(x: np.ndarray, dims: int, num_features: int, eps: float, *, batch_stats: bool,
                per_channel: tuple = ()) -> None:
    """torch's checks, in torch's exception types where callers rely on them. The channel
    count is checked against the per-channel arrays in use; with none (no affine, no
    running statistics) any channel count normalizes, as in torch."""
    ranks = RANKS[dims]
    if x.ndim not in ranks:
        raise ValueError(f"expected {' or '.join(f'{r}D' for r in ranks)} input (got {x.ndim}D input)")
    if not np.issubdtype(x.dtype, np.floating):
        raise TypeError(f"batch norm needs a floating-point input, got {x.dtype}")
    if any(a is not None for a in per_channel) and x.shape[1] != num_features:
        raise RuntimeError(f"running_mean should contain {x.shape[1]} elements not {num_features}")
    if batch_stats and eps <= 0:
        raise ValueError(f"batch_norm eps must be positive during training, but got {eps}")
    if eps < 0:
        raise ValueError(f"batch_norm eps must be non-negative, but got {eps}")
    if batch_stats and x.size // max(x.shape[1], 1) == 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {x.shape}")


def batch_norm_train(x, weight, bias, running_mean, running_var, *, eps: float, momentum: float | None):
    """Training forward: (y, new running_mean, new running_var); the running statistics
    are updated only when ``momentum`` is given (torch's blend, unbiased variance) and the
    batch is not empty."""
    if x.size == 0:  # no values: nothing to normalize, no statistics to blend in
        return x.copy(), running_mean, running_var
    mean, var, n = batch_stats(x)
    y = normalize(x, mean, var, weight, bias, eps)
    if momentum is None or running_mean is None:
        return y, running_mean, running_var
    unbiased = var * (np.float64(n) / np.float64(n - 1))
    new_mean = (1 - momentum) * running_mean.astype(np.float64) + momentum * mean
    new_var = (1 - momentum) * running_var.astype(np.float64) + momentum * unbiased
    return y, new_mean.astype(running_mean.dtype), new_var.astype(running_var.dtype)


def batch_norm_eval(x, weight, bias, running_mean, running_var, *, eps: float):
    return normalize(x, running_mean.astype(np.float64), running_var.astype(np.float64), weight, bias, eps)


def batch_norm_backward(x, dy, weight, mean, var, *, eps: float, training: bool):
    """(dx, dweight, dbias) in float64.

    Training (batch statistics): ``dx = w*invstd/n * (n*dy - sum(dy) - xhat*sum(dy*xhat))``;
    eval (fixed statistics): ``dx = w*invstd*dy``; both: ``dw = sum(dy*xhat)``, ``db = sum(dy)``.
    """
    axes = _axes(x)
    x64, dy64 = x.astype(np.float64), dy.astype(np.float64)
    n = x.size // x.shape[1]
    invstd = 1.0 / np.sqrt(var + eps)
    xhat = (x64 - _pc(mean, x)) * _pc(invstd, x)
    w = np.ones_like(mean) if weight is None else weight.astype(np.float64)
    sum_dy = dy64.sum(axis=axes)
    sum_dy_xhat = (dy64 * xhat).sum(axis=axes)
    if training:
        dx = _pc(w * invstd / n, x) * (n * dy64 - _pc(sum_dy, x) - xhat * _pc(sum_dy_xhat, x))
    else:
        dx = _pc(w * invstd, x) * dy64
    return dx, sum_dy_xhat, sum_dy


class NumpyAdapter(FunctionalAdapter):
    framework = "numpy"
    native_strides = True
    capabilities = Capabilities(
        double_backward=False, module_contract=False, errors=True,
        dtypes=("float64", "float32", "float16"), devices=("cpu",),
        notes=("plain two-pass NumPy BatchNorm with float64 accumulation; closed-form backward",
               "no bfloat16 in NumPy; no autograd, so no second-order gradients",
               "counter and momentum=None factor are the adapter's bookkeeping"),
    )

    def native(self) -> dict:
        # its momentum is passed to batch_norm_train as given
        return native_facts("bnspec.candidates.numpy_ref (torch's constructor)", torch_signature, eps="eps",
                            momentum="momentum", translate=as_given)

    def forward_train(self, st: BNState, x, weight, bias, running_mean, running_var, factor):
        check_input(x, st.dims, st.num_features, st.eps, batch_stats=True,
                    per_channel=(weight, bias, running_mean, running_var))
        return batch_norm_train(x, weight, bias, running_mean, running_var, eps=st.eps, momentum=factor)

    def forward_eval(self, st: BNState, x, weight, bias, running_mean, running_var):
        check_input(x, st.dims, st.num_features, st.eps, batch_stats=False,
                    per_channel=(weight, bias, running_mean, running_var))
        return batch_norm_eval(x, weight, bias, running_mean, running_var, eps=st.eps)

    def backward(self, st: BNState, x, dy, weight, bias, running_mean, running_var, training: bool) -> dict:
        if training:
            mean, var, _ = batch_stats(x)
        else:
            mean, var = running_mean.astype(np.float64), running_var.astype(np.float64)
        dx, dw, db = batch_norm_backward(x, dy, weight, mean, var, eps=st.eps, training=training)
        grads = {"x": dx.astype(x.dtype)}
        if weight is not None:
            grads["weight"] = dw.astype(weight.dtype)
        if bias is not None:
            grads["bias"] = db.astype(bias.dtype)
        return grads


def numpy_reference(device: str = "cpu") -> NumpyAdapter:
    return NumpyAdapter(device=device)
