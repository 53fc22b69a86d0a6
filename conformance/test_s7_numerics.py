"""S7: numerics (half-precision reductions, ill-conditioned data, special values, mixed
dtypes), judged against the float64 oracle with the bounds of bnspec.tolerance."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import pytest
import torch
from hypothesis import Phase, given, settings
from hypothesis import strategies as st

from bnspec import conventions
from conformance import driver, oracle
from conformance import strategies as cs
from conformance.driver import judge_running_step, legal
from conformance.oracle import Expected


def _dtypes(candidate, wanted: tuple[str, ...], why: str) -> tuple[str, ...]:
    return driver.dtypes_for(candidate, wanted, lacking=f"provides none of {', '.join(wanted)} ({why})")


def _forward(candidate, judge, case: cs.Case, what: str, *, training: bool = True, running: bool = False):
    """One forward of a module configured from ``case``; returns (x, values, out, before)."""
    with driver.configured(candidate, case, training=training, running=running) as d:
        before = d.module.state()
        x = case.x()
        out = legal(judge, d.module.forward, x, layout=case.layout, what=what, case=case)
    return x, d.values, out, before


# ----------------------------------------------------------------------------- S7.1

#: values per channel of the long reductions: long enough that accumulating in the input's
#: half precision (u = 2^-11 or 2^-8) errs far beyond float32's bound, few enough to stay fast
LONG_COUNTS = (1024, 4096, 16384)


@st.composite
def long_shapes(draw, *, dims: int) -> tuple[int, ...]:
    """A shape of BatchNorm{dims}d with n in LONG_COUNTS values per channel and C in 1..3."""
    n = draw(st.sampled_from(LONG_COUNTS), label="values_per_channel")
    c = draw(st.integers(1, 3), label="channels")
    rank = draw(st.sampled_from(cs.RANKS_BY_DIMS[dims]), label="rank")
    if rank == 2:
        return (n, c)
    batch = draw(st.sampled_from([1, 2, 4, 16]), label="batch")
    left = int(math.log2(n // batch))
    spatial = []
    for _ in range(rank - 3):
        e = draw(st.integers(0, left), label="spatial_log2")
        spatial.append(2 ** e)
        left -= e
    return (batch, c, *spatial, 2 ** left)


@pytest.mark.clause("S7.1")
# A third of the profile's examples (at least 4), and no shrinking: each example sends up
# to 49k values, and shrinking a failure took minutes; the first failing example is
# reported as drawn (with its paste-able reproduction).
@settings(max_examples=max(4, settings.default.max_examples // 3),
          phases=(Phase.explicit, Phase.reuse, Phase.generate))
@given(data=st.data())
def test_half_precision_reduced_in_float32(candidate, judge, data):
    candidate.require("forward")
    low = _dtypes(candidate, cs.LOW_PRECISION, "the clause is about half-precision inputs")
    case = data.draw(driver.cases_for(candidate, dtypes=low, dists=("normal", "offset")), label="case")
    case = cs.with_(case, shape=data.draw(long_shapes(dims=candidate.dims), label="shape"))
    if case.layout == "channels_last" and len(case.shape) < 4:
        case = cs.with_(case, layout="contiguous")
    x, values, out, before = _forward(candidate, judge, case, f"{case.dtype} training forward")
    judge.tensor("training output y", out.y, shape=case.shape, dtype=case.tdtype, case=case)
    # The bound uses float32's roundoff for the reductions (tolerance.compute_dtype):
    # accumulating n values in the input's half precision fails it.
    expected, _, _ = oracle.train(case, x, values.get("weight"), values.get("bias"))
    judge.close(f"training output y ({case.dtype}, {case.count} values per channel)", out.y, expected, case=case,
                alternatives=oracle.named_train(x, values.get("weight"), values.get("bias"), eps=case.eps,
                                                before=before))


# ----------------------------------------------------------------------------- S7.2


@pytest.mark.clause("S7.2")
@given(data=st.data())
def test_ill_conditioned_within_bound(candidate, judge, data):
    candidate.require("forward")
    dtypes = _dtypes(candidate, ("float32", "float64"), "the clause's bound is for full precision")
    case = data.draw(driver.cases_for(candidate, dtypes=dtypes,
                                      dists=("offset", "tiny_var", "near_eps", "constant")), label="case")
    x, values, out, before = _forward(candidate, judge, case, f"training forward ({case.dist})")
    w, b = values.get("weight"), values.get("bias")
    expected, _, _ = oracle.train(case, x, w, b)
    judge.close(f"training output y ({case.dist} data)", out.y, expected, case=case,
                alternatives=lambda: conventions.train_forward_alternatives(x, w, b, eps=case.eps,
                                                                           running=oracle.running_of(before)))


def _far_offset_case(dims: int, dtype: str) -> cs.Case:
    """A fixed "offset" case whose largest channel mean is >= 5e3 with unit std.

    The seed is the first that gives such a channel (make_values draws the offsets
    10^(1..4) from the seed), so the case is reproducible and the claim checked below.
    """
    shape = {1: (512, 3), 2: (8, 3, 6, 6), 3: (4, 3, 4, 4, 6)}[dims]
    for seed in range(1000):
        case = cs.Case(shape=shape, dtype=dtype, dist="offset", seed=seed)
        if float(case.x().double().mean(dim=[0, *range(2, len(shape))]).abs().max()) >= 5e3:
            return case
    raise AssertionError("no seed below 1000 gives an offset >= 5e3: strategies.make_values changed")


@pytest.mark.clause("S7.2")
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_offset_1e4_unit_std(candidate, judge, dtype):
    """A fixed worst case (|mean|/std ~ 1e4) that one-pass E[x^2]-E[x]^2 cannot meet."""
    candidate.require("forward", dtype=dtype)
    case = _far_offset_case(candidate.dims, dtype)
    x, values, out, before = _forward(candidate, judge, case, f"training forward (offset ~1e4, {dtype})")
    w, b = values.get("weight"), values.get("bias")
    expected, _, _ = oracle.train(case, x, w, b)
    judge.close("training output y (offset ~1e4, unit std)", out.y, expected, case=case,
                alternatives=lambda: conventions.train_forward_alternatives(x, w, b, eps=case.eps,
                                                                           running=oracle.running_of(before)))


# ----------------------------------------------------------------------------- S7.3


@dataclass(frozen=True)
class SpecialValueCase(cs.Case):
    """A :class:`Case` whose input holds one special value in channel 0, at ``index``
    (a flat index into channel 0's ``(N, *spatial)`` values)."""

    special: str = "nan"  #: "nan", "inf" or "-inf"
    index: int = 0

    def x(self) -> torch.Tensor:
        x = super().x()
        where = torch.unravel_index(torch.tensor(self.index), (self.shape[0], *self.shape[2:]))
        x[(int(where[0]), 0, *(int(i) for i in where[1:]))] = float(self.special)
        return x

    def repro(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in asdict(self).items())
        return (f"from conformance.test_s7_numerics import SpecialValueCase; "
                f"case = SpecialValueCase({fields}); x = case.x()")


def _other_channels(e: Expected) -> Expected:
    return Expected(e.value[1:], e.bound.expand_as(e.value)[1:])


@pytest.mark.clause("S7.3")
@given(data=st.data())
def test_special_values_stay_in_their_channel(candidate, judge, data):
    candidate.require("forward")
    base = data.draw(driver.cases_for(candidate, dists=("normal",)),
                     label="case")
    if base.channels < 2:
        base = cs.with_(base, shape=(base.shape[0], 2, *base.shape[2:]))
    special = data.draw(st.sampled_from(["nan", "inf", "-inf"]), label="special")
    index = data.draw(st.integers(0, base.count - 1), label="index")
    case = SpecialValueCase(**asdict(base), special=special, index=index)
    mode = data.draw(st.sampled_from(["train", "eval"]), label="mode")
    training = mode == "train"
    what = f"{special} in channel 0 ({mode}, track_running_stats={case.track_running_stats})"
    x, values, out, before = _forward(candidate, judge, case, what, training=training, running=True)
    w, b = values.get("weight"), values.get("bias")
    if training or not case.track_running_stats:
        expected, mean, var = oracle.train(case, x, w, b)
    else:
        expected = oracle.eval_(case, x, values["running_mean"], values["running_var"], w, b)
    # Exact special-value positions (judge.close): with batch statistics all of channel 0
    # is NaN (a NaN or infinite mean makes the variance NaN under every summation order:
    # two-pass, one-pass and Welford alike; torch CPU measured identical to the oracle for
    # float16..float64 and all layouts); in eval only the special element itself is
    # special (NaN, or +-inf scaled by w / sqrt(running_var + eps)). Other channels: bound.
    judge.close(f"output y with {what}", out.y, expected, case=case,
                alternatives=oracle.named_train(x, w, b, eps=case.eps, before=before) if training else None)
    if training and case.track_running_stats and candidate.keeps_running_stats:
        count = oracle.counter(before)
        em, ev, _ = oracle.running(case, before["running_mean"], before["running_var"], count, mean, var,
                                   case.count, case.momentum)
        with judge.together():  # both statistics judged, then one failure naming all
            for i, (name, exp) in enumerate((("running_mean", em), ("running_var", ev))):
                got = judge.tensor(f"{name} after {what}", out.state[name], shape=(case.channels,), case=case)
                # Channel 0's statistic is non-finite, but WHICH non-finite value is an
                # implementation choice: torch CPU sums (an inf input gives running_mean = inf),
                # a Welford update gives NaN (inf - inf). So: non-finite, and channels >= 1 right.
                if case.momentum != 0:
                    judge.check(not bool(torch.isfinite(got[0])),
                                f"{name}[0] = {float(got[0])!r} after {what}: a finite value from a "
                                f"channel holding {special}", case=case)
                judge.close(f"{name}[1:] after {what}", got[1:], _other_channels(exp), case=case,
                            alternatives=oracle.running_conventions(before["running_mean"], before["running_var"],
                                                                    count, mean, var, case.count, case.momentum, i,
                                                                    exp.value, part=slice(1, None), x=x))


# ----------------------------------------------------------------------------- S7.4


@pytest.mark.clause("S7.4")
@given(data=st.data())
def test_half_input_float32_parameters(candidate, judge, data):
    candidate.require("forward", dtype="float32")
    low = _dtypes(candidate, cs.LOW_PRECISION, "the clause is about half-precision inputs")
    case = data.draw(driver.cases_for(candidate, dtypes=low, dists=("normal", "offset"), mixed_params=True),
                     label="case")
    case = cs.with_(case, param_dtype="float32")
    mode = data.draw(st.sampled_from(["train", "eval"]), label="mode")
    training = mode == "train"
    what = f"{case.dtype} input, float32 parameters ({mode})"
    x, values, out, before = _forward(candidate, judge, case, what, training=training, running=True)
    judge.tensor(f"output y ({what})", out.y, shape=case.shape, dtype=case.tdtype, case=case)
    w, b = values.get("weight"), values.get("bias")
    if training or not case.track_running_stats:
        expected, mean, var = oracle.train(case, x, w, b)
    else:
        expected = oracle.eval_(case, x, values["running_mean"], values["running_var"], w, b)
    judge.close(f"output y ({what})", out.y, expected, case=case,
                alternatives=oracle.named_train(x, w, b, eps=case.eps, before=before) if training else None)
    if not case.track_running_stats or not candidate.keeps_running_stats:
        return
    for name in ("running_mean", "running_var"):
        judge.tensor(f"{name} after a forward with {what}", out.state[name], shape=(case.channels,),
                     dtype=torch.float32, case=case)
    if training:
        judge_running_step(judge, case, before, out.state, mean, var, what=what, x=x)
