"""``tinygrad``: ``tinygrad.nn.BatchNorm`` (torch's formulas, channel axis 1).

Translated (never patched): the train/eval switch (tinygrad defaults to inference mode:
its ``TRAINING`` context variable is set per call from torch's ``training`` flag),
``momentum`` (same convention as torch, given per call, so momentum=None's factor
``1/num_batches_tracked`` passes through), ``eps``, ``affine``, ``track_running_stats``,
and ``dtype=`` (tinygrad's BatchNorm has no dtype argument: its tensors are cast to it, as a
user casting a model would). ``bias=False`` has no tinygrad switch: the bias is None, which
tinygrad's ``Tensor.batchnorm`` accepts. Gradients via ``Tensor.gradient``.

Device: tinygrad's CPU device needs a ``clang`` compiler; without one the adapter uses the
PYTHON device (an interpreter; correct but slow: seconds per call). tinygrad keeps a
compile cache under ``$XDG_CACHE_HOME`` or ``~/.cache``: the adapter points ``CACHEDB`` at a
file under the system's temporary directory before importing it.
"""

from __future__ import annotations

import os
import shutil

from bnspec.candidates.functional import BNState, FunctionalAdapter, environment, from_numpy, private_path, to_numpy
from bnspec.candidates.protocol import Capabilities


_CACHEDB = private_path("tinygrad") + ".db"


def _import_tinygrad():
    with environment(CACHEDB=_CACHEDB):
        import tinygrad
        from tinygrad import helpers
        from tinygrad import nn as tnn
    return tinygrad, helpers, tnn


tinygrad, helpers, tnn = _import_tinygrad()
Tensor, dtypes, Context = tinygrad.Tensor, tinygrad.dtypes, helpers.Context
#: The context every call runs in: the PYTHON device when there is no clang for the CPU
#: device; no disk cache when tinygrad was imported before this module (its cache file is
#: then wherever the importer's environment put it, by default under the home directory).
CONTEXT: dict = {}
if "DEV" not in os.environ and shutil.which("clang") is None:
    CONTEXT["DEV"] = "PYTHON"
if getattr(helpers, "CACHEDB", _CACHEDB) != _CACHEDB:
    CONTEXT["CACHELEVEL"] = 0
DEVICE_CHOICE = CONTEXT.get("DEV", "default")


class TinygradAdapter(FunctionalAdapter):
    framework = "tinygrad"
    capabilities = Capabilities(
        double_backward=False, module_contract=False, errors=True, devices=("cpu",),
        dtypes=("float64", "float32", "float16", "bfloat16"),
        notes=("tinygrad defaults to inference mode: TRAINING is set per call from torch's flag",
               "no clang: the PYTHON device (slow) is used" if DEVICE_CHOICE == "PYTHON"
               else "tinygrad's default device",
               "second-order gradients not wired (not provided)",
               "counter num_batches_tracked is the adapter's bookkeeping"),
    )

    # Every operation runs in CONTEXT (device and cache choice), tensors created included.
    def construct(self, dims, num_features, kwargs):
        with Context(**CONTEXT):
            return super().construct(dims, num_features, kwargs)

    def forward(self, h, x, layout="contiguous", dy=None):
        with Context(**CONTEXT):
            return super().forward(h, x, layout, dy)

    def time_forward(self, *args, **kwargs):
        with Context(**CONTEXT):
            return super().time_forward(*args, **kwargs)

    def to_native(self, t):
        if t is None:
            return None
        a = to_numpy(t.contiguous())
        if a.dtype.name == "bfloat16":  # no NumPy bfloat16 in tinygrad: go through float32
            return Tensor(a.astype("float32")).cast(dtypes.bfloat16)
        return Tensor(a.copy())

    def to_torch(self, a):
        if a.dtype == dtypes.bfloat16:
            import ml_dtypes

            return from_numpy(a.cast(dtypes.float32).numpy().astype(ml_dtypes.bfloat16))
        return from_numpy(a.numpy())

    def _bn(self, st: BNState, w, b, rm, rv, momentum):
        bn = tnn.BatchNorm(st.num_features, eps=st.eps, affine=st.affine,
                           track_running_stats=st.track_running_stats, momentum=momentum)
        bn.weight, bn.bias = w, b
        if st.track_running_stats:
            # tinygrad updates with assign(): give it realized buffers of its own
            bn.running_mean, bn.running_var = rm.contiguous().realize(), rv.contiguous().realize()
        return bn

    def forward_train(self, st, x, w, b, rm, rv, factor):
        bn = self._bn(st, w, b, rm, rv, 0.1 if factor is None else factor)
        with Context(TRAINING=int(st.training), **CONTEXT):
            y = bn(x).realize()
        if factor is None:
            return y, rm, rv
        return y, bn.running_mean.realize(), bn.running_var.realize()

    def forward_eval(self, st, x, w, b, rm, rv):
        bn = self._bn(st, w, b, rm, rv, 0.1 if st.momentum is None else st.momentum)
        with Context(TRAINING=0, **CONTEXT):
            return bn(x).realize()

    def backward(self, st, x, dy, w, b, rm, rv, training):
        bn = self._bn(st, w, b, rm, rv, 0.1 if st.momentum is None else st.momentum)
        with Context(TRAINING=int(st.training), **CONTEXT):
            y = bn(x)
            targets = [x] + [p for p in (w, b) if p is not None]
            grads = [g.realize() for g in y.gradient(*targets, gradient=dy.cast(y.dtype))]
        out = {"x": grads[0]}
        rest = iter(grads[1:])
        if w is not None:
            out["weight"] = next(rest)
        if b is not None:
            out["bias"] = next(rest)
        return out

    def init_state(self, st: BNState) -> dict:
        bn = tnn.BatchNorm(st.num_features, eps=st.eps, affine=st.affine,
                           track_running_stats=st.track_running_stats)
        dt = getattr(dtypes, st.dtype)
        cast = lambda t: None if t is None else self.to_torch(t.cast(dt).realize())  # noqa: E731
        return {
            "weight": cast(bn.weight),
            "bias": cast(bn.bias) if st.use_bias else None,
            "running_mean": cast(bn.running_mean) if st.track_running_stats else None,
            "running_var": cast(bn.running_var) if st.track_running_stats else None,
        }


def tinygrad_batchnorm(device: str = "cpu") -> TinygradAdapter:
    return TinygradAdapter(device=device)
