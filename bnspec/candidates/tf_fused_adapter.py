"""``tf-fused``: TensorFlow's fused batch norm, ``tf.compat.v1.nn.fused_batch_norm``.

The one kernel TensorFlow trains convolution networks with (``FusedBatchNormV3``). It takes
4-D or 5-D input only, so the candidate provides BatchNorm2d and BatchNorm3d; it has no
float64 (its input type T is half, bfloat16 or float; its parameter type U is bfloat16 or
float).

Translated (never patched):

* the channel axis: ``data_format="NCHW"`` / ``"NCDHW"`` (torch's layout; TF's CPU kernel
  accepts it);
* the momentum convention: none needed. TF blends ``(1 - f) * old + f * batch`` with
  ``exponential_avg_factor = f``, torch's direction, and keeps the UNBIASED batch variance
  in the running variance, as torch does. momentum=None's ``1/num_batches_tracked`` is that
  factor, given per call. TF's API demands ``mean=None, variance=None`` when the factor is
  1.0 (the batch statistics are then returned, which is what a factor of 1 means);
* ``epsilon = eps`` (TF's default is 1e-3, always passed);
* the train/eval switch: ``is_training``; torch's eval without running statistics is
  ``is_training=True`` with the statistics discarded;
* torch's "no parameters" (``affine=False``) and "no bias": TF's required ``scale`` and
  ``offset`` set to ones and zeros;
* half parameters: TF's CPU kernels take float32 parameters only (float16 is not a
  parameter type; bfloat16 is declared but has no CPU kernel), so float16/bfloat16
  parameters are widened to float32 (exact) and the new running statistics and parameter
  gradients rounded back to their dtype, as torch's own kernel computes half parameters in
  float32 and rounds its results.

Kept as TF does it, so the suite reports it: no error for one value per channel (TF
normalizes it to the offset and keeps a zero variance), NaN statistics for an empty batch,
the errors TF raises where torch raises (InvalidArgumentError, not ValueError), the oneDNN
CPU kernels TF uses by default. Gradients via ``tf.GradientTape`` (``FusedBatchNormGradV3``),
second order via nested tapes.

TensorFlow logs to stderr at import; ``TF_CPP_MIN_LOG_LEVEL`` quiets it while it is
imported. It also imports Keras and matplotlib, which would write ``~/.keras`` and
``~/.cache/matplotlib``: their folders point under the temporary directory for the import,
as for the Keras candidates. Its intra-op thread pool is TF's own (``bnspec report --threads`` sets torch's).
"""

from __future__ import annotations

import numpy as np

from bnspec.candidates.functional import BNState, FunctionalAdapter, cache_environment, environment, from_numpy, to_numpy
from bnspec.candidates.protocol import Capabilities, native_facts

_FORMATS = {4: "NCHW", 5: "NCDHW"}
_NOTES = ("TensorFlow conventions kept: no error for one value per channel; NaN statistics for an empty "
          "batch; InvalidArgumentError where torch raises ValueError",
          "momentum: exponential_avg_factor = torch factor (same direction), set per call so momentum=None works",
          "4-D and 5-D input only (BatchNorm2d/3d); no float64; half parameters widened to float32 "
          "(TF's CPU kernels take float32 parameters only) and results rounded back",
          "counter num_batches_tracked is the adapter's bookkeeping (TF's op has none)",
          "timings run on TensorFlow's own thread pool (all cores), not on --threads")


def import_tensorflow():
    """``import tensorflow``, its start-up logging quieted. Raises UnusableTarget when missing."""
    try:
        with environment(TF_CPP_MIN_LOG_LEVEL="2", **cache_environment()):
            import tensorflow
    except ImportError:
        from bnspec.candidates.targets import UnusableTarget

        raise UnusableTarget("built-in candidate 'tf-fused' needs 'tensorflow' "
                             "(pip install 'bnspec[tensorflow]')") from None
    return tensorflow


def tf_momentum(factor: float | None) -> float:
    """TF's exponential_avg_factor for torch's factor f: the same direction; 1.0 (TF's default)
    where nothing is kept."""
    return 1.0 if factor is None else float(factor)


class TFFusedAdapter(FunctionalAdapter):
    framework = "tensorflow fused_batch_norm"
    dims_provided = (2, 3)  #: 4-D and 5-D input only
    capabilities = Capabilities(module_contract=False, errors=True, dtypes=("float32", "float16", "bfloat16"),
                                ranks=(4, 5), devices=("cpu",), notes=_NOTES)

    def __init__(self, device: str = "cpu") -> None:
        super().__init__(device)
        self.tf = import_tensorflow()

    def native(self) -> dict:
        return native_facts("tf.compat.v1.nn.fused_batch_norm", self.tf.compat.v1.nn.fused_batch_norm,
                            eps="epsilon", momentum="exponential_avg_factor", translate=tf_momentum)

    # -- arrays -------------------------------------------------------------------------
    def to_native(self, t):
        return None if t is None else self.tf.constant(to_numpy(t))

    def to_torch(self, a):
        return from_numpy(a.numpy() if hasattr(a, "numpy") else np.asarray(a))

    def _inputs(self, st: BNState, x, w, b, rm, rv):
        """(scale, offset, mean, variance) in float32, the only parameter type TF's CPU kernels
        take (the op also declares bfloat16, which has no CPU kernel: "Could not find device
        for node"); ones/zeros with the input's channel count stand in for torch's "no
        parameters", and missing statistics stay None."""
        tf = self.tf
        c = x.shape[1] if x.shape.rank >= 2 else st.num_features
        f32 = lambda a: None if a is None else tf.cast(a, tf.float32)  # noqa: E731
        scale = tf.ones([c], tf.float32) if w is None else f32(w)
        offset = tf.zeros([c], tf.float32) if b is None else f32(b)
        return scale, offset, f32(rm), f32(rv)

    def _fused(self, st, x, scale, offset, mean, var, *, training: bool, factor: float | None):
        fmt = _FORMATS.get(x.shape.rank, "NCHW")  # other ranks: TF's own error
        if training and (factor is None or factor == 1.0):
            mean = var = None  # TF's API for "no running statistics kept" / "factor 1"
        return self.tf.compat.v1.nn.fused_batch_norm(
            x, scale, offset, mean, var, epsilon=float(st.eps), data_format=fmt, is_training=training,
            exponential_avg_factor=tf_momentum(factor))

    def _back(self, st: BNState, a):
        """A parameter-typed result in the handle's dtype (half parameters were widened)."""
        return self.tf.cast(a, getattr(self.tf, st.dtype)) if st.dtype in ("float16", "bfloat16") else a

    # -- computation ----------------------------------------------------------------------
    def forward_train(self, st, x, w, b, rm, rv, factor):
        scale, offset, mean, var = self._inputs(st, x, w, b, rm, rv)
        y, new_mean, new_var = self._fused(st, x, scale, offset, mean, var, training=True, factor=factor)
        return y, self._back(st, new_mean), self._back(st, new_var)

    def forward_eval(self, st, x, w, b, rm, rv):
        scale, offset, mean, var = self._inputs(st, x, w, b, rm, rv)
        return self._fused(st, x, scale, offset, mean, var, training=False, factor=None)[0]

    def _first(self, st, x, w, b, rm, rv, training, dy):
        """The fused op's gradients; inside an outer tape they are recorded for second order."""
        scale, offset, mean, var = self._inputs(st, x, w, b, rm, rv)
        with self.tf.GradientTape() as inner:
            inner.watch([x, scale, offset])
            y = self._fused(st, x, scale, offset, mean, var, training=training, factor=None)[0]
        dx, dw, db = inner.gradient(y, [x, scale, offset], output_gradients=self.tf.cast(dy, y.dtype))
        grads = {"x": dx}
        if w is not None:
            grads["weight"] = self._back(st, dw)
        if b is not None:
            grads["bias"] = self._back(st, db)
        return grads

    def backward(self, st, x, dy, w, b, rm, rv, training):
        return self._first(st, x, w, b, rm, rv, training, dy)

    def double_backward_native(self, st, x, dy, w, b, rm, rv, training, v):
        wrt = {"x": x, "dy": dy, **{n: a for n, a in (("weight", w), ("bias", b)) if a is not None}}
        return tape_second_order(self.tf, wrt, lambda: self._first(st, x, w, b, rm, rv, training, dy), v)


def tape_second_order(tf, wrt: dict, first, v: dict) -> dict:
    """``{"first": first(), "second": d(sum_n sum(v_n * first_n)) / d wrt}``: the first-order
    gradients (a dict, computed by ``first`` with its own inner tape) recorded on an outer
    tape that watches ``wrt`` (name -> tensor)."""
    with tf.GradientTape() as outer:
        outer.watch(list(wrt.values()))
        grads = first()
        total = tf.add_n([tf.reduce_sum(tf.cast(v[n], g.dtype) * g) for n, g in grads.items()
                          if g is not None and n in v])
    return {"first": grads, "second": dict(zip(wrt, outer.gradient(total, list(wrt.values()))))}


def tf_fused(device: str = "cpu") -> TFFusedAdapter:
    return TFFusedAdapter(device=device)
