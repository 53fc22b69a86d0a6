"""S5: the module contract (constructor, initial values and registration, state_dict).

Expected names, keys and dtypes come from ``torch.nn.BatchNorm{1,2,3}d`` built in THIS
process (torch is the reference semantics; the candidate never sees it); expected initial
values and defaults are the specification's (SPEC.md S5). A state dict made by
torch after a few training steps is loaded into the candidate and the candidate's is
loaded into torch, both strict.
"""

from __future__ import annotations

import ast
import itertools

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import Tensor

from bnspec.candidates.torch_module import STATE_NAMES
from bnspec.isolation import CandidateRaised
from bnspec.isolation.wire import meta
from conformance import driver, oracle
from conformance import strategies as cs

REQUIRED = object()  #: no default
#: torch 2.13's constructor: (name, kind, default), in order (SPEC.md S5.1).
TORCH_SIGNATURE = (
    ("num_features", "POSITIONAL_OR_KEYWORD", REQUIRED),
    ("eps", "POSITIONAL_OR_KEYWORD", 1e-5),
    ("momentum", "POSITIONAL_OR_KEYWORD", 0.1),
    ("affine", "POSITIONAL_OR_KEYWORD", True),
    ("track_running_stats", "POSITIONAL_OR_KEYWORD", True),
    ("device", "POSITIONAL_OR_KEYWORD", None),
    ("dtype", "POSITIONAL_OR_KEYWORD", None),
    ("bias", "KEYWORD_ONLY", True),
)
#: Attribute values of a module made with only num_features (torch's, and a new module trains).
DEFAULT_ATTRS = {"eps": 1e-5, "momentum": 0.1, "affine": True, "track_running_stats": True, "training": True}
#: Every combination of the three switches (bias=False with affine=False is legal: no parameters).
SWITCHES = tuple(dict(affine=a, bias=b, track_running_stats=t)
                 for a, b, t in itertools.product((True, False), repeat=3))


# ----------------------------------------------------------------------------- helpers


def torch_class(dims: int):
    return {1: torch.nn.BatchNorm1d, 2: torch.nn.BatchNorm2d, 3: torch.nn.BatchNorm3d}[dims]


def constructor_kwargs(switches: dict, dtype: str | None = None) -> dict:
    """Keywords as a user writes them; ``bias`` only when False (absent = torch's default)."""
    kw = {"affine": switches["affine"], "track_running_stats": switches["track_running_stats"]}
    if not switches["bias"]:
        kw["bias"] = False
    if dtype is not None:
        kw["dtype"] = dtype
    return kw


def torch_module(dims: int, num_features: int, kwargs: dict) -> torch.nn.Module:
    kw = dict(kwargs)
    if isinstance(kw.get("dtype"), str):
        kw["dtype"] = getattr(torch, kw["dtype"])
    return torch_class(dims)(num_features, **kw)


def torch_state(module: torch.nn.Module) -> dict:
    """weight, bias, running statistics, counter: a detached copy, None where torch has None."""
    return {name: None if getattr(module, name) is None else getattr(module, name).detach().clone()
            for name in STATE_NAMES}


def _describe_kwargs(kw: dict) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in kw.items()) or "no keywords"


def _made(candidate, judge, num_features: int, kw: dict, *, case=None) -> driver.Driven:
    """A module built with ``kw`` (for a ``with`` block); the constructor's raise is a failure."""
    try:
        return driver.made(candidate, num_features, **kw)
    except CandidateRaised as exc:
        judge.fail(f"BatchNorm{candidate.dims}d({num_features}, {_describe_kwargs(kw)}) raised {exc.type_name}: "
                   f"{exc.message.strip()[:200]}; torch accepts it", case=case)


def _same_state(judge, what: str, got: dict, want: dict, *, case=None) -> None:
    """Every state tensor equal (values, dtype, shape) or both None."""
    for name in STATE_NAMES:
        g, w = got.get(name, "missing"), want.get(name, "missing")
        judge.check(w is None or isinstance(w, Tensor), f"{what}: the state to reproduce has {name} = "
                    f"{_short(w)}, not a tensor or None", case=case)
        if w is None:
            judge.check(g is None, f"{what}: {name} is {_short(g)}, expected None (as torch)", case=case)
            continue
        judge.check(isinstance(g, Tensor), f"{what}: {name} is {_short(g)}, expected a tensor", case=case)
        judge.check(g.dtype == w.dtype and tuple(g.shape) == tuple(w.shape),
                    f"{what}: {name} has dtype {g.dtype} shape {tuple(g.shape)}, expected {w.dtype} "
                    f"shape {tuple(w.shape)}", case=case)
        judge.exact(f"{what}: {name}", g, w, case=case)


def _short(v) -> str:
    if isinstance(v, Tensor):
        return f"a {v.dtype} tensor of shape {tuple(v.shape)}"
    return repr(v)[:80]


def _default_value(text: str | None):
    """The candidate's default as sent by the adapter (a repr), or REQUIRED."""
    if text is None:
        return REQUIRED
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text  # not a literal: kept as text, never equal to torch's default


def _same_default(got, want) -> bool:
    if want is REQUIRED or got is REQUIRED:
        return got is want
    return type(got) is type(want) and got == want


def buildable_switches(candidate) -> tuple[dict, ...]:
    """The switch combinations the candidate's constructor accepts (all True always is: the
    keywords are left out at torch's defaults)."""
    can = candidate.contract.builds
    return tuple(s for s in SWITCHES if all(s[key] or can(f"{key}=False")
                                            for key in ("affine", "bias", "track_running_stats")))


def _present(candidate, names: list[str], kind: str, theirs: list[str] | None = None) -> list[str]:
    """torch's ``names`` without those the contract finding already reports missing (unless
    the candidate has them anyway, e.g. a weight registered as a buffer)."""
    theirs = theirs or []
    return [n for n in names if n in theirs or candidate.contract.has(f"{n} {kind}")]


# ----------------------------------------------------------------------------- S5.1


@pytest.mark.clause("S5.1")
def test_contract_complete(candidate, judge):
    """One finding for everything the candidate lacks of torch's module contract: the other
    clauses draw only what it can be built with and skip what it does not have."""
    candidate.require("module_contract")
    contract = candidate.contract
    if contract.missing:
        lines = [f"  {piece}: {why}" for piece, why in contract.missing.items()]
        judge.fail(f"incomplete contract: {contract.summary()}\n" + "\n".join(lines))


@pytest.mark.clause("S5.1")
@given(num_features=st.integers(1, 64))
def test_constructor_signature_and_defaults(candidate, judge, num_features):
    candidate.require("module_contract")
    params = candidate.signature()
    names = list(params)
    problems = []
    for name, kind, default in TORCH_SIGNATURE:
        if name not in params:
            problems.append(f"no parameter {name!r}")
            continue
        p = params[name]
        if p["kind"] != kind:
            problems.append(f"{name!r} is {p['kind']}, torch's is {kind}")
        got = _default_value(p["default"])
        if not _same_default(got, default):
            want = "no default" if default is REQUIRED else f"default {default!r}"
            have = "no default" if got is REQUIRED else f"default {p['default']}"
            problems.append(f"{name!r} has {have}, torch's has {want}")
    positional = [n for n in names if params[n]["kind"] in ("POSITIONAL_ONLY", "POSITIONAL_OR_KEYWORD")]
    torch_positional = [n for n, k, _ in TORCH_SIGNATURE if k == "POSITIONAL_OR_KEYWORD"]
    if positional[:len(torch_positional)] != torch_positional:
        problems.append(f"positional order {positional}, torch's is {torch_positional}")
    torch_names = {n for n, _, _ in TORCH_SIGNATURE}
    for name in names:  # an extra parameter is harmless only when a torch-style call can omit it
        p = params[name]
        if name not in torch_names and p["default"] is None and p["kind"] not in ("VAR_POSITIONAL", "VAR_KEYWORD"):
            problems.append(f"extra required parameter {name!r} (torch's calls do not pass it)")
    judge.check(not problems, "constructor signature differs from torch.nn.BatchNorm"
                f"{candidate.dims}d(num_features, eps=1e-05, momentum=0.1, affine=True, "
                f"track_running_stats=True, device=None, dtype=None, *, bias=True): " + "; ".join(problems))

    # The defaults in effect: a module made with num_features only.
    with _made(candidate, judge, num_features, {}) as d:
        attrs = d.module.describe()["attrs"]
    want = {**DEFAULT_ATTRS, "num_features": num_features}
    for name, value in want.items():
        got = attrs.get(name)
        judge.check(type(got) is type(value) and got == value,
                    f"BatchNorm{candidate.dims}d({num_features}).{name} is {got!r}, expected {value!r}")


# ----------------------------------------------------------------------------- S5.2


@pytest.mark.clause("S5.2")
@given(num_features=st.integers(1, 16),
       dtype=st.sampled_from((None, *cs.DTYPES)))
def test_initial_values_and_registration(candidate, judge, num_features, dtype):
    candidate.require("module_contract")
    if dtype is not None and dtype not in candidate.capabilities.dtypes:
        dtype = None
    want_dtype = getattr(torch, dtype) if dtype else torch.get_default_dtype()
    for switches in buildable_switches(candidate):
        kw = constructor_kwargs(switches, dtype)
        what = f"BatchNorm{candidate.dims}d({num_features}, {_describe_kwargs(kw)})"
        ref = torch_module(candidate.dims, num_features, kw)
        with _made(candidate, judge, num_features, kw) as made:
            d = made.module.describe()
        for kind, got, want in (("parameters", d["param_names"], [n for n, _ in ref.named_parameters()]),
                                ("buffers", d["buffer_names"], [n for n, _ in ref.named_buffers()])):
            piece = kind.rstrip("s")
            # names the contract finding already reports (e.g. a weight registered as a buffer)
            reported = {p.split(" ")[0] for p in candidate.contract.missing if p.endswith((" parameter", " buffer"))}
            got = [n for n in (got or []) if n in want or n not in reported]
            want = _present(candidate, want, piece)
            judge.check(got == want, f"{what}: {kind} {got}, torch registers {want}")
        state = d["state"]
        ones = torch.ones(num_features, dtype=want_dtype)
        zeros = torch.zeros(num_features, dtype=want_dtype)
        expected = {
            "weight": ones if switches["affine"] else None,
            "bias": zeros if switches["affine"] and switches["bias"] else None,
            "running_mean": zeros if switches["track_running_stats"] else None,
            "running_var": ones if switches["track_running_stats"] else None,
            "num_batches_tracked": torch.tensor(0, dtype=torch.int64) if switches["track_running_stats"] else None,
        }
        for name, value in expected.items():
            got = state.get(name)
            if name not in _present(candidate, [name], "parameter" if name in ("weight", "bias") else "buffer",
                                    d["param_names"] if name in ("weight", "bias") else d["buffer_names"]):
                continue  # the contract finding reports it
            if value is None:
                judge.check(got is None, f"{what}: {name} is {_short(got)}, expected None (torch registers "
                            f"it as None: the attribute exists and is None)")
                continue
            judge.tensor(f"{what}: {name}", got, shape=value.shape, dtype=value.dtype, device=candidate.device)
            judge.exact(f"{what}: initial {name}", got, value)
        for name in ("weight", "bias"):
            if expected[name] is not None and candidate.contract.has(f"{name} parameter"):
                judge.check(meta((d["parameters"] or {}).get(name)).get("requires_grad") is True,
                            f"{what}: {name} does not require grad (torch's is a trainable nn.Parameter)")
        for name in d["buffer_names"] or ():
            judge.check(not meta((d["buffers"] or {}).get(name)).get("requires_grad"),
                        f"{what}: buffer {name} requires grad (torch's buffers do not)")


# ----------------------------------------------------------------------------- S5.3


@pytest.mark.clause("S5.3")
@given(num_features=st.integers(1, 16), dtype=st.sampled_from((None, *cs.DTYPES)))
def test_state_dict_keys(candidate, judge, num_features, dtype):
    """Keys (in order), dtypes and shapes of a new module's state_dict, per switch combination."""
    candidate.require("module_contract")
    if dtype is not None and dtype not in candidate.capabilities.dtypes:
        dtype = None
    candidate.require_piece("state_dict")
    for switches in buildable_switches(candidate):
        kw = constructor_kwargs(switches, dtype)
        what = f"BatchNorm{candidate.dims}d({num_features}, {_describe_kwargs(kw)}).state_dict()"
        with _made(candidate, judge, num_features, kw) as d:
            sd = d.module.state_dict()
        want = present_keys(candidate, torch_module(candidate.dims, num_features, kw).state_dict(), sd["keys"])
        judge.check(sd["keys"] == list(want), f"{what}: keys {sd['keys']}, torch's are {list(want)}")
        for key, value in want.items():
            judge.tensor(f"{what}[{key!r}]", sd["values"][key], shape=value.shape, dtype=value.dtype)


def present_keys(candidate, sd: dict, theirs: list[str]) -> dict:
    """torch's state_dict without the keys of pieces the contract finding reports missing."""
    kinds = {"weight": "parameter", "bias": "parameter"}
    return {k: v for k, v in sd.items() if k in theirs or candidate.contract.has(f"{k} {kinds.get(k, 'buffer')}")}


def _steps(case: cs.Case, k: int) -> list[Tensor]:
    """k training batches derived from the case (distinct seeds, same shape and dtype)."""
    return [cs.with_(case, seed=case.seed + 1 + i).x() for i in range(k)]


@pytest.mark.clause("S5.3")
@given(data=st.data())
def test_state_dict_round_trip_with_torch(candidate, judge, data):
    """torch's state_dict (after training steps) loads strictly into the candidate, which then
    has torch's state and gives the eval output; the candidate's loads strictly into torch."""
    candidate.require("module_contract", "forward")
    # Loading strictly both ways needs every piece of the state (the contract finding lists a missing one).
    candidate.require_piece("state_dict", "load_state_dict", "weight parameter", "bias parameter",
                            "running_mean buffer", "running_var buffer", "num_batches_tracked buffer")
    case = data.draw(driver.cases_for(candidate, dists=("normal",),
                                      layouts=candidate.capabilities.layouts, momenta=False), label="case")
    momenta = [0.1, *([None] if candidate.contract.builds("momentum=None") else []),
               *([0.5] if candidate.contract.builds("momentum") else [])]
    case = cs.with_(case, momentum=data.draw(st.sampled_from(momenta), label="momentum"))
    k = data.draw(st.integers(1, 3), label="training_steps")
    kw = case.module_kwargs()
    params = driver.set_values(case)  # the case's non-default weight and bias
    w, b = params.get("weight"), params.get("bias")

    # torch -> candidate
    ref = torch_module(case.dims, case.channels, kw)
    with torch.no_grad():
        if w is not None:
            ref.weight.copy_(w)
        if b is not None:
            ref.bias.copy_(b)
    for x in _steps(case, k):
        ref(x)
    want = torch_state(ref)
    with _made(candidate, judge, case.channels, kw, case=case) as d:
        try:
            got = d.module.load_state_dict(dict(ref.state_dict()))
        except CandidateRaised as exc:
            judge.fail(f"load_state_dict(torch's state_dict, strict=True) raised {exc.type_name}: "
                       f"{exc.message.strip()[:300]}", case=case)
        _same_state(judge, "after loading torch's state_dict", got, want, case=case)
        d.module.eval()
        x = case.x()
        out = d.module.forward(x, layout=case.layout)
    if case.track_running_stats:
        expected = oracle.eval_(case, x, want["running_mean"], want["running_var"], w, b)
    else:  # no running statistics: eval normalizes with the batch's
        expected, _, _ = oracle.train(case, x, w, b)
    judge.close("eval output after loading torch's state_dict", out.y, expected, case=case)
    _same_state(judge, "after an eval forward of the loaded module", out.state, want, case=case)

    # candidate -> torch
    with _made(candidate, judge, case.channels, kw, case=case) as d:
        if params:
            d.module.set_state(**params)
        for x in _steps(case, k):
            d.module.forward(x, layout=case.layout)
        theirs = d.module.state()
        sd = d.module.state_dict()
    fresh = torch_module(case.dims, case.channels, kw)
    want_sd = fresh.state_dict()
    judge.check(sd["keys"] == list(want_sd), f"state_dict keys {sd['keys']}, torch's are {list(want_sd)}",
                case=case)
    for key, value in want_sd.items():
        judge.tensor(f"candidate state_dict[{key!r}]", sd["values"][key], shape=value.shape,
                     dtype=value.dtype, case=case)
    try:
        fresh.load_state_dict(sd["values"], strict=True)
    except RuntimeError as exc:
        judge.fail(f"torch's load_state_dict(candidate's state_dict, strict=True) raised: "
                   f"{str(exc).strip()[:300]}", case=case)
    _same_state(judge, "torch after loading the candidate's state_dict", torch_state(fresh), theirs, case=case)
