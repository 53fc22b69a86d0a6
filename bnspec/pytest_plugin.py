"""bnspec's pytest plugin: candidate options, hypothesis profiles, per-clause records.

Registered under the ``pytest11`` entry point, so ``pytest conformance --candidate
TARGET`` works wherever bnspec is installed; ``bnspec check`` runs the same tests
through :func:`pytest.main` with this plugin.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import pytest

from bnspec.options import (DEFAULT_PROFILE, DEFAULT_STARTUP_TIMEOUT, DEFAULT_TIMEOUT, PROFILES, UsageProblem,
                            budget_for, dims_for, parse_dims)

DEFAULT_CANDIDATES = ("torch", "bnspec")


@dataclass(eq=False)  # a plugin object: pluggy keeps it by identity
class SuiteRun:
    """One run of the suite, as a caller of :func:`pytest.main` sees it: hand an instance in
    ``plugins=[...]``, and the plugin uses its already started candidate processes
    (``processes``: target -> :class:`~bnspec.isolation.CandidateProcess`) and fills
    ``records`` in memory. Without one (plain ``pytest conformance``) the plugin makes its own.
    """

    processes: dict = field(default_factory=dict)
    records: list[dict] = field(default_factory=list)
    started: float = field(default_factory=time.time)


RUN = pytest.StashKey[SuiteRun]()


def suite_run(config: pytest.Config) -> SuiteRun:
    """The :class:`SuiteRun` of this pytest session."""
    return config.stash[RUN]


def register_profiles() -> None:
    from hypothesis import HealthCheck, Phase, settings

    # Every phase but ``explain``: after shrinking, it replays the failing example with each
    # draw varied to comment on which ones matter, about two thirds of a failing check's time.
    # Its comments end up only in the draws' notes, which :func:`drawn` strips; the verdict and
    # the failing example are those of the phases before it.
    phases = tuple(phase for phase in Phase if phase is not Phase.explain)

    for name, profile in PROFILES.items():
        for seeded in (False, True):
            settings.register_profile(
                name + ("-seeded" if seeded else ""),
                max_examples=profile.examples,
                derandomize=profile.derandomize and not seeded,
                deadline=None,
                database=None,
                print_blob=False,
                phases=phases,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much,
                                       HealthCheck.data_too_large, HealthCheck.differing_executors,
                                       HealthCheck.function_scoped_fixture],
            )


def pytest_addoption(parser: pytest.Parser) -> None:
    g = parser.getgroup("bnspec", "bnspec conformance")
    g.addoption("--candidate", action="append", default=None, metavar="TARGET",
                help="BatchNorm to check: built-in name, package.module:Name, file.py:Name or "
                     f"entry point (repeatable; default: {', '.join(DEFAULT_CANDIDATES)})")
    g.addoption("--dims", default=None, metavar="1,2,3",
                help="rank families to check (default: all a built-in provides; 2 for a class)")
    g.addoption("--bn-profile", default=None, choices=sorted(PROFILES),
                help=f"hypothesis profile: examples per property (default: {DEFAULT_PROFILE})")
    g.addoption("--bn-seed", default=None, type=int, help="seed (turns derandomization off)")
    g.addoption("--device", default="cpu", help="torch device the candidate runs on (default cpu)")
    g.addoption("--dtypes", default=None, metavar="float32,float64",
                help="narrow the contract to these dtypes (the verdict says it was narrowed)")
    g.addoption("--call-timeout", default=DEFAULT_TIMEOUT, type=float,
                help=f"seconds one call into the candidate may take (default {DEFAULT_TIMEOUT:g})")
    g.addoption("--bn-startup-timeout", default=DEFAULT_STARTUP_TIMEOUT, type=float,
                help=f"seconds loading the candidate may take (default {DEFAULT_STARTUP_TIMEOUT:g})")
    g.addoption("--bn-budget", default=None, type=float,
                help="seconds the whole run may spend waiting for each candidate's answers "
                     "(default per profile, as bnspec check)")
    g.addoption("--clauses", default=None, metavar="S1,S3.2",
                help="run only clauses with these ids or id prefixes")
    g.addoption("--bn-results", default=None, metavar="FILE", help="write per-test records as JSON")
    g.addoption("--bn-no-diagnose", action="store_true", default=False,
                help="do not replay unexplained failures to find what they depend on (faster)")
    g.addoption("--bn-accept", default=None, metavar="NAME[,NAME...]",
                help="judge these known conventions (bnspec.conventions) against their own formulas "
                     "instead of torch's; what matches passes as 'pass (NAME)'")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "clause(id): the specification clause a test checks")
    from hypothesis import core, settings

    register_profiles()
    profile = config.getoption("--bn-profile") or DEFAULT_PROFILE
    seed = config.getoption("--bn-seed")
    settings.load_profile(profile + ("-seeded" if seed is not None else ""))
    from bnspec.conventions import unknown_conventions

    unknown = unknown_conventions(config.getoption("--bn-accept"))
    if unknown:
        raise pytest.UsageError(unknown)
    if seed is not None:
        core.global_force_seed = seed
    given = [p for p in config.pluginmanager.get_plugins() if isinstance(p, SuiteRun)]
    config.stash[RUN] = given[0] if given else SuiteRun()


def _targets(config: pytest.Config) -> list[str]:
    return config.getoption("--candidate") or list(DEFAULT_CANDIDATES)


def _dims(config: pytest.Config) -> list[int] | None:
    raw = config.getoption("--dims")
    try:
        return None if raw is None else parse_dims(raw)
    except UsageProblem as exc:
        raise pytest.UsageError(str(exc)) from None


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "candidate" in metafunc.fixturenames:
        explicit = _dims(metafunc.config)
        params = [(t, d) for t in _targets(metafunc.config) for d in dims_for(t, explicit)]
        metafunc.parametrize("candidate", params, indirect=True, ids=[f"{t}-{d}d" for t, d in params],
                             scope="session")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    wanted = config.getoption("--clauses")
    if not wanted:
        return
    prefixes = [w.strip() for w in wanted.split(",") if w.strip()]
    keep, drop = [], []
    for item in items:
        m = item.get_closest_marker("clause")
        cid = m.args[0] if m else ""
        (keep if any(cid == p or cid.startswith(p + ".") for p in prefixes) else drop).append(item)
    items[:] = keep
    config.hook.pytest_deselected(items=drop)


@pytest.fixture(scope="session")
def candidate(request: pytest.FixtureRequest):
    from bnspec.isolation import CandidateProcess
    from bnspec.runner import Candidate

    target, dims = request.param
    config = request.config
    processes = suite_run(config).processes
    device, timeout = config.getoption("--device"), config.getoption("--call-timeout")
    if target not in processes:
        # One child per target, shared by its rank families, under bnspec check's limits.
        profile = config.getoption("--bn-profile") or DEFAULT_PROFILE
        processes[target] = CandidateProcess(target, dims=dims_for(target, _dims(config))[0], device=device,
                                             timeout=timeout, startup_timeout=config.getoption("--bn-startup-timeout"),
                                             budget=budget_for(profile, config.getoption("--bn-budget")))
    dtypes = config.getoption("--dtypes")
    yield Candidate(target, dims=dims, device=device, timeout=timeout, process=processes[target],
                    dtypes=tuple(d.strip() for d in dtypes.split(",")) if dtypes else None)


@pytest.fixture(autouse=True)
def _revive_candidate(request: pytest.FixtureRequest):
    """A crash or hang fails one test; the next test gets a fresh child process."""
    if "candidate" in request.fixturenames:
        cand = request.getfixturevalue("candidate")
        cand.process.revive()
        # given up before this test: whatever it reports, the candidate never ran it
        request.node.user_properties.append(("not_run", cand.process.given_up))
    yield


@pytest.fixture
def judge(request: pytest.FixtureRequest):
    from conformance.judge import Judge

    return Judge(request.node)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call):
    outcome = yield
    report = outcome.get_result()
    if "candidate" not in getattr(item, "fixturenames", ()):
        return
    if report.when != "call" and not (report.failed or report.skipped):
        return
    cand = item.callspec.params.get("candidate") if hasattr(item, "callspec") else None
    mark = item.get_closest_marker("clause")
    props = dict(item.user_properties)
    ratio = props.get("error_over_bound")
    by_dtype = {k: (None if isinstance(v, float) and math.isnan(v) else v)
                for k, v in sorted(props.get("error_over_bound_by_dtype", {}).items())}
    record = {
        "nodeid": item.nodeid,
        "test": item.originalname,
        "clause": mark.args[0] if mark else None,
        "candidate": cand[0] if cand else None,
        "dims": cand[1] if cand else None,
        "phase": report.when,
        "outcome": report.outcome,
        "error_over_bound": None if ratio is None or (isinstance(ratio, float) and math.isnan(ratio)) else ratio,
        "error_over_bound_by_dtype": by_dtype,
        "detail": _detail(report, call),
        **verdict_fields(report, call, props),
        "duration_s": round(report.duration, 4),
        "accepted": list(props.get("accepted", [])),
        **_failure_facts(report, call),
    }
    from bnspec.diagnosis import named_alternatives

    if record["case"] and not named_alternatives(record) and not item.config.getoption("--bn-no-diagnose"):
        from conformance.diagnose import depends

        record["depends"] = depends(item, item.funcargs["candidate"], record["draws"])
        _accept_grad_mode(item, report, record)
    suite_run(item.config).records.append(record)


def _accept_grad_mode(item, report, record: dict) -> None:
    """With ``--bn-accept stats_by_grad_mode``, a failure whose replay passes with autograd off in
    eval was judged against that convention's own formula (running statistics under no_grad,
    batch statistics with autograd on) and matched it: it passes, as accepted."""
    from conformance.judge import accepted_names

    passes = (record.get("depends") or {}).get("passes_when") or {}
    if "grad mode" in passes and "stats_by_grad_mode" in accepted_names(item.config.getoption("--bn-accept")):
        report.outcome, report.longrepr = "passed", None
        # error/bound was measured against torch's formula; against the convention's it is not known
        record.update(outcome="passed", verdict="pass", reason="", failures=0, detail="", accepted=sorted({*record["accepted"], "stats_by_grad_mode"}),
                      error_over_bound=None, error_over_bound_by_dtype={})


def verdict_fields(report, call, props: dict) -> dict:
    """The record's verdict, read from the outcome and the exception's type (never from a
    message): pass, fail, error (the test's set-up failed), not run (the candidate had been
    given up before it), unsupported or n/a (:mod:`conformance.outcomes`); its one-line
    ``reason``; ``failures``, the number of distinct failures hypothesis found."""
    from conformance.outcomes import NotApplicable

    if report.passed:
        return {"verdict": "pass", "reason": "", "failures": 0}
    excs = _failures(call)
    first = _first_line(_describe(excs[0]) if excs else _detail(report, call))
    if report.skipped:
        exc = excs[0] if excs else None
        return {"verdict": "n/a" if isinstance(exc, NotApplicable) else "unsupported",
                "reason": _first_line(_detail(report, call)), "failures": 0}
    if props.get("not_run"):
        verdict = "not run"
    else:
        verdict = "error" if report.when == "setup" else "fail"
    exc = call.excinfo.value if call is not None and call.excinfo is not None else None
    if isinstance(exc, BaseExceptionGroup) and len(excs) == 1:  # hypothesis' FlakyFailure
        first = f"flaky (passed when repeated): {first}"
    return {"verdict": verdict, "reason": first, "failures": max(len(excs), 1)}


def _first_line(text: str) -> str:
    """The first non-blank line, without the proxy's note that a call was not retried."""
    from bnspec.isolation.proxy import NOT_RETRIED

    lines = [ln.strip().removesuffix(NOT_RETRIED) for ln in str(text).strip().splitlines() if ln.strip()]
    return lines[0] if lines else ""


def _detail(report, call) -> str:
    """Why a test did not pass: the failure's message and the drawn case, no traceback."""
    if report.passed:
        return ""
    if report.skipped:
        if call.excinfo is not None and isinstance(call.excinfo.value, pytest.skip.Exception):
            return call.excinfo.value.msg  # the message without its exception's type name
        longrepr = report.longrepr
        text = str(longrepr[2]) if isinstance(longrepr, tuple) else str(longrepr)
        return text.removeprefix("Skipped: ")
    exc = call.excinfo.value if call.excinfo is not None else None
    if exc is None:
        return (getattr(report, "longreprtext", "") or str(report.longrepr))[-2000:]
    if isinstance(exc, BaseExceptionGroup):  # hypothesis found several distinct failures
        parts = [_describe(e) for e in exc.exceptions[:3]]
        return (f"{len(exc.exceptions)} distinct failures:\n" + "\n".join(parts))[:4000]
    return _describe(exc)[:4000]


def _failures(call) -> list[BaseException]:
    exc = call.excinfo.value if call is not None and call.excinfo is not None else None
    if exc is None:
        return []
    return list(exc.exceptions) if isinstance(exc, BaseExceptionGroup) else [exc]


def _failure_facts(report, call) -> dict:
    """What a cause needs from a failure, as data: the conventions its result matches, the
    failing case (``Case(...)``) and every labelled draw of the failing example."""
    if not report.failed:
        return {"conventions": [], "case": None, "case_repro": None, "draws": {}, "suite_error": None,
                "not_run": False}
    excs = _failures(call)
    names: list[str] = []
    for exc in excs:
        names += [c for c in getattr(exc, "conventions", ()) if c not in names]
    first = next((e for e in excs if getattr(e, "case", None) is not None), excs[0] if excs else None)
    case = getattr(first, "case", None)
    return {"conventions": names, "case": repr(case) if case is not None else None,
            "case_repro": case.repro() if case is not None and hasattr(case, "repro") else None,
            "draws": drawn(first) if first is not None else {}, "suite_error": _suite_error(excs),
            "not_run": bool(dict(report.user_properties).get("not_run"))}


def _suite_error(excs: list[BaseException]) -> str | None:
    """The suite's own exception (a bug of bnspec, never a verdict on the candidate), if any:
    anything but an assertion, a candidate's error, or a skip."""
    from bnspec.isolation import CandidateError

    for exc in excs:
        if not isinstance(exc, (AssertionError, CandidateError, pytest.skip.Exception)):
            return f"{type(exc).__name__}: {exc}"[:500]
    return None


def drawn(exc: BaseException) -> dict[str, str]:
    """The failing example's draws from hypothesis' notes (``Draw 2 (momentum): 0.5``), label ->
    repr, unlabelled draws as ``#N``; a case the test changed after drawing is the judged one."""
    out = {}
    for note in getattr(exc, "__notes__", []):
        if not note.startswith("Draw "):
            continue
        head, _, value = note.partition(": ")
        number, _, label = head.removeprefix("Draw ").partition(" ")
        label = label[1:-1] if label.startswith("(") and label.endswith(")") else label
        value = value.split(" # or any other generated value")[0]  # hypothesis' explain phase
        out[label or f"#{number}"] = " ".join(value.split())
    return out


def _describe(exc: BaseException) -> str:
    from bnspec.isolation import CandidateError

    message = exc.reason if isinstance(exc, CandidateError) else str(exc)
    if not isinstance(exc, (AssertionError, CandidateError)):
        message = f"{type(exc).__name__}: {message}"
    draws = drawn(exc)
    if "reproduce:" in message:  # the judged case is in the message; the other draws complete the example
        draws = {k: v for k, v in draws.items() if k != "case" and not k.startswith("case (")}
    if draws:
        message += "\n  the other draws of this example: " if "reproduce:" in message else "\n  draws: "
        message += ", ".join(f"{k}={v}" for k, v in draws.items())
    return message


def pytest_sessionfinish(session: pytest.Session, exitstatus) -> None:
    run = session.config.stash.get(RUN, None)
    if run is None:
        return
    for proc in run.processes.values():
        proc.close()
    path = session.config.getoption("--bn-results")
    if path:
        from bnspec.output import write_json_atomic

        contracts = {f"{t}-{d}d": c.to_dict() for t, p in run.processes.items() for d, c in p.contracts.items()}
        write_json_atomic(path, {"records": run.records, "contracts": contracts})
