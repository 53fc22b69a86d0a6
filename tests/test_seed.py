"""The seed document's worked examples (bnspec.seed.EXAMPLES) as golden cases (S1).

The document runs ``nn.BatchNorm2d(3)`` (training mode, defaults) on
``arange(12).view(1, 3, 2, 2)`` and ``arange(24).view(2, 3, 2, 2)`` in float32 and prints
4 decimals; it then checks channel 0 by hand with eps *outside* the square root.

Exact rounding. ``round(y * 1e4) / 1e4`` in float64 equals the printed value bit for bit
when it rounds to the same 4-decimal number (both are the double nearest k / 1e4). For
the float32 output ``y`` that is guaranteed, not lucky, when the float64 oracle lies
further from every rounding boundary ``(k + 1/2) * 1e-4`` than the float32 error bound;
the tests check that margin first. The float32 error bound (the "slack") is the one of
tests/test_reference.py: ``K * (u32 + u32 * sqrt(n)) * (1 + scale)``, K = 4, n = 4 or 8
values per channel, scale = ``|x - mean| / sqrt(var + eps)`` (at most 1.35 here): ~2e-6.
"""

from __future__ import annotations

import math

import pytest
import torch

import bnspec
from bnspec import reference as R
from bnspec.seed import EPS, EXAMPLES, seed_hand_check

F32, F64 = torch.float32, torch.float64
U32, U64 = torch.finfo(F32).eps / 2, torch.finfo(F64).eps / 2
K = 4  # as K_FORWARD in test_reference.py (a handful of float32 roundings per output)
IDS = ["one-sample", "two-samples"]


def _round4(t: torch.Tensor) -> torch.Tensor:
    return torch.round(t.to(F64) * 1e4) / 1e4


def _float32_slack(x: torch.Tensor, oracle: torch.Tensor) -> torch.Tensor:
    """Elementwise float32 error bound of a BatchNorm output (weight 1, bias 0)."""
    n = x.numel() // x.shape[1]
    return K * (U32 + U32 * math.sqrt(n)) * (1 + oracle.abs())


def _boundary_margin(v: torch.Tensor) -> torch.Tensor:
    """Distance of v from the nearest 4-decimal rounding boundary (k + 1/2) * 1e-4."""
    frac = (v.to(F64) * 1e4) - torch.floor(v.to(F64) * 1e4)
    return (frac - 0.5).abs() * 1e-4


@pytest.mark.parametrize("ex", EXAMPLES, ids=IDS)
def test_seed_example_input_and_printed_values(ex):
    x = ex.input()
    assert x.dtype == F32 and x.shape == ex.shape
    assert torch.equal(x.flatten(), torch.arange(x.numel(), dtype=F32))
    assert ex.expected_output().shape == ex.shape and ex.expected_output().dtype == F64


@pytest.mark.parametrize("cls", [bnspec.BatchNorm2d, torch.nn.BatchNorm2d], ids=["bnspec", "torch"])
@pytest.mark.parametrize("ex", EXAMPLES, ids=IDS)
def test_S1_seed_outputs_round_to_printed(ex, cls):
    x = ex.input()
    m = cls(3)  # defaults, training mode, as in the document
    y = m(x)
    assert y.dtype == F32 and y.shape == x.shape
    oracle = R.train_forward(x, mode="oracle").y
    slack = _float32_slack(x, oracle)
    assert slack.max() < 3e-6  # the derivation above: K * u32 * (1 + sqrt(8)) * 2.35
    # the oracle is further from every rounding boundary than y can be from the oracle,
    # so y must round like the oracle
    assert bool((_boundary_margin(oracle) > slack).all())
    assert bool(((y.to(F64) - oracle).abs() <= slack).all())
    assert torch.equal(_round4(oracle), ex.expected_output())
    assert torch.equal(_round4(y), ex.expected_output())
    # equivalently: |y - printed| <= 0.5e-4 + float32 slack
    assert bool(((y.to(F64) - ex.expected_output()).abs() <= 0.5e-4 + slack).all())


@pytest.mark.parametrize("ex", EXAMPLES, ids=IDS)
def test_S1_seed_channel0_statistics(ex):
    x = ex.input()
    for mode in ("native", "oracle"):
        mean, var = R.batch_stats(x, mode=mode)
        # small integers: sums, squares and the divisions by 4 or 8 are exact in binary
        assert mean[0].item() == ex.channel0_mean and var[0].item() == ex.channel0_var
    ch0 = x[:, 0]
    assert ch0.mean().item() == ex.channel0_mean
    assert torch.var(ch0, unbiased=False).item() == ex.channel0_var  # as the document does
    # every channel is channel 0 shifted by 4 * k: same variance, so the same output
    _, var = R.batch_stats(x, mode="oracle")
    assert torch.equal(var, torch.full((3,), ex.channel0_var, dtype=F64))


@pytest.mark.parametrize("ex", EXAMPLES, ids=IDS)
def test_S3_seed_running_statistics_agree_with_torch(ex):
    x = ex.input()
    t, b = torch.nn.BatchNorm2d(3), bnspec.BatchNorm2d(3)
    t(x), b(x)
    n = x.numel() // 3
    mean, var = R.batch_stats(x, mode="oracle")
    want_mean, want_var = 0.1 * mean, 0.9 + 0.1 * var * n / (n - 1)  # unbiased
    for m in (t, b):
        assert int(m.num_batches_tracked) == 1
        # 0.1 * mean and 0.9 + 0.1 * var * n/(n-1): ~4 float32 roundings of values < 6
        assert bool(((m.running_mean.to(F64) - want_mean).abs() <= 4 * U32 * (1 + want_mean.abs())).all())
        assert bool(((m.running_var.to(F64) - want_var).abs() <= 4 * U32 * (1 + want_var.abs())).all())


def _hand_and_true(ex):
    """The document's hand check of channel 0 and the true BatchNorm value (float64)."""
    x = ex.input()
    ch0 = x[:, 0]
    hand = seed_hand_check(ch0, ex.channel0_mean, ex.channel0_var)
    true = R.train_forward(x, mode="oracle").y[:, 0]
    return ch0.to(F64), hand, true


@pytest.mark.parametrize("ex", EXAMPLES, ids=IDS)
def test_seed_hand_check_rounds_to_printed(ex):
    ch0, hand, _ = _hand_and_true(ex)
    assert hand.dtype == F64 and hand.shape == ch0.shape
    printed = torch.tensor(ex.printed_hand_check, dtype=F64)
    got = hand.flatten()[: printed.numel()].reshape(printed.shape)
    # hand is float64 arithmetic on exact inputs (a few roundings of values < 2), so its
    # distance from the rounding boundaries needs only a float64-sized margin
    assert bool((_boundary_margin(got) > 1e-12).all())
    assert torch.equal(_round4(got), printed)


@pytest.mark.parametrize("ex", EXAMPLES, ids=IDS)
def test_seed_hand_check_differs_from_batchnorm_in_6th_decimal(ex):
    ch0, hand, true = _hand_and_true(ex)
    mean = torch.tensor(ex.channel0_mean, dtype=F64)
    var = torch.tensor(ex.channel0_var, dtype=F64)
    s = torch.sqrt(var)
    # the difference of the two formulas, exactly: (x - mean) * (1/(s + eps) - 1/sqrt(var + eps))
    predicted = (ch0 - mean) * (1 / (s + EPS) - 1 / torch.sqrt(var + EPS))
    observed = hand - true
    # Both sides are differences of values of size |x - mean| / s <= 1.35 that each carry
    # a few float64 roundings (true also a reduction over n = 4 or 8 values):
    # the cancellation leaves an absolute error of a small multiple of u64 * n * |x - mean| / s.
    n = ex.input().numel() // 3
    tol = 8 * U64 * n * (1 + (ch0 - mean).abs() / s)
    assert bool(((observed - predicted).abs() <= tol).all())
    # First order in eps: 1/(s+eps) - 1/sqrt(var+eps) = (eps/var) (1/(2s) - 1) + O(eps^2/var^1.5)
    first_order = (ch0 - mean) * (EPS / var) * (1 / (2 * s) - 1)
    assert bool(((predicted - first_order).abs() <= (ch0 - mean).abs() * 2 * EPS**2 / var**1.5 + tol).all())
    # Its size: |x - mean|_max * eps/var * |1/(2s) - 1| = 6.6e-6 (example one), 1.9e-6
    # (example two): invisible at the printed 4 decimals, visible in the 6th.
    biggest = observed.abs().max().item()
    expected_biggest = ((ch0 - mean).abs().max() * (EPS / var) * (1 - 1 / (2 * s)).abs()).item()
    assert abs(biggest - expected_biggest) <= 1e-3 * expected_biggest  # first order: eps/var ~ 1e-5
    assert 1e-6 <= biggest < 0.5e-4
    # never zero off the mean: the hand check is not BatchNorm
    assert bool((observed[ch0 != mean].abs() > 0).all())
    # and the true value is torch's BatchNorm (float64 run of torch on the same input)
    t = torch.nn.BatchNorm2d(3, dtype=F64)(ex.input().to(F64))[:, 0]
    assert bool(((t - true).abs() <= tol).all())
