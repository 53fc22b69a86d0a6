"""``flax-linen`` and ``flax-nnx``: Flax's BatchNorm with Flax's own defaults.

Translated (never patched): the channel axis (``axis=1`` for torch's N, C, ... layout),
the train/eval switch (``use_running_average = not training``, and batch statistics in
eval when torch has no running buffers), the momentum convention (Flax blends
``momentum * old + (1 - momentum) * batch``, so ``momentum = 1 - f`` for torch's factor f,
which also carries momentum=None's ``1/num_batches_tracked``), ``epsilon = eps``,
``use_scale``/``use_bias`` for ``affine``/``bias`` and ``param_dtype`` for ``dtype``.

Kept as Flax does it, so the suite reports it: one-pass variance
(``use_fast_variance=True``), the BIASED batch variance in the running average, running
statistics created in float32 (nnx keeps them float32; linen's update may promote them),
output dtype promoted with the parameters' (``dtype=None``), no torch errors, NaN
statistics for an empty batch. Gradients via ``jax.vjp``; second order via ``jax.grad`` of
the vjp. float64 needs ``jax_enable_x64``: the adapter turns it on when imported (in the
candidate's process).

Every computation runs under ``jax.jit`` (as Flax models are run): eager JAX compiles each
primitive for each new shape, which costs seconds per call for the suite's ever-changing
shapes; one jitted program per call is several times faster.
"""

from __future__ import annotations

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import linen, nnx  # noqa: E402

from bnspec.candidates.functional import BNState, FunctionalAdapter, from_numpy, momentum_on_old, to_numpy  # noqa: E402
from bnspec.candidates.protocol import DTYPES, Capabilities, native_facts  # noqa: E402

_CAPS = dict(module_contract=False, errors=True, dtypes=DTYPES,
             devices=("cpu",))
_NOTES = ("Flax defaults kept: one-pass variance (use_fast_variance=True), biased running variance, "
          "running statistics in float32",
          "momentum translated: flax momentum = 1 - torch factor (per call, so momentum=None works)",
          "counter num_batches_tracked is the adapter's bookkeeping (Flax has none)",
          "jax_enable_x64 is turned on in the candidate's process for float64")
_DEFAULT_MOMENTUM = 0.99  #: Flax's default; used only where no running update happens


def _flax_momentum(factor: float | None) -> float:
    return momentum_on_old(factor, _DEFAULT_MOMENTUM)


def _native(layer: str, constructor) -> dict:
    return native_facts(layer, constructor, eps="epsilon", momentum="momentum", translate=_flax_momentum,
                        float64="opt-in: jax_enable_x64 (the adapter turns it on)",
                        settings={"use_fast_variance": "True (default) one-pass variance E[x^2]-E[x]^2; "
                                                        "False two-pass"})


def _pdtype(st: BNState):
    return getattr(jnp, st.dtype)


class _JaxArrays(FunctionalAdapter):
    def to_native(self, t):
        return None if t is None else jnp.asarray(to_numpy(t))

    def to_torch(self, a):
        return from_numpy(np.asarray(a))

    @staticmethod
    def _stats_or_default(st: BNState, rm, rv, x=None):
        """Flax always holds batch statistics; torch without tracking has none (so no
        channel count to match): Flax's initial ones for the input's channels stand in,
        and their update is discarded."""
        c = x.shape[1] if x is not None and x.ndim >= 2 else st.num_features
        return (jnp.zeros(c, jnp.float32) if rm is None else rm, jnp.ones(c, jnp.float32) if rv is None else rv)

    @staticmethod
    def _named(grads: dict) -> dict:
        return {"x": grads["x"], **{k: grads[k] for k in ("weight", "bias") if grads.get(k) is not None}}


class FlaxLinenAdapter(_JaxArrays):
    framework = "flax.linen"
    capabilities = Capabilities(notes=_NOTES, **_CAPS)

    def native(self) -> dict:
        return _native("flax.linen.BatchNorm", linen.BatchNorm)

    def __init__(self, device: str = "cpu") -> None:
        super().__init__(device)
        self._jitted: dict = {}

    def _module(self, st: BNState, *, use_running_average: bool, factor: float | None = None):
        return linen.BatchNorm(use_running_average=use_running_average, axis=1, momentum=_flax_momentum(factor),
                               epsilon=st.eps, use_bias=st.affine and st.use_bias, use_scale=st.affine,
                               param_dtype=_pdtype(st))

    def _jit(self, kind: str, bn, make):
        """One jitted function per (kind, module configuration); linen modules are hashable."""
        key = (kind, bn)
        if key not in self._jitted:
            if len(self._jitted) > 256:
                self._jitted.clear()
            self._jitted[key] = jax.jit(make(bn))
        return self._jitted[key]

    def init_state(self, st: BNState) -> dict:
        """Flax's variables: shapes and dtypes from ``init`` (traced, not run), values from
        the module's own initializers (ones/zeros, as ``init`` would give)."""
        bn = self._module(st, use_running_average=False)
        shapes = jax.eval_shape(bn.init, jax.random.PRNGKey(0), jnp.zeros((2, st.num_features), jnp.float32))
        params, stats = shapes.get("params", {}), shapes["batch_stats"]
        key = jax.random.PRNGKey(0)
        make = lambda init, s: self.to_torch(init(key, s.shape, s.dtype))  # noqa: E731
        return {
            "weight": make(bn.scale_init, params["scale"]) if "scale" in params else None,
            "bias": make(bn.bias_init, params["bias"]) if "bias" in params else None,
            "running_mean": make(linen.initializers.zeros, stats["mean"]) if st.track_running_stats else None,
            "running_var": make(linen.initializers.ones, stats["var"]) if st.track_running_stats else None,
        }

    @staticmethod
    def _params(w, b) -> dict:
        return {k: v for k, v in (("scale", w), ("bias", b)) if v is not None}

    @staticmethod
    def _make_pure(training: bool):
        def make(bn):
            def f(x, params, stats):
                variables = {"params": params, "batch_stats": stats}
                if training:
                    return bn.apply(variables, x, mutable=["batch_stats"])[0]
                return bn.apply(variables, x)
            return f
        return make

    def forward_train(self, st, x, w, b, rm, rv, factor):
        rm0, rv0 = self._stats_or_default(st, rm, rv, x)
        bn = self._module(st, use_running_average=False, factor=factor)
        run = self._jit("train", bn, lambda bn: lambda v, x: bn.apply(v, x, mutable=["batch_stats"]))
        y, upd = run({"params": self._params(w, b), "batch_stats": {"mean": rm0, "var": rv0}}, x)
        return y, upd["batch_stats"]["mean"], upd["batch_stats"]["var"]

    def forward_eval(self, st, x, w, b, rm, rv):
        bn = self._module(st, use_running_average=True)
        run = self._jit("eval", bn, lambda bn: lambda v, x: bn.apply(v, x))
        return run({"params": self._params(w, b), "batch_stats": {"mean": rm, "var": rv}}, x)

    def backward(self, st, x, dy, w, b, rm, rv, training):
        bn = self._module(st, use_running_average=not training)
        pure = self._make_pure(training)

        def make(bn):
            f = pure(bn)

            def run(x, params, stats, g):
                y, vjp = jax.vjp(lambda x, p: f(x, p, stats), x, params)
                return vjp(g.astype(y.dtype))
            return run

        rm0, rv0 = self._stats_or_default(st, rm, rv, x)
        dx, dp = self._jit(f"vjp{training}", bn, make)(x, self._params(w, b), {"mean": rm0, "var": rv0}, dy)
        return self._named({"x": dx, "weight": dp.get("scale"), "bias": dp.get("bias")})

    def double_backward_native(self, st, x, dy, w, b, rm, rv, training, v):
        bn = self._module(st, use_running_average=not training)
        pure = self._make_pure(training)
        names = {"scale": "weight", "bias": "bias"}

        def make(bn):
            f = pure(bn)

            def first(x, params, stats, g):
                y, vjp = jax.vjp(lambda x, p: f(x, p, stats), x, params)
                return vjp(g.astype(y.dtype))

            def total(x, params, stats, g, v):
                dx, dp = first(x, params, stats, g)
                out = jnp.sum(v["x"] * dx) if "x" in v else 0.0
                for k, n in names.items():
                    if k in dp and n in v:
                        out = out + jnp.sum(v[n] * dp[k])
                return out

            def run(x, params, stats, g, v):
                return first(x, params, stats, g), jax.grad(total, argnums=(0, 1, 3))(x, params, stats, g, v)
            return run

        rm0, rv0 = self._stats_or_default(st, rm, rv, x)
        (dx, dp), (sx, sp, sg) = self._jit(f"dbl{training}", bn, make)(
            x, self._params(w, b), {"mean": rm0, "var": rv0}, dy, v)
        return {"first": self._named({"x": dx, **{names[k]: a for k, a in dp.items()}}),
                "second": {**self._named({"x": sx, **{names[k]: a for k, a in sp.items()}}), "dy": sg}}


class FlaxNnxAdapter(_JaxArrays):
    framework = "flax.nnx"
    capabilities = Capabilities(notes=_NOTES, **_CAPS)

    def native(self) -> dict:
        return _native("flax.nnx.BatchNorm", nnx.BatchNorm)

    def __init__(self, device: str = "cpu") -> None:
        super().__init__(device)
        self._jitted: dict = {}

    def init_state(self, st: BNState) -> dict:
        bn = nnx.BatchNorm(st.num_features, axis=1, epsilon=st.eps, use_bias=st.affine and st.use_bias,
                           use_scale=st.affine, param_dtype=_pdtype(st), rngs=nnx.Rngs(0))
        st.native = bn
        tt = lambda var: None if var is None else self.to_torch(var.get_value())  # noqa: E731
        return {
            "weight": tt(bn.scale), "bias": tt(bn.bias),
            "running_mean": tt(bn.mean) if st.track_running_stats else None,
            "running_var": tt(bn.var) if st.track_running_stats else None,
        }

    def _load(self, st, x, w, b, rm, rv, *, use_running_average: bool, factor: float | None = None):
        """Put the handle's current values into the nnx module (as set_state would)."""
        bn = st.native
        if w is not None:
            bn.scale.set_value(w)
        if b is not None:
            bn.bias.set_value(b)
        rm0, rv0 = self._stats_or_default(st, rm, rv, x)
        bn.mean.set_value(rm0)
        bn.var.set_value(rv0)
        bn.epsilon = st.eps
        bn.momentum = _flax_momentum(factor)
        bn.use_running_average = use_running_average
        return bn

    def _jit(self, kind: str, graphdef, make):
        """One jitted function per (kind, graph definition: the module's static attributes)."""
        key = (kind, graphdef)
        if key not in self._jitted:
            if len(self._jitted) > 256:
                self._jitted.clear()
            self._jitted[key] = jax.jit(make(graphdef))
        return self._jitted[key]

    def forward_train(self, st, x, w, b, rm, rv, factor):
        bn = self._load(st, x, w, b, rm, rv, use_running_average=False, factor=factor)
        graphdef, state = nnx.split(bn)

        def make(graphdef):
            def run(state, x):
                m = nnx.merge(graphdef, state)
                y = m(x)
                return y, nnx.split(m)[1]
            return run

        y, new_state = self._jit("train", graphdef, make)(state, x)
        nnx.update(bn, new_state)
        return y, bn.mean.get_value(), bn.var.get_value()

    def forward_eval(self, st, x, w, b, rm, rv):
        bn = self._load(st, x, w, b, rm, rv, use_running_average=True)
        graphdef, state = nnx.split(bn)
        return self._jit("eval", graphdef, lambda g: lambda state, x: nnx.merge(g, state)(x))(state, x)

    def _split(self, st, x, w, b, rm, rv, training: bool):
        bn = self._load(st, x, w, b, rm, rv, use_running_average=not training)
        return nnx.split(bn, nnx.Param, ...)

    @staticmethod
    def _grads(dp) -> dict:
        return {n: (dp[k].get_value() if k in dp else None) for k, n in (("scale", "weight"), ("bias", "bias"))}

    @staticmethod
    def _first(graphdef):
        def first(x, params, rest, g):
            f = lambda x, p, r: nnx.merge(graphdef, p, r)(x)  # noqa: E731
            y, vjp = jax.vjp(f, x, params, rest)
            dx, dp, _ = vjp(g.astype(y.dtype))
            return dx, dp
        return first

    def backward(self, st, x, dy, w, b, rm, rv, training):
        graphdef, params, rest = self._split(st, x, w, b, rm, rv, training)
        dx, dp = self._jit("vjp", graphdef, self._first)(x, params, rest, dy)
        return self._named({"x": dx, **self._grads(dp)})

    def double_backward_native(self, st, x, dy, w, b, rm, rv, training, v):
        graphdef, params, rest = self._split(st, x, w, b, rm, rv, training)
        grads_of = self._grads

        def make(graphdef):
            first = self._first(graphdef)

            def total(x, params, rest, g, v):
                dx, dp = first(x, params, rest, g)
                grads = grads_of(dp)
                out = jnp.sum(v["x"] * dx) if "x" in v else 0.0
                for n in ("weight", "bias"):
                    if grads[n] is not None and n in v:
                        out = out + jnp.sum(v[n] * grads[n])
                return out

            def run(x, params, rest, g, v):
                return first(x, params, rest, g), jax.grad(total, argnums=(0, 1, 3))(x, params, rest, g, v)
            return run

        (dx, dp), (sx, sp, sg) = self._jit("dbl", graphdef, make)(x, params, rest, dy, v)
        return {"first": self._named({"x": dx, **self._grads(dp)}),
                "second": {**self._named({"x": sx, **self._grads(sp)}), "dy": sg}}


def flax_linen(device: str = "cpu") -> FlaxLinenAdapter:
    return FlaxLinenAdapter(device=device)


def flax_nnx(device: str = "cpu") -> FlaxNnxAdapter:
    return FlaxNnxAdapter(device=device)
