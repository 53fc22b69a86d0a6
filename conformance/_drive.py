"""Small helpers the S6, S7 and G1 tests share: configure a module from a Case, turn
"it raised" / "it did not raise" into a verdict with a clear message, and judge the running
statistics after one step.

Kept private to those tests (candidate for a shared helper module next to the S1 example's
``run_train``).
"""

from __future__ import annotations

from typing import Callable

from bnspec.isolation import CandidateRaised
from conformance import oracle
from conformance import strategies as cs


def configured(candidate, case: cs.Case, *, training: bool = True, running: bool = False,
               **overrides):
    """A module made from ``case`` with its non-default weight/bias (and running statistics
    when ``running``), switched to ``training`` or eval. Returns (module, values set).

    ``overrides`` replace constructor keywords (e.g. ``eps=0.0``).
    """
    m = candidate.make(case.channels, **{**case.module_kwargs(), **overrides})
    values = {}
    if case.affine:
        values["weight"] = case.weight()
        if case.bias:
            values["bias"] = case.bias_values()
    if running and case.track_running_stats:
        values["running_mean"], values["running_var"] = case.running()
    if values:
        m.set_state(**values)
    if not training:
        m.eval()
    return m, values


def first_line(exc: CandidateRaised) -> str:
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
                       x=None) -> None:
    """running_mean and running_var after one training step from ``before``, within their
    bounds; a failure names the running-statistics convention it matches."""
    count = oracle.counter(before)
    expected = oracle.running(case, before["running_mean"], before["running_var"], count, mean, var,
                              case.count, case.momentum)[:2]
    with judge.together():  # both statistics judged, then one failure naming all
        for i, (name, e) in enumerate(zip(("running_mean", "running_var"), expected)):
            judge.close(f"{name} after {what}", after[name], e, case=case,
                        alternatives=oracle.running_conventions(before["running_mean"], before["running_var"], count,
                                                                mean, var, case.count, case.momentum, i, e.value,
                                                                x=x))
