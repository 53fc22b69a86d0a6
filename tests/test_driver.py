"""conformance.driver: a driven module is released however the test ends, and configuring
sends exactly the calls the clauses were written against."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings

from bnspec.contract import Contract
from bnspec.isolation import CandidateRaised
from conformance import driver
from conformance import strategies as cs


class FakeModule:
    """Records every call, as the candidate's process would receive them."""

    def __init__(self, calls: list, fail_on: str | None = None) -> None:
        self.calls, self.fail_on = calls, fail_on

    def _record(self, op: str, result=None):
        self.calls.append(op)
        if op == self.fail_on:
            raise CandidateRaised("ValueError", ["ValueError"], "refused", op)
        return result

    def set_state(self, **values):
        return self._record("set_state", {"set": sorted(values)})

    def state(self):
        return self._record("state", {"read": True})

    def eval(self):
        return self._record("eval")

    def release(self):
        self._record("release")


def fake_candidate(fail_on: str | None = None):
    calls: list = []
    return SimpleNamespace(calls=calls, make=lambda n, **kw: calls.append("construct") or FakeModule(calls, fail_on))


CASE = cs.Case(shape=(4, 3, 2), affine=True, bias=True, track_running_stats=True)


def test_configured_sets_values_in_one_call_and_releases_on_leaving():
    candidate = fake_candidate()
    with driver.configured(candidate, CASE, training=False, running=True, count=5) as d:
        assert d.held() == {"set": ["bias", "num_batches_tracked", "running_mean", "running_var", "weight"]}
        assert torch.equal(d.weight, CASE.weight()) and torch.equal(d.running[1], CASE.running()[1])
    assert candidate.calls == ["construct", "set_state", "eval", "release"]


def test_released_when_the_test_fails_inside():
    candidate = fake_candidate()
    with pytest.raises(AssertionError):
        with driver.configured(candidate, CASE):
            raise AssertionError("a failing judgment")
    assert candidate.calls[-1] == "release"


def test_released_when_configuring_raises():
    candidate = fake_candidate(fail_on="set_state")
    with pytest.raises(CandidateRaised):
        driver.configured(candidate, CASE)
    assert candidate.calls == ["construct", "set_state", "release"]


def test_nothing_to_set_reads_the_state_once():
    candidate = fake_candidate()
    bare = cs.with_(CASE, affine=False, track_running_stats=False)
    with driver.configured(candidate, bare, running=True) as d:
        assert d.values == {} and d.weight is None and d.running is None
        assert d.held() == {"read": True}
    assert candidate.calls == ["construct", "state", "release"]


@settings(max_examples=20, database=None)
@given(case=driver.cases_for(SimpleNamespace(dims=3, contract=Contract(missing={"affine": "no"}),
                                             capabilities=SimpleNamespace(dtypes=("float64",)))))
def test_cases_for_draws_the_candidates_family_dtypes_and_contract(case):
    assert len(case.shape) == 5 and case.dtype == "float64" and case.affine
