"""bnspec.BatchNorm1d/2d/3d against torch.nn.BatchNorm1d/2d/3d of torch 2.13
(clauses S1-S3 through the modules, S4 gradients, S5 module contract, S6 errors, S7).

Tolerances follow tests/test_reference.py (its docstring has the derivation): a value
is compared with the float64 oracle (``bnspec.reference`` in ``mode="oracle"``) and must
satisfy ``|got - oracle| <= K * (u(out) + u(acc) * rho(n)) * (1 + scale)``, with ``u``
the unit roundoff, ``rho(n) = sqrt(n)`` for float32 reductions and ``n`` for float64,
and ``scale`` the magnitudes entering the value. Both torch and bnspec are judged by
the same bound; neither is the reference for the other.
"""

from __future__ import annotations

import inspect
import itertools
import math
import zlib

import pytest
import torch
from torch import nn

import bnspec
from bnspec import reference as R

F16, BF16, F32, F64 = torch.float16, torch.bfloat16, torch.float32, torch.float64

# case id -> (class name, input shape)
CASES = {
    "1d-NC": ("BatchNorm1d", (8, 3)),
    "1d-NCL": ("BatchNorm1d", (4, 3, 5)),
    "2d": ("BatchNorm2d", (4, 3, 5, 5)),
    "3d": ("BatchNorm3d", (2, 3, 3, 4, 5)),
}
NAMES = ("BatchNorm1d", "BatchNorm2d", "BatchNorm3d")
SWITCHES = [  # (affine, track_running_stats, bias)
    dict(affine=a, track_running_stats=t, bias=b)
    for a, t, b in itertools.product((True, False), (True, False), (True, False))
    if a or b  # bias=False without affine is the same module as affine=False
]
SWITCH_IDS = [
    f"affine={s['affine']}-track={s['track_running_stats']}-bias={s['bias']}" for s in SWITCHES
]
# K for forward outputs and running statistics: see K_FORWARD in test_reference.py
# (torch with float16/bfloat16 parameters rounds the batch mean and 1/std to that dtype
# before normalizing: up to two extra roundings in the output dtype; measured 1.32 of
# the K = 1 budget). K = 4 leaves ~3x margin.
K = 4


def _gen(*key: object) -> torch.Generator:
    """A generator seeded from the test's parameters (crc32: stable across runs)."""
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


def _randn(shape, g, dtype=F64, *, scale=2.0, shift=0.5):
    """Well conditioned data made in float64, then rounded once to ``dtype``."""
    return (torch.randn(shape, generator=g, dtype=F64) * scale + shift).to(dtype)


def _u(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps / 2


def _budget(out_dtype: torch.dtype, n: int) -> float:
    """u(out) + u(acc) * rho(n): float32 reductions for every dtype but float64."""
    if out_dtype == F64:
        return _u(F64) + _u(F64) * max(n, 1)
    return _u(out_dtype) + _u(F32) * math.sqrt(max(n, 1))


def _assert_within(got, oracle, scale, *, out_dtype, n, k=K, what=""):
    got, oracle = got.detach().to(F64), oracle.detach().to(F64)
    err = (got - oracle).abs()
    bound = k * _budget(out_dtype, n) * (1 + scale)
    if not bool((err <= bound).all()):
        ratio = (err / bound).nan_to_num(float("inf")).max().item()
        raise AssertionError(f"{what}: max error/bound = {ratio:.3g} (k={k}, n={n}, {out_dtype})")


def _pc(v, dim):
    return v.reshape(1, -1, *([1] * (dim - 2)))


def _count(x):
    return x.numel() // x.shape[1]


def _forward_scale(x, mean, var, w, b, eps):
    """(|x| + |mean|) / sqrt(var + eps) * |w| + |b|, in float64."""
    d = x.dim()
    s = (x.to(F64).abs() + _pc(mean.to(F64).abs(), d)) * _pc(torch.rsqrt(var.to(F64) + eps), d)
    if w is not None:
        s = s * _pc(w.detach().to(F64).abs(), d)
    if b is not None:
        s = s + _pc(b.detach().to(F64).abs(), d)
    return s


def _pair(name, *args, seed=None, **kwargs):
    """(torch module, bnspec module) built with the same arguments and, with ``seed``,
    the same random (non-default) weight and bias."""
    t = getattr(nn, name)(*args, **kwargs)
    b = getattr(bnspec, name)(*args, **kwargs)
    if seed is not None:
        g = _gen("params", seed)
        with torch.no_grad():
            for p in t.parameters():
                p.copy_(_randn(p.shape, g, scale=1.0, shift=0.0))
        b.load_state_dict(t.state_dict())
    return t, b


def _layout(y):
    cl = {4: torch.channels_last, 5: torch.channels_last_3d}.get(y.dim())
    return (y.is_contiguous(), None if cl is None else y.is_contiguous(memory_format=cl))


def _expected_train(x, m, eps):
    """Oracle output and scale for a training forward of module m (its weight/bias)."""
    o = R.train_forward(x, m.weight, m.bias, eps=eps, mode="oracle")
    return o, _forward_scale(x, o.mean, o.var, m.weight, m.bias, eps)


# ----------------------------------------------------------------------------- S5 contract


@pytest.mark.parametrize("name", NAMES)
def test_S5_constructor_signature(name):
    ours = inspect.signature(getattr(bnspec, name).__init__, eval_str=True)
    theirs = inspect.signature(getattr(nn, name).__init__, eval_str=True)
    assert ours == theirs  # names, kinds (bias keyword-only), defaults, annotations
    assert ours.parameters["bias"].kind is inspect.Parameter.KEYWORD_ONLY
    assert issubclass(getattr(bnspec, name), nn.Module)


@pytest.mark.parametrize("dtype", [None, F64, F16], ids=["default", "float64", "float16"])
@pytest.mark.parametrize("switches", SWITCHES, ids=SWITCH_IDS)
@pytest.mark.parametrize("name", NAMES)
def test_S5_defaults_parameters_buffers(name, switches, dtype):
    t, b = _pair(name, 5, dtype=dtype, **switches)
    for attr in ("num_features", "eps", "momentum", "affine", "track_running_stats", "training"):
        assert getattr(b, attr) == getattr(t, attr)
    assert (b.eps, b.momentum, b.num_features, b.training) == (1e-5, 0.1, 5, True)
    # registered buffers, including the ones registered as None, in the same order
    # (the parameter registry: test_S5_parameter_registry below)
    assert {k: v is None for k, v in b._buffers.items()} == {
        k: v is None for k, v in t._buffers.items()}
    assert list(b._buffers) == list(t._buffers)
    assert [k for k, _ in b.named_parameters()] == [k for k, _ in t.named_parameters()]
    assert [k for k, _ in b.named_buffers()] == [k for k, _ in t.named_buffers()]
    for (k, vb), (_, vt) in zip(itertools.chain(b.named_parameters(), b.named_buffers()),
                                itertools.chain(t.named_parameters(), t.named_buffers())):
        assert vb.dtype == vt.dtype and vb.shape == vt.shape and vb.device == vt.device, k
        assert torch.equal(vb, vt), k
        assert type(vb) is type(vt), k  # Parameter vs plain tensor
    want_dtype = dtype or F32
    if switches["affine"]:
        assert torch.equal(b.weight, torch.ones(5, dtype=want_dtype))
        if switches["bias"]:
            assert torch.equal(b.bias, torch.zeros(5, dtype=want_dtype))
        else:
            assert b.bias is None
    else:
        assert b.weight is None and b.bias is None
    if switches["track_running_stats"]:
        assert torch.equal(b.running_mean, torch.zeros(5, dtype=want_dtype))
        assert torch.equal(b.running_var, torch.ones(5, dtype=want_dtype))
        assert b.num_batches_tracked.dtype == torch.int64 and b.num_batches_tracked.dim() == 0
        assert int(b.num_batches_tracked) == 0
    else:
        assert b.running_mean is None and b.running_var is None and b.num_batches_tracked is None


@pytest.mark.parametrize("switches", [
    pytest.param(s, id=i)
    for s, i in zip(SWITCHES, SWITCH_IDS)
])
@pytest.mark.parametrize("name", NAMES)
def test_S5_parameter_registry(name, switches):
    """Parameters registered as None count: they decide what assignment accepts."""
    t, b = _pair(name, 5, **switches)
    assert {k: v is None for k, v in b._parameters.items()} == {
        k: v is None for k, v in t._parameters.items()}
    assert list(b._parameters) == list(t._parameters)


@pytest.mark.parametrize(
    "kwargs",
    [{}, dict(eps=1e-3, momentum=None), dict(momentum=0.0, affine=False),
     dict(track_running_stats=False, bias=False), dict(eps=0.5, momentum=1.5)],
)
@pytest.mark.parametrize("name", NAMES)
def test_S5_repr(name, kwargs):
    t, b = _pair(name, 7, **kwargs)
    assert repr(b) == repr(t)


def test_S5_keyword_only_bias():
    with pytest.raises(TypeError):
        bnspec.BatchNorm2d(3, 1e-5, 0.1, True, True, None, None, False)
    with pytest.raises(TypeError):
        nn.BatchNorm2d(3, 1e-5, 0.1, True, True, None, None, False)


# ----------------------------------------------------------------------------- S1-S3 steps

MOMENTA = (0.1, None, 0.0, 1.0)


def _check_step(t, b, x, eps, what):
    """One forward of both modules on x: outputs and running statistics vs the oracle."""
    x0 = x.clone()
    track_before = None if b.running_mean is None else (b.running_mean.clone(), b.running_var.clone())
    torch_before = {k: v.clone() for k, v in t.named_buffers()}
    yt, yb = t(x), b(x)
    assert torch.equal(x, x0), "input modified"
    assert yb.shape == yt.shape == x.shape and yb.dtype == yt.dtype == x.dtype
    assert yb.device == yt.device and _layout(yb) == _layout(yt)
    n = _count(x)
    uses_batch = b.training or b.running_mean is None
    if uses_batch:
        oracle, scale = _expected_train(x, b, eps)
        want = oracle.y
    else:
        want = R.eval_forward(x, b.running_mean, b.running_var, b.weight, b.bias, eps=eps,
                              mode="oracle")
        scale = _forward_scale(x, b.running_mean, b.running_var, b.weight, b.bias, eps)
        n = 1  # no reduction in eval
    for who, y in (("bnspec", yb), ("torch", yt)):
        _assert_within(y, want, scale, out_dtype=x.dtype, n=n, what=f"{what} {who} y")
    if b.running_mean is not None:
        assert b.num_batches_tracked.dtype == torch.int64
        assert int(b.num_batches_tracked) == int(t.num_batches_tracked)
        if b.training:
            # the blend's magnitudes: |1-f| |old| + |f| |batch statistic|; |f| <= 1 here
            xabs = x.detach().to(F64).abs().amax(dim=(0, *range(2, x.dim())))
            nn_ = _count(x)
            sm = track_before[0].to(F64).abs() + xabs
            sv = track_before[1].to(F64).abs() + 4 * xabs**2 * nn_ / max(nn_ - 1, 1)
            _assert_within(b.running_mean, t.running_mean, sm, out_dtype=b.running_mean.dtype,
                           n=nn_, what=f"{what} running_mean")
            _assert_within(b.running_var, t.running_var, sv, out_dtype=b.running_var.dtype,
                           n=nn_, what=f"{what} running_var")
        else:  # eval never changes the buffers
            assert torch.equal(b.running_mean, track_before[0])
            assert torch.equal(b.running_var, track_before[1])
            assert all(torch.equal(v, torch_before[k]) for k, v in t.named_buffers())
    return yt, yb


@pytest.mark.parametrize("track", [True, False], ids=["track", "no-track"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no-affine"])
@pytest.mark.parametrize("momentum", MOMENTA, ids=[f"m={m}" for m in MOMENTA])
@pytest.mark.parametrize("eps", [1e-5, 0.5])
@pytest.mark.parametrize("case", CASES)
def test_S1_S2_S3_training_steps_then_eval(case, eps, momentum, affine, track):
    name, shape = CASES[case]
    kw = dict(eps=eps, momentum=momentum, affine=affine, track_running_stats=track, dtype=F64)
    t, b = _pair(name, 3, seed=(case, eps, momentum, affine, track), **kw)
    g = _gen("steps", case, eps, momentum, affine, track)
    for step in range(1, 4):
        _check_step(t, b, _randn(shape, g), eps, f"train step {step}")
    if track:
        assert int(b.num_batches_tracked) == 3
        if momentum == 0.0:  # frozen
            assert torch.equal(b.running_mean, torch.zeros(3, dtype=F64))
            assert torch.equal(b.running_var, torch.ones(3, dtype=F64))
    t.eval(), b.eval()
    for step in range(2):
        x = _randn(shape, g)
        yt, yb = _check_step(t, b, x, eps, f"eval step {step}")
        if not track:  # no buffers: eval normalizes with the batch's statistics
            oracle, scale = _expected_train(x, b, eps)
            _assert_within(yb, oracle.y, scale, out_dtype=F64, n=_count(x), what="eval batch stats")
    if track:
        assert int(b.num_batches_tracked) == 3


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("case", CASES)
def test_S3_buffers_carry_no_autograd_history(case, momentum):
    name, shape = CASES[case]
    t, b = _pair(name, 3, seed=case, momentum=momentum, dtype=F64)
    g = _gen("history", case, momentum)
    for _ in range(2):
        x = _randn(shape, g).requires_grad_(True)
        for m in (t, b):
            m(x).sum().backward()
            for buf in (m.running_mean, m.running_var, m.num_batches_tracked):
                assert not buf.requires_grad and buf.grad_fn is None
    assert torch.equal(b.num_batches_tracked, t.num_batches_tracked)


@pytest.mark.parametrize("case", CASES)
def test_S2_eval_each_sample_independent(case):
    name, shape = CASES[case]
    _, b = _pair(name, 3, seed=case, dtype=F64)
    g = _gen("indep", case)
    b(_randn(shape, g))  # non-default running statistics
    b.eval()
    x = _randn(shape, g)
    full = b(x)
    for i in range(shape[0]):
        assert torch.equal(b(x[i : i + 1]), full[i : i + 1])


DTYPE_CASES = {  # id -> (module dtype, input dtype)
    "float64": (F64, F64),
    "float32": (F32, F32),
    "float16": (F16, F16),
    "bfloat16": (BF16, BF16),
    "f32-module-float16-input": (F32, F16),
    "f32-module-bfloat16-input": (F32, BF16),
}
LAYOUTS = {
    "contiguous": None,
    "channels_last": torch.channels_last,
    "channels_last_3d": torch.channels_last_3d,
}


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtypes", DTYPE_CASES.values(), ids=DTYPE_CASES.keys())
def test_S7_dtypes_and_channels_last(dtypes, layout):
    mdt, xdt = dtypes
    name, shape = ("BatchNorm3d", (2, 3, 3, 4, 5)) if layout == "channels_last_3d" else (
        "BatchNorm2d", (4, 3, 5, 5))
    t, b = _pair(name, 3, seed=(dtypes, layout), dtype=mdt, momentum=0.3)
    g = _gen("dtypes", dtypes, layout)
    for training in (True, True, False):
        t.train(training), b.train(training)
        x = _randn(shape, g, xdt)
        if LAYOUTS[layout] is not None:
            x = x.to(memory_format=LAYOUTS[layout])
        yt, yb = _check_step(t, b, x, 1e-5, f"{'train' if training else 'eval'}")
        if LAYOUTS[layout] is not None:
            assert _layout(yb) == (False, True)
        else:
            assert yb.is_contiguous()
        assert b.weight.dtype == b.running_mean.dtype == mdt


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("case", CASES)
def test_S3_empty_batch(case, momentum):
    name, shape = CASES[case]
    t, b = _pair(name, 3, seed=case, momentum=momentum, dtype=F64)
    g = _gen("empty", case, momentum)
    _check_step(t, b, _randn(shape, g), 1e-5, "first step")
    before = {k: v.clone() for k, v in b.named_buffers()}
    empty = torch.empty((0, *shape[1:]), dtype=F64, requires_grad=True)
    yt, yb = t(empty), b(empty)
    assert yb.shape == yt.shape == empty.shape and yb.dtype == F64
    assert torch.equal(b.running_mean, before["running_mean"])
    assert torch.equal(b.running_var, before["running_var"])
    assert int(b.num_batches_tracked) == int(t.num_batches_tracked) == 2
    # backward through an empty batch: empty dx, zero dweight/dbias, as torch
    yb.sum().backward(), yt.sum().backward()
    assert torch.equal(b.weight.grad, t.weight.grad) and torch.equal(b.bias.grad, t.bias.grad)
    assert torch.equal(b.weight.grad, torch.zeros(3, dtype=F64))
    # the next step's cumulative factor is 1/3: the empty step counted
    x = _randn(shape, g)
    _check_step(t, b, x, 1e-5, "after empty")
    assert int(b.num_batches_tracked) == 3
    if momentum is None:
        mean, _ = R.batch_stats(x, mode="oracle")
        want = before["running_mean"] * (2 / 3) + mean / 3
        _assert_within(b.running_mean, want, want.abs() + mean.abs(), out_dtype=F64,
                       n=_count(x), what="cumulative mean")


# ----------------------------------------------------------------------------- S5 state_dict


@pytest.mark.parametrize("switches", SWITCHES, ids=SWITCH_IDS)
@pytest.mark.parametrize("case", CASES)
def test_S5_state_dict_roundtrip(case, switches):
    name, shape = CASES[case]
    g = _gen("sd", case, switches)
    t, b = _pair(name, 3, dtype=F64, **switches)
    assert list(b.state_dict()) == list(t.state_dict())
    # torch -> bnspec, after torch has trained (non-default statistics and parameters)
    with torch.no_grad():
        for p in t.parameters():
            p.copy_(_randn(3, g, scale=1.0, shift=0.0))
    t(_randn(shape, g)), t(_randn(shape, g))
    result = b.load_state_dict(t.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    for k, v in t.state_dict().items():
        assert torch.equal(b.state_dict()[k], v) and b.state_dict()[k].dtype == v.dtype, k
    for training in (False, True):
        t.train(training), b.train(training)
        _check_step(t, b, _randn(shape, g), 1e-5, f"after load, training={training}")
    # bnspec -> torch
    b.train()
    b(_randn(shape, g))
    t2 = getattr(nn, name)(3, dtype=F64, **switches)
    t2.load_state_dict(b.state_dict(), strict=True)
    for k, v in b.state_dict().items():
        assert torch.equal(t2.state_dict()[k], v), k
    t2.eval(), b.eval()
    _check_step(t2, b, _randn(shape, g), 1e-5, "bnspec -> torch")


def _version1_state_dict(module_name, **kw):
    """A state dict as torch wrote it before num_batches_tracked existed (version 1),
    for a BatchNorm at prefix '0.' of a Sequential."""
    src = nn.Sequential(getattr(nn, module_name)(3, **kw))
    if src[0].running_mean is not None:
        src[0].running_mean.fill_(0.25)
    sd = src.state_dict()
    sd.pop("0.num_batches_tracked", None)
    sd._metadata["0"]["version"] = 1
    return sd


@pytest.mark.parametrize("name", NAMES)
def test_S5_load_version1_state_dict(name):
    sd = _version1_state_dict(name)
    assert "0.num_batches_tracked" not in sd
    t = nn.Sequential(getattr(nn, name)(3))
    b = nn.Sequential(getattr(bnspec, name)(3))
    for m in (t, b):
        res = m.load_state_dict(sd, strict=True)
        assert not res.missing_keys and not res.unexpected_keys
    assert torch.equal(b[0].running_mean, t[0].running_mean)
    assert torch.equal(b[0].num_batches_tracked, t[0].num_batches_tracked)
    assert b[0].num_batches_tracked.dtype == torch.int64 and int(b[0].num_batches_tracked) == 0


@pytest.mark.parametrize("name", NAMES)
def test_S5_load_version1_state_dict_keeps_current_counter(name):
    sd = _version1_state_dict(name)
    t = nn.Sequential(getattr(nn, name)(3))
    b = nn.Sequential(getattr(bnspec, name)(3))
    t[0].num_batches_tracked.fill_(7), b[0].num_batches_tracked.fill_(7)
    t.load_state_dict(sd, strict=True), b.load_state_dict(sd, strict=True)
    assert int(t[0].num_batches_tracked) == 7  # torch keeps the counter
    assert int(b[0].num_batches_tracked) == int(t[0].num_batches_tracked)


def test_S5_load_version1_state_dict_without_tracking():
    sd = _version1_state_dict("BatchNorm2d", track_running_stats=False)
    t = nn.Sequential(nn.BatchNorm2d(3, track_running_stats=False))
    b = nn.Sequential(bnspec.BatchNorm2d(3, track_running_stats=False))
    for m in (t, b):
        res = m.load_state_dict(sd, strict=True)
        assert not res.missing_keys and not res.unexpected_keys


# ----------------------------------------------------------------------------- S5 resets


@pytest.mark.parametrize("case", CASES)
def test_S5_reset_running_stats_and_parameters(case):
    name, shape = CASES[case]
    t, b = _pair(name, 3, seed=case, dtype=F64)
    g = _gen("reset", case)
    x = _randn(shape, g)
    t(x), b(x)
    ids = {k: v.data_ptr() for k, v in itertools.chain(b.named_parameters(), b.named_buffers())}
    w = b.weight.detach().clone()
    t.reset_running_stats(), b.reset_running_stats()
    assert torch.equal(b.running_mean, torch.zeros(3, dtype=F64))
    assert torch.equal(b.running_var, torch.ones(3, dtype=F64))
    assert int(b.num_batches_tracked) == 0 and b.num_batches_tracked.dtype == torch.int64
    assert torch.equal(b.weight, w)  # parameters untouched
    for k, v in t.state_dict().items():
        assert torch.equal(b.state_dict()[k], v), k
    t(x), b(x)
    t.reset_parameters(), b.reset_parameters()
    assert torch.equal(b.weight, torch.ones(3, dtype=F64))
    assert torch.equal(b.bias, torch.zeros(3, dtype=F64))
    assert int(b.num_batches_tracked) == 0
    for k, v in t.state_dict().items():
        assert torch.equal(b.state_dict()[k], v), k
    # in place: the same tensors, so optimizers and references stay valid
    assert ids == {k: v.data_ptr() for k, v in itertools.chain(b.named_parameters(), b.named_buffers())}
    # no-op without tracking / without affine, as torch
    for kw in (dict(track_running_stats=False), dict(affine=False)):
        t, b = _pair(name, 3, **kw)
        t.reset_parameters(), b.reset_parameters()
        assert list(b.state_dict()) == list(t.state_dict())


# ----------------------------------------------------------------------------- S6 errors


def _raise_both(t, b, x):
    """Call both; both must raise. Returns the two exceptions."""
    errors = []
    for m in (t, b):
        with pytest.raises(Exception) as info:
            m(x)
        errors.append(info.value)
    return errors


def _assert_same_error(t, b, x, etype):
    et, eb = _raise_both(t, b, x)
    assert type(et) is etype, f"torch raised {type(et).__name__}: {et}"
    assert type(eb) is type(et) and str(eb) == str(et), (
        f"torch: {type(et).__name__}: {et}\nbnspec: {type(eb).__name__}: {eb}")


@pytest.mark.parametrize("name, shape", [
    ("BatchNorm1d", (1, 3)), ("BatchNorm1d", (1, 3, 1)), ("BatchNorm2d", (1, 3, 1, 1)),
    ("BatchNorm3d", (1, 3, 1, 1, 1)),
])
def test_S6_one_value_per_channel(name, shape):
    t, b = _pair(name, 3)
    _assert_same_error(t, b, torch.ones(shape), ValueError)
    assert "Expected more than 1 value per channel when training" in str(_raise_both(t, b, torch.ones(shape))[1])
    t.eval(), b.eval()  # legal in eval
    assert b(torch.ones(shape)).shape == shape


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name, shape, text", [
    ("BatchNorm1d", (3,), "expected 2D or 3D input (got 1D input)"),
    ("BatchNorm1d", (2, 3, 2, 2), "expected 2D or 3D input (got 4D input)"),
    ("BatchNorm2d", (2, 3, 2), "expected 4D input (got 3D input)"),
    ("BatchNorm2d", (2, 3, 2, 2, 2), "expected 4D input (got 5D input)"),
    ("BatchNorm3d", (2, 3, 2, 2), "expected 5D input (got 4D input)"),
    ("BatchNorm3d", (2, 3, 2, 2, 2, 2), "expected 5D input (got 6D input)"),
])
def test_S6_wrong_rank(name, shape, text, training):
    t, b = _pair(name, 3)
    t.train(training), b.train(training)
    _assert_same_error(t, b, torch.ones(shape), ValueError)
    assert str(_raise_both(t, b, torch.ones(shape))[1]) == text


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("track, text", [
    (True, "running_mean should contain 4 elements not 3"),
    (False, "weight should contain 4 elements not 3"),
])
@pytest.mark.parametrize("case", CASES)
def test_S6_wrong_channel_count(case, track, text, training):
    name, shape = CASES[case]
    t, b = _pair(name, 3, track_running_stats=track)
    t.train(training), b.train(training)
    x = torch.ones((shape[0], 4, *shape[2:]))
    _assert_same_error(t, b, x, RuntimeError)
    assert str(_raise_both(t, b, x)[1]) == text


def test_S6_wrong_channel_count_not_checked_without_per_channel_tensors():
    t, b = _pair("BatchNorm2d", 3, affine=False, track_running_stats=False)
    x = _randn((4, 4, 2, 2), _gen("no-check"))
    _check_step(t, b, x, 1e-5, "C=4 into num_features=3")  # torch accepts it too


@pytest.mark.parametrize("eps, training", [(0.0, True), (-1e-5, True), (-1e-5, False)])
def test_S6_eps(eps, training):
    t, b = _pair("BatchNorm2d", 3, eps=eps)
    t.train(training), b.train(training)
    _assert_same_error(t, b, torch.ones(2, 3, 2, 2), ValueError)


def test_S6_eps_zero_in_eval_is_legal():
    t, b = _pair("BatchNorm2d", 3, seed="eps0", eps=0.0, dtype=F64)
    t.eval(), b.eval()
    _check_step(t, b, _randn((4, 3, 2, 2), _gen("eps0")), 0.0, "eps=0 eval")


_INT_CONFIGS = {
    "no-per-channel-tensors": dict(affine=False, track_running_stats=False),
    "affine": dict(track_running_stats=False),
    "tracking": dict(affine=False),
    "default": {},
}


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", [torch.int64, torch.bool], ids=["int64", "bool"])
@pytest.mark.parametrize("config", [
    pytest.param(k) for k in _INT_CONFIGS
])
def test_S6_integer_input_raises_not_implemented(config, dtype, training):
    t, b = _pair("BatchNorm2d", 3, **_INT_CONFIGS[config])
    t.train(training), b.train(training)
    et, eb = _raise_both(t, b, torch.ones(2, 3, 2, 2, dtype=dtype))
    assert type(et) is NotImplementedError
    assert type(eb) is NotImplementedError, f"{type(eb).__name__}: {eb}"


def test_S6_integer_input_message_matches_torch():
    t, b = _pair("BatchNorm2d", 3, affine=False, track_running_stats=False)
    _assert_same_error(t, b, torch.ones(2, 3, 2, 2, dtype=torch.int64), NotImplementedError)


@pytest.mark.parametrize("xdt, mdt", [(F64, F32), (F32, F64), (F32, F16)])
def test_S6_mixed_dtypes_raise_runtime_error(xdt, mdt):
    # Same type as torch; the message differs ("mixed dtype (CPU): ..." in torch).
    t, b = _pair("BatchNorm2d", 3, dtype=mdt)
    et, eb = _raise_both(t, b, torch.ones(2, 3, 2, 2, dtype=xdt))
    assert type(et) is type(eb) is RuntimeError
    assert "mixed dtype" in str(et) and "mixed dtype" in str(eb)


def test_S6_failed_call_leaves_state_untouched():
    """A documented, deliberate difference (bnspec/modules.py docstring): torch counts
    the step before it validates the input, bnspec validates first."""
    t, b = _pair("BatchNorm2d", 3)
    for m in (t, b):
        with pytest.raises(RuntimeError):
            m(torch.ones(2, 4, 2, 2))
    assert int(b.num_batches_tracked) == 0
    assert int(t.num_batches_tracked) == 1  # torch 2.13 behaviour, recorded here


# ----------------------------------------------------------------------------- S4 gradients

PARAM_CONFIGS = {
    "affine": dict(),
    "no-bias": dict(bias=False),
    "no-affine": dict(affine=False),
}


def _grad_scales(x, dy, mean, var, w, eps, training):
    """Magnitudes entering dx (per element), dweight and dbias (per channel)."""
    d = x.dim()
    axes = (0, *range(2, d))
    r = _pc(torch.rsqrt(var.to(F64) + eps), d)
    wabs = 1.0 if w is None else _pc(w.detach().to(F64).abs(), d)
    xmag = (x.detach().to(F64).abs() + _pc(mean.to(F64).abs(), d)) * r
    dya = dy.to(F64).abs()
    if training:
        sdx = wabs * r * (dya + _pc(dya.mean(dim=axes), d) + xmag * _pc((dya * xmag).mean(dim=axes), d))
    else:
        sdx = wabs * r * dya
    return sdx, (dya * xmag).sum(dim=axes), dya.sum(dim=axes)


@pytest.mark.parametrize("params", PARAM_CONFIGS)
@pytest.mark.parametrize("dtype", [F64, F32], ids=["float64", "float32"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("case", CASES)
def test_S4_gradients_match_torch(case, training, dtype, params):
    name, shape = CASES[case]
    eps = 1e-3
    t, b = _pair(name, 3, seed=(case, params), eps=eps, dtype=dtype, **PARAM_CONFIGS[params])
    g = _gen("grads", case, training, dtype, params)
    if not training:  # non-default running statistics
        x0 = _randn(shape, g, dtype)
        t(x0), b(x0)
    t.train(training), b.train(training)
    x = _randn(shape, g, dtype)
    dy = _randn(shape, g, dtype, scale=1.0, shift=0.0)
    grads = {}
    stats = (b.running_mean.clone(), b.running_var.clone())
    for who, m in (("torch", t), ("bnspec", b)):
        xr = x.clone().requires_grad_(True)
        m(xr).backward(dy)
        grads[who] = (xr.grad, getattr(m.weight, "grad", None), getattr(m.bias, "grad", None))
    w = b.weight
    n = _count(x)
    if training:
        oracle = R.train_backward(dy, x, w, eps=eps, mode="oracle")
        mean, var = R.batch_stats(x, mode="oracle")
    else:
        oracle = R.eval_backward(dy, x, *stats, w, eps=eps, mode="oracle")
        mean, var = stats
    sdx, sdw, sdb = _grad_scales(x, dy, mean, var, w, eps, training)
    for who, (dx, dw, db) in grads.items():
        assert dx.dtype == dtype and dx.shape == x.shape
        _assert_within(dx, oracle.dx, sdx, out_dtype=dtype, n=n if training else 1,
                       what=f"{who} dx")
        if b.weight is not None:
            _assert_within(dw, oracle.dweight, sdw, out_dtype=dtype, n=n, what=f"{who} dweight")
        if b.bias is not None:
            _assert_within(db, oracle.dbias, sdb, out_dtype=dtype, n=n, what=f"{who} dbias")
    assert (grads["bnspec"][1] is None) == (grads["torch"][1] is None)
    assert (grads["bnspec"][2] is None) == (grads["torch"][2] is None)


GC_CASES = {
    "1d-NC": ("BatchNorm1d", (5, 2)),
    "1d-NCL": ("BatchNorm1d", (3, 2, 3)),
    "2d": ("BatchNorm2d", (2, 2, 2, 3)),
    "3d": ("BatchNorm3d", (2, 2, 2, 1, 2)),
}


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("case", GC_CASES)
def test_S4_gradcheck_gradgradcheck(case, training):
    name, shape = GC_CASES[case]
    g = _gen("gradcheck", case, training)
    m = getattr(bnspec, name)(2, eps=1e-3, dtype=F64)
    with torch.no_grad():
        m.running_mean.copy_(torch.tensor([0.3, -0.2], dtype=F64))
        m.running_var.copy_(torch.tensor([1.5, 0.7], dtype=F64))
    m.train(training)
    x = _randn(shape, g).requires_grad_(True)
    w = _randn(2, g, scale=1.0, shift=1.0).requires_grad_(True)
    b = _randn(2, g, scale=1.0, shift=0.0).requires_grad_(True)

    def f(x, w, b):
        return torch.func.functional_call(m, {"weight": w, "bias": b}, (x,))

    # gradcheck's default tolerances (atol 1e-5, rtol 1e-3) judge central differences
    # with step 1e-6 in float64: their truncation error is O(h^2) ~ 1e-12, rounding
    # error O(u / h) ~ 1e-10, both far inside.
    assert torch.autograd.gradcheck(f, (x, w, b))
    assert torch.autograd.gradgradcheck(f, (x, w, b))
