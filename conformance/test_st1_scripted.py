"""ST1, scripted: switching between train and eval never changes the state, and a
training step after eval continues from the statistics it had.

The random sequences of test_st1_stateful.py can spend their few steps elsewhere; this
fixed train -> eval -> train sequence always exercises the switch back to training.
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bnspec import reference as R
from conformance import oracle
from conformance import strategies as cs
from conformance.outcomes import unsupported

STATS = ("running_mean", "running_var", "num_batches_tracked")


@pytest.mark.clause("ST1")
@given(data=st.data())
def test_train_eval_train_continues(candidate, judge, data):
    candidate.require("running_stats")
    # the dtypes of the stateful sequences (test_st1_stateful.DTYPES), narrowed to the candidate's
    dtypes = tuple(d for d in ("float64", "float32") if d in candidate.capabilities.dtypes)
    if not dtypes:
        unsupported(f"{candidate.target} provides neither float64 nor float32")
    case = data.draw(cs.for_candidate(candidate, dtypes=dtypes, dists=("normal",),
                                      momenta=False, switches=False), label="case")
    m = candidate.make(case.channels, **case.module_kwargs())
    m.forward(case.x(), layout=case.layout)
    for switch in ("eval", "train"):
        before = m.state()
        (m.eval() if switch == "eval" else m.train())
        after = m.state()
        for name in STATS:
            judge.exact(f"{name} after switching to {switch}", after[name], before[name], case=case)
        if switch == "eval":
            m.forward(cs.with_(case, seed=case.seed + 1).x(), layout=case.layout)
    before = m.state()
    x = cs.with_(case, seed=case.seed + 2).x()
    out = m.forward(x, layout=case.layout)
    m.release()
    mean, var = R.batch_stats(x, mode="oracle")
    count = oracle.counter(before)
    e_mean, e_var, e_count = oracle.running(case, before["running_mean"], before["running_var"], count,
                                            mean, var, case.count, case.momentum)
    with judge.together():  # both statistics judged, then one failure naming all
        for i, (name, e) in enumerate((("running_mean", e_mean), ("running_var", e_var))):
            judge.close(f"{name} after train -> eval -> train", out.state[name], e, case=case,
                        alternatives=oracle.running_conventions(before["running_mean"], before["running_var"], count,
                                                                mean, var, case.count, case.momentum, i, e.value, x=x))
    if candidate.contract.has("num_batches_tracked buffer"):
        judge.exact("num_batches_tracked after train -> eval -> train", oracle.counter(out.state), e_count,
                    case=case)
