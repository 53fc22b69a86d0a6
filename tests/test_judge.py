"""The judge names what a failing candidate does instead; naming never changes a verdict."""

from __future__ import annotations

import torch

from bnspec import conventions
from conformance import oracle
from conformance import strategies as cs
from conformance.judge import Judge

FLOAT32_WORDS = conventions.CONVENTIONS["float32_for_float64"]


def _float64_case_and_expected():
    """A float64 training case and the suite's own expectation for it (oracle value and bound)."""
    case = cs.Case(shape=(8, 3, 5), dtype="float64", affine=False, seed=3)
    x = case.x()
    expected, _, _ = oracle.train(case, x, None, None)
    return case, x, expected


def test_float64_computed_in_float32_is_named():
    case, x, expected = _float64_case_and_expected()
    from bnspec import reference as R

    in_float32 = R.train_forward(x.float()).y.double()  # what Keras 3 does with float64
    from bnspec import tolerance as T

    assert T.ratio(in_float32, expected.value, expected.bound) > 1  # a failure to explain
    _, names = Judge._explain("y", in_float32, expected, 1e6, None, case)
    assert FLOAT32_WORDS in describe_all(names)


def test_a_wrong_value_is_not_excused_as_float32_rounding():
    case, x, expected = _float64_case_and_expected()
    wrong = expected.value * 1.01
    _, names = Judge._explain("y", wrong, expected, 1e6, None, case)
    assert FLOAT32_WORDS not in describe_all(names)


def test_float32_naming_only_for_float64_cases():
    case, x, expected = _float64_case_and_expected()
    from bnspec import reference as R

    in_float32 = R.train_forward(x.float()).y.double()
    _, names = Judge._explain("y", in_float32, expected, 1e6, None, cs.with_(case, dtype="float32"))
    assert FLOAT32_WORDS not in describe_all(names)


def describe_all(names: list[str]) -> str:
    """What a failure message says the candidate does instead."""
    from bnspec.conventions import describe

    return "; ".join(describe(n) for n in names)


def test_exact_counts_nan_equal_to_nan():
    """A state that is NaN and stays NaN is unchanged (under an accepted nan_stats_empty_batch,
    the running statistics of an empty batch are NaN, and an eval call must keep them)."""
    from conformance.judge import same_values

    nan = float("nan")
    assert same_values(torch.tensor([nan, 1.0]), torch.tensor([nan, 1.0]))
    assert not same_values(torch.tensor([nan, 1.0]), torch.tensor([0.0, 1.0]))
    assert not same_values(torch.tensor([nan, 1.0]), torch.tensor([nan, 2.0]))
    assert not same_values(torch.tensor([1.0]), torch.tensor([1.0, 1.0]))
    assert same_values(torch.tensor([3]), torch.tensor([3])) and not same_values(torch.tensor([3]), torch.tensor([4]))
