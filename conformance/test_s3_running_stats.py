"""S3: running statistics (momentum average, cumulative average, counter, eval, autograd,
empty batch, reset).

Every update is judged from the state the candidate held just before the step (read
back from it), so one step's error never compounds into the next; counters are exact.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from bnspec import reference as R
from bnspec.isolation.wire import meta
from conformance import driver, oracle
from conformance import strategies as cs

TRACKED = ("running_mean", "running_var", "num_batches_tracked")
MOMENTA = (0.1, 0.0, 1.0, 0.5, 1.5, -0.25)  #: 0 freezes, 1 copies, outside [0, 1] extrapolates
#: Starting counters: fresh, small, 9 (the next cumulative factor, 1/10, equals the default
#: momentum, so only a later step tells them apart) and int32's maximum (a 32-bit counter
#: overflows on the next step).
COUNTS = (0, 1, 4, 9, 2**31 - 1)


# ----------------------------------------------------------------------------- helpers


def draw_case(data, candidate, *, track: bool | None = True, momentum: object = "drawn",
              dists=("normal", "normal", "offset", "constant"), min_count: int = 2) -> cs.Case:
    """A case with tracking forced (``track``; None draws it) and momentum fixed or drawn."""
    case = data.draw(driver.cases_for(candidate, dists=dists,
                                      min_count=min_count), label="case")
    changes = {}
    if track is not None:
        changes["track_running_stats"] = track
    if momentum != "drawn":
        changes["momentum"] = momentum
    elif case.momentum is None and not candidate.capabilities.cumulative:
        changes["momentum"] = 0.1  # momentum=None is S3.2's, which reports it unsupported
    return cs.with_(case, **changes) if changes else case


def counts(candidate) -> tuple[int, ...]:
    """Starting counters to draw: without a counter (the S5.1 contract finding reports it) only a fresh one."""
    return COUNTS if has_counter(candidate) else (0,)


def has_counter(candidate) -> bool:
    return candidate.contract.has("num_batches_tracked buffer")


def configured(candidate, case: cs.Case, *, count: int = 0) -> driver.Driven:
    """A module with non-default weight, bias, running statistics and counter (a module
    without a counter gets none)."""
    return driver.configured(candidate, case, running=True, count=count if has_counter(candidate) else None)


def step_case(case: cs.Case, k: int, *, n: int | None = None) -> cs.Case:
    """The batch of step k: another seed, optionally another batch size."""
    shape = case.shape if n is None else (n, *case.shape[1:])
    return cs.with_(case, seed=(case.seed + 7919 * k) % 2**31, shape=shape)


def counter_of(judge, state: dict, *, case: cs.Case) -> int:
    """num_batches_tracked, checked to be a 0-dim int64 tensor."""
    t = judge.tensor("num_batches_tracked", state.get("num_batches_tracked", "missing"), shape=(),
                     dtype=torch.int64, case=case)
    return int(t.item())


def stat_tensor(judge, name: str, state: dict, *, case: cs.Case, when: str = "") -> torch.Tensor:
    """A running statistic, checked to be a (C,) tensor in the parameter dtype."""
    return judge.tensor(f"{name}{when}", state.get(name, "missing"), shape=(case.channels,),
                        dtype=case.tparam_dtype, case=case)


def check_update(judge, case: cs.Case, before: dict, after: dict, x: torch.Tensor,
                 momentum: float | None, *, extra: dict[str, float] | None = None,
                 implied_count: int | None = None) -> None:
    """running_mean, running_var and counter after one training step on ``x``, from ``before``.

    ``extra`` names other blend factors a wrong implementation might use (a failure that
    matches one says so). ``implied_count``: the module has no counter (the contract finding
    reports it); this many steps came before, and no counter is judged.
    """
    n = case.count
    old_mean = stat_tensor(judge, "running_mean", before, case=case, when=" before the step")
    old_var = stat_tensor(judge, "running_var", before, case=case, when=" before the step")
    old_count = counter_of(judge, before, case=case) if implied_count is None else implied_count
    if n:
        mean, var = R.batch_stats(x, mode="oracle")
    else:  # an empty batch: statistics unused
        mean = var = torch.zeros(case.channels, dtype=torch.float64)
    e_mean, e_var, e_count = oracle.running(case, old_mean, old_var, old_count, mean, var, n, momentum)
    f = oracle.factor(momentum, old_count + 1)

    with judge.together():  # both statistics judged, then one failure naming all
        for i, (name, expected) in enumerate((("running_mean", e_mean), ("running_var", e_var))):
            observed = stat_tensor(judge, name, after, case=case)
            judge.close(f"{name} after a training step (factor {f:.6g})", observed, expected, case=case,
                        alternatives=oracle.running_conventions(old_mean, old_var, old_count, mean, var, n, momentum,
                                                                i, expected.value, mistakes=extra, x=x))
    if implied_count is None:
        judge.exact("num_batches_tracked after a training step", counter_of(judge, after, case=case), e_count,
                    case=case)


def cumulative_mistakes(t: int) -> dict[str, float]:
    """Wrong blend factors for a momentum=None step whose counter is ``t`` after it."""
    return {
        "momentum=None treated as the default momentum 0.1": 0.1,
        "momentum=None treated as 0 (statistics frozen)": 0.0,
        "factor 1/num_batches_tracked taken before the increment": 1 / max(t - 1, 1),
        "factor 1/(num_batches_tracked + 1)": 1 / (t + 1),
    }


def _describe(value: object) -> str:
    return f"a tensor of shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) else repr(value)


# ----------------------------------------------------------------------------- S3.1 - S3.7


@pytest.mark.clause("S3.1")
@given(data=st.data())
def test_momentum_average(candidate, judge, data):
    candidate.require("running_stats")
    momentum = data.draw(st.sampled_from(MOMENTA), label="momentum")
    case = draw_case(data, candidate, momentum=momentum)
    count = data.draw(st.sampled_from(counts(candidate)), label="start_count")
    with configured(candidate, case, count=count) as d:
        before = d.held()
        x = case.x()
        out = d.module.forward(x, layout=case.layout)
    check_update(judge, case, before, out.state, x, momentum, implied_count=None if has_counter(candidate) else 0)


@pytest.mark.clause("S3.2")
@given(data=st.data())
def test_cumulative_average(candidate, judge, data):
    candidate.require("running_stats", "cumulative")
    case = draw_case(data, candidate, momentum=None)
    count = data.draw(st.sampled_from(counts(candidate)), label="start_count")
    per_sample = math.prod(case.shape[2:])  # values per channel in one sample
    sizes = data.draw(st.lists(st.integers(1 if per_sample > 1 else 2, 6), min_size=2, max_size=4),
                      label="batch_sizes")
    with configured(candidate, case, count=count) as d:
        state = d.held()
        for k, size in enumerate(sizes):
            step = step_case(case, k, n=size)
            x = step.x()
            out = d.module.forward(x, layout=step.layout)
            implied = None if has_counter(candidate) else k
            t = (counter_of(judge, state, case=step) if implied is None else implied) + 1
            check_update(judge, step, state, out.state, x, None, extra=cumulative_mistakes(t),
                         implied_count=implied)
            state = out.state


@pytest.mark.clause("S3.3")
@given(data=st.data())
def test_counter(candidate, judge, data):
    candidate.require("running_stats")
    candidate.require_piece("num_batches_tracked buffer")
    case = draw_case(data, candidate, track=None, dists=("normal",))
    count = data.draw(st.sampled_from(COUNTS), label="start_count")
    modes = data.draw(st.lists(st.booleans(), min_size=1, max_size=5), label="training_per_call")
    with configured(candidate, case, count=count) as d:
        d.held()  # the starting state, read as every S3 check reads it (a describe call when nothing was set)
        expected = count if case.track_running_stats else None
        for k, training in enumerate(modes):
            d.module.train(training)
            out = d.module.forward(step_case(case, k).x(), layout=case.layout)
            what = f"num_batches_tracked after call {k + 1} ({'training' if training else 'eval'})"
            if expected is None:
                value = out.state.get("num_batches_tracked", "missing")
                judge.check(value is None, f"{what} with track_running_stats=False is {_describe(value)}; "
                                           f"expected None (torch registers the buffer as None)", case=case)
                continue
            expected += int(training)
            judge.exact(what, counter_of(judge, out.state, case=case), expected, case=case)


@pytest.mark.clause("S3.4")
@given(data=st.data())
def test_eval_never_changes_statistics(candidate, judge, data):
    candidate.require("running_stats")
    case = draw_case(data, candidate)
    count = data.draw(st.sampled_from(counts(candidate)), label="start_count")
    train_first = data.draw(st.booleans(), label="training_step_first")
    with_grad = candidate.capabilities.backward and data.draw(st.booleans(), label="with_backward")
    with configured(candidate, case, count=count) as d:
        m, before = d.module, d.held()
        if train_first:
            before = m.forward(step_case(case, 1).x(), layout=case.layout).state
        m.eval()
        states = [m.forward(step_case(case, k).x(), layout=case.layout,
                            dy=step_case(case, k).dy() if with_grad else None).state for k in (2, 3)]
    for k, after in enumerate(states):
        for name in TRACKED:
            judge.exact(f"{name} after eval call {k + 1}{' and backward' if with_grad else ''} "
                        "(eval must leave it bit for bit)", after.get(name, "missing"),
                        before.get(name, "missing"), case=case)


@pytest.mark.clause("S3.5")
@given(data=st.data())
def test_statistics_carry_no_autograd_history(candidate, judge, data):
    candidate.require("running_stats")
    # Only an input that requires grad can leave history; the adapter makes one when a
    # gradient is asked for, which needs autograd.
    candidate.require("backward")
    case = draw_case(data, candidate, dists=("normal",))
    with configured(candidate, case, count=data.draw(st.sampled_from(counts(candidate)), label="start_count")) as d:
        states = [d.module.forward(step_case(case, k).x(), layout=case.layout, dy=step_case(case, k).dy()).state
                  for k in range(2)]
    for k, state in enumerate(states):
        for name in [t for t in TRACKED if candidate.contract.has(f"{t} buffer")]:
            t = judge.tensor(name, state.get(name, "missing"), case=case)
            info = meta(t)
            judge.check(not info.get("requires_grad") and not info.get("has_grad_fn"),
                        f"{name} after training step {k + 1} (input requiring grad) carries autograd history: "
                        f"requires_grad={info.get('requires_grad')}, grad_fn "
                        f"{'set' if info.get('has_grad_fn') else 'None'}; expected requires_grad=False, "
                        "grad_fn None (updates run under no_grad / on detached statistics)", case=case)


@pytest.mark.clause("S3.6")
@given(data=st.data())
def test_empty_batch(candidate, judge, data):
    candidate.require("running_stats")
    case = draw_case(data, candidate, dists=("normal",))
    count = data.draw(st.sampled_from(counts(candidate)[:-1] or (0,)), label="start_count")
    empty = cs.with_(case, shape=(0, *case.shape[1:]))
    with configured(candidate, empty, count=count) as d:
        m, before = d.module, d.held()
        out = m.forward(empty.x(), layout=empty.layout)
        judge.tensor("output of an empty batch", out.y, shape=empty.shape, dtype=empty.tdtype, case=empty)
        check_update(judge, empty, before, out.state, empty.x(), empty.momentum,
                     implied_count=None if has_counter(candidate) else 0)
        if candidate.capabilities.cumulative and has_counter(candidate):
            # The empty step counted: a cumulative step after it averages over count + 2 batches.
            m.set_attr("momentum", None)
            follow = cs.with_(step_case(case, 1), momentum=None)
            x = follow.x()
            after = m.forward(x, layout=follow.layout).state
            mistakes = cumulative_mistakes(count + 2)
            del mistakes["factor 1/num_batches_tracked taken before the increment"]
            mistakes["the empty batch was not counted, or the factor was taken before the increment"] = \
                1 / (count + 1)
            check_update(judge, follow, out.state, after, x, None, extra=mistakes)


@pytest.mark.clause("S3.7")
@given(data=st.data())
def test_reset(candidate, judge, data):
    candidate.require("running_stats", "module_contract")
    candidate.require_piece("reset_running_stats", "reset_parameters")
    case = draw_case(data, candidate, dists=("normal",))
    steps = data.draw(st.integers(0, 3), label="training_steps")
    with configured(candidate, case, count=data.draw(st.sampled_from(counts(candidate)), label="start_count")) as d:
        m, state = d.module, d.held()
        for k in range(steps):
            state = m.forward(step_case(case, k).x(), layout=case.layout).state
        after = m.reset("reset_running_stats")
        reset = m.reset("reset_parameters")
    c, pdt = case.channels, case.tparam_dtype
    want = {"running_mean": torch.zeros(c, dtype=pdt), "running_var": torch.ones(c, dtype=pdt)}
    for label, got in (("reset_running_stats()", after), ("reset_parameters()", reset)):
        for name, value in want.items():
            judge.exact(f"{name} after {label}", stat_tensor(judge, name, got, case=case), value, case=case)
        if has_counter(candidate):
            judge.exact(f"num_batches_tracked after {label}", counter_of(judge, got, case=case), 0, case=case)
    for name in ("weight", "bias"):
        kept, value = state.get(name), after.get(name, "missing")
        if kept is None:
            judge.check(value is None, f"{name} after reset_running_stats() is {_describe(value)}, expected None",
                        case=case)
            continue
        judge.exact(f"{name} after reset_running_stats() (must keep the parameters)", value, kept, case=case)
        init = (torch.ones if name == "weight" else torch.zeros)(c, dtype=pdt)
        judge.exact(f"{name} after reset_parameters()", reset.get(name, "missing"), init, case=case)
