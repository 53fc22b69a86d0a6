"""The module contract a candidate was found to have (discovered in its child process).

torch's constructor is ``(num_features, eps=1e-5, momentum=0.1, affine=True,
track_running_stats=True, device=None, dtype=None, *, bias=True)``, and its modules have
``weight``/``bias`` parameters, ``running_mean``/``running_var``/``num_batches_tracked``
buffers, ``reset_running_stats``, ``reset_parameters``, ``state_dict``/``load_state_dict``
and ``train``/``eval`` (specification clause S5). A candidate that lacks some of it is
checked on what it can be built with; what it lacks is one finding (S5.1).
"""

from __future__ import annotations

from dataclasses import dataclass, field

#: torch's constructor defaults: a keyword the candidate lacks may be left out only at these.
DEFAULTS = {"eps": 1e-5, "momentum": 0.1, "affine": True, "track_running_stats": True, "bias": True,
            "device": None, "dtype": None}
#: Keyword value -> the constructor piece that must be present to pass it.
VALUE_PIECES = {("momentum", None): "momentum=None", ("affine", False): "affine=False",
                ("track_running_stats", False): "track_running_stats=False", ("bias", False): "bias=False"}
CONSTRUCTOR_PIECES = ("eps", "momentum", "affine", "track_running_stats", "momentum=None", "affine=False",
                      "track_running_stats=False", "bias=False", "device", "dtype")
INSTANCE_PIECES = ("weight parameter", "bias parameter", "running_mean buffer", "running_var buffer",
                   "num_batches_tracked buffer", "reset_running_stats", "reset_parameters", "state_dict",
                   "load_state_dict", "train/eval")


@dataclass(frozen=True)
class Contract:
    """``missing`` maps each absent piece to why (the probe's error); ``discovered`` is False
    for candidates that declare their capabilities instead (other frameworks' adapters)."""

    missing: dict = field(default_factory=dict)
    discovered: bool = False
    unbuildable: str | None = None  #: ``Name(4)`` itself raised

    @classmethod
    def from_found(cls, found: dict | None) -> "Contract":
        if not isinstance(found, dict):
            return cls()
        missing = {}
        for part in ("constructor", "instance"):
            pieces = found.get(part)
            if isinstance(pieces, dict):
                missing.update({str(k): str(v) for k, v in pieces.items() if v is not None})
        if found.get("unbuildable"):
            missing.update({p: "the module could not be built to look" for p in INSTANCE_PIECES})
        return cls(missing=missing, discovered=True, unbuildable=found.get("unbuildable"))

    def has(self, piece: str) -> bool:
        return piece not in self.missing

    def builds(self, piece: str) -> bool:
        """The constructor accepts ``piece`` (a keyword, or a keyword=value like ``bias=False``)."""
        return piece not in self.missing and piece.partition("=")[0] not in self.missing

    def why(self, piece: str) -> str:
        return self.missing.get(piece) or self.missing.get(piece.partition("=")[0], "")

    def buildable_kwargs(self, kwargs: dict) -> tuple[dict, str | None, str | None]:
        """(keywords to pass, dtype to cast to after building or None, the piece that makes it
        unbuildable or None)."""
        out, cast = {}, None
        for key, value in kwargs.items():
            piece = VALUE_PIECES.get((key, value)) if isinstance(value, (bool, type(None))) else None
            if piece is not None and not self.builds(piece):
                return kwargs, None, piece
            if key not in DEFAULTS or self.builds(key):
                out[key] = value
            elif key == "dtype":
                cast = value if isinstance(value, str) else str(value).removeprefix("torch.")
            elif not _same(value, DEFAULTS[key]):
                return kwargs, None, key
        return out, cast, None

    def to_dict(self) -> dict:
        return {"discovered": self.discovered, "missing": dict(self.missing), "unbuildable": self.unbuildable,
                "summary": self.summary()}

    def summary(self) -> str:
        """One line listing every missing piece."""
        if self.unbuildable:
            return f"cannot be built: {self.unbuildable}"
        ctor = [p for p in CONSTRUCTOR_PIECES if p in self.missing]
        inst = [p for p in INSTANCE_PIECES if p in self.missing]
        parts = []
        if ctor:
            parts.append("the constructor lacks " + ", ".join(ctor))
        if inst:
            parts.append("the module lacks " + ", ".join(inst))
        return "; ".join(parts)


def _same(a, b) -> bool:
    return type(a) is type(b) and a == b
