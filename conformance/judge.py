"""Judging: compare with the oracle, record error/bound, explain a failure.

A failure message names the clause, the compared quantity, the worst element, what
the candidate does instead when that matches a known convention, and a paste-able
reproduction of the case.
"""

from __future__ import annotations

import contextlib
import math
from typing import Callable

import pytest
import torch
from torch import Tensor

from bnspec import tolerance as T
from bnspec.conventions import atoms, describe
from bnspec.isolation.wire import meta
from conformance.oracle import Expected
from conformance.strategies import Case


class ConformanceFailure(AssertionError):
    """A candidate's result differs from the specification. ``case`` is the drawn case (when
    the test has one) and ``conventions`` the known conventions the result matches instead."""

    def __init__(self, message: str, *, case: Case | None = None, conventions: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.case, self.conventions = case, tuple(conventions)


def accepted_names(raw: str | None) -> frozenset[str]:
    """``--accept a,b`` as a set of convention names (unknown names are a usage error upstream)."""
    return frozenset(n.strip() for n in (raw or "").split(",") if n.strip())


#: Failures named in words that are a convention's formula: under ``stats_by_grad_mode`` an
#: eval backward with autograd on is the training-mode backward.
ALIASES = {"batch statistics in eval (the training-mode backward)": "stats_by_grad_mode"}


def covered(name: str, accept: frozenset[str]) -> bool:
    """A (possibly combined, ``a+b``) convention every part of which the user accepted."""
    return bool(accept) and any(all(ALIASES.get(part, part) in accept for part in alt) for alt in atoms(name))


class Judge:
    """Per-test judge; records the worst error/bound on the test item.

    ``accept``: conventions the user accepted (``--accept``). A comparison that fails
    torch's formula but matches an accepted convention's formula within the same bound
    passes, and the item records the convention under ``accepted``."""

    def __init__(self, item: pytest.Item, accept: frozenset[str] | None = None) -> None:
        self.item = item
        self.worst = 0.0
        self.worst_by_dtype: dict[str, float] = {}  #: keyed by the case's input dtype (accuracy report)
        if accept is None:
            config = getattr(item, "config", None)
            accept = accepted_names(config.getoption("--bn-accept", None) if config is not None else None)
        self.accept = accept
        self.accepted: set[str] = set()
        self._held: list[ConformanceFailure] | None = None

    @contextlib.contextmanager
    def together(self):
        """Value comparisons (``close``) inside fail once, at the end, with every message and
        every convention: a convention that changes two quantities (running mean and
        variance) is named for both."""
        self._held = held = []
        try:
            yield
        finally:
            self._held = None
        if held:
            names = tuple(dict.fromkeys(c for f in held for c in f.conventions))
            raise ConformanceFailure("\n".join(str(f) for f in held), case=held[0].case, conventions=names)

    def accepts(self, name: str) -> bool:
        """True (and recorded) when the user accepted convention ``name``."""
        if covered(name, self.accept):
            alt = next(a for a in atoms(name) if all(ALIASES.get(p, p) in self.accept for p in a))
            self.accepted.update(ALIASES.get(p, p) for p in alt)
            props = [p for p in self.item.user_properties if p[0] != "accepted"]
            self.item.user_properties[:] = [*props, ("accepted", sorted(self.accepted))]
            return True
        return False

    def _record(self, ratio: float, case: Case | None = None) -> None:
        if ratio > self.worst or math.isnan(ratio):
            self.worst = ratio
        if case is not None:
            old = self.worst_by_dtype.get(case.dtype, 0.0)
            if ratio > old or math.isnan(ratio):
                self.worst_by_dtype[case.dtype] = ratio
        keys = ("error_over_bound", "error_over_bound_by_dtype")
        props = [p for p in self.item.user_properties if p[0] not in keys]
        props += [("error_over_bound", self.worst), ("error_over_bound_by_dtype", dict(self.worst_by_dtype))]
        self.item.user_properties[:] = props

    def fail(self, message: str, *, case: Case | None = None, conventions: tuple[str, ...] = ()) -> None:
        raise _failure(message, case, conventions)

    def check(self, condition: bool, message: str, *, case: Case | None = None) -> None:
        if not condition:
            self.fail(message, case=case)

    def tensor(self, what: str, observed: object, *, shape=None, dtype: torch.dtype | None = None,
               device: str | None = None, case: Case | None = None) -> Tensor:
        """Check it is a tensor with the given shape, dtype, device; return it."""
        if not isinstance(observed, Tensor):
            self.fail(f"{what}: expected a tensor, got {observed!r:.80}", case=case)
        m = meta(observed)
        if shape is not None and tuple(observed.shape) != tuple(shape):
            self.fail(f"{what}: shape {tuple(observed.shape)}, expected {tuple(shape)}", case=case)
        if dtype is not None and observed.dtype != dtype:
            self.fail(f"{what}: dtype {observed.dtype}, expected {dtype}", case=case)
        if device is not None and m.get("device") and torch.device(m["device"]).type != torch.device(device).type:
            self.fail(f"{what}: on device {m['device']}, expected {device}", case=case)
        return observed

    def close(self, what: str, observed: object, expected: Expected, *, case: Case,
              alternatives: Callable[[], dict[str, Tensor]] | None = None) -> float:
        """``max |observed - oracle| / bound <= 1``, special values matching exactly."""
        obs = self.tensor(what, observed, shape=expected.value.shape, case=case)
        ratio = T.ratio(obs, expected.value, expected.bound)
        if ratio <= 1.0:
            self._record(ratio, case)
            return ratio
        message, matches = self._explain(what, obs, expected, ratio, alternatives, case)
        ok = [m for m in matches if self.accepts(m)]
        if ok:  # judged against the accepted convention's own formula, within the same bound
            self._record(self._own_ratio(obs, expected, alternatives, ok[0]), case)
            return ratio
        self._record(ratio, case)
        # Several matches of one comparison are alternatives: any of them explains it.
        names = ("|".join(matches),) if matches else ()
        if self._held is None:
            raise _failure(message, case, names)
        self._held.append(_failure(message, case, names))
        return ratio

    @staticmethod
    def _own_ratio(obs: Tensor, expected: Expected, alternatives, name: str) -> float:
        """error/bound against the accepted convention's formula (what the record shows)."""
        try:
            alts = alternatives() if alternatives is not None else {}
        except Exception:  # noqa: BLE001 - it was computed once already to name the match
            alts = {}
        if name.startswith("float32_for_float64"):
            # matched by _computed_in_float32: float32's rounding, of torch's formula or of the other part's
            other = name.partition("+")[2]
            target = alts[other] if other in alts else expected.value
            return T.ratio(obs.double(), target, expected.bound * _FLOAT32_OVER_FLOAT64)
        if name in alts:
            return T.ratio(obs.double(), alts[name], alternative_bound(expected.bound, alts[name], obs.dtype))
        return T.ratio(obs.double(), expected.value, expected.bound * _FLOAT32_OVER_FLOAT64)

    def exact(self, what: str, observed: object, expected: object, *, case: Case | None = None) -> None:
        """Exactly ``expected``; for tensors, NaN where it has NaN (a state left NaN by an
        empty batch under an accepted convention is unchanged when it stays NaN)."""
        ok = (same_values(observed, expected) if isinstance(expected, Tensor) and isinstance(observed, Tensor)
              else observed == expected)
        self._record(0.0 if ok else math.inf, case)
        if not ok:
            self.fail(f"{what}: got {observed!r:.200}, expected {expected!r:.200}", case=case)

    @staticmethod
    def _explain(what, obs: Tensor, expected: Expected, ratio: float, alternatives,
                 case: Case | None = None) -> tuple[str, list[str]]:
        """The failure's message and the conventions whose formula the result matches."""
        o, e, b = obs.double(), expected.value, expected.bound.expand_as(expected.value)
        if math.isinf(ratio):
            bad = (torch.isnan(o) != torch.isnan(e)) | (torch.isfinite(e) & ~torch.isfinite(o)) | \
                  (~torch.isfinite(e) & ~torch.isnan(e) & (o != e))
        else:
            q = torch.where(torch.isfinite(e), (o - e).abs() / b.clamp_min(1e-300), torch.zeros_like(e))
            bad = q == q.max()
        idx = tuple(int(i) for i in bad.nonzero()[0]) if bad.any() else ()
        at = (f" at index {idx}: got {o[idx].item():.9g}, expected {e[idx].item():.9g} "
              f"(bound {b[idx].item():.3g})") if idx else ""
        msg = f"{what}: error/bound = {ratio:.3g}{at}"
        if math.isinf(ratio):
            msg += " (a NaN/inf where the oracle has none, or a missing one)"
        try:
            alts = alternatives() if alternatives is not None else {}
        except Exception as exc:  # noqa: BLE001 - naming must never change or hide the verdict
            msg += f"\n  (the suite could not compute the known conventions to name this: {type(exc).__name__}: {exc})"
            alts = {}
        matches = [name for name, alt in alts.items()
                   if T.ratio(o, alt, alternative_bound(expected.bound, alt, obs.dtype)) <= 1.0]
        if not matches and case is not None and case.dtype == "float64":
            matches = _computed_in_float32(o, e, expected.bound, alts)
        return msg, matches


def same_values(observed: Tensor, expected: Tensor) -> bool:
    """Equal shape and values, NaN counted equal to NaN (``torch.equal`` says NaN != NaN)."""
    if observed.shape != expected.shape:
        return False
    if torch.equal(observed, expected):
        return True
    if not (observed.is_floating_point() and expected.is_floating_point()):
        return False
    nan = observed.isnan()
    return torch.equal(nan, expected.isnan()) and torch.equal(observed[~nan], expected[~nan])


def _failure(message: str, case: Case | None, conventions: tuple[str, ...]) -> ConformanceFailure:
    """The failure with what the candidate does instead and a paste-able reproduction."""
    if conventions:
        message += "\n  what it does instead: " + "; ".join(describe(c) for c in conventions)
    if case is not None:
        message += f"\n  reproduce: {case.repro()}"
    return ConformanceFailure(message, case=case, conventions=conventions)


def alternative_bound(bound: Tensor, alternative: Tensor, dtype: torch.dtype) -> Tensor:
    """The bound an alternative formula is matched within: the clause's, plus the rounding of
    the alternative's own result in the candidate's dtype (C1 roundings of its size). The
    clause's bound alone fits torch's formula: where a blend gives torch's result a tiny
    weight (a cumulative factor of 1/2**31), it is far below the alternative's own rounding."""
    own = T.C1 * T.unit_roundoff(dtype if dtype.is_floating_point else torch.float64) * alternative.abs()
    return bound + torch.where(torch.isfinite(own), own, torch.zeros_like(own))


#: How much wider float32's rounding is than float64's: the bound of a float64 case,
#: widened by it, is what the same computation done in float32 may be off by.
_FLOAT32_OVER_FLOAT64 = torch.finfo(torch.float32).eps / torch.finfo(torch.float64).eps


def _computed_in_float32(o: Tensor, e: Tensor, bound: Tensor, alts: dict[str, Tensor]) -> list[str]:
    """Names for a float64 result that is right, or follows a convention, only up to float32
    rounding (Keras 3 computes float64 in float32). Used to name a failure, never to pass one.
    An alternative counts only where it differs from the oracle by more than that rounding."""
    wide = bound * _FLOAT32_OVER_FLOAT64
    if T.ratio(o, e, wide) <= 1.0:
        return ["float32_for_float64"]
    return [f"float32_for_float64+{name}" for name, alt in alts.items()
            if T.ratio(alt, e, wide) > 1.0 and T.ratio(o, alt, wide) <= 1.0]
