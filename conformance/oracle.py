"""Expected values and their error bounds, from bnspec.reference (float64 oracle mode)
and bnspec.tolerance. Runs in the suite's process, never in the candidate's."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from bnspec import conventions
from bnspec import reference as R
from bnspec import tolerance as T
from conformance.strategies import Case


@dataclass
class Expected:
    value: Tensor
    bound: Tensor


def in_float64(t: Tensor | None) -> Tensor | None:
    """``t`` in float64; None stays None (an absent weight or bias)."""
    return None if t is None else t.double()


def per_channel(v: Tensor, like: Tensor) -> Tensor:
    """A (C,) tensor as (1, C, 1, ...), so it broadcasts against ``like`` of shape (N, C, *spatial)."""
    return v.reshape(1, -1, *([1] * (like.dim() - 2)))


def train(case: Case, x: Tensor, w: Tensor | None, b: Tensor | None) -> tuple[Expected, Tensor, Tensor]:
    """Expected training output with its bound, and the float64 batch mean and variance."""
    out = R.train_forward(x, in_float64(w), in_float64(b), eps=case.eps, mode="oracle")
    bound = T.train_forward_bound(x.double(), out.mean, out.var, in_float64(w), in_float64(b), eps=case.eps,
                                  dtype=case.tdtype, param_dtype=case.tparam_dtype)
    return Expected(out.y, bound), out.mean, out.var


def eval_(case: Case, x: Tensor, rm: Tensor, rv: Tensor, w: Tensor | None, b: Tensor | None) -> Expected:
    y = R.eval_forward(x, rm.double(), rv.double(), in_float64(w), in_float64(b), eps=case.eps, mode="oracle")
    bound = T.eval_forward_bound(x.double(), rm.double(), rv.double(), in_float64(w), in_float64(b), eps=case.eps,
                                 dtype=case.tdtype, param_dtype=case.tparam_dtype)
    return Expected(y, bound)


def counter(state: dict) -> int:
    """num_batches_tracked of a state as an int; 0 for a module without a counter (the S5.1
    contract finding reports it, and such a module is drawn with momentum set, so the count
    does not enter the expected statistics)."""
    value = state.get("num_batches_tracked")
    return int(value) if isinstance(value, Tensor) and value.numel() == 1 else 0


def fresh_running(case: Case) -> tuple[Tensor, Tensor] | None:
    """A new module's running statistics (mean 0, var 1), or None without tracking."""
    if not case.track_running_stats:
        return None
    return torch.zeros(case.channels, dtype=torch.float64), torch.ones(case.channels, dtype=torch.float64)


def running_of(state: dict) -> tuple[Tensor, Tensor] | None:
    """(running_mean, running_var) a module held, or None without them (for the frozen
    layer's convention: running statistics used to normalize in training)."""
    rm, rv = state.get("running_mean"), state.get("running_var")
    return (rm, rv) if isinstance(rm, Tensor) and isinstance(rv, Tensor) else None


def named_train(x: Tensor, w: Tensor | None, b: Tensor | None, *, eps: float, before: dict | None = None):
    """judge.close's ``alternatives`` for a training output: bnspec.conventions' forwards
    (``before``: the module's state before the step, for the frozen layer's convention)."""
    return lambda: conventions.train_forward_alternatives(x, w, b, eps=eps,
                                                          running=running_of(before) if before else None)


def factor(momentum: float | None, steps_after: int) -> float:
    """The blend factor of a step: momentum, or 1/num_batches_tracked (after the +1)."""
    return 1.0 / steps_after if momentum is None else float(momentum)


def running(case: Case, old_mean: Tensor, old_var: Tensor, old_count: int, mean: Tensor, var: Tensor,
            n: int, momentum: float | None) -> tuple[Expected, Expected, int]:
    """Expected running mean, running var (with bounds) and counter after one step."""
    new = R.update_running_stats(old_mean.double(), old_var.double(), torch.tensor(old_count),
                                 mean, var, n, momentum=momentum)
    f = factor(momentum, old_count + 1)
    bm, bv = T.running_stats_bound(old_mean.double(), old_var.double(), mean, var, n, f,
                                   dtype=case.tdtype, stat_dtype=case.tparam_dtype)
    if n == 0:  # an empty batch copies the old statistics: exact
        bm, bv = torch.zeros_like(bm), torch.zeros_like(bv)
    return Expected(new.mean, bm), Expected(new.var, bv), int(new.num_batches_tracked)


def blend(old_mean: Tensor, old_var: Tensor, mean: Tensor, var: Tensor, n: int, f: float) -> tuple[Tensor, Tensor]:
    """(1-f) old + f new for the mean and the unbiased variance, float64."""
    unbiased = var * n / (n - 1)
    return (1 - f) * old_mean.double() + f * mean, (1 - f) * old_var.double() + f * unbiased


def distinct(alternatives: dict[str, tuple[Tensor, Tensor]], i: int, expected: Tensor) -> dict[str, Tensor]:
    """Component ``i`` (0 mean, 1 var) of each alternative that changes it, one entry per value
    (the mean names only the momentum convention, not "momentum + biased variance"); two
    single conventions that give the same value here share it as ``"a|b"`` (either explains it)."""
    def same(a: Tensor, b: Tensor) -> bool:  # NaN equals NaN here: a NaN channel names nothing twice
        return a.shape == b.shape and bool(((a == b) | (a.isnan() & b.isnan())).all())

    out: dict[str, Tensor] = {}
    for name in sorted(alternatives, key=len):
        value = alternatives[name][i]
        if same(value, expected):
            continue
        twin = next((k for k, v in out.items() if same(value, v)), None)
        if twin is None:
            out[name] = value
        elif "+" not in name:  # the same value under another convention: either explains it ("a|b")
            out[f"{twin}|{name}"] = out.pop(twin)
    return out


def running_conventions(old_mean: Tensor, old_var: Tensor, old_count: int, mean: Tensor, var: Tensor, n: int,
                        momentum: float | None, i: int, expected: Tensor, part: slice = slice(None),
                        mistakes: dict[str, float] | None = None, x: Tensor | None = None):
    """judge.close's ``alternatives`` for running_mean (``i=0``) or running_var (``i=1``) after
    one step (as :func:`running`): the values of bnspec.conventions' running conventions, and
    of blends with the wrong factors ``mistakes`` (name -> factor), that differ from torch's,
    on the channels ``part``. An empty batch's alternative is NaN statistics. ``x``: the batch
    (for the one-pass variance's running statistics)."""
    def alternatives() -> dict[str, Tensor]:
        if not n:
            return {"nan_stats_empty_batch": torch.full_like(expected, float("nan"))[part]}
        alts = conventions.running_alternatives(old_mean, old_var, mean, var, n, factor(momentum, old_count + 1), x=x)
        for name, g in (mistakes or {}).items():
            alts[name] = blend(old_mean, old_var, mean, var, n, g)
        return distinct({name: (m[part], v[part]) for name, (m, v) in alts.items()}, i, expected[part])
    return alternatives


def train_grads(case: Case, dy: Tensor, x: Tensor, w: Tensor | None, mean: Tensor, var: Tensor) -> dict[str, Expected]:
    g = R.train_backward(dy, x, in_float64(w), eps=case.eps, mode="oracle")
    bx, bw, bb = T.train_backward_bound(dy.double(), x.double(), mean, var, in_float64(w), eps=case.eps,
                                        dtype=case.tdtype, param_dtype=case.tparam_dtype)
    return {"x": Expected(g.dx, bx), "weight": Expected(g.dweight, bw), "bias": Expected(g.dbias, bb)}


def eval_grads(case: Case, dy: Tensor, x: Tensor, rm: Tensor, rv: Tensor, w: Tensor | None) -> dict[str, Expected]:
    g = R.eval_backward(dy, x, rm.double(), rv.double(), in_float64(w), eps=case.eps, mode="oracle")
    bx, bw, bb = T.eval_backward_bound(dy.double(), x.double(), rm.double(), rv.double(), in_float64(w),
                                       eps=case.eps, dtype=case.tdtype, param_dtype=case.tparam_dtype)
    return {"x": Expected(g.dx, bx), "weight": Expected(g.dweight, bw), "bias": Expected(g.dbias, bb)}
