"""bnspec.reference against torch 2.13 (clauses S1 forward-train, S2 forward-eval,
S3 running statistics, S4 backward, S6 errors, S7 numerics).

Tolerances. Every low-precision comparison is made against the float64 oracle
(``mode="oracle"``) on the same (exactly representable) inputs and judged with

    |got - oracle| <= K * (u(out) + u(acc) * rho(n)) * (1 + scale)

* ``u(dtype) = finfo(dtype).eps / 2`` is the unit roundoff; ``out`` is the output dtype,
  ``acc`` the dtype the reductions run in (float32 for float16/bfloat16/float32 input,
  float64 for float64 input).
* ``rho(n)`` is the growth of rounding error in a reduction over ``n`` values: ``sqrt(n)``
  in float32 (at least the ``log2(n)`` worst case of the cascade sums torch uses for
  ``n >= 16``, and the random-walk size of recursive summation) and the worst-case
  ``n`` of recursive summation in float64 (cheap there: still ~1e-14 for n = 100).
* ``scale`` is the conditioning of the compared value, the sum of the magnitudes that
  enter it, e.g. ``(|x| + |mean|) / sqrt(var + eps) * |w| + |b|`` for the forward: each
  rounded operation errs relative to its operands, not to a result that may cancel.

The data are well conditioned (``randn * 2 + 0.5``: |mean| / std ~ 0.25). Measured on
these cases, in float32 an unbiased variance in the normalization fails the forward
bound by ~1e3x, float16 accumulation by ~250x, eps outside the square root by 1e2x
(eps = 1e-3) to 4e4x (eps = 0.5); in float64 all of them fail by more than 1e7x. A
one-pass E[x^2] - E[x]^2 variance needs ill-conditioned data (large |mean| / std) to
show, which is the conformance suite's job, not these unit tests'.
"""

from __future__ import annotations

import math
import zlib

import pytest
import torch
import torch.nn.functional as F

import bnspec
from bnspec import reference as R

F16, BF16, F32, F64 = torch.float16, torch.bfloat16, torch.float32, torch.float64

SHAPES = {2: (8, 3), 3: (4, 3, 5), 4: (4, 3, 5, 5), 5: (2, 3, 3, 4, 5)}
RANKS = tuple(SHAPES)
EPSES = (1e-5, 1e-3, 0.5)
# (input dtype, weight/bias/running-stat dtype); torch CPU accepts float32 parameters
# with a float16/bfloat16 input ("mixed dtype"), and otherwise one dtype for all.
DTYPES = {
    "float64": (F64, F64),
    "float32": (F32, F32),
    "float16": (F16, F16),
    "bfloat16": (BF16, BF16),
    "float16-f32params": (F16, F32),
}
AFFINE = ("none", "weight", "bias", "both")

# K for forward outputs. Measured worst error/budget with K = 1 over these cases is 1.32,
# for torch with float16/bfloat16 *parameters*: torch CPU then rounds the batch mean and
# 1/std to the parameter dtype before normalizing (bnspec keeps them in float32; 0.77),
# i.e. up to two roundings in the output dtype besides the final one. The float32 chain
# after the reductions has ~5 roundings (subtract, rsqrt, two multiplies, add), each
# relative to a term of ``scale``. K = 4 covers both with ~3x margin.
K_FORWARD = 4
# K for gradients: dx = w r (dy - mean(dy) - xhat mean(dy xhat)) has two extra reductions
# and ~6 roundings after them; dweight/dbias are single sums judged against sum(|terms|).
K_BACKWARD = 4


def _gen(*key: object) -> torch.Generator:
    """A generator seeded from the test's parameters (crc32: stable across runs)."""
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


def _randn(shape, g, dtype=F64, *, scale=2.0, shift=0.5):
    """Well conditioned data made in float64, then rounded once to ``dtype``."""
    return (torch.randn(shape, generator=g, dtype=F64) * scale + shift).to(dtype)


def _u(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps / 2


def _budget(out_dtype: torch.dtype, n: int) -> float:
    """u(out) + u(acc) * rho(n), see the module docstring."""
    if out_dtype == F64:
        return _u(F64) + _u(F64) * max(n, 1)
    return _u(out_dtype) + _u(F32) * math.sqrt(max(n, 1))


def _assert_within(got, oracle, scale, *, out_dtype, n, k, what):
    """Elementwise |got - oracle| <= k * budget * (1 + scale); reports error/bound."""
    got, oracle = got.to(F64), oracle.to(F64)
    err = (got - oracle).abs()
    bound = k * _budget(out_dtype, n) * (1 + scale)
    ok = err <= bound  # NaN in got fails here
    if not bool(ok.all()):
        ratio = (err / bound).nan_to_num(float("inf"))
        idx = tuple(int(i) for i in torch.nonzero(~ok)[0]) if err.dim() else ()
        raise AssertionError(
            f"{what}: max error/bound = {ratio.max().item():.3g} (k={k}, n={n}, "
            f"dtype={out_dtype}); first failure at {idx}: got {got[idx].item()!r}, "
            f"oracle {oracle[idx].item()!r}, bound {bound.expand_as(err)[idx].item():.3g}"
        )


def _pc(v: torch.Tensor, dim: int) -> torch.Tensor:
    """(C,) -> (1, C, 1, ...)."""
    return v.reshape(1, -1, *([1] * (dim - 2)))


def _count(x: torch.Tensor) -> int:
    return x.numel() // x.shape[1] if x.shape[1] else 0


def _params(affine: str, c: int, dtype, g):
    w = _randn(c, g, dtype, scale=1.0, shift=0.0) if affine in ("weight", "both") else None
    b = _randn(c, g, dtype, scale=1.0, shift=0.0) if affine in ("bias", "both") else None
    return w, b


def _running(c: int, dtype, g):
    """Non-default running statistics (mean ~ N(0.5, 0.5), var in [0.5, 3.5])."""
    rm = _randn(c, g, dtype, scale=0.5, shift=0.5)
    rv = (torch.rand(c, generator=g, dtype=F64) * 3 + 0.5).to(dtype)
    return rm, rv


def _forward_scale(x, mean, var, w, b, eps):
    """(|x| + |mean|) / sqrt(var + eps) * |w| + |b|, in float64."""
    d = x.dim()
    s = (x.to(F64).abs() + _pc(mean.to(F64).abs(), d)) * _pc(torch.rsqrt(var.to(F64) + eps), d)
    if w is not None:
        s = s * _pc(w.to(F64).abs(), d)
    if b is not None:
        s = s + _pc(b.to(F64).abs(), d)
    return s


def _layout_flags(y: torch.Tensor) -> tuple:
    cl = {4: torch.channels_last, 5: torch.channels_last_3d}.get(y.dim())
    return (y.is_contiguous(), None if cl is None else y.is_contiguous(memory_format=cl))


def _assert_like_torch(y, ty, x, out_dtype):
    """Shape, dtype, device and memory format of bnspec's output equal torch's."""
    assert y.shape == ty.shape == x.shape
    assert y.dtype == ty.dtype == out_dtype
    assert y.device == ty.device == x.device
    assert _layout_flags(y) == _layout_flags(ty)


# ----------------------------------------------------------------------------- S1 / S2 forward


@pytest.mark.parametrize("dtypes", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("affine", AFFINE)
@pytest.mark.parametrize("eps", EPSES)
@pytest.mark.parametrize("rank", RANKS)
def test_S1_train_forward_matches_torch(rank, eps, affine, dtypes):
    xd, pd = dtypes
    g = _gen("S1", rank, eps, affine, dtypes)
    x = _randn(SHAPES[rank], g, xd)
    w, b = _params(affine, x.shape[1], pd, g)
    x0 = x.clone()

    ty = F.batch_norm(x, None, None, w, b, training=True, eps=eps)
    out = R.train_forward(x, w, b, eps=eps)
    _assert_like_torch(out.y, ty, x, xd)
    assert out.y.is_contiguous()
    assert torch.equal(x, x0)  # input never modified

    oracle = R.train_forward(x, w, b, eps=eps, mode="oracle")
    scale = _forward_scale(x, oracle.mean, oracle.var, w, b, eps)
    n = _count(x)
    for who, y in (("bnspec", out.y), ("torch", ty)):
        _assert_within(y, oracle.y, scale, out_dtype=xd, n=n, k=K_FORWARD, what=f"{who} y")
    # batch statistics in the compute dtype: float32 for half input
    acc = F64 if xd == F64 else F32
    assert out.mean.dtype == out.var.dtype == acc and out.mean.shape == out.var.shape == (3,)
    xabs = x.to(F64).abs().amax(dim=(0, *range(2, x.dim())))
    # mean: a sum of n values of size <= max|x|; var: a sum of squares of size (2 max|x|)^2
    _assert_within(out.mean, oracle.mean, xabs, out_dtype=acc, n=n, k=2, what="mean")
    _assert_within(out.var, oracle.var, 4 * xabs**2, out_dtype=acc, n=n, k=2, what="var")


@pytest.mark.parametrize("dtypes", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("affine", AFFINE)
@pytest.mark.parametrize("eps", EPSES)
@pytest.mark.parametrize("rank", RANKS)
def test_S2_eval_forward_matches_torch(rank, eps, affine, dtypes):
    xd, pd = dtypes
    g = _gen("S2", rank, eps, affine, dtypes)
    x = _randn(SHAPES[rank], g, xd)
    w, b = _params(affine, x.shape[1], pd, g)
    rm, rv = _running(x.shape[1], pd, g)
    args = [t.clone() for t in (x, rm, rv)]

    ty = F.batch_norm(x, rm, rv, w, b, training=False, eps=eps)
    y = R.eval_forward(x, rm, rv, w, b, eps=eps)
    _assert_like_torch(y, ty, x, xd)
    assert all(torch.equal(a, b_) for a, b_ in zip(args, (x, rm, rv)))

    oracle = R.eval_forward(x, rm, rv, w, b, eps=eps, mode="oracle")
    scale = _forward_scale(x, rm, rv, w, b, eps)
    # No reduction in eval: n = 1 leaves one float32 rounding per operation.
    for who, got in (("bnspec", y), ("torch", ty)):
        _assert_within(got, oracle, scale, out_dtype=xd, n=1, k=K_FORWARD, what=f"{who} y")


@pytest.mark.parametrize("rank", RANKS)
def test_S2_eval_each_sample_independent(rank):
    g = _gen("S2-indep", rank)
    x = _randn(SHAPES[rank], g)
    rm, rv = _running(3, F64, g)
    full = R.eval_forward(x, rm, rv)
    for i in range(x.shape[0]):
        assert torch.equal(R.eval_forward(x[i : i + 1], rm, rv), full[i : i + 1])


def _layout_cases():
    g = _gen("layouts")
    cl, cl3 = torch.channels_last, torch.channels_last_3d
    return {
        "r4-channels_last": _randn((4, 3, 5, 5), g).to(memory_format=cl),
        "r5-channels_last": _randn((2, 3, 3, 4, 5), g).to(memory_format=cl3),
        "r5-permuted-to-channels_last": _randn((2, 3, 4, 5, 3), g).permute(0, 4, 1, 2, 3),
        # C = 1 or spatial = 1: channels_last strides are also contiguous strides
        "r4-channels_last-C1": _randn((4, 1, 5, 5), g).to(memory_format=cl),
        "r4-channels_last-spatial1": _randn((4, 3, 1, 1), g).to(memory_format=cl),
        "r2-transposed": _randn((3, 8), g).t(),
        "r3-transposed": _randn((4, 5, 3), g).transpose(1, 2),
        "r4-transposed": _randn((4, 3, 5, 5), g).transpose(2, 3),
        "r5-transposed": _randn((2, 3, 3, 4, 5), g).transpose(3, 4),
        "r3-sliced": _randn((8, 3, 10), g)[::2, :, 1::3],
        "r4-sliced": _randn((8, 3, 10, 5), g)[::2, :, ::2],
        "r4-channel-sliced": _randn((4, 6, 5, 5), g)[:, ::2],
    }


LAYOUTS = _layout_cases()


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name", LAYOUTS)
def test_S1_S2_memory_format_matches_torch(name, training):
    x = LAYOUTS[name]
    x0 = x.clone()
    c, n = x.shape[1], _count(x)
    if training:
        ty = F.batch_norm(x, None, None, training=True)
        y = R.train_forward(x).y
        o = R.train_forward(x, mode="oracle")
        scale = _forward_scale(x, o.mean, o.var, None, None, 1e-5)
        oracle = o.y
    else:
        rm, rv = _running(c, F64, _gen("layout-stats", name))
        ty = F.batch_norm(x, rm, rv, training=False)
        y = R.eval_forward(x, rm, rv)
        scale = _forward_scale(x, rm, rv, None, None, 1e-5)
        oracle, n = R.eval_forward(x, rm, rv, mode="oracle"), 1
    _assert_like_torch(y, ty, x, F64)
    if "channels_last" in name and "C1" not in name and "spatial1" not in name:
        assert not y.is_contiguous() and _layout_flags(y) == (False, True)
    elif "channels_last" not in name:
        assert y.is_contiguous()
    assert torch.equal(x, x0)  # input never modified
    for who, got in (("bnspec", y), ("torch", ty)):
        _assert_within(got, oracle, scale, out_dtype=F64, n=n, k=K_FORWARD, what=f"{who} y")


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_S1_S2_sliced_channels_last_keeps_channels_last(training):
    x = _randn((8, 3, 10, 5), _gen("cl-sliced")).to(memory_format=torch.channels_last)[::2]
    assert not x.is_contiguous() and not x.is_contiguous(memory_format=torch.channels_last)
    if training:
        ty, y = F.batch_norm(x, None, None, training=True), R.train_forward(x).y
    else:
        rm, rv = torch.zeros(3, dtype=F64), torch.ones(3, dtype=F64)
        ty, y = F.batch_norm(x, rm, rv, training=False), R.eval_forward(x, rm, rv)
    assert _layout_flags(ty) == (False, True)
    assert _layout_flags(y) == _layout_flags(ty)


@pytest.mark.parametrize("dtypes", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("rank", RANKS)
def test_S1_S2_empty_batch(rank, dtypes):
    xd, pd = dtypes
    shape = (0, *SHAPES[rank][1:])
    x = torch.empty(shape, dtype=xd)
    w, b = _params("both", 3, pd, _gen("empty", rank))
    rm, rv = _running(3, pd, _gen("empty-stats", rank))
    ty = F.batch_norm(x, None, None, w, b, training=True)
    out = R.train_forward(x, w, b)
    assert out.y.shape == ty.shape == shape and out.y.dtype == ty.dtype == xd
    assert out.y.device == x.device and out.mean.shape == out.var.shape == (3,)
    te = F.batch_norm(x, rm, rv, w, b, training=False)
    ye = R.eval_forward(x, rm, rv, w, b)
    assert ye.shape == te.shape == shape and ye.dtype == te.dtype == xd


# ----------------------------------------------------------------------------- S7 oracle mode


@pytest.mark.parametrize("dtypes", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("rank", RANKS)
def test_S7_oracle_mode_returns_float64(rank, dtypes):
    xd, pd = dtypes
    g = _gen("oracle-dtype", rank, dtypes)
    x = _randn(SHAPES[rank], g, xd)
    w, b = _params("both", 3, pd, g)
    rm, rv = _running(3, pd, g)
    out = R.train_forward(x, w, b, mode="oracle")
    assert out.y.dtype == out.mean.dtype == out.var.dtype == F64
    assert out.y.shape == x.shape and out.y.device == x.device
    y = R.eval_forward(x, rm, rv, w, b, mode="oracle")
    assert y.dtype == F64 and y.shape == x.shape
    mean, var = R.batch_stats(x, mode="oracle")
    assert mean.dtype == var.dtype == F64
    grads = R.train_backward(torch.ones_like(x), x, w, mode="oracle")
    assert grads.dx.dtype == grads.dweight.dtype == grads.dbias.dtype == F64
    grads = R.eval_backward(torch.ones_like(x), x, rm, rv, w, mode="oracle")
    assert grads.dx.dtype == grads.dweight.dtype == grads.dbias.dtype == F64
    # Oracle mode on a low-precision input equals oracle mode on its exact float64 copy.
    w64, b64 = w.to(F64), b.to(F64)
    assert torch.equal(out.y, R.train_forward(x.to(F64), w64, b64, mode="oracle").y)


@pytest.mark.parametrize("eps", EPSES)
@pytest.mark.parametrize("rank", RANKS)
def test_S7_oracle_float64_agrees_with_torch(rank, eps):
    g = _gen("oracle-f64", rank, eps)
    x = _randn(SHAPES[rank], g)
    w, b = _params("both", 3, F64, g)
    rm, rv = _running(3, F64, g)
    o = R.train_forward(x, w, b, eps=eps, mode="oracle")
    ty = F.batch_norm(x, None, None, w, b, training=True, eps=eps)
    _assert_within(ty, o.y, _forward_scale(x, o.mean, o.var, w, b, eps), out_dtype=F64,
                   n=_count(x), k=K_FORWARD, what="train")
    ye = R.eval_forward(x, rm, rv, w, b, eps=eps, mode="oracle")
    te = F.batch_norm(x, rm, rv, w, b, training=False, eps=eps)
    _assert_within(te, ye, _forward_scale(x, rm, rv, w, b, eps), out_dtype=F64, n=1,
                   k=K_FORWARD, what="eval")


# ----------------------------------------------------------------------------- S3 running stats

MOMENTA = (0.1, 0.0, 1.0, 0.7, 1.5, -0.5, None)


@pytest.mark.parametrize("dtype", [F64, F32], ids=["float64", "float32"])
@pytest.mark.parametrize("momentum", MOMENTA, ids=[f"m={m}" for m in MOMENTA])
def test_S3_update_running_stats_matches_torch(momentum, dtype):
    g = _gen("S3", momentum, dtype)
    rm, rv = _running(3, dtype, g)
    t_rm, t_rv = rm.clone(), rv.clone()  # torch's buffers, updated in place
    counter = torch.tensor(0, dtype=torch.int64)
    for step in range(1, 5):
        x = _randn((4, 3, 5), g, dtype)
        n = _count(x)
        # torch's module passes momentum=None as the factor 1 / num_batches_tracked
        factor = momentum if momentum is not None else 1.0 / step
        F.batch_norm(x, t_rm, t_rv, training=True, momentum=factor)
        mean, var = R.batch_stats(x)
        before = [t.clone() for t in (rm, rv, counter, mean, var)]
        new = R.update_running_stats(rm, rv, counter, mean, var, n, momentum=momentum)
        # arguments untouched, results are new tensors
        for a, b_ in zip(before, (rm, rv, counter, mean, var)):
            assert torch.equal(a, b_) and a.dtype == b_.dtype
        for res, arg in zip(new, (rm, rv, counter)):
            assert res.data_ptr() != arg.data_ptr()
        assert new.num_batches_tracked.dtype == torch.int64
        assert new.num_batches_tracked.dim() == 0 and int(new.num_batches_tracked) == step
        assert new.mean.dtype == new.var.dtype == dtype and new.mean.shape == (3,)
        # ~4 roundings in the blend on top of the batch statistics' own reduction error;
        # the scale is every magnitude that enters: |1-f| |old| + |f| |batch stat|.
        f = abs(factor)
        xabs = x.to(F64).abs().amax(dim=(0, 2))
        sm = abs(1 - factor) * rm.to(F64).abs() + f * xabs
        sv = abs(1 - factor) * rv.to(F64).abs() + f * 4 * xabs**2 * n / (n - 1)
        for got, want, s, what in ((new.mean, t_rm, sm, "mean"), (new.var, t_rv, sv, "var")):
            _assert_within(got, want, s, out_dtype=dtype, n=n, k=4, what=f"step {step} {what}")
        rm, rv, counter = new


@pytest.mark.parametrize("momentum", MOMENTA, ids=[f"m={m}" for m in MOMENTA])
def test_S3_empty_batch_leaves_stats_and_counts(momentum):
    g = _gen("S3-empty", momentum)
    rm, rv = _running(3, F32, g)
    counter = torch.tensor(4, dtype=torch.int64)
    x = torch.empty(0, 3, 5)
    t_rm, t_rv = rm.clone(), rv.clone()
    F.batch_norm(x, t_rm, t_rv, training=True, momentum=0.1 if momentum is None else momentum)
    mean, var = R.batch_stats(x)
    new = R.update_running_stats(rm, rv, counter, mean, var, 0, momentum=momentum)
    assert torch.equal(new.mean, rm) and torch.equal(new.var, rv)
    assert torch.equal(t_rm, rm) and torch.equal(t_rv, rv)  # torch agrees
    assert new.mean.data_ptr() != rm.data_ptr()
    assert new.num_batches_tracked.dtype == torch.int64 and new.num_batches_tracked.dim() == 0
    assert int(new.num_batches_tracked) == 5 and int(counter) == 4


def test_S3_none_statistics_stay_none():
    mean, var = torch.zeros(3), torch.ones(3)
    new = R.update_running_stats(None, None, torch.tensor(2), mean, var, 10, momentum=0.1)
    assert new.mean is None and new.var is None and int(new.num_batches_tracked) == 3
    # momentum 1 copies: exactly the unbiased variance 1 * 10 / 9, rounded once to float32
    new = R.update_running_stats(torch.zeros(3), torch.ones(3), None, mean, var, 10, momentum=1.0)
    assert new.num_batches_tracked is None and torch.equal(new.var, torch.full((3,), 10 / 9))


# ----------------------------------------------------------------------------- S4 backward


def _backward_scales(x, dy, mean, var, w, eps, training):
    """Magnitudes entering dx, dweight, dbias (float64), per element / per channel."""
    d = x.dim()
    axes = (0, *range(2, d))
    r = _pc(torch.rsqrt(var.to(F64) + eps), d)
    wabs = 1.0 if w is None else _pc(w.to(F64).abs(), d)
    xmag = (x.to(F64).abs() + _pc(mean.to(F64).abs(), d)) * r  # >= |xhat| and its error scale
    dya = dy.to(F64).abs()
    if training:
        mdy = _pc(dya.mean(dim=axes), d)
        mdyx = _pc((dya * xmag).mean(dim=axes), d)
        sdx = wabs * r * (dya + mdy + xmag * mdyx)
    else:
        sdx = wabs * r * dya
    return sdx, (dya * xmag).sum(dim=axes), dya.sum(dim=axes)


def _torch_grads(x, w, b, dy, eps, training, rm=None, rv=None):
    """torch autograd through F.batch_norm; weight None -> gradient for weight = ones."""
    xr = x.clone().requires_grad_(True)
    wr = (torch.ones(x.shape[1], dtype=x.dtype) if w is None else w.clone()).requires_grad_(True)
    br = b.clone().requires_grad_(True)
    y = F.batch_norm(xr, rm, rv, wr, br, training=training, eps=eps)
    y.backward(dy)
    return y, xr.grad, wr.grad, br.grad


@pytest.mark.parametrize("has_weight", [True, False], ids=["weight", "no-weight"])
@pytest.mark.parametrize("dtype", [F64, F32], ids=["float64", "float32"])
@pytest.mark.parametrize("rank", RANKS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_S4_backward_matches_torch_autograd(training, rank, dtype, has_weight):
    g = _gen("S4", training, rank, dtype, has_weight)
    eps = 1e-3
    x = _randn(SHAPES[rank], g, dtype)
    dy = _randn(SHAPES[rank], g, dtype, scale=1.0, shift=0.0)
    w, b = _params("both", 3, dtype, g)
    w = w if has_weight else None
    n = _count(x)
    if training:
        t = _torch_grads(x, w, b, dy, eps, True)
        grads = R.train_backward(dy, x, w, eps=eps)
        oracle = R.train_backward(dy, x, w, eps=eps, mode="oracle")
        mean, var = R.batch_stats(x, mode="oracle")
        # a no-weight forward is a weight-of-ones forward: check torch agrees on dx
        if w is None:
            xr = x.clone().requires_grad_(True)
            F.batch_norm(xr, None, None, None, b, training=True, eps=eps).backward(dy)
            _assert_within(xr.grad, oracle.dx, _backward_scales(x, dy, mean, var, w, eps, True)[0],
                           out_dtype=dtype, n=n, k=K_BACKWARD, what="torch dx (weight None)")
    else:
        rm, rv = _running(3, dtype, g)
        t = _torch_grads(x, w, b, dy, eps, False, rm, rv)
        grads = R.eval_backward(dy, x, rm, rv, w, eps=eps)
        oracle = R.eval_backward(dy, x, rm, rv, w, eps=eps, mode="oracle")
        mean, var = rm, rv
    _, tdx, tdw, tdb = t
    sdx, sdw, sdb = _backward_scales(x, dy, mean, var, w, eps, training)
    assert grads.dx.shape == x.shape and grads.dx.dtype == dtype
    assert grads.dweight.shape == grads.dbias.shape == (3,)
    assert grads.dweight.dtype == grads.dbias.dtype == dtype
    for who, dx, dw, db in (("bnspec", *grads), ("torch", tdx, tdw, tdb)):
        # eval dx has no reduction (n = 1); dweight, dbias are sums over n values
        _assert_within(dx, oracle.dx, sdx, out_dtype=dtype, n=n if training else 1,
                       k=K_BACKWARD, what=f"{who} dx")
        _assert_within(dw, oracle.dweight, sdw, out_dtype=dtype, n=n, k=K_BACKWARD,
                       what=f"{who} dweight")
        _assert_within(db, oracle.dbias, sdb, out_dtype=dtype, n=n, k=K_BACKWARD,
                       what=f"{who} dbias")


GG_SHAPES = {2: (5, 2), 3: (3, 2, 3), 4: (2, 2, 2, 3), 5: (2, 2, 2, 1, 2)}


@pytest.mark.parametrize("rank", RANKS)
def test_S4_second_order_gradgradcheck(rank):
    g = _gen("gradgrad", rank)
    x = _randn(GG_SHAPES[rank], g).requires_grad_(True)
    w = _randn(2, g, scale=1.0, shift=1.0).requires_grad_(True)
    b = _randn(2, g, scale=1.0, shift=0.0).requires_grad_(True)

    def f(x, w, b):
        return R.train_forward(x, w, b, eps=1e-3).y

    # default gradcheck tolerances (atol 1e-5, rtol 1e-3) compare finite differences
    # with step 1e-6 to analytic derivatives: their error is O(h^2 * f''') ~ 1e-10 here.
    assert torch.autograd.gradcheck(f, (x, w, b))
    assert torch.autograd.gradgradcheck(f, (x, w, b))

    def fe(x, w, b):
        rm, rv = torch.tensor([0.3, -0.2], dtype=F64), torch.tensor([1.5, 0.7], dtype=F64)
        return R.eval_forward(x, rm, rv, w, b, eps=1e-3)

    assert torch.autograd.gradgradcheck(fe, (x, w, b))


# ----------------------------------------------------------------------------- S6 errors


def _x(shape=(4, 3, 5), dtype=F32):
    return _randn(shape, _gen("err", shape, dtype), dtype)


@pytest.mark.parametrize("eps", [0.0, -1e-5, -1.0])
def test_S6_train_eps_must_be_positive(eps):
    x = _x()
    with pytest.raises(ValueError, match="eps must be positive during training"):
        R.train_forward(x, eps=eps)
    with pytest.raises(ValueError, match="eps must be positive during training"):
        R.train_backward(torch.ones_like(x), x, eps=eps)


def test_S6_eval_eps():
    x, rm, rv = _x(), torch.zeros(3), torch.ones(3)
    with pytest.raises(ValueError, match="eps must be non-negative"):
        R.eval_forward(x, rm, rv, eps=-1e-5)
    with pytest.raises(ValueError, match="eps must be non-negative"):
        R.eval_backward(torch.ones_like(x), x, rm, rv, eps=-1e-5)
    # eps = 0 is legal in eval, as in torch: exactly (x - rm) / sqrt(rv) here
    y = R.eval_forward(x, rm, rv, eps=0.0)
    assert torch.equal(y, F.batch_norm(x, rm, rv, training=False, eps=0.0))
    assert torch.equal(y, x)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8, torch.bool],
                         ids=["int64", "int32", "uint8", "bool"])
def test_S6_integer_input(dtype):
    x = torch.ones(4, 3, 5, dtype=dtype)
    with pytest.raises(NotImplementedError, match="batch_norm"):
        F.batch_norm(x, None, None, training=True)  # torch raises the same type
    with pytest.raises(NotImplementedError, match='"batch_norm" not implemented'):
        R.train_forward(x)
    with pytest.raises(NotImplementedError, match='"batch_norm" not implemented'):
        R.eval_forward(x, torch.zeros(3), torch.ones(3))
    with pytest.raises(NotImplementedError, match='"batch_norm" not implemented'):
        R.batch_stats(x)


@pytest.mark.parametrize("shape", [(3,), (2, 3, 2, 2, 2, 2)], ids=["rank1", "rank6"])
def test_S6_rank(shape):
    x = torch.ones(shape)
    for call in (lambda: R.train_forward(x), lambda: R.eval_forward(x, torch.zeros(3), torch.ones(3)),
                 lambda: R.batch_stats(x)):
        with pytest.raises(ValueError, match=f"expected 2D to 5D input.*got {len(shape)}D"):
            call()


@pytest.mark.parametrize("name", ["weight", "bias"])
def test_S6_train_per_channel_size(name):
    x = _x()
    kw = {name: torch.ones(4)}
    with pytest.raises(RuntimeError, match=f"{name} should contain 3 elements not 4"):
        R.train_forward(x, **kw)
    with pytest.raises(RuntimeError, match=f"{name} should contain 3 elements not 4"):
        F.batch_norm(x, None, None, training=True, **kw)  # torch: same message


@pytest.mark.parametrize("name", ["running_mean", "running_var", "weight", "bias"])
def test_S6_eval_per_channel_size(name):
    x = _x()
    kw = {"running_mean": torch.zeros(3), "running_var": torch.ones(3), name: torch.ones(2)}
    with pytest.raises(RuntimeError, match=f"{name} should contain 3 elements not 2"):
        R.eval_forward(x, **kw)


@pytest.mark.parametrize("name", ["running_mean", "running_var"])
def test_S6_update_per_channel_size(name):
    kw = {"running_mean": torch.zeros(3), "running_var": torch.ones(3), name: torch.ones(4)}
    with pytest.raises(RuntimeError, match=f"{name} should contain 3 elements not 4"):
        R.update_running_stats(**kw, num_batches_tracked=torch.tensor(0),
                               batch_mean=torch.zeros(3), batch_var=torch.ones(3), count=5,
                               momentum=0.1)


@pytest.mark.parametrize("shape", [(1, 3), (1, 3, 1), (1, 3, 1, 1), (1, 3, 1, 1, 1)])
def test_S6_one_value_per_channel_in_training(shape):
    x = torch.ones(shape)
    msg = "Expected more than 1 value per channel when training"
    with pytest.raises(ValueError, match=msg):
        R.train_forward(x)
    with pytest.raises(ValueError, match=msg):
        R.train_backward(torch.ones_like(x), x)
    with pytest.raises(ValueError, match=msg):
        F.batch_norm(x, None, None, training=True)
    # eval with one value per channel is legal
    assert R.eval_forward(x, torch.zeros(3), torch.ones(3)).shape == shape


@pytest.mark.parametrize("mode", ["float64", "Native", "", None])
def test_S6_bad_mode(mode):
    x = _x()
    for call in (lambda: R.train_forward(x, mode=mode),
                 lambda: R.eval_forward(x, torch.zeros(3), torch.ones(3), mode=mode),
                 lambda: R.batch_stats(x, mode=mode),
                 lambda: R.train_backward(x, x, mode=mode)):
        with pytest.raises(ValueError, match="mode must be one of"):
            call()


@pytest.mark.parametrize("momentum", ["0.1", [0.1], torch.tensor(0.1), True, float("nan")],
                         ids=["str", "list", "tensor", "bool", "nan"])
def test_S6_momentum_type(momentum):
    with pytest.raises(TypeError, match="momentum must be a real number or None"):
        R.update_running_stats(torch.zeros(3), torch.ones(3), torch.tensor(0), torch.zeros(3),
                               torch.ones(3), 5, momentum=momentum)


@pytest.mark.parametrize("count", [1, -1, 2.0, True])
def test_S6_count(count):
    with pytest.raises(ValueError, match="count must be 0"):
        R.update_running_stats(torch.zeros(3), torch.ones(3), torch.tensor(0), torch.zeros(3),
                               torch.ones(3), count, momentum=0.1)


@pytest.mark.parametrize(
    "xd, pd", [(F64, F32), (F32, F64), (F32, F16), (F16, F64)], ids=lambda d: str(d)[6:]
)
def test_S6_native_mixed_dtypes(xd, pd):
    x = _x(dtype=xd)
    w, rm, rv = torch.ones(3, dtype=pd), torch.zeros(3, dtype=pd), torch.ones(3, dtype=pd)
    with pytest.raises(RuntimeError, match="mixed dtype"):
        F.batch_norm(x, None, None, w, training=True)  # torch refuses the same pairs
    with pytest.raises(RuntimeError, match="mixed dtype"):
        R.train_forward(x, w)
    with pytest.raises(RuntimeError, match="mixed dtype"):
        R.eval_forward(x, rm, rv)
    # the oracle takes any float dtypes
    assert R.train_forward(x, w, mode="oracle").y.dtype == F64


# ----------------------------------------------------------------------------- no torch BN


_BN_NAMES = sorted(
    {n for n in dir(torch._C._VariableFunctions) if "batch_norm" in n}
    | {n for n in dir(torch) if "batch_norm" in n}
)


class _NoBatchNormMode(torch.utils._python_dispatch.TorchDispatchMode):
    """Records every aten op whose name mentions batch_norm (forward or backward)."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if "batch_norm" in func.name():
            self.seen.append(func.name())
        return func(*args, **(kwargs or {}))


def test_guard_catches_torch_batch_norm():
    """Meta test: the dispatch-mode guard below does see torch's own batch norm."""
    x = _x().requires_grad_(True)
    with _NoBatchNormMode() as mode:
        torch.nn.BatchNorm1d(3)(x).sum().backward()
    assert any("backward" in s for s in mode.seen) and any("backward" not in s for s in mode.seen)


def test_reference_never_calls_torch_batch_norm(monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("torch's batch norm was called")

    monkeypatch.setattr(F, "batch_norm", boom)
    for name in _BN_NAMES:
        if hasattr(torch, name):
            monkeypatch.setattr(torch, name, boom)
    # torch._C._VariableFunctions (an instance of an immutable C type) cannot be patched:
    # setattr raises on both it and its type. The dispatch-mode guard covers it: every
    # path into a batch-norm kernel, Python or C++, ends in an aten op named *batch_norm*.
    with pytest.raises((AttributeError, TypeError)):
        setattr(torch._C._VariableFunctions, "batch_norm", boom)
    with pytest.raises(AssertionError, match="was called"):
        torch.nn.BatchNorm1d(3)(_x())  # the patch is in force

    g = _gen("no-bn")
    x = _randn((4, 3, 5), g)
    w, b = _params("both", 3, F64, g)
    rm, rv = _running(3, F64, g)
    dy = torch.ones_like(x)
    with _NoBatchNormMode() as mode:
        for m in ("native", "oracle"):
            R.batch_stats(x, mode=m)
            out = R.train_forward(x, w, b, mode=m)
            R.eval_forward(x, rm, rv, w, b, mode=m)
            R.train_backward(dy, x, w, mode=m)
            R.eval_backward(dy, x, rm, rv, w, mode=m)
        R.update_running_stats(rm, rv, torch.tensor(0), out.mean, out.var, 20, momentum=None)
        for cls, shape in ((bnspec.BatchNorm1d, (4, 3, 5)), (bnspec.BatchNorm2d, (4, 3, 2, 2)),
                           (bnspec.BatchNorm3d, (2, 3, 2, 2, 2))):
            m = cls(3, dtype=F64)
            for training in (True, False):
                xi = _randn(shape, g).requires_grad_(True)
                m.train(training)
                y = m(xi)
                (gx,) = torch.autograd.grad((y * y).sum(), xi, create_graph=True)
                gx.sum().backward()  # second order too
    assert mode.seen == []
