"""The one strategies module: every case the suite draws comes from here.

Bulk coverage draws a small :class:`Case` record (shape, dtype, layout, flags, data kind
and a data seed) and builds the tensors with torch's generator from that seed, which costs
about 1 ms an example; hypothesis shrinks the record, and ``Case(...)`` pasted from a
failure rebuilds exactly the same tensors. Values are made in float64 and rounded once to
the case dtype, so the oracle sees exactly what the candidate sees.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

import torch
from hypothesis import assume
from hypothesis import strategies as st

from bnspec.candidates.protocol import DTYPES
from bnspec.contract import Contract

LOW_PRECISION = ("float16", "bfloat16")
#: Value distributions, each aimed at a class of weak implementations.
DISTS = (
    "normal",  # per-channel offset and scale: catches axis and formula bugs
    "offset",  # |mean| / std up to 1e4: catches one-pass E[x^2] - E[x]^2
    "tiny_var",  # std 1e-6..1e-2 relative: catches eps placement and cancellation
    "near_eps",  # var comparable to eps: catches eps outside the root, wrong eps
    "constant",  # some channels constant: var = 0 exactly
)
RANKS_BY_DIMS = {1: (2, 3), 2: (4,), 3: (5,)}
MAX_NUMEL = 6000  # keeps one example near a millisecond


@dataclass(frozen=True)
class Case:
    """One BatchNorm configuration and its data, rebuilt deterministically from ``seed``."""

    shape: tuple[int, ...]
    dtype: str = "float32"
    param_dtype: str | None = None  #: weight/bias/running stats; None = the input dtype
    layout: str = "contiguous"
    eps: float = 1e-5
    momentum: float | None = 0.1
    affine: bool = True
    bias: bool = True
    track_running_stats: bool = True
    dist: str = "normal"
    seed: int = 0

    # -- derived facts ---------------------------------------------------------------
    @property
    def dims(self) -> int:
        return {2: 1, 3: 1, 4: 2, 5: 3}[len(self.shape)]

    @property
    def channels(self) -> int:
        return self.shape[1]

    @property
    def count(self) -> int:
        """n, the number of values per channel."""
        return self.shape[0] * math.prod(self.shape[2:])

    @property
    def tdtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    @property
    def tparam_dtype(self) -> torch.dtype:
        return getattr(torch, self.param_dtype or self.dtype)

    def module_kwargs(self) -> dict:
        """Constructor keywords; ``bias`` only when False, so its absence fails only there."""
        kw = dict(eps=self.eps, momentum=self.momentum, affine=self.affine,
                  track_running_stats=self.track_running_stats, dtype=self.param_dtype or self.dtype)
        if not self.bias:
            kw["bias"] = False
        return kw

    def repro(self) -> str:
        """A paste-able line that rebuilds this case."""
        fields = ", ".join(f"{k}={v!r}" for k, v in asdict(self).items())
        return f"from conformance.strategies import Case; case = Case({fields}); x = case.x()"

    # -- tensors ---------------------------------------------------------------------
    def _gen(self, salt: int) -> torch.Generator:
        return torch.Generator().manual_seed((self.seed * 1_000_003 + salt) % (2**63))

    def x(self) -> torch.Tensor:
        """The input in ``dtype``, values drawn per ``dist`` (contiguous; layout is applied by the adapter)."""
        return make_values(self.shape, self.dist, self._gen(1), eps=self.eps).to(self.tdtype)

    def dy(self) -> torch.Tensor:
        """An upstream gradient in ``dtype``."""
        return torch.randn(self.shape, generator=self._gen(2), dtype=torch.float64).to(self.tdtype)

    def weight(self) -> torch.Tensor:
        """Non-default weight, away from 0 and of both signs, in ``param_dtype``."""
        g = self._gen(3)
        mag = torch.rand(self.channels, generator=g, dtype=torch.float64) * 1.5 + 0.25
        sign = torch.where(torch.rand(self.channels, generator=g) < 0.2, -1.0, 1.0).double()
        return (mag * sign).to(self.tparam_dtype)

    def bias_values(self) -> torch.Tensor:
        return torch.randn(self.channels, generator=self._gen(4), dtype=torch.float64).to(self.tparam_dtype)

    def running(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Non-default running mean and (positive) variance, in ``param_dtype``."""
        g = self._gen(5)
        mean = torch.randn(self.channels, generator=g, dtype=torch.float64) * 2
        var = torch.rand(self.channels, generator=g, dtype=torch.float64) * 3 + 0.1
        return mean.to(self.tparam_dtype), var.to(self.tparam_dtype)


def make_values(shape: tuple[int, ...], dist: str, g: torch.Generator, *, eps: float = 1e-5) -> torch.Tensor:
    """float64 values of ``shape``; every channel gets its own offset and scale."""
    c = shape[1]
    pc = (1, c, *([1] * (len(shape) - 2)))
    z = torch.randn(shape, generator=g, dtype=torch.float64)
    u = torch.rand(c, generator=g, dtype=torch.float64)
    sign = torch.where(torch.rand(c, generator=g) < 0.5, -1.0, 1.0).double()
    if dist == "normal":
        offset, scale = (u * 4 - 2), torch.exp(torch.rand(c, generator=g, dtype=torch.float64) * 2 - 1)
    elif dist == "offset":
        offset, scale = sign * 10 ** (1 + 3 * u), torch.ones(c, dtype=torch.float64)
    elif dist == "tiny_var":
        offset = u * 4 - 2
        scale = (offset.abs() + 1) * 10 ** (-6 + 4 * torch.rand(c, generator=g, dtype=torch.float64))
    elif dist == "near_eps":
        offset = u * 4 - 2
        scale = math.sqrt(eps) * (0.3 + 3 * torch.rand(c, generator=g, dtype=torch.float64))
    elif dist == "constant":
        offset = u * 4 - 2
        scale = torch.where(torch.rand(c, generator=g) < 0.6, 0.0, 1.0).double()
        scale[0] = 0.0  # at least one constant channel
    else:
        raise ValueError(f"unknown dist {dist!r}; allowed: {DISTS}")
    return z * scale.reshape(pc) + offset.reshape(pc)


# ----------------------------------------------------------------------------- strategies


@st.composite
def shapes(draw, *, dims: int, min_count: int = 2, max_numel: int = MAX_NUMEL,
           max_channels: int = 5) -> tuple[int, ...]:
    """A shape for BatchNorm{dims}d with at least ``min_count`` values per channel."""
    rank = draw(st.sampled_from(RANKS_BY_DIMS[dims]))
    c = draw(st.integers(1, max_channels))
    if rank == 2:
        n = draw(st.integers(max(min_count, 1), 64))
        shape = (n, c)
    else:
        spatial = tuple(draw(st.lists(st.integers(1, 9 if rank < 5 else 5), min_size=rank - 2, max_size=rank - 2)))
        n = draw(st.integers(1, 6))
        shape = (n, c, *spatial)
    assume(math.prod(shape) <= max_numel and shape[0] * math.prod(shape[2:]) >= min_count)
    return shape


@st.composite
def cases(draw, *, dims: int, dtypes: tuple[str, ...] = DTYPES, dists: tuple[str, ...] = DISTS,
          layouts: tuple[str, ...] = ("contiguous", "channels_last", "noncontiguous"),
          momenta: bool = True, switches: bool = True, min_count: int = 2,
          max_numel: int = MAX_NUMEL, mixed_params: bool = False, contract: Contract | None = None) -> Case:
    """A :class:`Case`; keyword-only knobs narrow what is drawn. ``contract`` narrows it to
    what the candidate can be built with (a keyword it lacks keeps torch's default)."""
    can = contract.builds if contract is not None else (lambda piece: True)
    shape = draw(shapes(dims=dims, min_count=min_count, max_numel=max_numel))
    dtype = draw(st.sampled_from(dtypes))
    param_dtype = None
    if mixed_params and dtype in LOW_PRECISION:
        param_dtype = draw(st.sampled_from([None, "float32"]))
    usable = [lay for lay in layouts if lay != "channels_last" or len(shape) >= 4]
    layout = draw(st.sampled_from(usable))
    dist = draw(st.sampled_from(dists))
    eps = draw(st.sampled_from([1e-5, 1e-3, 0.1, 1e-5])) if can("eps") else 1e-5
    momentum = 0.1
    if momenta and can("momentum"):
        momentum = draw(st.sampled_from([0.1, *([None] if can("momentum=None") else []), 0.0, 1.0, 0.5, 1.5, -0.25]))
    affine = draw(st.booleans()) if switches and can("affine=False") else True
    bias = draw(st.booleans()) if switches and affine and can("bias=False") else True
    track = draw(st.booleans()) if switches and can("track_running_stats=False") else True
    seed = draw(st.integers(0, 2**31 - 1))
    return Case(shape=shape, dtype=dtype, param_dtype=param_dtype, layout=layout, eps=eps,
                momentum=momentum, affine=affine, bias=bias, track_running_stats=track, dist=dist,
                seed=seed)


def with_(case: Case, **changes) -> Case:
    """A copy of ``case`` with fields changed (keeps repro strings honest)."""
    return replace(case, **changes)
