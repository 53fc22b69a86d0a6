"""``bnspec check TARGET``, and :func:`check`, the one seam between the commands and the suite.

:func:`check` loads the target once in a child process (which also says what it can be
built with), runs the tests in ``conformance/`` through pytest with bnspec's plugin (the
same tests ``pytest conformance --candidate TARGET`` runs) on that process, and turns
the records into the results document (:mod:`bnspec.results`). ``bnspec report`` calls
it for each candidate; a synced target (``--world-size K``) goes to
:func:`bnspec.distributed.check.synced_document`.

Time: each call into the candidate has ``timeout`` seconds; loading it has
``startup_timeout``; the whole check may spend at most ``budget`` seconds waiting for the
candidate's answers (default per profile, :data:`bnspec.options.BUDGETS`; loading is not
counted). A candidate whose import hangs or raises cannot be used: :class:`UsageProblem`,
exit 2. Everything the candidate does after loading is a verdict: exit 1.
"""

from __future__ import annotations

import argparse
import os
import sys

import pytest

from bnspec.options import (EXIT_CONFORMS, EXIT_DOES_NOT_CONFORM, CheckOptions, UsageProblem, dims_for,
                            parse_accept, parse_clauses, parse_device, parse_dims, parse_dtypes, target_kind)
from bnspec.output import check_output_path, emit, one_line, write_json_atomic


class RunProblem(UsageProblem):
    """The suite's run itself cannot be used (``--clauses`` selected no test; pytest could
    not run the suite): the same for every candidate, so a report stops too."""


def check(target: str, options: CheckOptions) -> dict:
    """The results document of checking ``target`` (schema in :mod:`bnspec.results`);
    :class:`UsageProblem` when the target or an option cannot be used."""
    return check_with_hello(target, options)[0]


def check_with_hello(target: str, options: CheckOptions) -> tuple[dict, dict]:
    """:func:`check`, and what the candidate's child said when it started (its versions,
    capabilities and native defaults: ``bnspec report`` shows them)."""
    from bnspec.candidates.synced import SYNC_BUILTINS
    from bnspec.results import document

    if options.world_size is not None or target in SYNC_BUILTINS:
        from bnspec.distributed.check import synced_document

        doc = synced_document(target, options)  # synced BatchNorm in K processes (SPEC.md S9)
        return doc, {"versions": doc["versions"].get("candidate")}
    wanted, proc = start_candidate(target, options)
    hello = dict(proc.hello)
    try:
        records = run_suite(target, options.but(dims=tuple(wanted)), proc)
    finally:
        proc.close()
    if not records:
        raise RunProblem(f"no conformance test ran: --clauses {options.clauses!r} matched no test")
    dtypes = list(options.dtypes) if options.dtypes else None
    accept = list(options.accept) if options.accept else None
    return document(target=target, dims=wanted, profile=options.profile, seed=options.seed, device=options.device,
                    dtypes=dtypes, records=records, clauses=options.clauses, timeout=options.timeout,
                    budget=options.budget, candidate_versions=hello.get("versions"), accept=accept,
                    contract=contract_of(proc, wanted)), hello


def start_candidate(target: str, options: CheckOptions):
    """Load the target once in a child process: the rank families it will be checked for,
    and that (started) process, which then runs the tests."""
    from bnspec.isolation import CandidateError, CandidateProcess, TargetUnusable
    from bnspec.runner import discover

    kind = target_kind(target)
    wanted = dims_for(target, options.dims)
    if kind != "builtin" and len(wanted) > 1:
        raise UsageProblem(f"{target!r} is one class; give one rank family with --dims (1, 2 or 3)")
    proc = CandidateProcess(target, dims=wanted[0], device=options.device, timeout=options.timeout,
                            startup_timeout=options.startup_timeout, budget=options.effective_budget)
    try:
        hello = proc.start()
    except TargetUnusable as exc:
        proc.close()
        raise UsageProblem(one_line(exc.reason)) from None
    except CandidateError as exc:
        proc.close()
        raise UsageProblem(one_line(f"{target!r} could not be loaded: {exc.reason}")) from None
    missing = [d for d in wanted if d not in hello.get("dims", [])]
    if missing and options.provided_only and kind == "builtin" and options.dims is None:
        # A framework without some rank family (MLX has no BatchNorm3d): check the ones it has.
        wanted = [d for d in wanted if d not in missing]
        missing = [] if wanted else missing
    if missing:
        proc.close()
        raise UsageProblem(f"{target!r} does not provide BatchNorm{missing[0]}d")
    for d in wanted:  # what it can be built with, before any clause draws (cached on the process)
        discover(proc, d)
    return wanted, proc


def contract_of(proc, dims: list[int]) -> dict | None:
    """The contract the suite discovered (cached on the process; one rank family for a class)."""
    found = proc.contracts
    if not found:
        return None
    if len(dims) == 1 or len(found) == 1:
        return next(iter(found.values())).to_dict()
    return {str(d): found[d].to_dict() for d in dims if d in found}


class Progress:
    """A progress bar on stderr, shown only when the run lasts more than a few seconds."""

    def __init__(self, label: str) -> None:
        self.label, self.bar = label, None

    def pytest_collection_finish(self, session) -> None:
        from tqdm import tqdm

        self.bar = tqdm(total=len(session.items), desc=self.label, unit="test", file=sys.stderr,
                        delay=3.0, leave=False, dynamic_ncols=True)

    def pytest_runtest_logfinish(self, nodeid, location) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def pytest_sessionfinish(self, session, exitstatus) -> None:
        if self.bar is not None:
            self.bar.close()


class NativeTracebacks:
    """pytest's tracebacks in Python's own format, when no terminal shows them.

    pytest's default format re-parses the test's source file for every failing example
    (hypothesis formats each one through pytest): a third of a failing candidate's check.
    The records carry the failures' messages, never these tracebacks.
    """

    def pytest_configure(self, config) -> None:
        config.option.tbstyle = "native"  # the option --tb sets; -p no:terminal removes --tb


def suite_arguments(target: str, options: CheckOptions) -> list[str]:
    """pytest's command line for the suite on ``target`` (what ``pytest conformance`` takes)."""
    import conformance

    args = [os.path.dirname(conformance.__file__), "-p", "no:cacheprovider", "-o", "addopts=",
            "--bn-profile", options.profile, "--device", options.device, "--call-timeout", str(options.timeout),
            "--bn-startup-timeout", str(options.startup_timeout), "--bn-budget", str(options.effective_budget),
            "--candidate", target]
    args += ["-q"] if options.verbose else ["-p", "no:terminal"]
    for option, value in (("--dims", options.dims), ("--dtypes", options.dtypes), ("--bn-accept", options.accept)):
        if value:
            args += [option, ",".join(map(str, value))]
    if options.seed is not None:
        args += ["--bn-seed", str(options.seed)]
    if options.clauses:
        args += ["--clauses", options.clauses]
    return args


def run_suite(target: str, options: CheckOptions, process) -> list[dict]:
    """Run the conformance tests for ``target`` in this process on its started ``process``;
    the per-test records, in memory."""
    from bnspec.pytest_plugin import SuiteRun

    run = SuiteRun(processes={target: process})
    plugins = [run, Progress(target)] + ([] if options.verbose else [NativeTracebacks()])
    code = pytest.main(suite_arguments(target, options), plugins=plugins)
    if code not in (0, 1):  # 0 all passed, 1 some failed; anything else is a usage/internal error
        raise RunProblem(f"the conformance run could not complete (pytest exit status {int(code)})")
    return run.records


def options_of(ns: argparse.Namespace) -> CheckOptions:
    """``bnspec check``'s options, parsed (a value that cannot be used: :class:`UsageProblem`)."""
    dims = parse_dims(ns.dims) if ns.dims is not None else None
    dtypes = parse_dtypes(ns.dtypes)
    clauses = parse_clauses(ns.clauses)
    accept = parse_accept(ns.accept)
    return CheckOptions(dims=tuple(dims) if dims else None, profile=ns.profile, seed=ns.seed,
                        device=parse_device(ns.device), dtypes=tuple(dtypes) if dtypes else None, clauses=clauses,
                        timeout=ns.timeout, startup_timeout=ns.startup_timeout, budget=ns.budget,
                        accept=tuple(accept) if accept else None, world_size=ns.world_size, verbose=ns.verbose)


def cmd_check(ns: argparse.Namespace) -> int:
    """``bnspec check``: print the causes and the clause table; exit 0 conforms, 1 not."""
    from bnspec.results import format_table

    options = options_of(ns)
    if ns.json_path is not None:
        check_output_path(ns.json_path, "--json")
    doc = check(ns.target, options)
    problem = None
    if ns.json_path:  # first: a closed stdout must not lose the results
        try:
            write_json_atomic(ns.json_path, doc)
        except OSError as exc:
            problem = UsageProblem(f"--json {ns.json_path!r}: could not write the results ({exc})")
    table = format_table(doc)
    if "world_size" in doc:
        from bnspec.distributed.check import synced_table

        table = synced_table(doc, table)
    emit(table)
    if problem is not None:
        raise problem
    return EXIT_CONFORMS if doc["conformant"] else EXIT_DOES_NOT_CONFORM
