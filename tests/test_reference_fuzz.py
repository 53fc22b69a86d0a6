"""Random valid and invalid arguments for the reference functions (issue 6).

Every public function of :mod:`bnspec.reference` is called with a random valid argument
set, and with the same set where ONE argument is made bad:

* valid calls never raise and return tensors of the documented shapes and dtypes
  (finite for finite input);
* invalid calls raise ``TypeError``, ``ValueError``, ``RuntimeError`` or
  ``NotImplementedError`` (never another type, never a result) with a message that names
  the bad argument (or, for the input's dtype, torch's own message).

Bad arguments the fuzzer first found unchecked are pinned one by one in
:data:`FOUND_BY_FUZZING` (each now raises a clear error naming the argument).

Examples per test are kept modest; bnspec's pytest plugin loads the derandomized ``ci``
hypothesis profile, so the draws are the same on every run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from bnspec import reference as R

FLOATS = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
LOW = (torch.float16, torch.bfloat16)
CLEAR_ERRORS = (TypeError, ValueError, RuntimeError, NotImplementedError)
EXAMPLES = 60  #: valid calls per function
MUTATION_EXAMPLES = 8  #: calls per (function, bad argument)


# ----------------------------------------------------------------------------- drawing


@st.composite
def inputs(draw, *, training: bool, min_rank: int = 2) -> torch.Tensor:
    """A float input (N, C, *spatial) of rank 2-5; in training, not one value per channel."""
    rank = draw(st.integers(min_rank, 5), label="rank")
    c = draw(st.integers(1, 4), label="C")
    n = draw(st.integers(0, 4), label="N")
    spatial = draw(st.lists(st.integers(0, 3), min_size=rank - 2, max_size=rank - 2), label="spatial")
    shape = (n, c, *spatial)
    if training and n * math.prod(spatial) == 1:
        shape = (2, *shape[1:])
    dtype = draw(st.sampled_from(FLOATS), label="dtype")
    seed = draw(st.integers(0, 2**16), label="seed")
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * 2 + 0.5).to(dtype)


def per_channel(x: torch.Tensor, dtype: torch.dtype, *, positive: bool = False, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    v = torch.rand(x.shape[1], generator=g, dtype=torch.float64) + 0.5 if positive else \
        torch.randn(x.shape[1], generator=g, dtype=torch.float64)
    return v.to(dtype)


def param_dtype(draw, x: torch.Tensor, mode: str) -> torch.dtype:
    """A dtype torch accepts for weight/bias/statistics with this input (native mode:
    the input's, or float32 for float16/bfloat16; oracle mode: any float)."""
    if mode == "oracle":
        return draw(st.sampled_from(FLOATS), label="param dtype")
    return draw(st.sampled_from([x.dtype, torch.float32] if x.dtype in LOW else [x.dtype]), label="param dtype")


@dataclass
class Call:
    fn: Callable
    kwargs: dict
    check: Callable  #: check(result, kwargs) for a valid call


def _eps_mutations(training: bool) -> list:
    bad = [("eps=nan", float("nan")), ("eps='1e-5'", "1e-5"), ("eps=True", True), ("eps=None", None),
           ("eps=tensor", torch.tensor(1e-5)), ("eps=-1", -1.0)]
    if training:
        bad.append(("eps=0", 0.0))
    return [(label, {"eps": v}, (TypeError, ValueError), ("eps",)) for label, v in bad]


def _mode_mutations() -> list:
    return [(f"mode={m!r}", {"mode": m}, (ValueError,), ("mode",)) for m in ("fast", None, "NATIVE", 1)]


def _input_mutations(name: str = "x") -> list:
    return [
        ("x=list", {name: [[1.0, 2.0], [3.0, 4.0]]}, (TypeError,), ("input",)),
        ("x=float", {name: 1.5}, (TypeError,), ("input",)),
        ("x=None", {name: None}, (TypeError,), ("input",)),
        ("x=int64", {name: torch.ones(4, 2, dtype=torch.int64)}, (NotImplementedError,), ("batch_norm", "Long")),
        ("x=bool", {name: torch.ones(4, 2, dtype=torch.bool)}, (NotImplementedError,), ("batch_norm", "Bool")),
        ("x=complex", {name: torch.ones(4, 2, dtype=torch.complex64)}, (NotImplementedError,), ("batch_norm",)),
        ("x=1D", {name: torch.ones(4)}, (ValueError,), ("1D input",)),
        ("x=0D", {name: torch.tensor(1.0)}, (ValueError,), ("0D input",)),
        ("x=6D", {name: torch.ones(2, 2, 1, 1, 1, 2)}, (ValueError,), ("6D input",)),
    ]


def _per_channel_mutations(name: str, x: torch.Tensor) -> list:
    c = x.shape[1]
    return [
        (f"{name}=wrong size", {name: torch.ones(c + 1, dtype=x.dtype)}, (RuntimeError,), (name,)),
        (f"{name}=list", {name: [1.0] * c}, (TypeError, RuntimeError), (name,)),
        (f"{name}=int", {name: torch.ones(c, dtype=torch.int32)}, (TypeError,), (name,)),
        (f"{name}=meta", {name: torch.ones(c, dtype=x.dtype, device="meta")}, (RuntimeError,), (name,)),
    ]


def _mixed_dtype_mutation(name: str, x: torch.Tensor, mode: str) -> list:
    """Native mode only (oracle mode accepts any float dtypes): None elsewhere."""
    other = torch.float64 if x.dtype != torch.float64 else torch.float32
    bad = {name: torch.ones(x.shape[1], dtype=other)} if mode == "native" else None
    return [(f"{name}=mixed dtype", bad, (RuntimeError,), ("mixed dtype",))]


def _check_like_input(out: torch.Tensor, x: torch.Tensor, mode: str) -> None:
    assert isinstance(out, torch.Tensor)
    assert out.shape == x.shape
    assert out.dtype == (torch.float64 if mode == "oracle" else x.dtype)


def _check_per_channel(t: torch.Tensor, x: torch.Tensor) -> None:
    assert isinstance(t, torch.Tensor) and t.shape == (x.shape[1],)


def _finite(t: torch.Tensor, x: torch.Tensor) -> None:
    if x.numel() and torch.isfinite(x).all():
        assert torch.isfinite(t).all()


@st.composite
def train_forward_calls(draw) -> Call:
    x = draw(inputs(training=True))
    mode = draw(st.sampled_from(["native", "oracle"]), label="mode")
    pd = param_dtype(draw, x, mode)
    w = draw(st.sampled_from([None, per_channel(x, pd, seed=1)]), label="weight")
    b = draw(st.sampled_from([None, per_channel(x, pd, seed=2)]), label="bias")
    eps = draw(st.sampled_from([1e-5, 1e-3, 0.5, 3.0]), label="eps")

    def check(out, kw):
        _check_like_input(out.y, kw["x"], kw["mode"])
        _check_per_channel(out.mean, kw["x"])
        _check_per_channel(out.var, kw["x"])
        if _count(kw["x"]) > 0:
            _finite(out.y, kw["x"])
            assert (out.var >= 0).all()

    return Call(R.train_forward, dict(x=x, weight=w, bias=b, eps=eps, mode=mode), check)


def train_forward_mutations(kw: dict) -> list:
    x = kw["x"]
    return (_input_mutations() + _eps_mutations(True) + _mode_mutations() + _per_channel_mutations("weight", x)
            + _per_channel_mutations("bias", x) + _mixed_dtype_mutation("weight", x, kw["mode"])
            + [("one value per channel", {"x": torch.ones(1, x.shape[1], dtype=x.dtype)}, (ValueError,),
                ("more than 1 value per channel",))])


@st.composite
def eval_forward_calls(draw) -> Call:
    x = draw(inputs(training=False))
    mode = draw(st.sampled_from(["native", "oracle"]), label="mode")
    pd = param_dtype(draw, x, mode)
    rm, rv = per_channel(x, pd, seed=3), per_channel(x, pd, positive=True, seed=4)
    w = draw(st.sampled_from([None, per_channel(x, pd, seed=1)]), label="weight")
    b = draw(st.sampled_from([None, per_channel(x, pd, seed=2)]), label="bias")
    eps = draw(st.sampled_from([0.0, 1e-5, 0.5]), label="eps")

    def check(out, kw):
        _check_like_input(out, kw["x"], kw["mode"])
        _finite(out, kw["x"])

    return Call(R.eval_forward, dict(x=x, running_mean=rm, running_var=rv, weight=w, bias=b, eps=eps, mode=mode),
                check)


def eval_forward_mutations(kw: dict) -> list:
    x = kw["x"]
    return (_input_mutations() + _eps_mutations(False) + _mode_mutations()
            + _per_channel_mutations("running_mean", x) + _per_channel_mutations("running_var", x)
            + _per_channel_mutations("weight", x) + _mixed_dtype_mutation("running_var", x, kw["mode"])
            + [("running_mean=None", {"running_mean": None}, (TypeError,), ("running_mean",)),
               ("running_var=None", {"running_var": None}, (TypeError,), ("running_var",))])


@st.composite
def batch_stats_calls(draw) -> Call:
    x = draw(inputs(training=False))
    mode = draw(st.sampled_from(["native", "oracle"]), label="mode")

    def check(out, kw):
        mean, var = out
        _check_per_channel(mean, kw["x"])
        _check_per_channel(var, kw["x"])
        if _count(kw["x"]) > 0:
            _finite(var, kw["x"])

    return Call(R.batch_stats, dict(x=x, mode=mode), check)


def batch_stats_mutations(kw: dict) -> list:
    return _input_mutations() + _mode_mutations()


@st.composite
def update_running_stats_calls(draw) -> Call:
    c = draw(st.integers(1, 5), label="C")
    dtype = draw(st.sampled_from(FLOATS), label="dtype")
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16), label="seed"))
    stat = lambda positive=False: ((torch.rand(c, generator=g, dtype=torch.float64) + 0.5) if positive  # noqa: E731
                                   else torch.randn(c, generator=g, dtype=torch.float64)).to(dtype)
    momentum = draw(st.sampled_from([0.1, 0.0, 1.0, 0.5, 1.5, -0.25, None]), label="momentum")
    tracked = draw(st.booleans(), label="running stats") or momentum is None
    rm, rv = (stat(), stat(True)) if draw(st.booleans(), label="has running stats") else (None, None)
    nbt = torch.tensor(draw(st.integers(0, 10), label="num_batches_tracked")) if tracked else None
    count = draw(st.sampled_from([0, 2, 3, 100]), label="count")
    bm, bv = stat(), stat(True)

    def check(out, kw):
        for old, new in ((kw["running_mean"], out.mean), (kw["running_var"], out.var)):
            if old is None:
                assert new is None
            else:
                assert new.shape == old.shape and new.dtype == old.dtype
        if kw["num_batches_tracked"] is None:
            assert out.num_batches_tracked is None
        else:
            assert out.num_batches_tracked.dtype == torch.int64 and out.num_batches_tracked.dim() == 0
            assert int(out.num_batches_tracked) == int(kw["num_batches_tracked"]) + 1

    return Call(R.update_running_stats,
                dict(running_mean=rm, running_var=rv, num_batches_tracked=nbt, batch_mean=bm, batch_var=bv,
                     count=count, momentum=momentum), check)


def update_running_stats_mutations(kw: dict) -> list:
    bm = kw["batch_mean"]
    c, dtype = bm.numel(), bm.dtype
    return [
        *[(f"count={v!r}", {"count": v}, (ValueError, TypeError), ("count",)) for v in (1, -1, 2.0, True, "3", None)],
        *[(f"momentum={v!r}", {"momentum": v}, (TypeError,), ("momentum",)) for v in ("0.1", float("nan"), True)],
        ("batch_mean 2-D", {"batch_mean": bm.reshape(c, 1)}, (TypeError, ValueError), ("batch_mean",)),
        ("batch_mean=list", {"batch_mean": bm.tolist()}, (TypeError,), ("batch_mean",)),
        ("batch_var=None", {"batch_var": None}, (TypeError,), ("batch_var",)),
        ("running_mean wrong size", {"running_mean": torch.zeros(c + 1, dtype=dtype)}, (RuntimeError,),
         ("running_mean",)),
        ("running_var wrong size", {"running_var": torch.ones(c + 2, dtype=dtype)}, (RuntimeError,),
         ("running_var",)),
        ("num_batches_tracked=3", {"num_batches_tracked": 3}, (TypeError,), ("num_batches_tracked",)),
        ("num_batches_tracked 2 elements", {"num_batches_tracked": torch.tensor([1, 2])}, (TypeError,),
         ("num_batches_tracked",)),
        ("momentum=None without counter", {"momentum": None, "num_batches_tracked": None}, (ValueError,),
         ("num_batches_tracked",)),
    ]


def _grad_mutations(x: torch.Tensor) -> list:
    return [
        ("dy wrong shape", {"dy": torch.ones(x.shape[0] + 1, *x.shape[1:], dtype=x.dtype)}, (ValueError,),
         ("grad_output",)),
        ("dy=list", {"dy": [1.0]}, (ValueError, TypeError), ("grad_output",)),
        ("dy=None", {"dy": None}, (ValueError, TypeError), ("grad_output",)),
        ("dy on meta", {"dy": torch.ones(x.shape, dtype=x.dtype, device="meta")}, (RuntimeError,), ("grad_output",)),
    ]


def _check_grads(out, kw) -> None:
    x = kw["x"]
    _check_like_input(out.dx, x, kw["mode"])
    _check_per_channel(out.dweight, x)
    _check_per_channel(out.dbias, x)
    if _count(x) > 0:
        _finite(out.dx, x)


@st.composite
def train_backward_calls(draw) -> Call:
    x = draw(inputs(training=True))
    mode = draw(st.sampled_from(["native", "oracle"]), label="mode")
    w = draw(st.sampled_from([None, per_channel(x, param_dtype(draw, x, mode), seed=1)]), label="weight")
    dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64).to(x.dtype)
    eps = draw(st.sampled_from([1e-5, 0.5]), label="eps")
    kwargs = dict(dy=dy, x=x, weight=w, eps=eps, mode=mode)
    if draw(st.booleans(), label="stats given") and _count(x) > 0:
        kwargs["stats"] = R.batch_stats(x, mode=mode)
    return Call(R.train_backward, kwargs, _check_grads)


def train_backward_mutations(kw: dict) -> list:
    x = kw["x"]
    return (_input_mutations() + _eps_mutations(True) + _mode_mutations() + _per_channel_mutations("weight", x)
            + _grad_mutations(x))


@st.composite
def eval_backward_calls(draw) -> Call:
    x = draw(inputs(training=False))
    mode = draw(st.sampled_from(["native", "oracle"]), label="mode")
    pd = param_dtype(draw, x, mode)
    w = draw(st.sampled_from([None, per_channel(x, pd, seed=1)]), label="weight")
    dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64).to(x.dtype)
    kwargs = dict(dy=dy, x=x, running_mean=per_channel(x, pd, seed=3),
                  running_var=per_channel(x, pd, positive=True, seed=4), weight=w,
                  eps=draw(st.sampled_from([0.0, 1e-5]), label="eps"), mode=mode)
    return Call(R.eval_backward, kwargs, _check_grads)


def eval_backward_mutations(kw: dict) -> list:
    x = kw["x"]
    return (_input_mutations() + _eps_mutations(False) + _mode_mutations()
            + _per_channel_mutations("running_mean", x) + _per_channel_mutations("running_var", x)
            + _grad_mutations(x))


def _count(x: torch.Tensor) -> int:
    return x.shape[0] * math.prod(x.shape[2:])


CALLS = {
    "train_forward": (train_forward_calls, train_forward_mutations),
    "eval_forward": (eval_forward_calls, eval_forward_mutations),
    "batch_stats": (batch_stats_calls, batch_stats_mutations),
    "update_running_stats": (update_running_stats_calls, update_running_stats_mutations),
    "train_backward": (train_backward_calls, train_backward_mutations),
    "eval_backward": (eval_backward_calls, eval_backward_mutations),
}
_DUMMY = {"x": torch.ones(4, 3), "mode": "native", "batch_mean": torch.zeros(3)}
#: (function, mutation label): one test each, so every bad argument is tried.
MUTATIONS = [(name, m[0]) for name, (_, mutations) in CALLS.items() for m in mutations(_DUMMY)]


# ----------------------------------------------------------------------------- tests


@pytest.mark.parametrize("name", list(CALLS))
@settings(max_examples=EXAMPLES)
@given(data=st.data())
def test_valid_arguments_give_results_of_the_right_shape(name, data):
    call = data.draw(CALLS[name][0](), label="call")
    out = call.fn(**call.kwargs)
    call.check(out, call.kwargs)


@pytest.mark.parametrize("name, label", MUTATIONS, ids=[f"{n}-{lab}" for n, lab in MUTATIONS])
@settings(max_examples=MUTATION_EXAMPLES)
@given(data=st.data())
def test_one_invalid_argument_gives_a_clear_error(name, label, data):
    strategy, mutations = CALLS[name]
    call = data.draw(strategy(), label="call")
    _, bad, types, texts = next(m for m in mutations(call.kwargs) if m[0] == label)
    assume(bad is not None)  # the mutation does not apply to this call (e.g. oracle mode)
    kwargs = {**call.kwargs, **bad}
    if name == "train_backward" and "x" in bad:
        kwargs.pop("stats", None)  # statistics of the old x would be a second bad argument
    try:
        out = call.fn(**kwargs)
    except CLEAR_ERRORS as exc:
        assert isinstance(exc, types), f"{label}: {type(exc).__name__}: {exc}"
        message = str(exc)
        assert all(t in message for t in texts), f"{label}: message {message!r} does not name {texts}"
    except Exception as exc:  # noqa: BLE001 - the point of the test
        pytest.fail(f"{label}: raised {type(exc).__name__} ({exc}), expected {[t.__name__ for t in types]}")
    else:
        pytest.fail(f"{label}: returned {type(out).__name__} instead of raising {[t.__name__ for t in types]}")


def test_every_public_function_is_fuzzed():
    assert set(CALLS) == {n for n in R.__all__ if callable(getattr(R, n)) and n[0].islower()}


# ----------------------------------------------------------------------------- found by fuzzing

_x = torch.randn(4, 3, 2, 2)
_c = torch.ones(3)

#: Bad arguments the reference once let through (or failed on with an unrelated
#: message); each must raise one of the clear types and name the argument.
FOUND_BY_FUZZING = {
    "batch_var of the wrong size": (
        lambda: R.update_running_stats(_c * 0, _c, torch.tensor(0), _c * 0, torch.ones(2), 4, momentum=0.1),
        "batch_var"),
    "integer running_mean": (
        lambda: R.update_running_stats(torch.zeros(3, dtype=torch.int64), _c, torch.tensor(0), _c * 0, _c, 4,
                                       momentum=0.1), "running_mean"),
    "fractional num_batches_tracked": (
        lambda: R.update_running_stats(_c * 0, _c, torch.tensor(0.5), _c * 0, _c, 4, momentum=None),
        "num_batches_tracked"),
    "train_backward stats of the wrong size": (
        lambda: R.train_backward(torch.ones_like(_x), _x, stats=(torch.zeros(2), _c)), "stats"),
    "train_backward stats not a pair": (lambda: R.train_backward(torch.ones_like(_x), _x, stats=5), "stats"),
    "eval_backward running_mean None": (
        lambda: R.eval_backward(torch.ones_like(_x), _x, None, _c), "running_mean"),
}


@pytest.mark.parametrize("case", list(FOUND_BY_FUZZING))
def test_found_by_fuzzing_raises_clearly(case):
    fn, name = FOUND_BY_FUZZING[case]
    with pytest.raises(CLEAR_ERRORS) as info:
        fn()
    assert name in str(info.value), f"{type(info.value).__name__}: {info.value}"


def test_weight_of_shape_c_by_1_is_accepted_like_torch():
    """torch reads weight and bias by element count: a (C, 1) weight works there, so here too."""
    w, b = torch.rand(3, 1) + 0.5, torch.randn(1, 3)
    expected = torch.nn.functional.batch_norm(_x, None, None, w, b, True)
    torch.testing.assert_close(R.train_forward(_x, w, b).y, expected)
    expected = torch.nn.functional.batch_norm(_x, _c * 0.5, _c * 2, w, b, False)
    torch.testing.assert_close(R.eval_forward(_x, _c * 0.5, _c * 2, w, b), expected)
