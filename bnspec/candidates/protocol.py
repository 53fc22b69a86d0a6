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


def as_given(factor: float | None) -> float | None:
    """The momentum translation of a candidate that takes torch's factor as it is."""
    return factor


def native_facts(layer: str, constructor, *, eps: str | None, momentum: str | None, translate=None,
                 float64: str = "", settings: dict[str, str] | None = None) -> dict:
    """A framework's own BatchNorm facts for the report's conventions table, read from its API.

    The defaults are read from ``constructor``'s signature, or from a dict of an operator
    schema's attribute defaults (never typed in); ``translate`` is
    the function the adapter maps torch's momentum factor with, so whether the framework's
    momentum weights the old value is what the adapter really does (the check's S3.1 then
    confirms the translation). ``settings``: a framework switch -> what it changes; only
    switches the signature really has are kept."""
    import inspect

    if isinstance(constructor, dict):  # an operator's schema (ONNX): its attribute defaults
        params = {k: inspect.Parameter(k, inspect.Parameter.KEYWORD_ONLY, default=v) for k, v in constructor.items()}
    else:
        params = inspect.signature(constructor).parameters
        if isinstance(constructor, type) and not any(p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
                                                     for p in params.values()):
            # a metaclass __call__ (flax.nnx's modules) hides the constructor's own signature
            params = inspect.signature(constructor.__init__).parameters
    default = lambda name: None if name is None or name not in params else params[name].default  # noqa: E731
    weights = None
    if translate is not None:
        weights = "old" if abs(translate(0.25) - 0.75) < 1e-12 else "new"
    return {"layer": layer, "eps": _plain(default(eps)), "momentum": _plain(default(momentum)),
            "momentum_weights": weights, "float64": float64,
            "settings": {k: v for k, v in (settings or {}).items() if k in params}}


def _plain(value):
    """A signature default as a JSON number (None for a missing or non-numeric one)."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return None
