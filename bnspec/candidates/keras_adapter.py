"""``keras-jax``, ``keras-torch``, ``keras-numpy``, ``keras-tensorflow``: Keras 3's ``layers.BatchNormalization``
on a chosen backend, with Keras's own arithmetic.

The backend is chosen the only way Keras allows: ``KERAS_BACKEND`` is set before Keras is
imported. Each candidate runs in its own process, so the loader sets it; a process that
already imported Keras with another backend cannot load the candidate (UnusableTarget).

Translated (never patched): the channel axis (``axis=1``), the train/eval switch (``training``
is always passed: Keras runs inference when it is not), the momentum convention (Keras
blends ``momentum * old + (1 - momentum) * batch``, so ``momentum = 1 - f`` for torch's
factor f; ``momentum`` is a plain attribute Keras reads at each call, so momentum=None's
``1/num_batches_tracked`` is set per step without touching the arithmetic), ``epsilon = eps``
(Keras's default is 1e-3, torch's 1e-5: always passed), ``scale``/``center`` for
``affine``/``bias``, the layer's ``dtype`` for torch's ``dtype``. Every call is the layer's
own ``stateless_call`` with the handle's values: the new running statistics are Keras's.
Keras has no rank families (its layer is built for whatever rank arrives) and always holds
moving statistics: without torch's running buffers, Keras's initial zeros/ones stand in and
their update is discarded; in eval without running buffers the layer runs with
``training=True`` (batch statistics), as torch does.

Kept as Keras does it, so the suite reports it (measured with Keras 3.15):

* the BIASED batch variance in the moving variance;
* float64 computed in float32 on the jax, torch and numpy backends: ``BatchNormalization.call``
  computes in ``result_type(inputs.dtype, "float32")``, which is float32 for float64 inputs
  under those backends' promotion rules, and casts the result back to the layer's dtype (the
  tensorflow backend's ``result_type`` gives float64: float64 is computed in float64 there);
* one-pass variance ``E[x^2] - E[x]^2`` on the torch and numpy backends (``ops.moments``);
  the jax backend uses ``jnp.var`` and the tensorflow backend ``tf.nn.moments`` (two-pass);
* no error for one value per channel, NaN statistics for an empty batch, no rank check;
* the layer's dtype policy decides the output dtype (float16 input to a float32 layer gives
  float32, where torch gives float16);
* on the numpy backend, variables declared float64 hold float32 values until first assigned
  (the initial statistics and parameters are float32).

Gradients: ``jax.vjp`` on the jax backend, torch autograd on the torch backend,
``tf.GradientTape`` on the tensorflow backend (nested tapes for second order); the numpy
backend has none (backward is not provided). The jax backend runs with ``jax_enable_x64``
(turned on before Keras is imported) so that float64 arrays exist at all; every jax
computation is a jitted ``stateless_call`` (one program per configuration and shape).

Keras writes ``keras.json`` under ``KERAS_HOME`` (default ``~/.keras``) and imports
matplotlib, which writes a font cache under ``MPLCONFIGDIR`` (default ``~/.cache`` and
``~/.config``): both are pointed at a directory under the system's temporary directory
while Keras is imported, so a check never writes into the home directory and a user's
``keras.json`` (floatx, epsilon) never changes what is measured.
"""

from __future__ import annotations

import sys

import numpy as np
import torch

from bnspec.candidates.functional import BNState, FunctionalAdapter, cache_environment, environment, from_numpy, momentum_on_old, to_numpy
from bnspec.candidates.protocol import DTYPES, Capabilities, native_facts

BACKENDS = ("jax", "torch", "numpy", "tensorflow")
_DEFAULT_MOMENTUM = 0.99  #: Keras's default; used only where no running update is kept


def keras_momentum(factor: float | None) -> float:
    """Keras's momentum for torch's factor f: Keras keeps ``momentum * old + (1 - momentum) * batch``."""
    return momentum_on_old(factor, _DEFAULT_MOMENTUM)

_NOTES = ("Keras conventions kept: biased variance in the moving variance; computation in "
          "result_type(dtype, 'float32') (float32 for float64 except on the tensorflow backend); no error "
          "for one value per channel; NaN statistics for an empty batch",
          "momentum translated: keras momentum = 1 - torch factor (set per call, so momentum=None works)",
          "epsilon always passed (Keras's default is 1e-3); training always passed (Keras's default is inference)",
          "counter num_batches_tracked is the adapter's bookkeeping (Keras has none)")
_BACKEND_NOTES = {
    "jax": ("jax backend: two-pass variance (jnp.var); gradients via jax.vjp; jax_enable_x64 turned on "
            "in the candidate's process so float64 arrays exist",),
    "torch": ("torch backend: one-pass variance E[x^2]-E[x]^2 (keras ops.moments); gradients via torch "
              "autograd",),
    "tensorflow": ("tensorflow backend: two-pass variance (tf.nn.moments), float64 computed in float64; "
                   "gradients via tf.GradientTape; tf.nn.moments stops the gradient through the mean in the "
                   "variance, which loses part of the second-order gradients; timings run on TensorFlow's own "
                   "thread pool (all cores), not on --threads",),
    "numpy": ("numpy backend: one-pass variance E[x^2]-E[x]^2 (keras ops.moments); no autograd: backward "
              "and double backward are not provided",),
}


def import_keras(backend: str):
    """``import keras`` with ``backend``; its config and matplotlib's caches kept out of
    the home directory. Raises UnusableTarget when Keras is missing or this process
    already imported it with another backend."""
    from bnspec.candidates.targets import UnusableTarget

    if backend not in BACKENDS:
        raise UnusableTarget(f"keras backend {backend!r} is not one of {BACKENDS}")
    if "keras" in sys.modules:
        keras = sys.modules["keras"]
        have = keras.backend.backend()
        if have != backend:
            raise UnusableTarget(f"keras was already imported in this process with the {have!r} backend; "
                                 f"keras-{backend} needs a process of its own")
        return keras
    env = {"KERAS_BACKEND": backend, **cache_environment()}
    if backend == "torch":
        env["KERAS_TORCH_DEVICE"] = "cpu"  # bnspec runs framework candidates on the CPU
    if backend == "tensorflow":
        env["TF_CPP_MIN_LOG_LEVEL"] = "2"  # TensorFlow's start-up logging
    try:
        with environment(**env):
            if backend == "jax":
                import jax

                jax.config.update("jax_enable_x64", True)
            import keras
    except ImportError as exc:
        extra = "tensorflow" if backend == "tensorflow" else "keras"
        raise UnusableTarget(f"built-in candidate 'keras-{backend}' needs {exc.name!r} "
                             f"(pip install 'bnspec[{extra}]')") from None
    if keras.backend.backend() != backend:
        raise UnusableTarget(f"keras chose the {keras.backend.backend()!r} backend, not {backend!r}")
    return keras


class KerasAdapter(FunctionalAdapter):
    """Keras 3's BatchNormalization, one backend per process."""

    def native(self) -> dict:
        return native_facts("keras.layers.BatchNormalization", self.keras.layers.BatchNormalization,
                            eps="epsilon", momentum="momentum", translate=keras_momentum,
                            float64="opt-in: jax_enable_x64 (the adapter turns it on)" if self.backend == "jax" else "")

    def __init__(self, backend: str, device: str = "cpu") -> None:
        super().__init__(device)
        self.keras = import_keras(backend)
        self.backend = backend
        self.framework = f"keras ({backend} backend)"
        # torch and NumPy arrays have strides: the output's layout is Keras's own
        self.native_strides = backend in ("torch", "numpy")
        grads = backend in ("jax", "torch", "tensorflow")
        self.capabilities = Capabilities(backward=grads, double_backward=grads, module_contract=False,
                                         errors=True, dtypes=DTYPES,
                                         devices=("cpu",), notes=_NOTES + _BACKEND_NOTES[backend])
        self._layers: dict = {}
        self._jitted: dict = {}
        if backend == "jax":
            import jax
            import jax.numpy as jnp

            self.jax, self.jnp = jax, jnp
        if backend == "tensorflow":
            import tensorflow

            self.tf = tensorflow

    # -- arrays -------------------------------------------------------------------------
    def to_native(self, t):
        if t is None:
            return None
        if self.backend == "torch":
            return t.detach()
        if self.backend == "jax":
            return self.jnp.asarray(to_numpy(t))
        if self.backend == "tensorflow":
            return self.tf.constant(to_numpy(t))
        return to_numpy(t)

    def to_torch(self, a):
        if isinstance(a, torch.Tensor):
            return a.detach().cpu()
        if self.backend == "tensorflow":
            a = a.numpy()
        return from_numpy(np.asarray(a))

    # -- layers ---------------------------------------------------------------------------
    def _new_layer(self, st: BNState, shape: tuple):
        layer = self.keras.layers.BatchNormalization(
            axis=1, momentum=_DEFAULT_MOMENTUM, epsilon=float(st.eps), center=st.affine and st.use_bias,
            scale=st.affine, dtype=st.dtype)
        layer.build(tuple(shape))
        return layer

    def init_state(self, st: BNState) -> dict:
        """Keras's variables as its initializers create them, in the layer's dtype."""
        layer = self._new_layer(st, (2, st.num_features))
        tt = lambda var: None if var is None else self.to_torch(var.value).clone()  # noqa: E731
        return {
            "weight": tt(layer.gamma), "bias": tt(layer.beta),
            "running_mean": tt(layer.moving_mean) if st.track_running_stats else None,
            "running_var": tt(layer.moving_variance) if st.track_running_stats else None,
        }

    def _layer(self, st: BNState, x, has_channel_state: bool):
        """A built layer for this configuration and input rank (Keras builds its reduction
        axes for one rank). Every call passes the handle's values to ``stateless_call``, so
        handles of one configuration share a layer (and, on jax, its compiled programs).
        Without any per-channel tensor torch takes any channel count: the layer is built
        for the input's; otherwise for num_features, so Keras checks the input."""
        shape = tuple(x.shape)
        c = st.num_features if has_channel_state or len(shape) < 2 else shape[1]
        key = (st.dtype, st.affine, st.affine and st.use_bias, len(shape), c)
        if key not in self._layers:
            if len(self._layers) > 256:
                self._layers.clear()
                self._jitted.clear()
            spec = (1,) * len(shape) if len(shape) < 2 else (1, c, *shape[2:])
            self._layers[key] = self._new_layer(st, spec)
        return self._layers[key]

    def _values(self, st, layer, w, b, rm, rv):
        """(trainable values, non-trainable values) in the layer's variable order."""
        trainable = [a for a in (w, b) if a is not None]
        if rm is None or rv is None:  # no running buffers: Keras's initial values stand in
            rm = layer.moving_mean.value
            rv = layer.moving_variance.value
        return trainable, [rm, rv]

    def _prepare(self, st, x, w, b, rm, rv, momentum):
        has_state = any(a is not None for a in (w, b, rm, rv))
        layer = self._layer(st, x, has_state)
        layer.epsilon = float(st.eps)
        layer.momentum = float(momentum)
        return layer, *self._values(st, layer, w, b, rm, rv)

    def _jit(self, kind: str, layer, make):
        key = (kind, id(layer), layer.epsilon, layer.momentum)
        if key not in self._jitted:
            if len(self._jitted) > 256:
                self._jitted.clear()
            self._jitted[key] = self.jax.jit(make(layer))  # the layer lives in self._layers
        return self._jitted[key]

    def _call(self, layer, tv, ntv, x, training: bool):
        if self.backend == "jax":
            def make(layer):
                return lambda tv, ntv, x: layer.stateless_call(tv, ntv, x, training=training)
            return self._jit(f"call{training}", layer, make)(tv, ntv, x)
        return layer.stateless_call(tv, ntv, x, training=training)

    # -- computation ----------------------------------------------------------------------
    def forward_train(self, st, x, w, b, rm, rv, factor):
        momentum = keras_momentum(factor)
        layer, tv, ntv = self._prepare(st, x, w, b, rm, rv, momentum)
        y, (new_mean, new_var) = self._call(layer, tv, ntv, x, True)
        return y, new_mean, new_var

    def forward_eval(self, st, x, w, b, rm, rv):
        layer, tv, ntv = self._prepare(st, x, w, b, rm, rv, _DEFAULT_MOMENTUM)
        return self._call(layer, tv, ntv, x, False)[0]

    def _jax_grads(self, layer, training: bool):
        """``(x, tv, ntv, g) -> [dx, *d(trainable)]`` by ``jax.vjp`` of the layer's call."""
        jax = self.jax

        def grads(x, tv, ntv, g):
            f = lambda x, tv: layer.stateless_call(tv, ntv, x, training=training)[0]  # noqa: E731
            y, vjp = jax.vjp(f, x, tv)
            dx, dtv = vjp(g.astype(y.dtype))
            return [dx, *dtv]
        return grads

    def _tf_grads(self, layer, tv, ntv, x, dy, training: bool) -> list:
        """[dx, *d(trainable)] by ``tf.GradientTape``; recorded by an enclosing tape."""
        with self.tf.GradientTape() as tape:
            tape.watch([x, *tv])
            y = layer.stateless_call(tv, ntv, x, training=training)[0]
        return tape.gradient(y, [x, *tv], output_gradients=self.tf.cast(dy, y.dtype))

    def _named(self, grads: list, tv_names: list[str]) -> dict:
        return {"x": grads[0], **dict(zip(tv_names, grads[1:]))}

    @staticmethod
    def _tv_names(w, b) -> list[str]:
        return [n for n, a in (("weight", w), ("bias", b)) if a is not None]

    def backward(self, st, x, dy, w, b, rm, rv, training):
        if self.backend == "numpy":
            return super().backward(st, x, dy, w, b, rm, rv, training)
        layer, tv, ntv = self._prepare(st, x, w, b, rm, rv, _DEFAULT_MOMENTUM)
        names = self._tv_names(w, b)
        if self.backend == "jax":
            make = lambda layer: self._jax_grads(layer, training)  # noqa: E731
            return self._named(self._jit(f"vjp{training}", layer, make)(x, tv, ntv, dy), names)
        if self.backend == "tensorflow":
            return self._named(self._tf_grads(layer, tv, ntv, x, dy, training), names)
        xs = [x.detach().requires_grad_(True), *(t.detach().requires_grad_(True) for t in tv)]
        y = layer.stateless_call(xs[1:], ntv, xs[0], training=training)[0]
        grads = torch.autograd.grad(y, xs, dy.to(y.dtype), allow_unused=True)
        return self._named(list(grads), names)

    def double_backward_native(self, st, x, dy, w, b, rm, rv, training, v):
        if self.backend == "numpy":
            return super().double_backward_native(st, x, dy, w, b, rm, rv, training, v)
        layer, tv, ntv = self._prepare(st, x, w, b, rm, rv, _DEFAULT_MOMENTUM)
        names = ["x", *self._tv_names(w, b)]
        if self.backend == "jax":
            jax, jnp = self.jax, self.jnp

            def make(layer):
                first = self._jax_grads(layer, training)

                def total(x, tv, ntv, g, v):
                    return sum(jnp.sum(v[n] * a) for n, a in zip(names, first(x, tv, ntv, g)) if n in v)

                def run(x, tv, ntv, g, v):
                    sx, stv, sg = jax.grad(total, argnums=(0, 1, 3))(x, tv, ntv, g, v)
                    return first(x, tv, ntv, g), [sx, *stv, sg]
                return run

            f1, s2 = self._jit(f"dbl{training}", layer, make)(x, tv, ntv, dy, v)
            return {"first": dict(zip(names, f1)), "second": dict(zip([*names, "dy"], s2))}
        if self.backend == "tensorflow":
            from bnspec.candidates.tf_fused_adapter import tape_second_order

            first = lambda: dict(zip(names, self._tf_grads(layer, tv, ntv, x, dy, training)))  # noqa: E731
            return tape_second_order(self.tf, {**dict(zip(names, [x, *tv])), "dy": dy}, first, v)
        xs = [x.detach().requires_grad_(True), *(t.detach().requires_grad_(True) for t in tv)]
        g = dy.detach().requires_grad_(True)
        y = layer.stateless_call(xs[1:], ntv, xs[0], training=training)[0]
        first = torch.autograd.grad(y, xs, g.to(y.dtype), create_graph=True, allow_unused=True)
        total = sum((gi * v[n]).sum() for n, gi in zip(names, first) if gi is not None and n in v)
        second = torch.autograd.grad(total, [*xs, g], allow_unused=True)
        return {"first": dict(zip(names, first)), "second": dict(zip([*names, "dy"], second))}


def keras_jax(device: str = "cpu") -> KerasAdapter:
    return KerasAdapter("jax", device=device)


def keras_torch(device: str = "cpu") -> KerasAdapter:
    return KerasAdapter("torch", device=device)


def keras_numpy(device: str = "cpu") -> KerasAdapter:
    return KerasAdapter("numpy", device=device)


def keras_tensorflow(device: str = "cpu") -> KerasAdapter:
    return KerasAdapter("tensorflow", device=device)
