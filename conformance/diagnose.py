"""What a failure depends on: replay the failing example with one feature changed at a time.

A failure no convention explains is replayed (same test, same draws) with one feature of
its drawn case changed: layout, dtype, parameter dtype, affine, bias, momentum None,
tracking, batch size, rank, and, for torch-style modules, autograd switched off in eval
(a layer that picks its statistics by ``torch.is_grad_enabled()`` passes then). The
features whose change makes it pass say what the failure depends on ("fails only for
channels_last and noncontiguous input; contiguous passes"); failures of different clauses
with the same dependence are one cause.
"""

from __future__ import annotations

import inspect
import math

import pytest

from bnspec.diagnosis import dependence_text
from bnspec.isolation import CandidateError
from conformance import strategies as cs
from conformance.judge import Judge

#: The variation that recognises statistics chosen by grad mode.
GRAD_MODE = "autograd off in eval"


class _Item:
    """Just enough of a pytest item for a :class:`Judge` whose records are thrown away."""

    def __init__(self, config) -> None:
        self.user_properties: list = []
        self.config = config


class ReplayPassed(Exception):
    """The replay asked for a draw after the last recorded one: it got past the point where
    the recorded example failed (draws are recorded up to the failure)."""


class ReplayData:
    """Stands in for hypothesis' ``data``: returns the recorded draws in order."""

    def __init__(self, values: list) -> None:
        self.values = list(values)

    def draw(self, strategy, label=None):
        if not self.values:
            raise ReplayPassed()
        return self.values.pop(0)


def parse_draws(draws: dict[str, str]) -> list | None:
    """The recorded draws as values, in order; None when one cannot be rebuilt."""
    names = {"Case": cs.Case, "nan": math.nan, "inf": math.inf, "__builtins__": {}}
    out = []
    for text in draws.values():
        try:
            out.append(eval(text, dict(names)))  # noqa: S307 - reprs the suite's own strategies drew
        except Exception:  # noqa: BLE001
            return None
    return out


def replay(item, candidate, values: list, *, eval_no_grad: bool = False) -> str:
    """Run ``item``'s test body once on ``values``: "pass", "fail" or "skip"."""
    inner = getattr(getattr(item.obj, "hypothesis", None), "inner_test", None)
    if inner is None:
        return "skip"
    params = inspect.signature(inner).parameters
    kwargs = {k: v for k, v in item.funcargs.items() if k in params}
    kwargs["judge"] = Judge(_Item(item.config))
    kwargs["data"] = ReplayData(values)
    candidate.process.revive()
    try:
        if eval_no_grad:
            candidate.process.call("set_option", name="eval_no_grad", value=True)
        inner(**kwargs)
    except pytest.skip.Exception:
        return "skip"
    except ReplayPassed:
        return "pass"
    except Exception:  # noqa: BLE001 - a failure, the candidate's error, or anything else: not a pass
        return "fail"
    finally:
        if eval_no_grad:
            try:
                candidate.process.call("set_option", name="eval_no_grad", value=False)
            except CandidateError:
                pass
    return "pass"


def variations(case: cs.Case, candidate) -> list[tuple[str, str, cs.Case | None]]:
    """(feature, description, changed case); case None = the grad-mode variation."""
    caps, can = candidate.capabilities, candidate.contract.builds
    out = []
    layouts = [lay for lay in caps.layouts if lay != "channels_last" or len(case.shape) >= 4]
    out += [("layout", lay, cs.with_(case, layout=lay)) for lay in layouts if lay != case.layout]
    out += [("dtype", d, cs.with_(case, dtype=d, param_dtype=None)) for d in ("float64", "float32")
            if d != case.dtype and d in caps.dtypes]
    if case.param_dtype is not None:
        out.append(("parameter dtype", "the input's", cs.with_(case, param_dtype=None)))
    if case.affine and can("affine=False"):
        out.append(("affine", "affine=False", cs.with_(case, affine=False, bias=True)))
    if not case.affine:
        out.append(("affine", "affine=True", cs.with_(case, affine=True)))
    if case.affine and case.bias and can("bias=False"):
        out.append(("bias", "bias=False", cs.with_(case, bias=False)))
    if case.affine and not case.bias:
        out.append(("bias", "bias=True", cs.with_(case, bias=True)))
    if case.momentum is None:
        out.append(("momentum", "momentum=0.1", cs.with_(case, momentum=0.1)))
    elif can("momentum=None") and caps.cumulative:
        out.append(("momentum", "momentum=None", cs.with_(case, momentum=None)))
    if case.track_running_stats and can("track_running_stats=False"):
        out.append(("tracking", "track_running_stats=False", cs.with_(case, track_running_stats=False)))
    if not case.track_running_stats:
        out.append(("tracking", "track_running_stats=True", cs.with_(case, track_running_stats=True)))
    if case.shape[0] >= 1:
        bigger = (case.shape[0] + 1, *case.shape[1:])
        out.append(("batch size", f"N={bigger[0]}", cs.with_(case, shape=bigger)))
    if len(case.shape) == 2 and case.dims == 1:
        out.append(("rank", "3-D input", cs.with_(case, shape=(*case.shape, 2))))
    elif len(case.shape) == 3:
        out.append(("rank", "2-D input", cs.with_(case, shape=(case.shape[0] * case.shape[2], case.shape[1]),
                                                  layout="contiguous")))
    if candidate.contract.discovered:
        out.append(("grad mode", GRAD_MODE, None))
    return out


def depends(item, candidate, draws: dict[str, str]) -> dict | None:
    """``{"passes_when": {feature: [descriptions]}, "fails_when": {...}, "summary": str}`` for a
    failing example whose draws include a ``case``; None when it cannot be replayed."""
    labels = [k for k in draws if k == "case" or k.startswith("case (")]
    if not labels:
        return None
    values = parse_draws(draws)
    if values is None:
        return None
    index = list(draws).index(labels[-1])  # a test that draws several cases failed on its last
    case = values[index]
    if not isinstance(case, cs.Case) or replay(item, candidate, values) != "fail":
        return None  # not reproducible on its own (e.g. it needed an earlier call's state)
    passes: dict[str, list[str]] = {}
    fails: dict[str, list[str]] = {}
    for feature, description, changed in variations(case, candidate):
        changed_values = list(values)
        if changed is not None:
            changed_values[index] = changed
        outcome = replay(item, candidate, changed_values, eval_no_grad=changed is None)
        if outcome == "pass":
            passes.setdefault(feature, []).append(description)
        elif outcome == "fail":
            fails.setdefault(feature, []).append(description)
    now = {f: _value(case, f) for f in [*passes, *fails]}
    return {"passes_when": passes, "fails_when": fails, "now": now, "summary": summary(case, passes, fails)}


def summary(case: cs.Case, passes: dict, fails: dict) -> str:
    """One sentence: which features make it fail ("fails only for channels_last ... ")."""
    if not passes:
        tried = ", ".join(dict.fromkeys([*fails]))
        return f"fails whatever is changed ({tried or 'nothing could be varied'})"
    return "; ".join(dependence_text(feature, [_value(case, feature), *fails.get(feature, [])], ok)
                     for feature, ok in passes.items())


def _value(case: cs.Case, feature: str) -> str:
    return {
        "layout": case.layout, "dtype": case.dtype, "parameter dtype": f"parameters in {case.param_dtype}",
        "affine": f"affine={case.affine}", "bias": f"bias={case.bias}", "momentum": f"momentum={case.momentum}",
        "tracking": f"track_running_stats={case.track_running_stats}", "batch size": f"N={case.shape[0]}",
        "rank": f"{len(case.shape)}-D input",
    }.get(feature, feature)
