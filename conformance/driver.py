"""Driving a candidate, the one way every clause does it: draw a case for the candidate,
make a module configured from it (released however the test ends), and turn "it raised" /
"it did not raise" into a verdict with a clear message.

A clause's test reads: draw (:func:`cases_for`), drive (``with configured(...) as d:``),
judge (``judge``, and :func:`legal`, :func:`must_raise`, :func:`judge_running_step` here).
"""

from __future__ import annotations

from typing import Callable

import torch

from bnspec.isolation import CandidateRaised
from conformance import oracle
from conformance import strategies as cs
from conformance.outcomes import unsupported

# ----------------------------------------------------------------------------- draw


def cases_for(candidate, **narrowing):
    """:func:`strategies.cases` for ``candidate``: its rank family, its dtypes (unless
    ``dtypes`` is given) and what it can be built with; ``narrowing`` as for ``cases``."""
    narrowing.setdefault("dtypes", candidate.capabilities.dtypes)
    return cs.cases(dims=candidate.dims, contract=candidate.contract, **narrowing)


def dtypes_for(candidate, wanted: tuple[str, ...], *, lacking: str) -> tuple[str, ...]:
    """The dtypes of ``wanted`` the candidate provides, in ``wanted``'s order; when it provides
    none the test is unsupported: "<target> <lacking>"."""
    have = tuple(d for d in wanted if d in candidate.capabilities.dtypes)
    if not have:
        unsupported(f"{candidate.target} {lacking}")
    return have


# ----------------------------------------------------------------------------- drive


class Driven:
    """A module living in the candidate's process, released when the ``with`` block that
    holds it ends, however it ends (a failure, a skip, the candidate's error).

    ``values``: what was set on it (weight, bias, running statistics, counter);
    ``state``: the state the candidate answered after setting them (None when nothing was set).
    A holder that cannot use a ``with`` block (a state machine across steps) calls
    :meth:`release` itself.
    """

    def __init__(self, module, values: dict | None = None, state: dict | None = None) -> None:
        self.module, self.values, self.state = module, values or {}, state

    @property
    def weight(self) -> torch.Tensor | None:
        """The weight set on the module (None: the case is not affine, or none was set)."""
        return self.values.get("weight")

    @property
    def bias(self) -> torch.Tensor | None:
        return self.values.get("bias")

    @property
    def running(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(running_mean, running_var) set on the module, or None when none were set."""
        v = self.values
        return (v["running_mean"], v["running_var"]) if "running_mean" in v else None

    def held(self) -> dict:
        """The module's state after configuring: set_state's answer; read back (one more call
        to the candidate) only when nothing was set."""
        return self.state if self.state is not None else self.module.state()

    def release(self) -> None:
        self.module.release()

    def __enter__(self) -> Driven:
        return self

    def __exit__(self, *exc_info) -> None:
        self.release()


def made(candidate, num_features: int, **kwargs) -> Driven:
    """A module built with exactly these constructor keywords (none: the constructor's
    defaults); the candidate's raise comes out of this call, before any ``with``."""
    return Driven(candidate.make(num_features, **kwargs))


def set_values(case: cs.Case, *, params: bool = True, running: bool = False,
               count: int | None = None) -> dict[str, torch.Tensor]:
    """What :func:`configured` sets: the case's non-default weight and bias (``params``, where
    affine and bias exist), its running statistics (``running``, when tracked) and the counter
    (``count``, when tracked)."""
    values = {}
    if params and case.affine:
        values["weight"] = case.weight()
        if case.bias:
            values["bias"] = case.bias_values()
    if running and case.track_running_stats:
        values["running_mean"], values["running_var"] = case.running()
    if count is not None and case.track_running_stats:
        values["num_batches_tracked"] = torch.tensor(count, dtype=torch.int64)
    return values


def configured(candidate, case: cs.Case, *, training: bool = True, params: bool = True,
               running: bool = False, count: int | None = None) -> Driven:
    """A module made with ``case``'s constructor keywords, :func:`set_values` set on it (one
    call, none when there is nothing to set), switched to eval unless ``training``.

    Made here, so that a raise while making it comes out of this call (``legal`` and
    ``try`` can wrap it); use the result in a ``with`` block, which releases it.
    """
    values = set_values(case, params=params, running=running, count=count)
    driven = made(candidate, case.channels, **case.module_kwargs())
    try:
        if values:
            driven.state = driven.module.set_state(**values)
        if not training:
            driven.module.eval()
    except BaseException:  # nobody holds it yet: release before the raise goes on
        driven.release()
        raise
    driven.values = values
    return driven


# ----------------------------------------------------------------------------- judge


def first_line(exc: CandidateRaised) -> str:
    """The first line of the candidate's error message, at most 200 characters."""
    text = exc.message.strip().splitlines()
    return text[0][:200] if text else ""


def legal(judge, fn: Callable, *args, what: str, case: cs.Case | None = None, **kwargs):
    """Run ``fn``; a raise from the candidate is a failure ("torch accepts this")."""
    try:
        return fn(*args, **kwargs)
    except CandidateRaised as exc:
        judge.fail(f"{what}: raised {exc.type_name}: {first_line(exc)}; torch accepts this", case=case)


def must_raise(candidate, judge, fn: Callable, *args, what: str, type_name: str | None = None,
               case: cs.Case | None = None, convention: str | None = None, **kwargs) -> CandidateRaised:
    """Run ``fn``; it must raise (an instance of ``type_name`` when given). ``convention``
    names the known deviation a candidate that returns instead follows."""
    exc = candidate.raises(fn, *args, **kwargs)
    if exc is None:
        if convention and judge.accepts(convention):
            return None
        judge.fail(f"no error for {what}: expected {type_name or 'an exception'} (torch raises)", case=case,
                   conventions=(convention,) if convention else ())
    if exc.is_a("WrongOutput"):  # the adapter's complaint, not the candidate's error
        judge.fail(f"no error for {what}: the candidate returned a non-tensor ({first_line(exc)})", case=case)
    if type_name is not None and not exc.is_a(type_name):
        judge.fail(f"{what}: raised {exc.type_name} ({first_line(exc)}), expected {type_name} "
                   f"(torch's type; callers catch it)", case=case)
    return exc


def judge_running_step(judge, case: cs.Case, before: dict, after: dict, mean, var, *, what: str,
                       x=None) -> int:
    """running_mean and running_var after one training step from ``before``, within their
    bounds; a failure names the running-statistics convention it matches. Returns the
    counter expected after the step (for a caller that judges it)."""
    count = oracle.counter(before)
    e_mean, e_var, e_count = oracle.running(case, before["running_mean"], before["running_var"], count, mean, var,
                                            case.count, case.momentum)
    with judge.together():  # both statistics judged, then one failure naming all
        for i, (name, e) in enumerate((("running_mean", e_mean), ("running_var", e_var))):
            judge.close(f"{name} after {what}", after[name], e, case=case,
                        alternatives=oracle.running_conventions(before["running_mean"], before["running_var"], count,
                                                                mean, var, case.count, case.momentum, i, e.value,
                                                                x=x))
    return e_count
