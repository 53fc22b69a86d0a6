"""``paddle-cpu``: PaddlePaddle's ``paddle.nn.BatchNorm1D/2D/3D`` on the CPU.

Translated (never patched): torch's rank family is Paddle's (BatchNorm1D with ``NCL``,
2D with ``NCHW``, 3D with ``NCDHW``: channels first, as torch), the train/eval switch
(``layer.train()``/``layer.eval()``), the momentum convention (Paddle blends
``momentum * old + (1 - momentum) * batch``, so ``momentum = 1 - f`` for torch's factor f;
the layer reads its momentum at each call, so momentum=None's ``1/num_batches_tracked`` is
set per step without touching the arithmetic), ``epsilon = eps``, ``weight_attr=False`` /
``bias_attr=False`` for ``affine``/``bias``, and torch's ``dtype`` as Paddle's default dtype
while the layer is created (the only way Paddle makes a float64 layer). Every call loads the
handle's values into the layer and reads its statistics back. Paddle always holds running
statistics: without torch's buffers, its initial zeros/ones stand in and their update is
discarded; in eval without running buffers the layer runs in training mode (batch
statistics), as torch does.

Kept as Paddle does it, so the suite reports it: the BIASED batch variance in the running
variance, a batch of one value per channel given back unchanged with the statistics
untouched (no error), no error for eps <= 0, no half precision on the CPU (Paddle
registers its CPU batch_norm kernel for float64 and float32 only), momentum and epsilon
passed to the kernel as float32 operator attributes (1e-5 is 9.99999975e-06 there), and
no second-order gradients in eval mode (Paddle's kernel raises: "is_test = True CANNOT be
used in train program"), and no gradient for the weight when the layer has no bias
(``bias_attr=False``; Paddle 3.3.1's own ``.backward()`` leaves ``weight.grad`` None too).
Gradients via ``paddle.grad`` (second order with ``create_graph=True``).

Paddle creates ``~/.cache/paddle/dataset`` when it is imported (it reads ``HOME``): the
adapter imports it with ``HOME`` pointed at a directory under the system's temporary
directory, so a check never writes into the home directory.
"""

from __future__ import annotations

import sys
import warnings

import numpy as np

from bnspec.candidates.functional import BNState, FunctionalAdapter, environment, from_numpy, momentum_on_old, private_path, to_numpy
from bnspec.candidates.protocol import Capabilities, native_facts

_DEFAULT_MOMENTUM = 0.9  #: Paddle's default; used only where no running update is kept


def paddle_momentum(factor: float | None) -> float:
    """Paddle's momentum for torch's factor f: Paddle keeps ``momentum * old + (1 - momentum) * batch``."""
    return momentum_on_old(factor, _DEFAULT_MOMENTUM)
_LAYERS = {1: "BatchNorm1D", 2: "BatchNorm2D", 3: "BatchNorm3D"}
_NOTES = ("Paddle conventions kept: biased variance in the running statistics; a batch of one value per "
          "channel given back unchanged, statistics untouched, no error; no error for eps <= 0",
          "momentum translated: paddle momentum = 1 - torch factor (set per call, so momentum=None works)",
          "no float16/bfloat16: Paddle's CPU batch_norm kernel is float64/float32 only",
          "momentum and epsilon are float32 operator attributes in Paddle's kernel",
          "eval-mode double backward raises in Paddle (is_test); training-mode second order works",
          "no weight gradient without a bias (bias_attr=False): Paddle's own backward gives none either",
          "counter num_batches_tracked is the adapter's bookkeeping (Paddle has none)")
#: Paddle warns at every training call that it always tracks statistics (as torch does)
_TRAIN_WARNING = "When training, we now always track global mean and variance."


def import_paddle():
    """``import paddle`` with its dataset folder kept out of the home directory."""
    if "paddle" in sys.modules:
        return sys.modules["paddle"]
    try:
        with environment(HOME=private_path("paddle")):
            import paddle
    except ImportError:
        from bnspec.candidates.targets import UnusableTarget

        raise UnusableTarget("built-in candidate 'paddle-cpu' needs 'paddle' "
                             "(pip install 'bnspec[paddle]')") from None
    return paddle


class PaddleAdapter(FunctionalAdapter):
    framework = "paddle"
    capabilities = Capabilities(module_contract=False, errors=True, dtypes=("float64", "float32"),
                                devices=("cpu",), notes=_NOTES)

    def __init__(self, device: str = "cpu") -> None:
        super().__init__(device)
        self.paddle = import_paddle()
        self.paddle.set_device("cpu")

    def native(self) -> dict:
        return native_facts("paddle.nn.BatchNorm2D", self.paddle.nn.BatchNorm2D, eps="epsilon", momentum="momentum",
                            translate=paddle_momentum,
                            settings={"use_global_stats": "True normalizes with the running statistics in "
                                                          "training too (a frozen layer)"})

    # -- arrays -------------------------------------------------------------------------
    def to_native(self, t):
        return None if t is None else self.paddle.to_tensor(np.ascontiguousarray(to_numpy(t)))

    def to_torch(self, a):
        return from_numpy(a.numpy() if hasattr(a, "numpy") else np.asarray(a))

    # -- layers ---------------------------------------------------------------------------
    def _new_layer(self, st: BNState, c: int):
        paddle = self.paddle
        old = paddle.get_default_dtype()
        paddle.set_default_dtype(st.dtype)
        try:
            return getattr(paddle.nn, _LAYERS[st.dims])(
                c, momentum=_DEFAULT_MOMENTUM, epsilon=float(st.eps),
                weight_attr=None if st.affine else False,
                bias_attr=None if st.affine and st.use_bias else False)
        finally:
            paddle.set_default_dtype(old)

    def init_state(self, st: BNState) -> dict:
        """Paddle's parameters and statistics as its layer creates them."""
        layer = self._new_layer(st, st.num_features)
        st.native = {st.num_features: layer}
        tt = lambda p: None if p is None else self.to_torch(p)  # noqa: E731
        return {"weight": tt(layer.weight), "bias": tt(layer.bias),
                "running_mean": tt(layer._mean) if st.track_running_stats else None,
                "running_var": tt(layer._variance) if st.track_running_stats else None}

    def _layer(self, st: BNState, x, w, b, rm, rv, *, training: bool, momentum: float):
        """The handle's layer with its values loaded. Without any per-channel tensor torch
        takes any channel count: a layer for the input's channels stands in."""
        has_state = any(a is not None for a in (w, b, rm, rv))
        c = st.num_features if has_state or x.ndim < 2 else int(x.shape[1])
        if c not in st.native:
            st.native[c] = self._new_layer(st, c)
        layer = st.native[c]
        for param, value in ((layer.weight, w), (layer.bias, b)):
            if param is not None and value is not None:
                param.set_value(value)
        layer._mean.set_value(rm if rm is not None else np.zeros(c, layer._mean.numpy().dtype))
        layer._variance.set_value(rv if rv is not None else np.ones(c, layer._variance.numpy().dtype))
        layer._momentum = float(momentum)  # read by forward at each call
        layer._epsilon = float(st.eps)
        layer.train() if training else layer.eval()
        return layer

    @staticmethod
    def _run(layer, x):
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_TRAIN_WARNING)
            return layer(x)

    # -- computation ----------------------------------------------------------------------
    def forward_train(self, st, x, w, b, rm, rv, factor):
        momentum = paddle_momentum(factor)
        layer = self._layer(st, x, w, b, rm, rv, training=True, momentum=momentum)
        with self.paddle.no_grad():
            y = self._run(layer, x)
        return y, layer._mean.numpy().copy(), layer._variance.numpy().copy()

    def forward_eval(self, st, x, w, b, rm, rv):
        layer = self._layer(st, x, w, b, rm, rv, training=False, momentum=_DEFAULT_MOMENTUM)
        with self.paddle.no_grad():
            return self._run(layer, x)

    def _grad_inputs(self, layer, x):
        x = x.detach()
        x.stop_gradient = False
        params = [(n, p) for n, p in (("weight", layer.weight), ("bias", layer.bias)) if p is not None]
        return x, params

    def backward(self, st, x, dy, w, b, rm, rv, training):
        layer = self._layer(st, x, w, b, rm, rv, training=training, momentum=_DEFAULT_MOMENTUM)
        x, params = self._grad_inputs(layer, x)
        y = self._run(layer, x)
        grads = self.paddle.grad([y], [x, *(p for _, p in params)], grad_outputs=[dy.astype(y.dtype)],
                                 allow_unused=True)
        return {"x": grads[0], **{n: g for (n, _), g in zip(params, grads[1:])}}

    def double_backward_native(self, st, x, dy, w, b, rm, rv, training, v):
        paddle = self.paddle
        layer = self._layer(st, x, w, b, rm, rv, training=training, momentum=_DEFAULT_MOMENTUM)
        x, params = self._grad_inputs(layer, x)
        g = dy.detach()
        g.stop_gradient = False
        y = self._run(layer, x)
        inputs = [x, *(p for _, p in params)]
        names = ["x", *(n for n, _ in params)]
        first = paddle.grad([y], inputs, grad_outputs=[g.astype(y.dtype)], create_graph=True, allow_unused=True)
        total = sum((fi * v[n]).sum() for n, fi in zip(names, first) if fi is not None and n in v)
        second = paddle.grad([total], [*inputs, g], allow_unused=True)
        return {"first": dict(zip(names, first)), "second": dict(zip([*names, "dy"], second))}


def paddle_cpu(device: str = "cpu") -> PaddleAdapter:
    return PaddleAdapter(device=device)
