r"""S4: gradients of first order (training S4.1, eval S4.2) and second order (S4.3, S4.4).

First order is judged against ``bnspec.reference``'s closed-form backward in oracle mode
with ``bnspec.tolerance``'s bounds (``conformance.oracle.train_grads`` / ``eval_grads``).

Second order. The candidate's adapter computes ``T = sum(v_x*dx) + sum(v_w*dw) + sum(v_b*db)``
from its first-order gradients (``create_graph=True``) and returns the gradients of T with
respect to x, weight, bias and dy. The oracle is the same computation in this process:
torch.autograd, twice, through ``bnspec.reference.train_forward`` / ``eval_forward`` in
``mode="oracle"`` on float64 leaves (the reference is written in differentiable ops).
These are oracle VALUES; no second-order formula is written here.

The bound of a second-order value (bnspec.tolerance has none; derivation below, next to
:func:`second_order_bound`) is ``K2 * U(n, dtype) * cond * M`` with ``M`` the sum of the
absolute values of the monomials of the exact derivative. It is only claimed for float64
and float32 inputs with well-conditioned data (``dist="normal"``: |mean|/std <~ 6,
variance 0.13..7.4); low-precision and ill-conditioned cases are left to S4.1/S4.2.

dy is sent with x's layout (the adapter applies the case's layout to both): torch CPU's
float16 backward is inaccurate when dy and x have different memory formats, a measured
torch quirk this suite deliberately does not test.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import Tensor

from bnspec import conventions
from bnspec import reference as R
from bnspec import tolerance as T
from bnspec.isolation import CandidateRaised
from conformance import driver, oracle
from conformance import strategies as cs
from conformance.oracle import Expected

#: Every distribution: each aims at a class of weak implementations (strategies.DISTS).
ALL_DISTS = ("normal", "normal", "offset", "tiny_var", "near_eps", "constant")
#: Second order: the dtypes and data its bound is derived for (module docstring).
SECOND_ORDER_DTYPES = ("float64", "float32")


# ----------------------------------------------------------------------------- helpers


def _backward_case(case: cs.Case) -> cs.Case:
    """The case as sent for a first-order backward check.

    torch CPU's float16/bfloat16 backward on a NON-CONTIGUOUS input takes a path that
    rounds in the input dtype (measured, torch 2.13: eval dweight of a float16 input
    errs by up to 3.6x the bound, i.e. ~3 roundings in float16; with a bfloat16 input and
    float32 parameters dbias comes back as a bfloat16 value, 3e3x the bound). Like the
    dy memory-format quirk (module docstring) this is deliberately not tested: such a
    case is sent contiguous. float32/float64 non-contiguous inputs are tested.
    """
    if case.dtype in cs.LOW_PRECISION and case.layout == "noncontiguous":
        return cs.with_(case, layout="contiguous")
    return case


def _expected_names(case: cs.Case) -> list[str]:
    """The tensors gradients exist for: x, and the parameters the switches create."""
    return ["x"] + (["weight"] if case.affine else []) + (["bias"] if case.affine and case.bias else [])


def _judge_first_order(judge, candidate, case: cs.Case, grads: dict, expected: dict[str, Expected],
                       *, mode: str, alternatives=None) -> None:
    """dx, dweight, dbias: present exactly where torch has them, right dtype, within bound."""
    # A weight or bias that is not a trainable parameter is the S5.1 contract finding's.
    names = [n for n in _expected_names(case) if n == "x" or candidate.contract.has(f"{n} parameter")]
    extra = sorted(set(grads) - set(names))
    judge.check(not extra, f"{mode} backward: gradients for {extra}, which do not exist with "
                f"affine={case.affine}, bias={case.bias} (torch registers no such parameter)", case=case)
    for name in names:
        dtype = case.tdtype if name == "x" else case.tparam_dtype
        what = f"{mode} backward d{name}"
        judge.check(name in grads, f"{what}: missing (the module has no trainable {name} although "
                    f"affine={case.affine}, bias={case.bias})", case=case)
        judge.check(grads[name] is not None, f"{what}: no gradient flows (None)", case=case)
        judge.tensor(what, grads[name], shape=expected[name].value.shape, dtype=dtype,
                     device=candidate.device, case=case)
        alt = _matching(grads[name], (lambda n=name: alternatives(n)) if alternatives is not None else None)
        judge.close(what, grads[name], _representable(expected[name], dtype, grads[name]), case=case,
                    alternatives=alt)


def _frozen_stats(case: cs.Case, dy: Tensor, x: Tensor, w: Tensor | None,
                  running: tuple[Tensor, Tensor] | None = None):
    """dx's alternatives (other gradients have none): dx under the forward conventions
    (bnspec.conventions, within the training bound; ``running``: the statistics a frozen layer
    normalizes with), and a training backward that treats mean and var as constants (the eval
    backward with the batch statistics as running statistics, oracle value and bound)."""
    def alt(name: str) -> dict[str, Expected]:
        if name != "x":
            return {}
        mean, var = R.batch_stats(x, mode="oracle")
        bound = oracle.train_grads(case, dy, x, w, mean, var)["x"].bound
        out = {name: Expected(value, bound) for name, value in
               conventions.train_backward_alternatives(x, dy, w, eps=case.eps, running=running).items()}
        if running is not None:
            out["running_stats_in_training"] = oracle.eval_grads(case, dy, x, *running, w)["x"]
        out["batch statistics treated as constants (no gradient through mean and var)"] = \
            oracle.eval_grads(case, dy, x, mean, var, w)["x"]
        return out
    return alt


def _batch_stats_in_eval(case: cs.Case, dy: Tensor, x: Tensor, w: Tensor | None):
    """An eval backward that uses the training formula (batch statistics), per gradient."""
    def alt(name: str) -> dict[str, Expected]:
        mean, var = R.batch_stats(x, mode="oracle")
        return {"batch statistics in eval (the training-mode backward)":
                oracle.train_grads(case, dy, x, w, mean, var)[name]}
    return alt


def _representable(expected: Expected, dtype: torch.dtype, observed: Tensor) -> Expected:
    """The expected value and bound as the gradient's dtype can hold them.

    * Gradual underflow: a result below the dtype's smallest normal number is rounded to a
      fixed spacing, not relative to its size; each rounding in that range errs by up to
      half the smallest subnormal (float16: 3e-8). tolerance's eval bound of dx is purely
      relative (``|dy w r|`` times u), so a float16 dx of -3.9e-7 computed exactly right and
      rounded once failed it by 43x (torch and bnspec, CPU and CUDA; seen in 2 of ~1500
      float16 eval draws). The bound gets ``C_OUT`` such roundings as an absolute floor.
    * Overflow: a true gradient beyond the dtype's range rounds to +-inf in a correct
      implementation (an eval dweight of -67207 for float16 parameters and |x| ~ 1e4 is
      -inf in torch). Elements whose oracle is out of range by more than the bound must be
      that infinity; within the bound of the overflow threshold either result is accepted.
    """
    fi = torch.finfo(dtype)
    bound = expected.bound + T.C_OUT * fi.smallest_normal * fi.eps / 2
    threshold = fi.max + 0.5 * fi.eps * fi.max / (2 - fi.eps)  # round-to-nearest overflows here
    v, bnd = expected.value, bound.expand_as(expected.value)
    if not (v.abs() + bnd >= threshold).any():
        return Expected(v, bound)
    over = v.abs() - bnd > threshold
    inf = torch.sign(v) * torch.inf
    obs = observed.detach().double()
    either = ~over & (v.abs() + bnd >= threshold) & (obs == inf)
    return Expected(torch.where(over, inf, torch.where(either, obs, v)), bound)


def _matching(observed: object, alternatives) -> object:
    """judge.close's ``alternatives`` from ones that carry their own bound.

    The judge compares an alternative with the clause's bound, which fits only the clause's
    formula (an eval-mode bound is far tighter than a training-mode one); here each
    alternative is matched within ITS bound and a match is handed over as the observed value.
    """
    if alternatives is None or not isinstance(observed, Tensor):
        return None
    return lambda: {name: observed.double() for name, e in alternatives().items()
                    if T.ratio(observed, e.value, e.bound) <= 1.0}


# ----------------------------------------------------------------------------- S4.1


@pytest.mark.clause("S4.1")
@given(data=st.data())
def test_train_backward(candidate, judge, data):
    candidate.require("backward")
    case = data.draw(driver.cases_for(candidate, dists=ALL_DISTS,
                                      layouts=candidate.capabilities.layouts, momenta=False, mixed_params=True),
                     label="case")
    case = _backward_case(case)
    with driver.configured(candidate, case) as d:
        x, dy = case.x(), case.dy()
        out = d.module.forward(x, layout=case.layout, dy=dy)
    w, b = d.weight, d.bias
    _, mean, var = oracle.train(case, x, w, b)
    expected = oracle.train_grads(case, dy, x, w, mean, var)
    _judge_first_order(judge, candidate, case, out.grads, expected, mode="training",
                       alternatives=_frozen_stats(case, dy, x, w, oracle.fresh_running(case)))


# ----------------------------------------------------------------------------- S4.2


@pytest.mark.clause("S4.2")
@given(data=st.data())
def test_eval_backward(candidate, judge, data):
    """Eval with (non-default) running statistics: dx = w r dy, the statistics are constants."""
    candidate.require("backward")
    case = data.draw(driver.cases_for(candidate, dists=ALL_DISTS,
                                      layouts=candidate.capabilities.layouts, momenta=False, mixed_params=True),
                     label="case")
    case = _backward_case(cs.with_(case, track_running_stats=True))
    with driver.configured(candidate, case, training=False, running=True) as d:
        x, dy = case.x(), case.dy()
        out = d.module.forward(x, layout=case.layout, dy=dy)
    w, (rm, rv) = d.weight, d.running
    expected = oracle.eval_grads(case, dy, x, rm, rv, w)
    _judge_first_order(judge, candidate, case, out.grads, expected, mode="eval",
                       alternatives=_batch_stats_in_eval(case, dy, x, w))


@pytest.mark.clause("S4.2")
@given(data=st.data())
def test_eval_backward_without_running_stats(candidate, judge, data):
    """track_running_stats=False: eval normalizes with batch statistics, so its backward
    is the training formula (gradients flow through mean and var)."""
    candidate.require("backward")
    case = data.draw(driver.cases_for(candidate, dists=ALL_DISTS,
                                      layouts=candidate.capabilities.layouts, momenta=False, mixed_params=True),
                     label="case")
    case = _backward_case(cs.with_(case, track_running_stats=False))
    with driver.configured(candidate, case, training=False) as d:
        x, dy = case.x(), case.dy()
        out = d.module.forward(x, layout=case.layout, dy=dy)
    w, b = d.weight, d.bias
    _, mean, var = oracle.train(case, x, w, b)
    expected = oracle.train_grads(case, dy, x, w, mean, var)
    _judge_first_order(judge, candidate, case, out.grads, expected, mode="eval (track_running_stats=False)",
                       alternatives=_frozen_stats(case, dy, x, w))


# ----------------------------------------------------------------------------- second order: oracle


def second_order_oracle(case: cs.Case, x: Tensor, dy: Tensor, w: Tensor | None, b: Tensor | None,
                        v: dict[str, Tensor], running: tuple[Tensor, Tensor] | None,
                        train_forward=None) -> dict[str, Tensor]:
    """Gradients of ``T = sum_k sum(v_k * d_k)`` w.r.t. x, weight, bias, dy, by autograd on the
    float64 reference forward (batch statistics when ``running`` is None; ``train_forward``
    replaces the reference's there, for a convention's values). A tensor T does not depend
    on is returned as zeros."""
    leaf = lambda t: None if t is None else t.detach().double().requires_grad_(True)  # noqa: E731
    x64, g64, w64, b64 = leaf(x), leaf(dy), leaf(w), leaf(b)
    if running is None and train_forward is not None:
        y = train_forward(x64, w64, b64, eps=case.eps)
    elif running is None:
        y = R.train_forward(x64, w64, b64, eps=case.eps, mode="oracle").y
    else:
        y = R.eval_forward(x64, running[0].double(), running[1].double(), w64, b64, eps=case.eps, mode="oracle")
    names = _expected_names(case)
    leaves = [t for t in (x64, w64, b64) if t is not None]
    first = torch.autograd.grad(y, leaves, g64, create_graph=True)
    total = sum((d * v[name]).sum() for name, d in zip(names, first))
    second = torch.autograd.grad(total, [*leaves, g64], allow_unused=True)
    return {name: torch.zeros_like(t) if s is None else s.detach()
            for name, s, t in zip([*names, "dy"], second, [*leaves, g64])}


# ----------------------------------------------------------------------------- second order: bound
#
# Derivation. Per channel, with r = 1/sqrt(var + eps), xhat = (x - mean) r, g = dy, n values,
# S1 = sum g, S2 = sum g xhat, R0 = sum v_x, R1 = sum v_x xhat, Q = sum v_x g:
#
#   dx = (w r / n) (n g - S1 - xhat S2),  dw = S2,  db = S1
#   T  = sum v_x dx + v_w S2 + v_b S1 = (w r / n)(n Q - R0 S1 - R1 S2) + v_w S2 + v_b S1.
#
# In training, d r/d x_i = -r^2 xhat_i / n, d S2/d x_i = (r/n)(n g_i - S1 - xhat_i S2) and
# d R1/d x_i = (r/n)(n v_i - R0 - xhat_i R1). Expanding dT/dx_i, dT/dw, dT/dg_i (dT/db = 0)
# and replacing every factor and every sum by the sum of absolute values gives M, the sum
# of the absolute values of the monomials of each second-order value (the triangle
# inequality, term by term; these expressions are used ONLY as a majorant, never as
# expected values; every example checks |oracle| <= M, a breach is a suite bug):
#
#   M_x  = |w| r^2 |xh_i| / n^2 (n P0 + V0 A1 + V1 A2)
#        + |w| r^2 / n^2 ((n |v_i| + V0 + |xh_i| V1) A2 + V1 (n |g_i| + A1 + |xh_i| A2))
#        + |v_w| r / n (n |g_i| + A1 + |xh_i| A2)
#   M_w  = r / n (n P0 + V0 A1 + V1 A2)
#   M_dy = |w| r / n (n |v_i| + V0 + |xh_i| V1) + |v_w| |xh_i| + |v_b|
#
# with A1 = sum|g|, A2 = sum|g xh|, V0 = sum|v|, V1 = sum|v xh|, P0 = sum|v g|, and xh = xhat.
# In eval (running statistics are constants, xhat = (x - running_mean) r):
#   M_x = |v_w| |g_i| r,  M_w = r P0,  M_dy = |w| r |v_i| + |v_w| (|x_i| + |rm|) r + |v_b|
# (|x| + |rm| instead of |x - rm| covers the fused x*scale + shift form).
#
# Why a correct implementation stays within K2 * U * cond * M, U = u (C0 + LAMBDA sqrt(n)):
# * each monomial is a product of at most 3 xhat factors, r or r^2, w, v and g, summed in
#   at most two nested levels (a sum times a sum). A correct implementation evaluates the
#   same function in the compute dtype: the inputs x, dy, w are exact, v is rounded once
#   (u), each reduction errs by U times the sum of its |terms| (tolerance.py's model),
#   each elementwise operation by u.
# * the batch statistics err by e_mu, e_var (tolerance.stats_bounds), so xhat errs by
#   e_mu r + |xhat| e_var / (2 (var + eps)) <= U (1 + 2 |mean| r) (1 + |xhat|); hence xh
#   above is |xhat| + 1 and the relative error of r and r^2 is <= U (1 + 2 |mean| r).
#   cond = 1 + 2 |mean| r (1 for eval) multiplies M.
# * with xhat replaced by |xhat| + 1, a perturbation of each factor by its relative error
#   changes a monomial by at most (number of rounded factors and nested reductions) times
#   U cond times its majorant term: <= 3 (xhat) + 2 (r^2) + 1 (v) + 2 (reductions) + 2
#   (elementwise) = 10. K2 = 16 covers that worst case with room.
# Measured (300 draws, float32 and float64, 1-3d, every layout, train and eval): the worst
# error/bound of torch, bnspec and the zoo's three correct BatchNorms is 0.0103, and
# |oracle| <= M held everywhere. A backward that is not differentiable through the batch
# statistics (first order right, mean and invstd computed without graph) errs by the
# missing terms, O(1) of |oracle|: error/bound 75..1300 in float32 and 1e10..4e11 in
# float64, in every training draw; detached statistics: 720..4800 and 1e11..2e12.

K2 = 16.0


def _axes(t: Tensor) -> tuple[int, ...]:
    return (0, *range(2, t.dim()))


def second_order_majorant(case: cs.Case, x: Tensor, dy: Tensor, w: Tensor | None, v: dict[str, Tensor],
                          running: tuple[Tensor, Tensor] | None) -> dict[str, Tensor]:
    """``cond * M`` per second-order value (see the derivation above), float64."""
    x64, g = x.double(), dy.double().abs()
    ax, n = _axes(x), case.count
    has_w, has_b = case.affine, case.affine and case.bias
    ones = torch.ones(case.channels, dtype=torch.float64)
    wa = w.double().abs() if has_w else ones
    vw = v["weight"].abs() if has_w else 0 * ones
    vb = v["bias"].abs() if has_b else 0 * ones
    vx = v["x"].abs()
    P = lambda t: oracle.per_channel(t, x)  # noqa: E731
    if running is not None:
        rm, rv = running[0].double(), running[1].double()
        r = torch.rsqrt(rv + case.eps)
        xm = (x64.abs() + P(rm.abs())) * P(r)
        return {"x": P(vw * r) * g, "weight": r * (vx * g).sum(ax), "bias": 0 * ones,
                "dy": vx * P(wa * r) + P(vw) * xm + P(vb)}
    mean, var = R.batch_stats(x, mode="oracle")
    r = torch.rsqrt(var + case.eps)
    xh = (x64 - P(mean)).abs() * P(r) + 1
    a1, a2 = g.sum(ax), (g * xh).sum(ax)
    v0, v1, p0 = vx.sum(ax), (vx * xh).sum(ax), (vx * g).sum(ax)
    wr2 = P(wa * r * r) / n**2
    mx = (wr2 * xh * P(n * p0 + v0 * a1 + v1 * a2)
          + wr2 * ((n * vx + P(v0) + xh * P(v1)) * P(a2) + P(v1) * (n * g + P(a1) + xh * P(a2)))
          + P(vw * r) / n * (n * g + P(a1) + xh * P(a2)))
    mw = r / n * (n * p0 + v0 * a1 + v1 * a2)
    mdy = P(wa * r) / n * (n * vx + P(v0) + xh * P(v1)) + P(vw) * xh + P(vb)
    cond = 1 + 2 * mean.abs() * r
    return {"x": mx * P(cond), "weight": mw * cond, "bias": 0 * ones, "dy": mdy * P(cond)}


def second_order_bound(case: cs.Case, majorant: Tensor) -> Tensor:
    return K2 * T.summation_factor(case.count, case.tdtype) * majorant


# ----------------------------------------------------------------------------- second order: tests


def _check_second_order(candidate, judge, case: cs.Case, *, training: bool) -> None:
    mode = "training" if training else "eval"
    if case.affine:  # the oracle differentiates w.r.t. weight and bias: they must be parameters
        candidate.require_piece("weight parameter", *(["bias parameter"] if case.bias else []))
    with driver.configured(candidate, case, training=training, running=not training) as d:
        x, dy = case.x(), case.dy()
        gen = torch.Generator().manual_seed(case.seed * 1_000_003 + 6)  # v follows from the case: one-line repro
        v = {"x": torch.randn(case.shape, generator=gen, dtype=torch.float64),
             "weight": torch.randn(case.channels, generator=gen, dtype=torch.float64),
             "bias": torch.randn(case.channels, generator=gen, dtype=torch.float64)}
        try:
            res = d.module.double_backward(x, dy, v, layout=case.layout)
        except CandidateRaised as exc:
            judge.fail(f"second-order gradients ({mode} mode): the double backward raised "
                       f"{exc.type_name}: {exc.message.strip()[:300]}\n  torch's BatchNorm is twice "
                       f"differentiable (gradgradcheck), so a drop-in must give second-order gradients",
                       case=case)
    w, b = d.weight, d.bias
    running = d.running

    # First order, through the create_graph path.
    if running is not None:
        first, alt = oracle.eval_grads(case, dy, x, *running, w), _batch_stats_in_eval(case, dy, x, w)
    else:
        _, mean, var = oracle.train(case, x, w, b)
        first = oracle.train_grads(case, dy, x, w, mean, var)
        alt = _frozen_stats(case, dy, x, w, oracle.fresh_running(case))
    _judge_first_order(judge, candidate, case, res["first"], first, mode=f"{mode} (create_graph=True)",
                       alternatives=alt)

    # Second order.
    expected = second_order_oracle(case, x, dy, w, b, v, running)

    def conventions_of(name: str):
        """Second-order values of the conventions: about the batch variance (training), and in
        eval the training-mode values (a layer that picks batch statistics by grad mode)."""
        if running is not None:  # matched within the training values' own bound, then handed over
            def training_values():
                value = second_order_oracle(case, x, dy, w, b, v, None)[name]
                bound = second_order_bound(case, second_order_majorant(case, x, dy, w, v, None)[name])
                got = second.get(name)
                ok = isinstance(got, Tensor) and T.ratio(got, value, bound) <= 1.0
                return {"batch statistics in eval (the training-mode backward)": got.double()} if ok else {}
            return training_values
        return lambda: {conv: second_order_oracle(case, x, dy, w, b, v, None, train_forward=f)[name]
                        for conv, f in conventions.SECOND_ORDER_FORWARDS.items()}

    majorant = second_order_majorant(case, x, dy, w, v, running)
    for name, value in expected.items():  # the derivation's invariant; a breach is a suite bug
        if not bool((value.abs() <= majorant[name] * (1 + 1e-9)).all()):
            raise RuntimeError(f"bnspec suite bug: |oracle| exceeds the second-order majorant for d{name}; "
                               f"{case.repro()}")
    second = res["second"]
    judge.check(any(second.get(name) is not None for name in expected),
                f"{mode} second-order gradients: none reaches x, weight, bias or dy (the first-order "
                f"gradients are not differentiable, e.g. a @once_differentiable backward or gradients "
                f"computed outside autograd); torch's BatchNorm is twice differentiable", case=case)
    for name, value in expected.items():
        what = f"{mode} second-order gradient d(sum v.grads)/d{name}"
        got = second.get(name)
        if got is None:
            biggest = float(value.abs().max()) if value.numel() else 0.0
            judge.check(biggest == 0.0, f"{what}: None (not connected to the first-order gradients) "
                        f"where the oracle is non-zero (max |oracle| = {biggest:.3g})", case=case)
            continue
        dtype = case.tdtype if name in ("x", "dy") else case.tparam_dtype
        judge.tensor(what, got, shape=value.shape, dtype=dtype, device=candidate.device, case=case)
        judge.close(what, got, Expected(value, second_order_bound(case, majorant[name])), case=case,
                    alternatives=conventions_of(name))


@pytest.mark.clause("S4.3")
@given(data=st.data())
def test_second_order_training(candidate, judge, data):
    candidate.require("double_backward")
    dtypes = driver.dtypes_for(candidate, SECOND_ORDER_DTYPES, lacking=f"provides none of {SECOND_ORDER_DTYPES}")
    case = data.draw(driver.cases_for(candidate, dtypes=dtypes, dists=("normal",),
                                      layouts=candidate.capabilities.layouts, momenta=False), label="case")
    _check_second_order(candidate, judge, case, training=True)


@pytest.mark.clause("S4.4")
@given(data=st.data())
def test_second_order_eval(candidate, judge, data):
    """Eval with non-default running statistics, or (track_running_stats=False) batch statistics."""
    candidate.require("double_backward")
    dtypes = driver.dtypes_for(candidate, SECOND_ORDER_DTYPES, lacking=f"provides none of {SECOND_ORDER_DTYPES}")
    case = data.draw(driver.cases_for(candidate, dtypes=dtypes, dists=("normal",),
                                      layouts=candidate.capabilities.layouts, momenta=False), label="case")
    _check_second_order(candidate, judge, case, training=False)
