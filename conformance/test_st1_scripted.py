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
from conformance import driver, oracle
from conformance import strategies as cs

STATS = ("running_mean", "running_var", "num_batches_tracked")


@pytest.mark.clause("ST1")
@given(data=st.data())
def test_train_eval_train_continues(candidate, judge, data):
    candidate.require("running_stats")
    # the dtypes of the stateful sequences (test_st1_stateful.DTYPES), narrowed to the candidate's
    dtypes = driver.dtypes_for(candidate, ("float64", "float32"), lacking="provides neither float64 nor float32")
    case = data.draw(driver.cases_for(candidate, dtypes=dtypes, dists=("normal",),
                                      momenta=False, switches=False), label="case")
    with driver.configured(candidate, case, params=False) as d:
        m = d.module
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
    mean, var = R.batch_stats(x, mode="oracle")
    e_count = driver.judge_running_step(judge, case, before, out.state, mean, var, what="train -> eval -> train", x=x)
    if candidate.contract.has("num_batches_tracked buffer"):
        judge.exact("num_batches_tracked after train -> eval -> train", oracle.counter(out.state), e_count,
                    case=case)
