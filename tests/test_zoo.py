"""Meta tests: the conformance suite fails every mutant of the zoo and passes every correct BatchNorm.

1. One pytest subprocess runs ``conformance/`` with every mutant of
   ``tests/zoo/mutants.py`` as a candidate (quick profile); each mutant must FAIL at
   least one test of the clause it was written to break (``MUTANTS``). A setup error
   (the target could not be used) does not count as caught. A mutant that follows a
   known convention (``NAMED``) must also have it named in one of its failures.
2. One pytest subprocess runs the correct BatchNorms (``tests/zoo/correct.py``, the
   zoo's base, and the built-ins ``torch`` and ``bnspec``) on all three rank families
   (ci profile): nothing may fail or error, and a skip must say "not applicable".

Both read the suite's per-test JSON records (``--bn-results``) and print a per-candidate
table. The runs start in the background when the session begins (``tests/suite_runs.py``)
and these tests run last, so the runs use the core the other tests leave idle.
"""

from __future__ import annotations

import os
from collections import defaultdict

import pytest

import suite_runs
from bnspec.conventions import CONVENTIONS, atoms
from suite_runs import CPU_TAG, NO_SHRINK_ENV, Start, SuiteRun
from zoo import correct as zoo_correct
from zoo import mutants as zoo_mutants

MUTANTS_FILE = "tests/zoo/mutants.py"
CORRECT_FILE = "tests/zoo/correct.py"
BASE_FILE = "tests/zoo/base.py"
CORRECT_NAMES = ("FromScratch", "Float64Internal", "ClosedForm")
#: Profiles: the brief's. With "quick" (6 derandomized examples) a mutant whose bug needs
#: a particular combination of draws can escape; which ones do is in the zoo's report.
MUTANT_PROFILE, CORRECT_PROFILE = "quick", "ci"


def _mutant_targets(dims: str) -> list[str]:
    """Class mutants run as BatchNorm2d (--dims 2); a mapping mutant would need --dims 1,2,3."""
    want_mapping = dims != "2"
    return [f"{MUTANTS_FILE}:{n}" for n in zoo_mutants.MUTANTS
            if isinstance(getattr(zoo_mutants, n), dict) == want_mapping]


def correct_targets() -> list[str]:
    return [f"{CORRECT_FILE}:{n}" for n in CORRECT_NAMES] + [f"{BASE_FILE}:Base", "torch", "bnspec"]


def planned_runs(wanted: set[str]) -> dict[str, Start]:
    """The suite runs the selected tests (``wanted``: their function names) read, by name.
    ``tests/conftest.py`` starts them in the background when the session begins."""
    plan: dict[str, Start] = {}
    if "test_suite_catches_every_mutant" in wanted:
        # The plugin's --dims is global to a run: one run per family kind. With class
        # mutants only (today), that is ONE run.
        for dims in ("2", "1,2,3"):
            targets = _mutant_targets(dims)
            if targets:
                name = f"mutants-{dims.replace(',', '')}"
                plan[name] = lambda workdir, name=name, targets=targets, dims=dims: SuiteRun(
                    name, targets, dims=dims, profile=MUTANT_PROFILE, workdir=workdir, shrink=False)
    if "test_suite_passes_every_correct_batchnorm" in wanted:
        plan["correct"] = lambda workdir: SuiteRun("correct", correct_targets(), dims="1,2,3",
                                                   profile=CORRECT_PROFILE, workdir=workdir, shrink=True)
    return plan


@pytest.fixture(scope="module")
def runs(request) -> dict[str, SuiteRun]:
    """The runs the selected tests need: started in the background, or now."""
    started = suite_runs.take_all(planned_runs(suite_runs.selected_names(request.session, request.module)))
    yield started
    for run in started.values():
        run.stop()


def _timing(wall: float, cpu: float | None) -> str:
    return f"{wall:.0f} s wall" + (f", {cpu:.0f} s CPU" if cpu is not None else "")


# ----------------------------------------------------------------------------- plugin for the runs
# The runs load THIS module as a pytest plugin (``-p test_zoo``, with tests/ on PYTHONPATH).
# In the outer session these hooks are inert: pytest takes no hooks from test modules.


@pytest.hookimpl(trylast=True)
def pytest_configure(config):
    """With NO_SHRINK_ENV: the profile's examples (and derandomization) unchanged, no shrinking.

    A verdict does not depend on shrinking: the same examples are generated and the first
    failing one fails the test. Shrinking (and the explain phase) only makes the
    counterexample smaller and costs most of a mutant run: one mutant over the whole suite
    took 38 s with it and 5.7 s without (ST1's state machine alone 22 s).
    """
    if os.environ.get(NO_SHRINK_ENV) != "1":
        return
    from hypothesis import Phase, settings

    settings.register_profile("bnspec-zoo-no-shrink",
                              settings(settings.default, phases=(Phase.explicit, Phase.reuse, Phase.generate)))
    settings.load_profile("bnspec-zoo-no-shrink")


def _target_of(item) -> str | None:
    callspec = getattr(item, "callspec", None) if item is not None else None
    param = callspec.params.get("candidate") if callspec is not None else None
    return param[0] if isinstance(param, tuple) else None


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """Close a candidate's process once its last test ran.

    bnspec's plugin keeps every candidate's process until the session ends: with 50
    mutants that is 50 idle processes of about 250 MB each. Tests are grouped by candidate
    (a session-scoped parameter), and a closed process restarts on its next call anyway.
    """
    yield
    target = _target_of(item)
    if target is not None and target != _target_of(nextitem):
        state = getattr(item.config, "_bnspec_state", None) or {}
        proc = state.get("processes", {}).get(target)
        if proc is not None:
            proc.close()


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session):
    """Report the CPU time of this run and of its (waited-for) candidate processes."""
    import resource

    from bnspec.isolation.launch import stop_servers

    stop_servers()  # the candidates were forked by a fork server: its CPU time includes theirs
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    print(f"\n{CPU_TAG} {me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime:.1f}")


# ----------------------------------------------------------------------------- helpers


def names(record: dict, convention: str) -> bool:
    """The failure names ``convention``: in its message, in the conventions the judge matched,
    or (statistics chosen by grad mode) by the diagnosis' replay that passes with autograd off."""
    if CONVENTIONS[convention] in (record["detail"] or ""):
        return True
    if any(convention in part for name in record.get("conventions") or [] for part in atoms(name)):
        return True
    passes = (record.get("depends") or {}).get("passes_when") or {}
    return convention == "stats_by_grad_mode" and "grad mode" in passes


def _first_line(text: str) -> str:
    for line in (text or "").splitlines():
        if line.strip():
            return line.strip()[:110]
    return ""


# ----------------------------------------------------------------------------- tests


def test_registry_is_well_formed():
    from bnspec.spec import CLAUSES

    assert set(zoo_mutants.NAMED) <= set(zoo_mutants.MUTANTS)
    assert set(zoo_mutants.NAMED.values()) <= set(CONVENTIONS)
    assert len(zoo_mutants.MUTANTS) >= 30
    for name, (clause, description) in zoo_mutants.MUTANTS.items():
        assert clause in CLAUSES, f"{name}: unknown clause {clause!r}"
        assert description and "\n" not in description, name
        obj = getattr(zoo_mutants, name)
        assert isinstance(obj, dict) or callable(obj), name
    for name in CORRECT_NAMES:
        assert sorted(getattr(zoo_correct, name)) == [1, 2, 3], name


def test_suite_catches_every_mutant(runs):
    records, wall, cpu = [], 0.0, 0.0
    for key in [k for k in runs if k.startswith("mutants")]:
        recs, w, c = runs[key].wait()
        records += recs
        wall, cpu = max(wall, w), (cpu + c if c is not None and cpu is not None else None)
    by_candidate: dict[str, list[dict]] = defaultdict(list)
    for r in records:
        by_candidate[r["candidate"]].append(r)
    rows, missed = [], []
    for name, (clause, _description) in zoo_mutants.MUTANTS.items():
        recs = by_candidate.get(f"{MUTANTS_FILE}:{name}", [])
        of_clause = [r for r in recs if r["clause"] == clause]
        caught = [r for r in of_clause if r["outcome"] == "failed" and r["phase"] == "call"]
        errors = [r for r in recs if r["phase"] != "call" and r["outcome"] == "failed"]
        failed_clauses = sorted({r["clause"] for r in recs if r["outcome"] == "failed" and r["phase"] == "call"})
        if caught:
            verdict, how = "caught", f"{caught[0]['test']}: {_first_line(caught[0]['detail'])}"
        elif not recs:
            verdict, how = "NOT RUN", "no records for this candidate"
        elif not of_clause:
            verdict, how = "NO TEST", f"no test of {clause} ran (not written yet?)"
        else:
            outcomes = ", ".join(sorted({f"{r['test']}={r['outcome']}" for r in of_clause}))
            verdict, how = "MISSED", f"{clause} tests: {outcomes}"
        if errors and not caught:
            how += f"; {len(errors)} setup errors: {_first_line(errors[0]['detail'])}"
        rows.append((name, clause, verdict, ",".join(failed_clauses) or "-", how))
        convention = zoo_mutants.NAMED.get(name)
        if verdict == "caught" and convention is not None:
            if not any(names(r, convention) for r in recs if r["outcome"] == "failed"):
                verdict, how = "UNNAMED", f"caught, but no failure names {convention!r}: {how}"
        if verdict != "caught":
            missed.append(name)
    table = "\n".join(f"{n:32} {c:5} {v:8} fails:{f:40.40} {h}" for n, c, v, f, h in rows)
    print(f"\nmutant run: {_timing(wall, cpu)}\n{table}")
    assert not missed, (f"{len(missed)} of {len(rows)} mutants not caught by their clause (or their "
                        f"convention not named): {', '.join(missed)}\n"
                        f"{table}")


def test_suite_passes_every_correct_batchnorm(runs):
    records, wall, cpu = runs["correct"].wait()
    bad = []
    seen: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for r in records:
        seen[f"{r['candidate']} {r['dims']}d"][r["outcome"]] += 1
        if r["outcome"] == "failed":
            bad.append(r)
        elif r["outcome"] == "skipped" and "not applicable" not in (r["detail"] or ""):
            bad.append(r)
    summary = "\n".join(f"{c:44} {dict(v)}" for c, v in seen.items())
    print(f"\ncorrect run: {_timing(wall, cpu)}\n{summary}")
    expected = {f"{t} {d}d" for t in correct_targets() for d in (1, 2, 3)}
    assert set(seen) == expected, f"candidates without records: {sorted(expected - set(seen))}"
    details = "\n\n".join(f"{r['candidate']}-{r['dims']}d {r['nodeid']} [{r['phase']}] {r['outcome']}:\n{r['detail']}"
                          for r in bad[:20])
    assert not bad, f"{len(bad)} false verdicts on correct BatchNorms:\n{summary}\n\n{details}"
