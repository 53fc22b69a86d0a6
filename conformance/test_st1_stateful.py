"""ST1: random sequences of operations match the reference step by step.

A hypothesis rule-based state machine drives one module of the candidate through
training steps, eval calls, resets, state_dict save and load, momentum changes and
train/eval switches. After each step the candidate's full state (weight, bias, running
statistics, counter) and its output are compared with the reference applied to the state
the candidate held just before the step, so a rounding difference never compounds and a
wrong step is caught where it happens. Counters and everything a step must not touch are
compared exactly.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (RuleBasedStateMachine, initialize, precondition, rule,
                                 run_state_machine_as_test)

from bnspec import conventions
from bnspec import reference as R
from conformance import driver, oracle
from conformance import strategies as cs
from conformance.test_s2_eval import eval_alternatives
from conformance.test_s3_running_stats import cumulative_mistakes

STATE_NAMES = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
DTYPES = ("float64", "float32")
#: 0 freezes, 1 copies, outside [0, 1] extrapolates, None is the cumulative average
MOMENTA = (0.1, None, 1.0, 0.0, 0.5, 1.5, -0.25)
BATCHES = (2, 3, 5, 1, 0)  #: N per step; shrinks towards 2 (n = 1 per channel is widened to 2)
DISTS = ("normal", "offset", "constant")
#: one batch: (N, value distribution, data seed)
BATCH = st.tuples(st.sampled_from(BATCHES), st.sampled_from(DISTS), st.integers(0, 2**31 - 1))
STEPS = 10  #: stateful_step_count
EXAMPLES_DIVISOR = 2  #: a sequence of up to STEPS steps costs several single examples; 12 sequences at ci


def _describe(value: object) -> str:
    return f"a tensor of shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) else repr(value)


class BatchNormMachine(RuleBasedStateMachine):
    """One candidate module and the state it held after the last step."""

    def __init__(self, candidate, judge) -> None:
        super().__init__()
        self.candidate, self.judge = candidate, judge
        self.caps = candidate.capabilities
        self.driven = None
        self.saved: dict | None = None

    # -- set-up ---------------------------------------------------------------------------
    @initialize(data=st.data())
    def make_module(self, data) -> None:
        dtypes = [d for d in DTYPES if d in self.caps.dtypes]
        self.dtype = data.draw(st.sampled_from(dtypes), label="dtype")
        self.rank = data.draw(st.sampled_from(cs.RANKS_BY_DIMS[self.candidate.dims]), label="rank")
        self.channels = data.draw(st.integers(1, 4), label="channels")
        self.spatial = tuple(data.draw(st.lists(st.integers(1, 4), min_size=self.rank - 2,
                                                max_size=self.rank - 2), label="spatial"))
        can = self.candidate.contract.builds  # only what the candidate can be built with
        self.eps = data.draw(st.sampled_from([1e-5, 1e-3, 0.1] if can("eps") else [1e-5]), label="eps")
        momenta = [m for m in MOMENTA if m is not None or self.caps.cumulative] if can("momentum") else [0.1]
        self.momentum = data.draw(st.sampled_from(momenta), label="momentum")
        # True first (hypothesis's simplest sequences track statistics), tracking 2 draws in 3.
        self.affine = data.draw(st.sampled_from([True, False] if can("affine=False") else [True]), label="affine")
        self.bias = data.draw(st.sampled_from([True, False] if can("bias=False") else [True]),
                              label="bias") if self.affine else True
        self.track = data.draw(st.sampled_from([True, True, False] if can("track_running_stats=False") else [True]),
                               label="track_running_stats")
        self.layout = data.draw(st.sampled_from(["contiguous", "noncontiguous"]
                                                + (["channels_last"] if self.rank >= 4 else [])), label="layout")
        seed = data.draw(st.integers(0, 2**31 - 1), label="seed")
        self.driven = driver.configured(self.candidate, self._case(2, "normal", seed))  # released in teardown
        self.m = self.driven.module
        self.training = True
        self.state = self.driven.held()
        # Every sequence starts with training (hypothesis's swarm testing otherwise makes
        # many sequences of, say, resets alone): the later rules act on non-default statistics.
        self._train(data.draw(st.lists(BATCH, min_size=1, max_size=2), label="first_training_batches"))

    def _case(self, n: int, dist: str, seed: int) -> cs.Case:
        if n == 1 and math.prod(self.spatial) == 1:
            n = 2  # one value per channel raises in training (S6.1), not a state question
        return cs.Case(shape=(n, self.channels, *self.spatial), dtype=self.dtype, layout=self.layout,
                       eps=self.eps, momentum=self.momentum, affine=self.affine, bias=self.bias,
                       track_running_stats=self.track, dist=dist, seed=seed)

    def teardown(self) -> None:
        if self.driven is not None:
            self.driven.release()

    # -- comparisons ----------------------------------------------------------------------
    def _same(self, what: str, name: str, observed: dict, expected: dict, case: cs.Case | None) -> None:
        """Exactly the expected value (None stays None) with the same dtype."""
        got, want = observed.get(name, "missing"), expected.get(name, "missing")
        if not isinstance(want, torch.Tensor):
            self.judge.check(got is None if want is None else isinstance(got, str) and got == want,
                             f"{name} {what} is {_describe(got)}, expected {_describe(want)}", case=case)
            return
        self.judge.tensor(f"{name} {what}", got, shape=want.shape, dtype=want.dtype, case=case)
        self.judge.exact(f"{name} {what}", got, want, case=case)

    def _unchanged(self, what: str, observed: dict, case: cs.Case | None, names=STATE_NAMES) -> None:
        for name in names:
            self._same(what, name, observed, self.state, case)

    def _check_output(self, y, case: cs.Case, x: torch.Tensor, *, use_batch: bool) -> None:
        what = f"{'training' if self.training else 'eval'} output y"
        self.judge.tensor(what, y, shape=case.shape, dtype=case.tdtype, case=case)
        if case.count == 0:
            return
        w, b = self.state.get("weight"), self.state.get("bias")
        running = oracle.running_of(self.state)
        if use_batch:
            expected, _, _ = oracle.train(case, x, w, b)
            named = lambda: conventions.train_forward_alternatives(x, w, b, eps=case.eps, running=running)  # noqa: E731
        else:
            expected = oracle.eval_(case, x, self.state["running_mean"], self.state["running_var"], w, b)
            named = lambda: eval_alternatives(case, x, *running, w, b)  # noqa: E731
        self.judge.close(what, y, expected, case=case, alternatives=named)

    # -- rules ----------------------------------------------------------------------------
    @rule(batches=st.lists(BATCH, min_size=1, max_size=3))
    def train_steps(self, batches: list[tuple[int, str, int]]) -> None:
        """Switch to training (when in eval) and run one training forward per batch."""
        if not self.training:
            self._set_mode(True)
        self._train(batches)

    def _train(self, batches: list[tuple[int, str, int]]) -> None:
        for n, dist, seed in batches:
            case = self._case(n, dist, seed)
            x = case.x()
            out = self.m.forward(x, layout=case.layout)
            self._check_output(out.y, case, x, use_batch=True)
            self._unchanged("after a training step", out.state, case, names=("weight", "bias"))
            if not self.track:
                self._unchanged("after a training step (track_running_stats=False)", out.state, case)
            else:
                self._check_update(case, x, out.state)
            self.state = out.state

    def _check_update(self, case: cs.Case, x: torch.Tensor, after: dict) -> None:
        before = {name: self.judge.tensor(f"{name} before the step", self.state.get(name, "missing"), case=case)
                  for name in ("running_mean", "running_var", "num_batches_tracked")}
        count = oracle.counter(before)
        n = case.count
        mean, var = (R.batch_stats(x, mode="oracle") if n else
                     (torch.zeros(self.channels, dtype=torch.float64),) * 2)
        e_mean, e_var, e_count = oracle.running(case, before["running_mean"], before["running_var"], count,
                                                mean, var, n, self.momentum)
        f = oracle.factor(self.momentum, count + 1)
        with self.judge.together():  # both statistics judged, then one failure naming all
            for i, (name, expected) in enumerate((("running_mean", e_mean), ("running_var", e_var))):
                got = self.judge.tensor(name, after.get(name, "missing"), shape=(self.channels,),
                                        dtype=case.tparam_dtype, case=case)
                mistakes = cumulative_mistakes(count + 1) if self.momentum is None else None
                alternatives = oracle.running_conventions(before["running_mean"], before["running_var"], count, mean,
                                                          var, n, self.momentum, i, expected.value, mistakes=mistakes,
                                                          x=x)
                self.judge.close(f"{name} after a training step (momentum={self.momentum}, factor {f:.6g}, "
                                 f"counter {count} before)", got, expected, case=case, alternatives=alternatives)
        counter = self.judge.tensor("num_batches_tracked", after.get("num_batches_tracked", "missing"),
                                    shape=(), dtype=torch.int64, case=case)
        self.judge.exact("num_batches_tracked after a training step", int(counter), e_count, case=case)

    @rule(batches=st.lists(BATCH, min_size=1, max_size=2))
    def eval_calls(self, batches: list[tuple[int, str, int]]) -> None:
        """Switch to eval (when training) and run one eval forward per batch."""
        if self.training:
            self._set_mode(False)
        for n, dist, seed in batches:
            case = self._case(n, dist, seed)
            x = case.x()
            out = self.m.forward(x, layout=case.layout)
            # Without running statistics eval normalizes with the batch's own statistics.
            self._check_output(out.y, case, x, use_batch=not self.track)
            self._unchanged("after an eval call", out.state, case)
            self.state = out.state

    def _set_mode(self, training: bool) -> None:
        self.m.train(training)
        self.training = training

    @rule(training=st.booleans())
    def switch_mode(self, training: bool) -> None:
        self._set_mode(training)
        self._unchanged(f"after train({training})", self.m.state(), None)

    @rule(momentum=st.sampled_from([m for m in MOMENTA if m is not None]))
    def set_momentum(self, momentum: float) -> None:
        self.m.set_attr("momentum", momentum)
        self.momentum = momentum

    @precondition(lambda self: self.caps.cumulative)
    @rule()
    def set_momentum_none(self) -> None:
        """momentum=None: the cumulative average (a rule of its own, so sequences reach it often)."""
        self.m.set_attr("momentum", None)
        self.momentum = None

    @precondition(lambda self: self.caps.module_contract)
    @rule()
    def reset_running_stats(self) -> None:
        after = self.m.reset("reset_running_stats")
        expected = dict(self.state)
        if self.track:
            pdt = getattr(torch, self.dtype)
            expected.update(running_mean=torch.zeros(self.channels, dtype=pdt),
                            running_var=torch.ones(self.channels, dtype=pdt),
                            num_batches_tracked=torch.tensor(0, dtype=torch.int64))
        for name in STATE_NAMES:
            self._same("after reset_running_stats()", name, after, expected, None)
        self.state = after

    @precondition(lambda self: self.caps.module_contract)
    @rule()
    def save_state_dict(self) -> None:
        sd = self.m.state_dict()
        values = sd["values"]
        for name in STATE_NAMES:
            if isinstance(self.state.get(name), torch.Tensor):
                self._same("in state_dict()", name, values, self.state, None)
        self.saved = {"values": values, "state": dict(self.state)}

    @precondition(lambda self: self.caps.module_contract and self.saved is not None)
    @rule()
    def load_saved_state_dict(self) -> None:
        after = self.m.load_state_dict(self.saved["values"])
        for name in STATE_NAMES:
            self._same("after load_state_dict(the saved state_dict)", name, after, self.saved["state"], None)
        self.state = after


@pytest.mark.clause("ST1")
def test_stateful_sequences(candidate, judge):
    candidate.require("running_stats")
    if candidate.capabilities.module_contract:  # the sequences read, reset, save and load every piece
        candidate.require_piece("weight parameter", "bias parameter", "running_mean buffer", "running_var buffer",
                                "num_batches_tracked buffer", "reset_running_stats", "state_dict", "load_state_dict")
    driver.dtypes_for(candidate, DTYPES, lacking=f"provides none of {', '.join(DTYPES)}")
    no_grad = candidate.contract.discovered and judge.accepts("stats_by_grad_mode")
    if no_grad:
        # The accepted convention's own semantics: eval calls under torch.no_grad() (the
        # diagnosis' replays verify the same for the other clauses).
        candidate.process.call("set_option", name="eval_no_grad", value=True)
    current = settings()
    try:
        run_state_machine_as_test(
            lambda: BatchNormMachine(candidate, judge),
            settings=settings(current, max_examples=max(2, current.max_examples // EXAMPLES_DIVISOR),
                              stateful_step_count=STEPS))
    finally:
        if no_grad:
            candidate.process.revive()
            candidate.process.call("set_option", name="eval_no_grad", value=False)
