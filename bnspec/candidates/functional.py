"""Child-side base for candidates that are not torch modules (NumPy, JAX/Flax, ONNX, ...).

A framework adapter subclasses :class:`FunctionalAdapter` and implements, in its own
arrays, only the computation:

* ``forward_train(st, x, weight, bias, running_mean, running_var, factor)`` ->
  ``(y, new_running_mean, new_running_var)``: normalize with batch statistics; when
  ``factor`` is not None, also return the framework's running-statistics update for the
  torch blend factor ``factor`` (``new = (1 - factor) * old + factor * batch``), which the
  adapter TRANSLATES to the framework's convention (ONNX/Flax: ``momentum = 1 - factor``);
* ``forward_eval(st, x, weight, bias, running_mean, running_var)`` -> ``y``;
* ``backward(st, x, dy, weight, bias, running_mean, running_var, training)`` ->
  ``{"x": dx, "weight": dw, "bias": db}`` (only when it has gradients);
* optionally ``double_backward``, ``to_native``/``to_torch`` (array conversion) and
  ``init_state`` (the framework's own initial parameters and statistics, in ITS dtypes).

The base keeps one record per handle and does the bookkeeping torch's module does around
its kernel (the counter ``num_batches_tracked``, the blend factor ``momentum`` or
``1/num_batches_tracked`` for ``momentum=None``, the choice between batch and running
statistics, ``track_running_stats`` and ``affine`` switches), then answers the same
operations as :class:`bnspec.candidates.torch_module.TorchModuleAdapter` with torch tensors.

Adapter rule: translate parameters, never patch behaviour. The base maps the channel axis,
the train/eval switch, the momentum convention, eps and dtypes; what the framework then
computes (biased running variance, one-pass variance, statistics kept in float32, NaN
statistics for an empty batch, a missing error) reaches the suite unchanged and shows up
as that framework's deviation.

Memory format: frameworks whose arrays have no strides (JAX, ONNX, MLX, tinygrad) give
their result back in the input's torch memory format (a torch-only concept, translated
like the channel axis); NumPy has strides and shares memory with the torch input, so its
layout is its own (``native_strides = True``).
"""

from __future__ import annotations

import inspect
import os
import sys
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np
import torch

from bnspec.candidates.layouts import apply_layout, channels_last_format
from bnspec.candidates.protocol import Capabilities

STATE_NAMES = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
_RESETS = ("reset_running_stats", "reset_parameters")
_SETTABLE = ("momentum", "eps")


def private_path(name: str) -> str:
    """A per-user path in the temporary folder for a framework's cache, never under HOME."""
    uid = os.getuid() if hasattr(os, "getuid") else 0
    return os.path.join(tempfile.gettempdir(), f"bnspec-{name}-{uid}")


@contextmanager
def environment(**values: str) -> Iterator[None]:
    """Environment variables set while a framework is imported (it reads them then), restored after."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@dataclass
class BNState:
    """One module handle: torch's attributes and tensors, plus the framework's object."""

    dims: int
    num_features: int
    eps: float
    momentum: float | None
    affine: bool
    use_bias: bool
    track_running_stats: bool
    dtype: str  #: parameter dtype asked for (torch's ``dtype=``), e.g. "float32"
    training: bool = True
    tensors: dict[str, Any] = field(default_factory=dict)  #: STATE_NAMES -> torch.Tensor | None
    native: Any = None  #: per-handle framework object (an nnx module, a session, ...)


def cache_environment() -> dict[str, str]:
    """Where Keras (imported by TensorFlow too) and matplotlib write, for their import:
    ``KERAS_HOME`` and, unless matplotlib is already imported, ``MPLCONFIGDIR``, both under
    the temporary folder instead of the home directory."""
    env = {"KERAS_HOME": private_path("keras")}
    if "matplotlib" not in sys.modules:  # its font cache and config go to MPLCONFIGDIR
        env["MPLCONFIGDIR"] = private_path("matplotlib")
    return env


def torch_signature(num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True,
                    device=None, dtype=None, *, bias=True):  # pragma: no cover - signature only
    """The constructor keywords the base accepts (torch.nn.BatchNorm{1,2,3}d's)."""


def momentum_on_old(factor: float | None, default: float) -> float:
    """The momentum of a framework that weights the OLD value (Keras, Flax, ONNX, Paddle:
    ``new = momentum * old + (1 - momentum) * batch``) for torch's blend factor ``factor``:
    ``1 - factor``; the framework's ``default`` where no running update is made (None)."""
    return default if factor is None else 1.0 - factor


def to_numpy(t: torch.Tensor) -> np.ndarray:
    """A NumPy view of a CPU tensor (bfloat16 as ml_dtypes.bfloat16), strides kept."""
    t = t.detach()
    if t.dtype == torch.bfloat16:
        import ml_dtypes

        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def from_numpy(a: Any) -> torch.Tensor:
    """A torch tensor of an array (NumPy, or anything ``np.asarray`` takes), strides kept."""
    a = np.asarray(a)
    if a.dtype.name == "bfloat16":
        return torch.from_numpy(np.array(a.view(np.int16))).view(torch.bfloat16)
    if not a.flags.writeable:
        a = np.array(a)
    if a.dtype.byteorder == ">":
        a = a.astype(a.dtype.newbyteorder("="))
    return torch.from_numpy(a)


class FunctionalAdapter:
    """Base adapter: handle bookkeeping in torch tensors, computation in the framework."""

    #: shown in messages ("numpy", "flax.linen", ...)
    framework = "framework"
    capabilities = Capabilities()
    #: the framework's arrays have strides (NumPy): its output layout is its own
    native_strides = False
    #: rank families provided (1, 2, 3 = BatchNorm1d/2d/3d)
    dims_provided: tuple[int, ...] = (1, 2, 3)

    def __init__(self, device: str = "cpu") -> None:
        if str(device) != "cpu":
            from bnspec.candidates.targets import UnusableTarget

            raise UnusableTarget(f"{self.framework} is run on the CPU only by bnspec (asked for {device!r})")
        self.device = torch.device("cpu")
        self.modules: dict[int, BNState] = {}
        self._next = -1
        # The child reports these as the rank families it provides.
        self.factories = {d: torch_signature for d in self.dims_provided}

    # -- hooks a framework adapter implements ---------------------------------------------
    def to_native(self, t: torch.Tensor | None) -> Any:
        """A torch tensor (or None) as the framework's array."""
        return None if t is None else to_numpy(t)

    def to_torch(self, a: Any) -> torch.Tensor:
        return from_numpy(a)

    def init_state(self, st: BNState) -> dict[str, torch.Tensor | None]:
        """Initial weight/bias/running_mean/running_var, as the framework creates them
        (its dtypes). Default: torch's (ones, zeros, zeros, ones in ``st.dtype``)."""
        dt = getattr(torch, st.dtype)
        c = st.num_features
        return {
            "weight": torch.ones(c, dtype=dt) if st.affine else None,
            "bias": torch.zeros(c, dtype=dt) if st.affine and st.use_bias else None,
            "running_mean": torch.zeros(c, dtype=dt) if st.track_running_stats else None,
            "running_var": torch.ones(c, dtype=dt) if st.track_running_stats else None,
        }

    def forward_train(self, st: BNState, x, weight, bias, running_mean, running_var, factor):
        raise NotImplementedError

    def forward_eval(self, st: BNState, x, weight, bias, running_mean, running_var):
        raise NotImplementedError

    def backward(self, st: BNState, x, dy, weight, bias, running_mean, running_var, training: bool) -> dict:
        raise NotImplementedError(f"{self.framework} has no gradients (backward is not provided)")

    def double_backward_native(self, st: BNState, x, dy, weight, bias, running_mean, running_var,
                               training: bool, v: dict) -> dict:
        raise NotImplementedError(f"{self.framework} has no second-order gradients")

    # -- construction -----------------------------------------------------------------
    def signature(self, dims: int) -> dict:
        sig = inspect.signature(torch_signature)
        return {
            name: {"kind": p.kind.name, "default": repr(p.default) if p.default is not p.empty else None}
            for name, p in sig.parameters.items()
        }

    def construct(self, dims: int, num_features: int, kwargs: dict) -> int:
        kw = dict(kwargs)
        unknown = set(kw) - {"eps", "momentum", "affine", "track_running_stats", "device", "dtype", "bias"}
        if unknown:
            raise TypeError(f"{self.framework} adapter: unexpected keyword argument(s) {sorted(unknown)}")
        if dims not in self.dims_provided:
            raise NotImplementedError(f"{self.framework} provides no BatchNorm{dims}d")
        dtype = kw.get("dtype") or "float32"
        if isinstance(dtype, torch.dtype):
            dtype = str(dtype).replace("torch.", "")
        device = kw.get("device")
        if device is not None and str(device) != "cpu":
            raise ValueError(f"{self.framework} adapter runs on the CPU only (device={device!r})")
        st = BNState(dims=dims, num_features=int(num_features), eps=kw.get("eps", 1e-5),
                     momentum=kw.get("momentum", 0.1), affine=bool(kw.get("affine", True)),
                     use_bias=bool(kw.get("bias", True)),
                     track_running_stats=bool(kw.get("track_running_stats", True)), dtype=dtype)
        st.tensors = dict(self.init_state(st))
        # torch's module keeps the counter (bookkeeping around the kernel): so does the base.
        st.tensors["num_batches_tracked"] = (torch.tensor(0, dtype=torch.int64)
                                             if st.track_running_stats else None)
        self._next += 1
        self.modules[self._next] = st
        return self._next

    def release(self, h: int) -> None:
        self.modules.pop(h, None)

    # -- state ------------------------------------------------------------------------
    def describe(self, h: int) -> dict:
        st = self.modules[h]
        return {
            "attrs": {"num_features": st.num_features, "eps": st.eps, "momentum": st.momentum,
                      "affine": st.affine, "track_running_stats": st.track_running_stats,
                      "training": st.training},
            "state": self._state(st),
            "parameters": None, "buffers": None, "param_names": None, "buffer_names": None,
        }

    @staticmethod
    def _state(st: BNState) -> dict:
        return {name: st.tensors.get(name) for name in STATE_NAMES}

    def set_training(self, h: int, flag: bool) -> None:
        self.modules[h].training = bool(flag)

    def set_state(self, h: int, values: dict) -> dict:
        """Copy values into the existing tensors, cast to THEIR dtype (like ``copy_``)."""
        st = self.modules[h]
        for name, value in values.items():
            if name not in STATE_NAMES:
                raise ValueError(f"set_state: {name!r} is not one of {STATE_NAMES}")
            target = st.tensors.get(name)
            if not isinstance(target, torch.Tensor):
                raise TypeError(f"{self.framework} module has no tensor {name!r} (it is None)")
            target.copy_(value)
        return self._state(st)

    def set_attr(self, h: int, name: str, value: Any) -> None:
        if name not in _SETTABLE:
            raise ValueError(f"set_attr: {name!r} is not settable; allowed: {_SETTABLE}")
        setattr(self.modules[h], name, value)

    def reset(self, h: int, method: str) -> dict:
        if method not in _RESETS:
            raise ValueError(f"reset: {method!r} not allowed; allowed: {_RESETS}")
        st = self.modules[h]
        t = st.tensors
        if st.track_running_stats:
            t["running_mean"].zero_()
            t["running_var"].fill_(1)
            t["num_batches_tracked"].zero_()
        if method == "reset_parameters":
            if t.get("weight") is not None:
                t["weight"].fill_(1)
            if t.get("bias") is not None:
                t["bias"].zero_()
        return self._state(st)

    def state_dict(self, h: int) -> dict:
        raise NotImplementedError(f"{self.framework} has no torch state_dict (module_contract is not provided)")

    def load_state_dict(self, h: int, sd: dict) -> dict:
        raise NotImplementedError(f"{self.framework} has no torch state_dict (module_contract is not provided)")

    # -- computation ------------------------------------------------------------------
    def _native_state(self, st: BNState) -> tuple:
        t = st.tensors
        return tuple(self.to_native(t.get(n)) for n in ("weight", "bias", "running_mean", "running_var"))

    def _out(self, a: Any, like: torch.Tensor | None) -> torch.Tensor:
        """The framework's result as a torch tensor, in the input's memory format when
        the framework has no strides of its own."""
        out = self.to_torch(a)
        if like is not None and not self.native_strides and like.dim() == out.dim():
            fmt = channels_last_format(like.dim())
            if fmt is not None and like.is_contiguous(memory_format=fmt) and not like.is_contiguous():
                out = out.contiguous(memory_format=fmt)
        return out

    def _mode(self, st: BNState) -> tuple[bool, float | None]:
        """(use batch statistics, blend factor or None): torch's module logic, including the
        counter increment, which torch does before calling its kernel."""
        factor = None
        if st.training and st.track_running_stats and st.tensors.get("num_batches_tracked") is not None:
            st.tensors["num_batches_tracked"].add_(1)
            if st.momentum is None:
                factor = 1.0 / float(st.tensors["num_batches_tracked"])
            else:
                factor = st.momentum
        use_batch = st.training or (st.tensors.get("running_mean") is None
                                    and st.tensors.get("running_var") is None)
        if not st.training or st.tensors.get("running_mean") is None:
            factor = None
        return use_batch, factor

    def forward(self, h: int, x: torch.Tensor, layout: str = "contiguous",
                dy: torch.Tensor | None = None) -> dict:
        st = self.modules[h]
        xin = apply_layout(x, layout)
        before = _snapshot(xin)
        use_batch, factor = self._mode(st)
        xn = self.to_native(xin)
        w, b, rm, rv = self._native_state(st)
        if use_batch:
            y, new_mean, new_var = self.forward_train(st, xn, w, b, rm if st.training else None,
                                                      rv if st.training else None, factor)
            if factor is not None:
                st.tensors["running_mean"] = self.to_torch(new_mean).detach()
                st.tensors["running_var"] = self.to_torch(new_var).detach()
        else:
            y = self.forward_eval(st, xn, w, b, rm, rv)
        out: dict = {"y": self._out(y, xin)}
        if dy is not None:
            dyn = self.to_native(apply_layout(dy, layout))
            grads = self.backward(st, xn, dyn, w, b, rm, rv, use_batch)
            out["grads"] = {k: (None if v is None else self._out(v, xin if k == "x" else None))
                            for k, v in grads.items()}
        out["input_modified"] = _snapshot(xin) != before
        out["state"] = self._state(st)
        return out

    def time_forward(self, dims: int, shape: list[int], dtype: str, layout: str, training: bool,
                     min_run_time: float, threads: int | None = None) -> dict:
        """Median time of the framework's forward on seeded data, its arrays prepared
        beforehand; each run ends by handing the output back as a torch tensor, which makes
        lazy or asynchronous frameworks (JAX, MLX, tinygrad) finish their work."""
        from bnspec.report.timing import sample_input, time_callable

        if threads:  # torch's pool; a framework's own pool is its business (noted in the report)
            torch.set_num_threads(threads)
        st = self.modules[self.construct(dims, shape[1], {"dtype": dtype})]
        st.training = bool(training)
        xn = self.to_native(apply_layout(sample_input(tuple(shape), dtype), layout))
        w, b, rm, rv = self._native_state(st)
        if training:
            def run():
                return self.to_torch(self.forward_train(st, xn, w, b, rm, rv, st.momentum)[0])
        else:
            def run():
                return self.to_torch(self.forward_eval(st, xn, w, b, rm, rv))
        run()  # warm-up outside the timing: compilation, caches
        return time_callable(run, min_run_time=min_run_time)

    def double_backward(self, h: int, x: torch.Tensor, layout: str, dy: torch.Tensor,
                        v: dict[str, torch.Tensor]) -> dict:
        st = self.modules[h]
        xin = apply_layout(x, layout)
        use_batch = st.training or st.tensors.get("running_mean") is None
        w, b, rm, rv = self._native_state(st)
        vn = {k: self.to_native(t) for k, t in v.items()}
        res = self.double_backward_native(st, self.to_native(xin), self.to_native(apply_layout(dy, layout)),
                                          w, b, rm, rv, use_batch, vn)
        conv = lambda d: {k: None if a is None else self._out(a, xin if k in ("x", "dy") else None)  # noqa: E731
                          for k, a in d.items()}
        return {"first": conv(res["first"]), "second": conv(res["second"])}


def _snapshot(t: torch.Tensor) -> bytes:
    plain = t.detach().cpu().clone(memory_format=torch.contiguous_format)
    return plain.reshape(-1).view(torch.uint8).numpy().tobytes() if plain.numel() else b""
