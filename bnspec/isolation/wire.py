"""The wire format between parent and child: plain data only, tensors as raw bytes.

Messages are pickles of dicts, lists, tuples, str, bytes, numbers, bool and None. The
reader refuses every other type (no class is ever looked up), so a message from the
child cannot run code in the parent. Tensors travel as a tagged dict with dtype, shape,
strides, device and raw bytes, and come back as plain CPU tensors with the same strides
(where the strides describe a dense tensor) plus their metadata.
"""

from __future__ import annotations

import io
import pickle
from typing import Any

import torch

_DTYPES = {str(d): d for d in (
    torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.int8, torch.int16,
    torch.int32, torch.int64, torch.uint8, torch.bool, torch.complex64, torch.complex128,
)}
TENSOR_TAG = "__bnspec_tensor__"


class WireError(Exception):
    """A message that is not plain data, or a malformed tensor record."""


class _PlainUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):  # noqa: D401 - pickle hook
        raise WireError(f"refused to load {module}.{name}: only plain data crosses the wire")


def dumps(obj: Any) -> bytes:
    return pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)


def loads(data: bytes) -> Any:
    try:
        return _PlainUnpickler(io.BytesIO(data)).load()
    except WireError:
        raise
    except Exception as exc:  # truncated or corrupt message
        raise WireError(f"unreadable message: {type(exc).__name__}: {exc}") from None


def encode_tensor(t: torch.Tensor) -> dict:
    """A tensor (any device, any subclass) as plain data, with its layout and autograd facts."""
    plain = t.detach()
    if type(plain) is not torch.Tensor:
        plain = plain.as_subclass(torch.Tensor)
    cpu = plain.to("cpu").contiguous()
    if cpu.numel() == 1 and cpu.reshape(-1).stride(0) != 1:
        cpu = cpu.clone(memory_format=torch.contiguous_format)  # a 1-element view with stride > 1
    return {
        TENSOR_TAG: True,
        "type": type(t).__module__ + "." + type(t).__qualname__,
        "dtype": str(t.dtype),
        "shape": list(t.shape),
        "stride": list(t.stride()) if t.layout == torch.strided else None,
        "device": str(t.device),
        "requires_grad": bool(t.requires_grad),
        "has_grad_fn": t.grad_fn is not None,
        "data": cpu.reshape(-1).view(torch.uint8).numpy().tobytes() if cpu.numel() else b"",
    }


def is_tensor_record(obj: Any) -> bool:
    return isinstance(obj, dict) and obj.get(TENSOR_TAG) is True


META_KEYS = ("type", "dtype", "shape", "stride", "device", "requires_grad", "has_grad_fn")


def meta(t: torch.Tensor) -> dict:
    """What the child reported about a decoded tensor (type, device, strides, autograd)."""
    return getattr(t, "bnspec_meta", {})


def decode_tensor(rec: dict) -> torch.Tensor:
    out = _rebuild(rec)
    out.bnspec_meta = {k: rec.get(k) for k in META_KEYS}
    return out


def _rebuild(rec: dict) -> torch.Tensor:
    """A CPU tensor with the recorded strides where they describe a dense layout."""
    try:
        dtype = _DTYPES[rec["dtype"]]
        shape = tuple(int(s) for s in rec["shape"])
        flat = torch.frombuffer(bytearray(rec["data"]), dtype=torch.uint8) if rec["data"] else torch.empty(0, dtype=torch.uint8)
        values = flat.view(dtype).reshape(shape) if flat.numel() else torch.empty(shape, dtype=dtype)
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise WireError(f"malformed tensor record: {exc}") from None
    stride = rec.get("stride")
    if stride is not None and values.numel() > 1:
        try:
            out = torch.empty_strided(shape, tuple(stride), dtype=dtype)
            if _dense(shape, stride):
                out.copy_(values)
                return out
        except RuntimeError:
            pass
    return values


def _dense(shape: tuple[int, ...], stride: list[int]) -> bool:
    """True when the strides describe a non-overlapping dense permutation of the shape."""
    dims = sorted((s, n) for s, n in zip(stride, shape) if n != 1)
    expected = 1
    for s, n in dims:
        if s != expected:
            return False
        expected *= n
    return True


def encode(obj: Any) -> Any:
    """Tensors anywhere in nested dicts/lists/tuples become tensor records."""
    if isinstance(obj, torch.Tensor):
        return encode_tensor(obj)
    if isinstance(obj, dict):
        return {k: encode(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(encode(v) for v in obj)
    return obj


def decode(obj: Any) -> Any:
    if is_tensor_record(obj):
        return decode_tensor(obj)
    if isinstance(obj, dict):
        return {k: decode(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(decode(v) for v in obj)
    return obj
