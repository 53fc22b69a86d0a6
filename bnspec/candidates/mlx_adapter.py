"""``mlx``: ``mlx.nn.BatchNorm`` (CPU wheel ``mlx[cpu]`` on Linux).

Translated (never patched): the channel axis (MLX is channels-last: the adapter moves
torch's axis 1 to the end on the way in and back on the way out), the train/eval switch
(``module.train()``/``eval()``), ``momentum`` (same convention as torch, given per call so
momentum=None's ``1/num_batches_tracked`` passes through), ``eps``, ``affine``,
``track_running_stats`` and ``dtype=`` (MLX's BatchNorm has no dtype argument: its arrays
are cast to it, as ``Module.set_dtype`` would). ``bias=False`` has no MLX switch (its affine
has weight and bias together): the bias is held at zero and not reported as a parameter.

MLX has no BatchNorm3d (it accepts 2-4 dimensional inputs only): the adapter provides the
1-d and 2-d families (``bnspec check mlx --dims 1,2``). Kept as MLX does it, so the suite
reports it: ``eps <= 0`` rejected by the constructor, its own error types and messages.
Gradients via ``mx.vjp``.

Measured with MLX 0.32.4 (CPU): a training forward on an EMPTY batch made from a NumPy
array (``mx.array(np.zeros((0, 3), np.float32))``, as every input arrives here) often never
returns from ``mx.eval``; ``mx.zeros((0, 3))`` does not hang. The suite sees a hang (S1.5,
S3.6, empty batches in S6.6 and ST1); after three hangs a check stops restarting the
candidate, and the clauses it had not reached are "not run" (their detail ends "(earlier in
this check; not retried)").
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as mnn
import numpy as np

from bnspec.candidates.functional import BNState, FunctionalAdapter, from_numpy, to_numpy
from bnspec.candidates.protocol import DTYPES, Capabilities, native_facts

_MX = {"float64": mx.float64, "float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}


def _last(x):
    """N, C, *spatial -> N, *spatial, C."""
    return x if x.ndim < 3 else mx.moveaxis(x, 1, -1)


def _first(y):
    """N, *spatial, C -> N, C, *spatial."""
    return y if y.ndim < 3 else mx.moveaxis(y, -1, 1)


def mlx_momentum(factor: float | None) -> float:
    """MLX's momentum for torch's factor f: the same direction as torch's; 0.1 where nothing is kept."""
    return 0.1 if factor is None else factor


class MlxAdapter(FunctionalAdapter):
    framework = "mlx"
    dims_provided = (1, 2)  #: no BatchNorm3d in MLX: check with --dims 1,2
    capabilities = Capabilities(
        double_backward=False, module_contract=False, errors=True, devices=("cpu",), ranks=(2, 3, 4),
        dtypes=DTYPES,
        notes=("MLX is channels-last: the adapter moves the channel axis",
               "no BatchNorm3d in MLX (2-4 dimensional inputs only)",
               "bias=False: MLX's bias held at zero (no MLX switch)",
               "second-order gradients not wired (not provided)",
               "counter num_batches_tracked is the adapter's bookkeeping"),
    )

    def native(self) -> dict:
        return native_facts("mlx.nn.BatchNorm", mnn.BatchNorm, eps="eps", momentum="momentum",
                            translate=mlx_momentum)

    def to_native(self, t):
        if t is None:
            return None
        a = to_numpy(t)
        name = a.dtype.name
        if name in _MX:
            return mx.array(np.ascontiguousarray(a).astype(np.float32) if name == "bfloat16" else
                            np.ascontiguousarray(a), dtype=_MX[name])
        return mx.array(np.ascontiguousarray(a))

    def to_torch(self, a):
        """Dense (row-major) values: the strides of MLX's array are the adapter's own axis
        move, not MLX's choice; the base then gives the input's memory format."""
        if a.dtype == mx.bfloat16:
            import ml_dtypes

            return from_numpy(np.ascontiguousarray(np.array(a.astype(mx.float32))).astype(ml_dtypes.bfloat16))
        return from_numpy(np.ascontiguousarray(np.array(a)))

    def _bn(self, st: BNState, w, b, rm, rv, momentum):
        bn = mnn.BatchNorm(st.num_features, eps=st.eps, momentum=momentum, affine=st.affine,
                           track_running_stats=st.track_running_stats)
        if st.affine:
            bn.weight = w
            bn.bias = b if b is not None else mx.zeros_like(w)
        if st.track_running_stats:
            bn.running_mean, bn.running_var = rm, rv
        bn.train(st.training)
        return bn

    def forward_train(self, st, x, w, b, rm, rv, factor):
        bn = self._bn(st, w, b, rm, rv, mlx_momentum(factor))
        y = _first(bn(_last(x)))
        mx.eval(y)
        if factor is None:
            return y, rm, rv
        mx.eval(bn.running_mean, bn.running_var)
        return y, bn.running_mean, bn.running_var

    def forward_eval(self, st, x, w, b, rm, rv):
        bn = self._bn(st, w, b, rm, rv, 0.1 if st.momentum is None else st.momentum)
        y = _first(bn(_last(x)))
        mx.eval(y)
        return y

    def backward(self, st, x, dy, w, b, rm, rv, training):
        bn = self._bn(st, w, b, rm, rv, 0.1 if st.momentum is None else st.momentum)
        names = ["x"] + [n for n, p in (("weight", w), ("bias", b)) if p is not None]

        def f(*args):
            given = dict(zip(names, args))
            if "weight" in given:
                bn.weight = given["weight"]
            if "bias" in given:
                bn.bias = given["bias"]
            return _first(bn(_last(given["x"])))

        primals = [x] + [p for p in (w, b) if p is not None]
        (y,), grads = mx.vjp(f, primals, [dy])
        grads = list(grads)
        mx.eval(grads)
        return dict(zip(names, grads))

    def init_state(self, st: BNState) -> dict:
        bn = mnn.BatchNorm(st.num_features, eps=st.eps, affine=st.affine,
                           track_running_stats=st.track_running_stats)
        bn.set_dtype(_MX.get(st.dtype, mx.float32))
        get = lambda name: self.to_torch(getattr(bn, name)) if name in bn else None  # noqa: E731
        return {
            "weight": get("weight"),
            "bias": get("bias") if st.use_bias else None,
            "running_mean": get("running_mean"),
            "running_var": get("running_var"),
        }


def mlx_batchnorm(device: str = "cpu") -> MlxAdapter:
    return MlxAdapter(device=device)
