"""The wire format between parent and child: plain data only, tensors as raw bytes.

Messages are pickles of dicts, lists, tuples, str, bytes, numbers, bool and None. The
reader refuses every other type (no class is ever looked up), so a message from the
child cannot run code in the parent. Tensors travel as a tagged dict with dtype, shape,
strides, device and raw bytes, and come back as plain CPU tensors with the same strides
(where the strides describe a dense tensor) plus their metadata.

Framing: each message is ``MAGIC`` (4 bytes), its length (8 bytes, big-endian), then the
pickle. The parent reads with a deadline and refuses a frame without the magic or longer
than :data:`MAX_MESSAGE`, so garbage a candidate writes into the socket (it is a file
descriptor of the child's process) is a :class:`WireError`, never a hang or a huge
allocation in the parent.
"""

from __future__ import annotations

import io
import math
import numbers
import pickle
import select
import socket
import struct
import time
from typing import Any

import torch

_DTYPES = {str(d): d for d in (
    torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.int8, torch.int16,
    torch.int32, torch.int64, torch.uint8, torch.bool, torch.complex64, torch.complex128,
)}
# Exotic dtypes a wrong candidate may return: they travel too, so the verdict can say
# "dtype torch.float8_e4m3fn, expected torch.float32" (newer torch only).
_DTYPES.update({str(d): d for d in (getattr(torch, name, None) for name in (
    "uint16", "uint32", "uint64", "float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz",
)) if isinstance(d, torch.dtype)})
TENSOR_TAG = "__bnspec_tensor__"


class WireError(Exception):
    """A message that is not plain data, or a malformed tensor record."""


MAGIC = b"BNSP"
_HEADER = struct.Struct("!4sQ")
#: The longest message the parent accepts (a frame announcing more is garbage).
MAX_MESSAGE = 1 << 29


def send_message(sock: socket.socket, data: bytes, *, timeout: float | None = None) -> None:
    """Write one frame; ``timeout`` bounds the whole write (TimeoutError), None blocks."""
    sock.settimeout(timeout)
    sock.sendall(_HEADER.pack(MAGIC, len(data)) + data)


def wait_readable(sock: socket.socket, timeout: float) -> bool:
    """True when a read would not block (data, end of file, or an error)."""
    if hasattr(select, "poll"):  # no FD_SETSIZE limit, unlike select()
        poller = select.poll()
        poller.register(sock, select.POLLIN | select.POLLPRI)
        return bool(poller.poll(max(0.0, timeout) * 1000))
    readable, _, _ = select.select([sock], [], [], max(0.0, timeout))
    return bool(readable)


def recv_message(sock: socket.socket, *, deadline: float | None = None,
                 max_size: int = MAX_MESSAGE) -> bytes:
    """Read one frame. EOFError when the peer closed; TimeoutError when ``deadline``
    (``time.monotonic()``) passes first; WireError for a frame that is not ours."""
    magic, size = _HEADER.unpack(_read_exactly(sock, _HEADER.size, deadline))
    if magic != MAGIC:
        raise WireError(f"not a bnspec frame (starts with {magic!r}): something else wrote to the socket")
    if size > max_size:
        raise WireError(f"frame too long ({size} bytes; the limit is {max_size})")
    return _read_exactly(sock, size, deadline)


def _read_exactly(sock: socket.socket, n: int, deadline: float | None) -> bytes:
    chunks, got = [], 0
    while got < n:
        if deadline is None:
            sock.settimeout(None)
        else:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("the message did not arrive in time")
            sock.settimeout(remaining)
        chunk = sock.recv(min(n - got, 1 << 20))
        if not chunk:
            raise EOFError("the other end closed the connection")
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


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
    if plain.device.type == "meta":
        raise WireError(f"a tensor on device {plain.device} has no values to send")
    if plain.layout != torch.strided:
        raise WireError(f"a {plain.layout} tensor cannot be sent (only strided tensors)")
    if str(plain.dtype) not in _DTYPES:
        raise WireError(f"a tensor of dtype {plain.dtype} cannot be sent")
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
        shape = tuple(rec["shape"])
        data = rec["data"]
        if not all(type(s) is int and s >= 0 for s in shape) or len(shape) > 16 or type(data) is not bytes:
            raise ValueError(f"bad shape {rec['shape']!r} or data")
        itemsize = torch.empty((), dtype=dtype).element_size()
        if math.prod(shape) * itemsize != len(data):
            raise ValueError(f"{len(data)} bytes do not hold a {dtype} tensor of shape {shape}")
        flat = torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)
        values = flat.view(dtype).reshape(shape) if flat.numel() else torch.empty(shape, dtype=dtype)
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise WireError(f"malformed tensor record: {exc}") from None
    stride = rec.get("stride")
    if (isinstance(stride, list) and len(stride) == len(shape) and all(type(s) is int and s >= 0 for s in stride)
            and values.numel() > 1):
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


_PLAIN = (type(None), bool, int, float, str, bytes)


def encode(obj: Any) -> Any:
    """Tensors anywhere in nested dicts/lists/tuples become tensor records; other numbers
    (a NumPy scalar, an IntEnum), strings and sequences (a named tuple) become the plain
    type. Anything else is refused here, in the sender, with a message naming it."""
    if isinstance(obj, torch.Tensor):
        return encode_tensor(obj)
    if type(obj) in _PLAIN:
        return obj
    if isinstance(obj, dict):
        return {encode_key(k): encode(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return (list if isinstance(obj, list) else tuple)(encode(v) for v in obj)
    for plain, kind in ((bool, bool), (str, str), (bytes, bytes), (numbers.Integral, int), (numbers.Real, float)):
        if isinstance(obj, plain):
            return kind(obj)
    if type(obj).__module__ == "numpy" and type(obj).__name__ in ("bool", "bool_"):  # not a Python bool
        return bool(obj)
    raise WireError(f"cannot send a {type(obj).__module__}.{type(obj).__qualname__} to the suite "
                    "(only tensors, numbers, strings, None and lists/dicts of them)")


def encode_key(k: Any) -> Any:
    if type(k) in (str, int, bool, type(None)):
        return k
    if isinstance(k, (str, int)):
        return (str if isinstance(k, str) else int)(k)
    return repr(k)


def decode(obj: Any) -> Any:
    if is_tensor_record(obj):
        return decode_tensor(obj)
    if isinstance(obj, dict):
        return {k: decode(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(decode(v) for v in obj)
    return obj
