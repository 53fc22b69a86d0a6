"""S1: forward in training mode (values, shape/dtype/device, layout, input untouched, N=0)."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from bnspec import conventions
from conformance import driver, oracle
from conformance import strategies as cs
from conformance.outcomes import not_applicable


def run_train(candidate, case: cs.Case):
    """One training forward of a module with the case's non-default weight/bias."""
    with driver.configured(candidate, case) as d:
        x = case.x()
        out = d.module.forward(x, layout=case.layout)
    return x, d.weight, d.bias, out


@pytest.mark.clause("S1.1")
@given(data=st.data())
def test_train_forward_values(candidate, judge, data):
    candidate.require("forward")
    case = data.draw(driver.cases_for(candidate,
                                      dists=("normal", "normal", "offset", "tiny_var", "near_eps", "constant")),
                     label="case")
    x, w, b, out = run_train(candidate, case)
    expected, _, _ = oracle.train(case, x, w, b)
    judge.close("training output y", out.y, expected, case=case,
                alternatives=lambda: conventions.train_forward_alternatives(
                    x, w, b, eps=case.eps, running=oracle.fresh_running(case)))


@pytest.mark.clause("S1.2")
@given(data=st.data())
def test_train_forward_shape_dtype_device(candidate, judge, data):
    candidate.require("forward")
    case = data.draw(driver.cases_for(candidate, dists=("normal",)), label="case")
    # Every input dtype the candidate provides, in every example: a wrong output dtype for
    # one of them (float16 in, float32 out) must not depend on which dtypes were drawn.
    others = [d for d in candidate.capabilities.dtypes if d != case.dtype]
    for c in (case, *[cs.with_(case, dtype=d, param_dtype=None) for d in others]):
        _, _, _, out = run_train(candidate, c)
        judge.tensor("training output y", out.y, shape=c.shape, dtype=c.tdtype, device=candidate.device, case=c)


@pytest.mark.clause("S1.3")
@given(data=st.data())
def test_channels_last_in_channels_last_out(candidate, judge, data):
    candidate.require("forward")
    if candidate.dims == 1:
        not_applicable("channels_last needs a 4-D or 5-D input (BatchNorm2d/3d)")
    case = data.draw(driver.cases_for(candidate, dists=("normal",),
                                      layouts=("channels_last", "contiguous")), label="case")
    # C = 1 or all spatial sizes 1 make the two layouts the same strides: no claim there.
    if case.channels == 1 or all(s == 1 for s in case.shape[2:]):
        case = cs.with_(case, shape=(case.shape[0], 2, *[max(s, 2) for s in case.shape[2:]]))
    _, _, _, out = run_train(candidate, case)
    fmt = torch.channels_last if len(case.shape) == 4 else torch.channels_last_3d
    want = fmt if case.layout == "channels_last" else torch.contiguous_format
    stride = out.y.bnspec_meta.get("stride")
    probe = torch.empty(case.shape, memory_format=want)
    # The memory format is the claim, as torch tests it: the strides of size-1 axes are
    # free (any value describes the same layout), so compare with is_contiguous.
    dense = stride is not None and torch.empty_strided(case.shape, stride).is_contiguous(memory_format=want)
    judge.check(dense, f"output strides {stride} for {case.layout} input of shape {case.shape}; expected "
                       f"{str(want).replace('torch.', '')}, e.g. strides {list(probe.stride())}", case=case)


@pytest.mark.clause("S1.4")
@given(data=st.data())
def test_input_not_modified(candidate, judge, data):
    candidate.require("forward")
    case = data.draw(driver.cases_for(candidate, dists=("normal",)), label="case")
    # Every path every time: training and eval, an input that requires grad and one that
    # does not can take different code in a candidate (in-place tricks are only legal
    # without autograd).
    for train, with_grad in itertools.product((True, False), (False, True) if candidate.capabilities.backward
                                              else (False,)):
        with driver.configured(candidate, case, params=False, training=train) as d:
            out = d.module.forward(case.x(), layout=case.layout, dy=case.dy() if with_grad else None)
        judge.check(not out.input_modified,
                    f"the input was modified in place ({'training' if train else 'eval'} forward"
                    f"{' and backward' if with_grad else ''})", case=case)


@pytest.mark.clause("S1.5")
@given(data=st.data())
def test_empty_batch_gives_empty_output(candidate, judge, data):
    candidate.require("forward")
    case = data.draw(driver.cases_for(candidate, dists=("normal",)), label="case")
    case = cs.with_(case, shape=(0, *case.shape[1:]))
    train = data.draw(st.booleans(), label="training")
    with driver.configured(candidate, case, params=False, training=train) as d:
        out = d.module.forward(case.x(), layout=case.layout)
    judge.tensor("output of an empty batch", out.y, shape=case.shape, dtype=case.tdtype, case=case)
