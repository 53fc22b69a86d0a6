"""Input layouts the suite sends: built in the child, so strides survive the wire."""

from __future__ import annotations

import torch
from torch import Tensor

LAYOUTS = ("contiguous", "channels_last", "noncontiguous")


def channels_last_format(ndim: int) -> torch.memory_format | None:
    return {4: torch.channels_last, 5: torch.channels_last_3d}.get(ndim)


def apply_layout(x: Tensor, layout: str) -> Tensor:
    """Same values, another layout: channels_last (4-D/5-D), or a strided non-contiguous view.

    ``noncontiguous`` places x in every other slot of a larger buffer along the last axis,
    so no stride pattern can make it dense.
    """
    if layout == "contiguous":
        return x.contiguous()
    if layout == "channels_last":
        fmt = channels_last_format(x.dim())
        if fmt is None:
            raise ValueError(f"channels_last needs a 4-D or 5-D input, got {x.dim()}-D")
        return x.contiguous(memory_format=fmt)
    if layout == "noncontiguous":
        base = torch.zeros(*x.shape[:-1], 2 * x.shape[-1], dtype=x.dtype, device=x.device)
        view = base[..., ::2]
        view.copy_(x)
        return view
    raise ValueError(f"unknown layout {layout!r}; allowed: {', '.join(LAYOUTS)}")
