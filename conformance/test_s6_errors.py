"""S6: errors where torch raises, and the legal edge cases where it does not.

Every rule here was measured on torch 2.13 CPU (BatchNorm1d/2d/3d) and holds for
bnspec's modules. Exception TYPES are compared exactly where torch's type is part of how
callers use it (ValueError for bad batch size, rank and eps); where torch's type is an
accident of its dispatcher (RuntimeError for a channel mismatch, NotImplementedError for
integer input) any exception is accepted: the contract is "no silent numbers".
"""

from __future__ import annotations

import re

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from bnspec.isolation import CandidateRaised
from conformance import driver, oracle
from conformance import strategies as cs
from conformance.driver import first_line, judge_running_step, legal, must_raise
from conformance.test_s2_eval import eval_alternatives


def _mode(data) -> bool:
    return data.draw(st.sampled_from(["train", "eval"]), label="mode") == "train"


def _uses_batch_stats(case: cs.Case, training: bool) -> bool:
    """torch normalizes with batch statistics in training, and in eval without buffers."""
    return training or not case.track_running_stats


# ----------------------------------------------------------------------------- S6.1


@pytest.mark.clause("S6.1")
@given(data=st.data())
def test_one_value_per_channel_raises(candidate, judge, data):
    candidate.require("errors")
    case = data.draw(driver.cases_for(candidate, dists=("normal",)),
                     label="case")
    rank = data.draw(st.sampled_from(cs.RANKS_BY_DIMS[candidate.dims]), label="rank")
    case = cs.with_(case, shape=(1, case.channels, *[1] * (rank - 2)))
    if case.layout == "channels_last" and rank < 4:
        case = cs.with_(case, layout="contiguous")
    training = _mode(data)
    x = case.x()
    where = f"{'training' if training else 'eval'}, track_running_stats={case.track_running_stats}"
    with driver.configured(candidate, case, training=training, running=True) as d:
        if _uses_batch_stats(case, training):
            # torch: ValueError("Expected more than 1 value per channel when training, ...");
            # also in eval without running statistics (batch statistics are used there).
            must_raise(candidate, judge, d.module.forward, x, layout=case.layout, type_name="ValueError",
                       what=f"one value per channel (input {case.shape}, {where})", case=case,
                       convention="no_error_one_value")
            return
        # Eval with running statistics is elementwise: one sample is fine (torch returns).
        out = legal(judge, d.module.forward, x, layout=case.layout,
                    what=f"one value per channel in eval with running statistics (input {case.shape})", case=case)
    judge.close("eval output for one value per channel", out.y, oracle.eval_(case, x, *d.running, d.weight, d.bias),
                case=case, alternatives=lambda: eval_alternatives(case, x, *d.running, d.weight, d.bias))


# ----------------------------------------------------------------------------- S6.2

# Message check. torch says "expected 4D input (got 3D input)" ("expected 2D or 3D input
# (got 4D input)" for BatchNorm1d). The type is required exactly: callers catch ValueError.
# Of the message we require only that it names the rank it GOT ("3D", "3-D", "rank 3",
# "3 dim..."): that is what makes the message useful, while torch's exact wording is not an
# API (it is not documented, and other correct frameworks word it differently), so
# requiring it verbatim would flag correct candidates for prose.
def _names_rank(message: str, rank: int) -> bool:
    pattern = rf"(?<![\d.]){rank}\s*-?\s*[dD]\b|\brank\W{{0,4}}{rank}\b|(?<![\d.]){rank}\s+dim|ndim\W{{0,4}}{rank}\b"
    return re.search(pattern, message) is not None


@pytest.mark.clause("S6.2")
@given(data=st.data())
def test_wrong_rank_raises(candidate, judge, data):
    candidate.require("errors")
    case = data.draw(driver.cases_for(candidate, dists=("normal",),
                                      layouts=("contiguous",)), label="case")
    valid = cs.RANKS_BY_DIMS[candidate.dims]
    rank = data.draw(st.sampled_from([r for r in range(1, 7) if r not in valid]), label="rank")
    c = case.channels
    shape = (c,) if rank == 1 else (2, c, *[3] * (rank - 2))
    training = _mode(data)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(case.seed), dtype=torch.float64).to(case.tdtype)
    what = (f"a {rank}-D input {shape} to BatchNorm{candidate.dims}d "
            f"(expects {' or '.join(f'{r}D' for r in valid)}; {'training' if training else 'eval'}; "
            f"x = torch.randn({shape}, generator=torch.Generator().manual_seed({case.seed}), "
            f"dtype=torch.float64).to(torch.{case.dtype}))")
    with driver.configured(candidate, case, training=training, running=True) as d:
        exc = must_raise(candidate, judge, d.module.forward, x, type_name="ValueError", what=what, case=case)
    judge.check(_names_rank(exc.message, rank),
                f"{what}: the ValueError's message does not name the rank it got ({rank}D): "
                f"{exc.message.strip()[:200]!r}; torch says 'expected ... input (got {rank}D input)'", case=case)


# ----------------------------------------------------------------------------- S6.3


@pytest.mark.clause("S6.3")
@given(data=st.data())
def test_wrong_channel_count_raises(candidate, judge, data):
    candidate.require("errors")
    case = data.draw(driver.cases_for(candidate, dists=("normal",)),
                     label="case")
    # A module of ONE channel is the likeliest to pass silently (its (1,)-shaped tensors
    # broadcast over any C), so it is drawn often.
    own = data.draw(st.sampled_from([1, 1, 2, 3, 5]), label="module_channels")
    other = data.draw(st.integers(1, 6).filter(lambda k: k != own), label="input_channels")
    training = _mode(data)
    _check_channel_mismatch(candidate, judge, cs.with_(case, shape=(case.shape[0], own, *case.shape[2:])),
                            other, training)


def _check_channel_mismatch(candidate, judge, case: cs.Case, other: int, training: bool) -> None:
    given_case = cs.with_(case, shape=(case.shape[0], other, *case.shape[2:]))
    x = given_case.x()
    what = (f"{other} input channels to a module of {case.channels} (affine={case.affine}, "
            f"track_running_stats={case.track_running_stats}, {'training' if training else 'eval'}; "
            f"input: the case below with shape={given_case.shape})")
    with driver.configured(candidate, case, training=training, running=True) as d:
        if case.affine or case.track_running_stats:
            # torch: RuntimeError("running_mean should contain 2 elements not 3") or the same
            # for weight. Any exception: a broadcast of a 1-element tensor must not pass.
            must_raise(candidate, judge, d.module.forward, x, layout=case.layout, what=what, case=case)
            return
        # No per-channel tensor at all: torch normalizes whatever channels come in
        # (measured: BatchNorm2d(3, affine=False, track_running_stats=False) takes C=2 or 4).
        out = legal(judge, d.module.forward, x, layout=case.layout, what=what, case=given_case)
    expected, _, _ = oracle.train(given_case, x, None, None)
    judge.close(f"output for {what}", out.y, expected, case=given_case)


@pytest.mark.clause("S6.3")
@pytest.mark.parametrize("own, other", [(1, 3), (3, 1)], ids=["module1-input3", "module3-input1"])
def test_wrong_channel_count_broadcastable(candidate, judge, own, other):
    """The broadcast-prone pairs, every switch combination and mode, deterministically."""
    candidate.require("errors")
    shape = {1: (4, own, 3), 2: (2, own, 3, 3), 3: (2, own, 2, 2, 3)}[candidate.dims]
    for affine, track in ((True, True), (True, False), (False, True), (False, False)):
        for training in (True, False):
            case = cs.Case(shape=shape, dtype="float32" if "float32" in candidate.capabilities.dtypes
                           else candidate.capabilities.dtypes[0], affine=affine, track_running_stats=track)
            _check_channel_mismatch(candidate, judge, case, other, training)


# ----------------------------------------------------------------------------- S6.4


@pytest.mark.clause("S6.4")
@given(data=st.data())
def test_bad_eps_raises(candidate, judge, data):
    candidate.require("errors")
    case = data.draw(driver.cases_for(candidate, dists=("normal",)),
                     label="case")
    eps = data.draw(st.sampled_from([0.0, -1e-5, -0.1, -1.0]), label="eps")
    route = data.draw(st.sampled_from(["constructor", "set_attr"]), label="route")
    training = _mode(data)
    _judge_eps(candidate, judge, cs.with_(case, eps=eps), route, training)
    if (eps, training) != (0.0, True):
        # eps = 0 with batch statistics, the boundary torch draws the line at, in every
        # example: whether it is reached must not depend on the draws
        _judge_eps(candidate, judge, cs.with_(case, eps=0.0), route, True)


def _judge_eps(candidate, judge, case, route: str, training: bool) -> None:
    eps = case.eps
    batch = _uses_batch_stats(case, training)
    # torch validates eps in forward: batch statistics need eps > 0 ("batch_norm eps must be
    # positive during training"; also eval without running statistics, which uses batch
    # statistics), running statistics need eps >= 0 ("must be non-negative").
    illegal = eps <= 0 if batch else eps < 0
    what = (f"eps={eps} ({'training' if training else 'eval'}, track_running_stats="
            f"{case.track_running_stats}, set by {route})")
    if route == "constructor":
        try:
            d = driver.configured(candidate, case, training=training, running=True)
        except CandidateRaised as exc:
            # Rejecting a negative eps already at construction is acceptable (it is illegal
            # in every mode), with torch's type; eps = 0 is legal in eval with running
            # statistics, so constructing with it must work.
            if exc.op == "construct" and eps < 0 and exc.is_a("ValueError"):
                return
            judge.fail(f"{what}: {exc.op} raised {exc.type_name}: {first_line(exc)}"
                       + ("; expected ValueError" if eps < 0 else "; eps=0 is legal in eval"), case=case)
    else:
        d = driver.configured(candidate, cs.with_(case, eps=1e-5), training=training, running=True)
    with d:
        if route == "set_attr":
            legal(judge, d.module.set_attr, "eps", eps, what=f"setting {what}", case=case)
        x = case.x()
        if illegal:
            must_raise(candidate, judge, d.module.forward, x, layout=case.layout, type_name="ValueError", what=what,
                       case=case)
            return
        # eps = 0 in eval with running statistics: torch returns (running_var > 0 here)
        out = legal(judge, d.module.forward, x, layout=case.layout, what=what, case=case)
    judge.close(f"eval output with {what}", out.y, oracle.eval_(case, x, *d.running, d.weight, d.bias), case=case)


# ----------------------------------------------------------------------------- S6.5


@pytest.mark.clause("S6.5")
@given(data=st.data())
def test_integer_input_raises(candidate, judge, data):
    candidate.require("errors")
    case = data.draw(driver.cases_for(candidate, dists=("normal",)),
                     label="case")
    itype = data.draw(st.sampled_from(["int64", "int32", "bool"]), label="input_dtype")
    training = _mode(data)
    x = case.x().double()
    x = (x > 0) if itype == "bool" else (x * 10).round().to(getattr(torch, itype))
    # torch: NotImplementedError('"batch_norm" not implemented for \'Long\''). Any exception
    # is accepted; silently casting to float is not.
    with driver.configured(candidate, case, training=training, running=True) as d:
        must_raise(candidate, judge, d.module.forward, x, layout=case.layout,
                   what=f"{itype} input ({'training' if training else 'eval'}; the case's values "
                        f"{'> 0' if itype == 'bool' else 'times 10, rounded'})", case=case)


# ----------------------------------------------------------------------------- S6.6

EDGES = ("momentum_outside_0_1", "empty_batch", "eps_zero_eval", "one_channel", "one_sample_many_values")


@pytest.mark.clause("S6.6")
@given(data=st.data())
def test_legal_edge_cases_do_not_raise(candidate, judge, data):
    candidate.require("forward")
    stats = candidate.keeps_running_stats and candidate.contract.builds("momentum")
    # Every edge in every example: one drawn edge per example left some edges unvisited
    # in a 6-example run.
    for edge in [e for e in EDGES if e != "momentum_outside_0_1" or stats]:
        _legal_edge(candidate, judge, data, edge)


def _legal_edge(candidate, judge, data, edge: str) -> None:
    case = data.draw(driver.cases_for(candidate, dists=("normal",)), label=f"case ({edge})")
    training = True
    if edge == "momentum_outside_0_1":
        momentum = data.draw(st.sampled_from([1.5, -0.5, 2.0]), label="momentum")
        case = cs.with_(case, momentum=momentum, track_running_stats=True)
        what = f"momentum={momentum} in training"
    elif edge == "empty_batch":
        training = _mode(data)
        case = cs.with_(case, shape=(0, *case.shape[1:]))
        what = f"an empty batch {case.shape} in {'training' if training else 'eval'}"
    elif edge == "eps_zero_eval":
        training = False
        case = cs.with_(case, eps=0.0, track_running_stats=True)
        what = "eps=0 in eval with running statistics"
    elif edge == "one_channel":
        training = _mode(data)
        case = cs.with_(case, shape=(case.shape[0], 1, *case.shape[2:]))
        what = f"C=1 {case.shape} in {'training' if training else 'eval'}"
    else:  # N = 1 but several values per channel: torch's rule counts values, not samples
        if case.dims == 1 and len(case.shape) == 2:
            case = cs.with_(case, shape=(1, case.channels, 3), layout="contiguous")
        spatial = [max(s, 2) if i == 0 else s for i, s in enumerate(case.shape[2:])]
        case = cs.with_(case, shape=(1, case.channels, *spatial))
        what = f"one sample with {case.count} values per channel {case.shape} in training"
    with legal(judge, driver.configured, candidate, case, training=training, running=True,
               what=f"constructing for {what}", case=case) as d:
        x = case.x()
        before = d.module.state() if edge == "momentum_outside_0_1" else None
        out = legal(judge, d.module.forward, x, layout=case.layout, what=what, case=case)
    judge.tensor(f"output for {what}", out.y, shape=case.shape, dtype=case.tdtype, case=case)
    if edge == "empty_batch":
        return  # S1.5 and S3.6 judge the rest
    w, b = d.weight, d.bias
    if training or not case.track_running_stats:
        expected, mean, var = oracle.train(case, x, w, b)
    else:
        expected = oracle.eval_(case, x, *d.running, w, b)
    named = oracle.named_train(x, w, b, eps=case.eps, before=d.values) if training else None
    judge.close(f"output for {what}", out.y, expected, case=case, alternatives=named)
    if edge == "momentum_outside_0_1":
        # "Accepted" means used as given: not clamped into [0, 1], not rejected.
        judge_running_step(judge, case, before, out.state, mean, var, what=what, x=x)
