"""The plugin's record fields: a verdict read from the outcome and the exception's type,
never from a message; the reason in one line; the number of distinct failures."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from hypothesis.errors import FlakyFailure

from bnspec.pytest_plugin import verdict_fields
from bnspec.results import clause_reason, clause_verdicts
from conformance.outcomes import NotApplicable, Unsupported


def _outcome(exc: BaseException | None, *, outcome: str = "failed", when: str = "call"):
    report = SimpleNamespace(passed=outcome == "passed", skipped=outcome == "skipped", failed=outcome == "failed",
                             when=when, longrepr=None, longreprtext="")
    call = SimpleNamespace(excinfo=None if exc is None else SimpleNamespace(value=exc))
    return report, call


def test_a_skips_verdict_comes_from_its_type_not_its_message():
    # the messages say the opposite of the types: only the type counts
    na, _ = _outcome(None, outcome="skipped")
    fields = verdict_fields(na, _outcome(NotApplicable("unsupported: looks like one"))[1], {})
    assert fields == {"verdict": "n/a", "reason": "unsupported: looks like one", "failures": 0}
    fields = verdict_fields(na, _outcome(Unsupported("not applicable: looks like one"))[1], {})
    assert fields["verdict"] == "unsupported"
    assert verdict_fields(na, _outcome(pytest.skip.Exception("plain skip"))[1], {})["verdict"] == "unsupported"


def test_failures_are_counted_from_the_exceptions():
    group = BaseExceptionGroup("found", [AssertionError("first\n  more"), AssertionError("second")])
    fields = verdict_fields(*_outcome(group), {})
    assert fields == {"verdict": "fail", "reason": "first", "failures": 2}
    flaky = FlakyFailure("flaky", [AssertionError("once")])
    assert verdict_fields(*_outcome(flaky), {})["reason"] == "flaky (passed when repeated): once"
    assert verdict_fields(*_outcome(AssertionError("x"), when="setup"), {})["verdict"] == "error"
    assert verdict_fields(*_outcome(AssertionError("x")), {"not_run": True})["verdict"] == "not run"
    assert verdict_fields(*_outcome(None, outcome="passed"), {}) == {"verdict": "pass", "reason": "", "failures": 0}


def test_the_clause_reason_reads_the_fields():
    rec = {"clause": "S1.1", "verdict": "fail", "reason": "y: error/bound = 3", "failures": 3, "dims": 2,
           "detail": "3 distinct failures:\ny: error/bound = 3\n...", "error_over_bound": 3.0}
    (clause,) = clause_verdicts([rec], command="bnspec check x")
    assert clause["reason"] == "y: error/bound = 3" and clause["failures"] == 3
    assert clause_reason(clause) == "y: error/bound = 3 (first of 3 distinct failures)"
    old = {"title": "t", "detail": "2 distinct failures:\nfirst\nsecond"}  # written before the reason field
    assert clause_reason(old) == "first (first of 2 distinct failures)"
