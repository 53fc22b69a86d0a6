"""Timing a BatchNorm forward, and this machine's memory bandwidth, for the timing report.

Times are medians of ``torch.utils.benchmark.Timer.blocked_autorange`` (it synchronises
CUDA around its blocks). Effective bandwidth counts the least traffic a forward needs,
reading x once and writing y once:

.. math::
    \\text{GB/s} = \\frac{2 \\cdot \\text{numel}(x) \\cdot \\text{itemsize}}{t}

and is put against the bandwidth of a plain ``copy_`` of a large buffer (read + write)
measured in the same run, on the same device. A real training forward reads x twice
(two-pass statistics), so a fraction near 1 is out of reach by design; the fraction says
how far a candidate is from streaming its data once.

Timings are benchmarks: printed and reported, never asserted in tests.
"""

from __future__ import annotations

import math
import os
from typing import Any, Callable

import torch

#: Shapes timed per rank family (full size, and the small "quick"/CI size).
SHAPES = {
    1: {"full": (4096, 1024), "small": (512, 256)},
    2: {"full": (32, 64, 56, 56), "small": (8, 32, 28, 28)},
    3: {"full": (8, 32, 16, 28, 28), "small": (2, 16, 8, 14, 14)},
}


def size_for(profile: str) -> str:
    """"small" for the quick profile and on CI (short, loaded runs), else "full"."""
    return "small" if profile == "quick" or os.environ.get("CI") else "full"
COPY_BYTES = {"full": 256 * 2**20, "small": 32 * 2**20}  #: well past the last-level cache


def time_callable(fn: Callable[[], Any], *, min_run_time: float) -> dict:
    """Median and interquartile range of ``fn()`` in seconds, and how many runs were timed."""
    from torch.utils.benchmark import Timer

    m = Timer(stmt="fn()", globals={"fn": fn}).blocked_autorange(min_run_time=min_run_time)
    return {"median_s": m.median, "iqr_s": m.iqr, "runs": len(m.times) * m.number_per_run}


def forward_bytes(shape: tuple[int, ...], dtype: str) -> int:
    """Read x once, write y once."""
    return 2 * math.prod(shape) * getattr(torch, dtype).itemsize


def copy_bandwidth(device: str = "cpu", *, size: str = "full", min_run_time: float = 0.5,
                   threads: int | None = None) -> dict:
    """GB/s of ``dst.copy_(src)`` for a buffer of :data:`COPY_BYTES` (2 bytes moved per byte),
    with ``threads`` torch threads (None: as set) -- the same number the candidates get."""
    if threads:
        torch.set_num_threads(threads)
    n = COPY_BYTES[size] // 4
    src = torch.rand(n, device=device)
    dst = torch.empty_like(src)
    t = time_callable(lambda: dst.copy_(src), min_run_time=min_run_time)
    return {"device": str(device), "bytes": 2 * n * 4, "median_s": t["median_s"],
            "gb_per_s": 2 * n * 4 / t["median_s"] / 1e9, "threads": torch.get_num_threads()}


def sample_input(shape: tuple[int, ...], dtype: str, device: str = "cpu") -> torch.Tensor:
    """Seeded ``randn * 2 + 0.5`` data: the same input for every candidate."""
    g = torch.Generator().manual_seed(0)
    return (torch.randn(shape, generator=g) * 2 + 0.5).to(device=device, dtype=getattr(torch, dtype))
