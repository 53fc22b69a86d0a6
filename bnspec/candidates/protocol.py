"""The small protocol every candidate is reached through, and its declared capabilities.

A candidate adapter lives in the child process and answers these operations on module
handles it creates (a handle is an int):

``construct(dims, num_features, kwargs) -> handle``, ``signature(dims)``,
``describe(h)`` (attributes, parameters, buffers, state), ``set_training(h, flag)``,
``forward(h, x, layout, dy=None)`` (output, optional gradients, state after, whether the
input was modified), ``double_backward(h, x, layout, dy, v)``, ``state_dict(h)``,
``load_state_dict(h, sd)``, ``reset(h, method)``, ``set_attr(h, name, value)``.

A torch drop-in target is held to the whole torch contract (:data:`FULL`); only built-in
adapters of other frameworks declare less. A capability a candidate lacks makes the
clauses that need it "unsupported", never "pass".
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

DTYPES = ("float64", "float32", "float16", "bfloat16")


@dataclass(frozen=True)
class Capabilities:
    """What a candidate can be asked to do."""

    forward: bool = True
    running_stats: bool = True
    cumulative: bool = True  #: momentum=None
    backward: bool = True
    double_backward: bool = True
    module_contract: bool = True  #: torch's attributes, state_dict, reset methods
    errors: bool = True  #: raises where torch raises
    dtypes: tuple[str, ...] = DTYPES
    ranks: tuple[int, ...] = (2, 3, 4, 5)
    layouts: tuple[str, ...] = ("contiguous", "channels_last", "noncontiguous")
    devices: tuple[str, ...] = ("cpu", "cuda")
    notes: tuple[str, ...] = field(default=())

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Capabilities":
        kw = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k in cls.__dataclass_fields__}
        return cls(**kw)

    def narrowed(self, *, dtypes: tuple[str, ...] | None = None) -> "Capabilities":
        """The contract a user narrowed explicitly (reported as narrowed)."""
        return self if dtypes is None else replace(self, dtypes=tuple(d for d in self.dtypes if d in dtypes))


FULL = Capabilities()
