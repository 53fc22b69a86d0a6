"""``onnx-reference`` and ``onnxruntime``: one ONNX ``BatchNormalization`` node, opset 15.

Translated (never patched): eval is ``training_mode=0`` with ``input_mean``/``input_var``
set to the running statistics; training is ``training_mode=1``, whose extra outputs are
the new running statistics. ONNX blends ``momentum * old + (1 - momentum) * batch``, so
``momentum = 1 - f`` for torch's factor f (which also carries momentum=None's
``1/num_batches_tracked``: one graph per factor). ``epsilon = eps``. torch's "no
parameters" (``affine=False``) and "no bias" are ONNX's required ``scale``/``B`` inputs set
to ones/zeros; torch's "no running statistics" (eval with batch statistics) is
``training_mode=1`` with the outputs discarded. ONNX attributes are float32, as the
format stores them.

Kept as ONNX does it, so the suite reports it: the BIASED batch variance in the running
statistics (the operator's definition), no torch errors, NaN statistics for an empty
batch, the arithmetic dtype of each runtime. No autograd: backward is not provided.
onnxruntime has no bfloat16 BatchNormalization kernel (float16 runs on CPU).

onnxruntime writes a telemetry cache under ``$XDG_CACHE_HOME`` (default ``~/.cache``) when
it is imported; the adapter imports it with ``XDG_CACHE_HOME`` pointed at a directory
under the system's temporary directory, so a check never writes into the home directory.
"""

from __future__ import annotations


import numpy as np
import onnx
from onnx import TensorProto, helper

from bnspec.candidates.functional import BNState, FunctionalAdapter, environment, momentum_on_old, private_path
from bnspec.candidates.protocol import Capabilities, native_facts

OPSET = 15
IR_VERSION = 8  #: the IR version of opset 15 (onnxruntime refuses IR versions newer than it knows)

_NOTES = ("ONNX conventions kept: biased variance in the running statistics; momentum translated "
          "(onnx momentum = 1 - torch factor, one graph per factor)",
          "no autograd: backward and double backward are not provided",
          "counter num_batches_tracked is the adapter's bookkeeping (ONNX has none)",
          "attributes epsilon and momentum are float32 in the ONNX format")


def _elem(dtype: np.dtype) -> int:
    if dtype.name == "bfloat16":
        return TensorProto.BFLOAT16
    return helper.np_dtype_to_tensor_dtype(np.dtype(dtype))


def make_model(*, training: bool, eps: float, momentum: float, x_dtype, param_dtype, stats_dtype,
               rank: int) -> onnx.ModelProto:
    """A model with one BatchNormalization node (opset 15)."""
    dims = [f"d{i}" for i in range(rank)]
    inputs = [helper.make_tensor_value_info("X", _elem(x_dtype), dims),
              helper.make_tensor_value_info("scale", _elem(param_dtype), ["C"]),
              helper.make_tensor_value_info("B", _elem(param_dtype), ["C"]),
              helper.make_tensor_value_info("input_mean", _elem(stats_dtype), ["C"]),
              helper.make_tensor_value_info("input_var", _elem(stats_dtype), ["C"])]
    outputs = [helper.make_tensor_value_info("Y", _elem(x_dtype), dims)]
    names = ["Y"]
    if training:
        outputs += [helper.make_tensor_value_info("running_mean", _elem(stats_dtype), ["C"]),
                    helper.make_tensor_value_info("running_var", _elem(stats_dtype), ["C"])]
        names += ["running_mean", "running_var"]
    node = helper.make_node("BatchNormalization", ["X", "scale", "B", "input_mean", "input_var"], names,
                            epsilon=float(eps), momentum=float(momentum), training_mode=int(training))
    graph = helper.make_graph([node], "bnspec_batchnorm", inputs, outputs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = IR_VERSION
    return model


def onnx_momentum(factor: float | None) -> float:
    """ONNX's momentum for torch's factor f (ONNX keeps ``momentum * old + (1 - momentum) * batch``);
    0.9, ONNX's default, when nothing is kept."""
    return momentum_on_old(factor, 0.9)


class _OnnxAdapter(FunctionalAdapter):
    """Shared graph building; subclasses say how a model runs."""

    def __init__(self, device: str = "cpu") -> None:
        super().__init__(device)
        self._runners: dict = {}

    def _runner(self, model: onnx.ModelProto):  # pragma: no cover - abstract
        raise NotImplementedError

    def _run(self, st: BNState, x, w, b, rm, rv, *, training: bool, momentum: float):
        pdt = np.dtype(getattr(np, st.dtype)) if st.dtype != "bfloat16" else x.dtype
        # torch without parameters / running statistics holds nothing per channel: ONNX's
        # required inputs stand in with the INPUT's channel count (identity scale, zero
        # shift; statistics that are not used or whose update is discarded).
        c = x.shape[1] if x.ndim >= 2 else st.num_features
        w = np.ones(c, pdt) if w is None else w
        b = np.zeros(w.shape[0], w.dtype) if b is None else b
        rm = np.zeros(c, pdt) if rm is None else rm
        rv = np.ones(rm.shape[0], rm.dtype) if rv is None else rv
        key = (training, float(st.eps), float(momentum), x.dtype.str, w.dtype.str, rm.dtype.str, x.ndim)
        if key not in self._runners:
            if len(self._runners) > 64:
                self._runners.clear()
            self._runners[key] = self._runner(make_model(training=training, eps=st.eps, momentum=momentum,
                                                         x_dtype=x.dtype, param_dtype=w.dtype,
                                                         stats_dtype=rm.dtype, rank=x.ndim))
        feeds = {"X": np.ascontiguousarray(x), "scale": w, "B": b, "input_mean": rm, "input_var": rv}
        return self._runners[key](feeds)

    def native(self) -> dict:
        schema = onnx.defs.get_schema("BatchNormalization")
        defaults = {name: helper.get_attribute_value(a.default_value) for name, a in schema.attributes.items()
                    if a.default_value.name}
        return native_facts(f"ONNX BatchNormalization (opset {schema.since_version})", defaults, eps="epsilon",
                            momentum="momentum", translate=onnx_momentum)

    def forward_train(self, st, x, w, b, rm, rv, factor):
        momentum = onnx_momentum(factor)
        y, new_mean, new_var = self._run(st, x, w, b, rm, rv, training=True, momentum=momentum)
        return y, new_mean, new_var

    def forward_eval(self, st, x, w, b, rm, rv):
        return self._run(st, x, w, b, rm, rv, training=False, momentum=0.9)[0]


class OnnxReferenceAdapter(_OnnxAdapter):
    framework = "onnx.reference"
    capabilities = Capabilities(backward=False, double_backward=False, module_contract=False, errors=True,
                                devices=("cpu",),
                                notes=_NOTES + ("onnx.reference computes in NumPy, in the input's dtype "
                                                "(bfloat16 through ml_dtypes)",))

    def _runner(self, model):
        from onnx.reference import ReferenceEvaluator

        ev = ReferenceEvaluator(model)
        return lambda feeds: ev.run(None, feeds)


class OnnxRuntimeAdapter(_OnnxAdapter):
    framework = "onnxruntime"
    capabilities = Capabilities(backward=False, double_backward=False, module_contract=False, errors=True,
                                dtypes=("float64", "float32", "float16"), devices=("cpu",),
                                notes=_NOTES + ("onnxruntime (CPU) has no bfloat16 BatchNormalization kernel",))

    def __init__(self, device: str = "cpu") -> None:
        super().__init__(device)
        self.ort = import_onnxruntime()

    def _runner(self, model):
        opts = self.ort.SessionOptions()
        opts.intra_op_num_threads = 1
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        sess = self.ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        return lambda feeds: sess.run(None, feeds)


def import_onnxruntime():
    """``import onnxruntime`` with its telemetry cache kept out of the home directory."""
    try:
        with environment(XDG_CACHE_HOME=private_path("onnxruntime")):
            import onnxruntime
    except ImportError:
        from bnspec.candidates.targets import UnusableTarget

        raise UnusableTarget("built-in candidate 'onnxruntime' needs 'onnxruntime' "
                             "(pip install 'bnspec[onnxruntime]')") from None
    return onnxruntime


def onnx_reference(device: str = "cpu") -> OnnxReferenceAdapter:
    return OnnxReferenceAdapter(device=device)


def onnxruntime_session(device: str = "cpu") -> OnnxRuntimeAdapter:
    return OnnxRuntimeAdapter(device=device)
