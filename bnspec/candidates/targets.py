"""Resolve a TARGET string to a child-side adapter.

TARGET is one of:

* a built-in name (``bnspec list``): ``torch``, ``bnspec``, ...;
* a name registered by another package under the entry-point group
  ``bnspec.candidates`` (the object is a factory, or a mapping ``{1: .., 2: .., 3: ..}``);
* ``package.module:Name`` or ``path/to/file.py:Name``, where ``Name`` is a class or
  factory with ``torch.nn.BatchNorm{1,2,3}d``'s constructor signature. It provides the
  one rank family given by ``--dims`` (default 2).

Resolution happens in the child process; only the parent's syntax check runs here too.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Callable

from bnspec.candidates.protocol import FULL, Capabilities

ENTRY_POINT_GROUP = "bnspec.candidates"


class UnusableTarget(Exception):
    """The target cannot be loaded or is not a BatchNorm factory (exit status 2)."""


@dataclass(frozen=True)
class Builtin:
    name: str
    description: str
    loader: str  #: "module:function" returning an adapter; imported only when selected
    extra: str = ""  #: the pip extra that installs its framework ("" = always there)


BUILTINS: dict[str, Builtin] = {
    b.name: b
    for b in (
        Builtin("torch", "torch.nn.BatchNorm1d/2d/3d (native CPU/CUDA kernels)",
                "bnspec.candidates.builtin:torch_modules"),
        Builtin("bnspec", "bnspec.BatchNorm1d/2d/3d, the reference's drop-in modules",
                "bnspec.candidates.builtin:bnspec_modules"),
        Builtin("torch-functional", "nn.Module calling torch.nn.functional.batch_norm with its buffers",
                "bnspec.candidates.torch_variants:torch_functional"),
        Builtin("torch-compile", "torch.compile(nn.BatchNorm1d/2d/3d, dynamic=True)",
                "bnspec.candidates.torch_variants:torch_compile"),
        Builtin("torch-channels-last", "nn.BatchNorm2d/3d in channels_last, inputs converted to channels_last",
                "bnspec.candidates.torch_variants:torch_channels_last"),
        Builtin("numpy", "plain two-pass NumPy BatchNorm, float64 accumulation, closed-form backward",
                "bnspec.candidates.numpy_ref:numpy_reference"),
        # Synced BatchNorms: only with --world-size K (bnspec.candidates.synced); elsewhere unusable, exit 2.
        Builtin("torch-sync", "torch.nn.SyncBatchNorm, in K processes (bnspec check --world-size K torch-sync)",
                "bnspec.candidates.synced:torch_sync"),
        Builtin("bnspec-sync", "bnspec.SyncBatchNorm, in K processes (bnspec check --world-size K bnspec-sync)",
                "bnspec.candidates.synced:bnspec_sync"),
        Builtin("flax-linen", "flax.linen.BatchNorm (Flax defaults; gradients via jax.vjp; x64 on)",
                "bnspec.candidates.flax_adapter:flax_linen", "flax"),
        Builtin("flax-nnx", "flax.nnx.BatchNorm (Flax defaults; gradients via jax.vjp; x64 on)",
                "bnspec.candidates.flax_adapter:flax_nnx", "flax"),
        Builtin("onnx-reference", "ONNX BatchNormalization (opset 15) run by onnx.reference.ReferenceEvaluator",
                "bnspec.candidates.onnx_adapter:onnx_reference", "onnx"),
        Builtin("onnxruntime", "ONNX BatchNormalization (opset 15) run by onnxruntime (CPU)",
                "bnspec.candidates.onnx_adapter:onnxruntime_session", "onnxruntime"),
        Builtin("tinygrad", "tinygrad.nn.BatchNorm (CPU device: clang, else zig cc; PYTHON device when neither)",
                "bnspec.candidates.tinygrad_adapter:tinygrad_batchnorm", "tinygrad"),
        Builtin("mlx", "mlx.nn.BatchNorm (CPU wheel; channels-last, transposed by the adapter)",
                "bnspec.candidates.mlx_adapter:mlx_batchnorm", "mlx"),
        Builtin("keras-jax", "keras.layers.BatchNormalization, Keras 3 on the jax backend (gradients via jax.vjp)",
                "bnspec.candidates.keras_adapter:keras_jax", "keras"),
        Builtin("keras-torch", "keras.layers.BatchNormalization, Keras 3 on the torch backend (torch autograd)",
                "bnspec.candidates.keras_adapter:keras_torch", "keras"),
        Builtin("keras-numpy", "keras.layers.BatchNormalization, Keras 3 on the numpy backend (no gradients)",
                "bnspec.candidates.keras_adapter:keras_numpy", "keras"),
        Builtin("keras-tensorflow", "keras.layers.BatchNormalization, Keras 3 on the tensorflow backend "
                "(tf.GradientTape)", "bnspec.candidates.keras_adapter:keras_tensorflow", "tensorflow"),
        Builtin("tf-fused", "tf.compat.v1.nn.fused_batch_norm, TensorFlow's fused kernel (4-D/5-D, no float64)",
                "bnspec.candidates.tf_fused_adapter:tf_fused", "tensorflow"),
        Builtin("paddle-cpu", "paddle.nn.BatchNorm1D/2D/3D, PaddlePaddle on the CPU (gradients via paddle.grad)",
                "bnspec.candidates.paddle_adapter:paddle_cpu", "paddle"),
    )
}


def kind_of(target: str) -> str:
    """'builtin', 'entrypoint', 'file' or 'module' (syntax only; nothing is imported)."""
    if target in BUILTINS:
        return "builtin"
    if ":" not in target:
        return "entrypoint"
    path, _, name = target.rpartition(":")
    if not name.isidentifier():
        raise UnusableTarget(f"{target!r}: {name!r} after ':' is not a Python name")
    return "file" if path.endswith(".py") or os.sep in path else "module"


def import_object(target: str) -> object:
    """The object ``package.module:Name`` or ``path/to/file.py:Name`` names (its module imported)."""
    path, _, name = target.rpartition(":")
    if kind_of(target) == "file":
        if not os.path.isfile(path):
            raise UnusableTarget(f"{target!r}: no such file {path!r}")
        mod_name = "bnspec_candidate_" + os.path.splitext(os.path.basename(path))[0]
        spec = importlib.util.spec_from_file_location(mod_name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[mod_name] = module
        sys.path.insert(0, os.path.dirname(os.path.abspath(path)))
        try:
            spec.loader.exec_module(module)
        except SyntaxError as exc:
            raise UnusableTarget(f"{target!r}: syntax error in {path} line {exc.lineno}: {exc.msg}") from None
    else:
        try:
            module = importlib.import_module(path)
        except ModuleNotFoundError as exc:
            raise UnusableTarget(f"{target!r}: cannot import module {exc.name!r}") from None
        except SyntaxError as exc:
            raise UnusableTarget(f"{target!r}: syntax error in {exc.filename} line {exc.lineno}: {exc.msg}") from None
    try:
        return getattr(module, name)
    except AttributeError:
        raise UnusableTarget(f"{target!r}: module {path!r} has no attribute {name!r}") from None


def _factories(obj: object, target: str, dims: int) -> dict[int, Callable]:
    if isinstance(obj, dict):
        bad = [k for k in obj if k not in (1, 2, 3) or not callable(obj[k])]
        if bad or not obj:
            raise UnusableTarget(f"{target!r}: a mapping target needs callables under keys 1, 2, 3")
        return dict(obj)
    if not callable(obj):
        raise UnusableTarget(f"{target!r} is a {type(obj).__name__}, not a class or factory")
    return {dims: obj}


def load_adapter(target: str, *, dims: int, device: str = "cpu"):
    """The child-side adapter for ``target`` (raises :class:`UnusableTarget`)."""
    from bnspec.candidates.torch_module import TorchModuleAdapter

    kind = kind_of(target)
    if kind == "builtin":
        builtin = BUILTINS[target]
        module_name, _, func = builtin.loader.partition(":")
        try:
            loader = getattr(importlib.import_module(module_name), func)
        except ImportError as exc:
            hint = f" (pip install 'bnspec[{builtin.extra}]')" if builtin.extra else ""
            raise UnusableTarget(f"built-in candidate {target!r} needs {exc.name!r}{hint}") from None
        return loader(device=device)
    if kind == "entrypoint":
        found = [ep for ep in entry_points(group=ENTRY_POINT_GROUP) if ep.name == target]
        if not found:
            raise UnusableTarget(
                f"{target!r} is not a built-in candidate ({', '.join(BUILTINS)}), not registered "
                f"under the entry-point group {ENTRY_POINT_GROUP!r}, and not module:Name or file.py:Name")
        obj = found[0].load()
    else:
        obj = import_object(target)
    return TorchModuleAdapter(_factories(obj, target, dims), FULL, device=device)


def describe_builtins() -> list[tuple[str, str, bool]]:
    """(name, description, installed) for ``bnspec list``, without importing frameworks."""
    rows = []
    for b in BUILTINS.values():
        module_name = b.loader.partition(":")[0]
        installed = True
        if b.extra:
            installed = importlib.util.find_spec(b.extra) is not None
        rows.append((b.name, b.description, installed and importlib.util.find_spec(module_name) is not None))
    return rows


def capabilities_of(adapter) -> Capabilities:
    return getattr(adapter, "capabilities", FULL)


def native_of(adapter) -> dict:
    """The framework's own defaults and switches (:func:`~bnspec.candidates.protocol.native_facts`);
    empty for an adapter that does not say, or when reading them fails (a report column, never
    a reason to refuse the candidate)."""
    try:
        return adapter.native() if hasattr(adapter, "native") else {}
    except Exception:  # noqa: BLE001 - a framework API that moved: the column says "-"
        return {}
