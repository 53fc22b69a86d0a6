"""Parent-side handle on a candidate: modules made and driven in its child process.

The conformance tests talk to a candidate only through :class:`Candidate` and
:class:`RemoteModule`; what comes back is data (tensors with their metadata, attribute
values, exception names), judged in the parent against the oracle.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from bnspec.candidates.protocol import Capabilities
from bnspec.contract import Contract
from bnspec.isolation import CandidateError, CandidateProcess, CandidateRaised
from bnspec.options import DEFAULT_TIMEOUT
from conformance.outcomes import unsupported


@dataclass
class ForwardResult:
    y: torch.Tensor
    state: dict
    input_modified: bool
    grads: dict = field(default_factory=dict)


class RemoteModule:
    """A module living in the candidate's process."""

    def __init__(self, candidate: "Candidate", handle: int, dims: int) -> None:
        self.candidate, self.handle, self.dims = candidate, handle, dims

    def _call(self, op: str, **args):
        return self.candidate.process.call(op, h=self.handle, **args)

    def forward(self, x: torch.Tensor, *, layout: str = "contiguous", dy: torch.Tensor | None = None,
                no_grad: bool = False) -> ForwardResult:
        extra = {"no_grad": True} if no_grad else {}  # sent only when asked: foreign adapters lack it
        r = self._call("forward", x=x, layout=layout, dy=dy, **extra)
        return ForwardResult(r["y"], r["state"], r["input_modified"], r.get("grads", {}))

    def double_backward(self, x, dy, v: dict, *, layout: str = "contiguous") -> dict:
        return self._call("double_backward", x=x, layout=layout, dy=dy, v=v)

    def train(self, flag: bool = True) -> "RemoteModule":
        self.candidate.require_piece("train/eval")
        self._call("set_training", flag=flag)
        return self

    def eval(self) -> "RemoteModule":
        return self.train(False)

    def describe(self) -> dict:
        return self._call("describe")

    def state(self) -> dict:
        return self.describe()["state"]

    def set_state(self, **values: torch.Tensor) -> dict:
        return self._call("set_state", values=values)

    def set_attr(self, name: str, value) -> None:
        self._call("set_attr", name=name, value=value)

    def reset(self, method: str) -> dict:
        return self._call("reset", method=method)

    def state_dict(self) -> dict:
        return self._call("state_dict")

    def load_state_dict(self, sd: dict) -> dict:
        return self._call("load_state_dict", sd=sd)

    def release(self) -> None:
        try:
            self._call("release")
        except Exception:
            pass


class Candidate:
    """A target (built-in, module:Name, file.py:Name, entry point) for one rank family."""

    def __init__(self, target: str, *, dims: int, device: str = "cpu", timeout: float = DEFAULT_TIMEOUT,
                 dtypes: tuple[str, ...] | None = None, process: CandidateProcess | None = None) -> None:
        """``process``: a child shared with the target's other rank families (default: a new one)."""
        self.target, self.dims, self.device = target, dims, device
        self.process = process or CandidateProcess(target, dims=dims, device=device, timeout=timeout)
        self.narrowed_dtypes = dtypes
        self._caps: Capabilities | None = None
        self._contract: Contract | None = None

    @property
    def id(self) -> str:
        return f"{self.target}-{self.dims}d"

    @property
    def capabilities(self) -> Capabilities:
        if self._caps is None:
            hello = self.process.hello or self.process.start()
            caps = Capabilities.from_dict(hello.get("capabilities", {})).narrowed(dtypes=self.narrowed_dtypes)
            if not self.contract.builds("momentum=None"):
                caps = replace(caps, cumulative=False)
            self._caps = caps
        return self._caps

    @property
    def contract(self) -> Contract:
        """What the candidate can be built with and what its modules have (discovered once per
        process and rank family, in the child, before any clause draws)."""
        if self._contract is None:
            self._contract = discover(self.process, self.dims)
        return self._contract

    @property
    def keeps_running_stats(self) -> bool:
        """Running statistics the suite can read: declared, and registered as buffers."""
        return self.capabilities.running_stats and self.contract.has("running_mean buffer") \
            and self.contract.has("running_var buffer")

    def require_piece(self, *pieces: str) -> None:
        """Skip as "unsupported" when the module lacks a piece of torch's contract (the S5
        contract finding lists it; here it would only repeat that finding)."""
        for piece in pieces:
            if not self.contract.has(piece):
                unsupported(f"{self.target} has no {piece} ({self.contract.why(piece)}; "
                            "listed in the S5.1 contract finding)")

    def require(self, *needs: str, dtype: str | None = None) -> None:
        """Skip as "unsupported" when a declared capability is missing (never a pass)."""
        caps = self.capabilities
        for need in needs:
            if not getattr(caps, need):
                unsupported(f"{self.target} does not provide {need}")
            if need == "running_stats":
                self.require_piece("running_mean buffer", "running_var buffer")
        if dtype is not None and dtype not in caps.dtypes:
            unsupported(f"{self.target} does not provide dtype {dtype}")

    def make(self, num_features: int, **kwargs) -> RemoteModule:
        """A module built the way this candidate can be built: a keyword its constructor lacks
        is left out when it has torch's default (``dtype``: built, then ``.to(dtype)``); a
        value it cannot be built with skips the test as unsupported."""
        kwargs, cast, missing = self.contract.buildable_kwargs(kwargs)
        if missing:
            unsupported(f"{self.target} cannot be built with {missing} "
                        f"({self.contract.why(missing)}; listed in the S5.1 contract finding)")
        extra = {} if cast is None else {"cast_dtype": cast}
        handle = self.process.call("construct", dims=self.dims, num_features=num_features, kwargs=kwargs, **extra)
        return RemoteModule(self, handle, self.dims)

    def signature(self) -> dict:
        return self.process.call("signature", dims=self.dims)

    def raises(self, fn, *args, **kwargs) -> CandidateRaised | None:
        """Run ``fn``; return the candidate's exception, or None when it did not raise."""
        try:
            fn(*args, **kwargs)
        except CandidateRaised as exc:
            return exc
        return None

    def close(self) -> None:
        self.process.close()


def discover(process: CandidateProcess, dims: int) -> Contract:
    """The contract of ``process``'s candidate for one rank family, cached on the process
    (a restarted child loads the same code). Adapters of other frameworks have no
    ``discover``: their declared capabilities are their contract."""
    cache = process.contracts
    if dims not in cache:
        try:
            found = process.call("discover", dims=dims)
        except CandidateError:
            # No discover op (another framework's adapter), or a hang or crash while probing:
            # the clauses meet the candidate as it is and say what happened.
            found = None
        cache[dims] = Contract.from_found(found)
    return cache[dims]
