"""``bnspec report``: check and time several candidates and write the report folder
(:mod:`bnspec.report.run` keeps what finished, :mod:`bnspec.report.render` writes the
tables and pages). Each candidate is checked by :func:`bnspec.commands.check.check`, the
same check ``bnspec check`` runs. Exit 0 when the report was written, whatever the
verdicts; 2 for a bad option.
"""

from __future__ import annotations

import argparse
import os
import sys

from bnspec.commands.check import RunProblem, check_with_hello
from bnspec.options import (TARGET_FORMS, CheckOptions, UsageProblem, dims_for, parse_accept, parse_clauses,
                            parse_device, target_kind)
from bnspec.output import check_output_path, emit, write_json_atomic


def cmd_report(ns: argparse.Namespace) -> int:
    from bnspec.isolation import CandidateProcess
    from bnspec.report import render
    from bnspec.report import run as RP
    from bnspec.results import format_table, versions

    if ns.candidates is None:
        targets = RP.installed_builtins()
    else:
        targets = list(dict.fromkeys(t.strip() for t in ns.candidates.split(",") if t.strip()))
    if not targets:
        raise UsageProblem(f"--candidates {ns.candidates!r}: give at least one target, comma-separated "
                           f"({TARGET_FORMS})")
    for target in targets:
        target_kind(target)
    clauses = parse_clauses(ns.clauses)
    accept = parse_accept(ns.accept)
    device = parse_device(ns.device)
    check_output_path(ns.out, "--out", directory=True)
    options = CheckOptions(profile=ns.profile, seed=ns.seed, device=device, clauses=clauses, timeout=ns.timeout,
                           startup_timeout=ns.startup_timeout, budget=ns.budget,
                           accept=tuple(accept) if accept else None, provided_only=True)
    found = versions()
    settings = {"profile": ns.profile, "seed": ns.seed, "device": device, "clauses": clauses, "accept": accept,
                "timing": not ns.no_timing, "threads": ns.threads, "bnspec": found["bnspec"],
                "torch": found["torch"], "suite": RP.suite_fingerprint()}
    load_at_start = [round(v, 2) for v in os.getloadavg()]

    def check(target: str, own: list[str] | None = None, only: str | None = None) -> tuple:
        """The strict check; with ``own``, the check again of the clauses ``only`` with the
        candidate's own conventions accepted (the report's "modulo conventions" view)."""
        run_accept = sorted({*(accept or []), *own}) if own else accept
        run = options.but(accept=tuple(run_accept) if run_accept else None,
                          clauses=only if only is not None else clauses)
        try:
            doc, hello = check_with_hello(target, run)
        except RunProblem:  # the same for every candidate: the report cannot be made
            raise
        except UsageProblem as exc:  # this candidate only: the others still run
            emit(f"{target}: cannot be used: {exc}")
            return "unusable", str(exc), None
        emit(format_table(doc) + "\n")
        return "checked", doc, hello

    def start_timing(target: str):
        # Per call: one warm-up (a compile, for JIT frameworks) and about a second of timed runs.
        proc = CandidateProcess(target, dims=dims_for(target, None)[0], device=device,
                                timeout=ns.timeout, startup_timeout=ns.startup_timeout, budget=None)
        proc.start()
        return proc

    def say(line: str) -> None:
        print(f"bnspec report: {line}", file=sys.stderr, flush=True)

    entries = RP.run(targets, out=ns.out, settings=settings, check=check,
                     start_timing=None if ns.no_timing else start_timing, emit=say, fresh=ns.fresh)
    bandwidth = None
    if not ns.no_timing:
        from bnspec.report.timing import copy_bandwidth, size_for

        say("measuring this machine's copy bandwidth")
        bandwidth = copy_bandwidth(device, size=size_for(ns.profile), threads=ns.threads)
    report = RP.assemble(entries, settings=settings, bandwidth=bandwidth,
                         command=RP.report_command(sys.argv[2:] if ns.argv is None else ns.argv),
                         load_at_start=load_at_start)
    try:
        write_json_atomic(os.path.join(ns.out, "results.json"), report)
        written = render.write_all(report, ns.out)
    except OSError as exc:
        raise UsageProblem(f"--out {ns.out!r}: could not write the report ({exc})") from None
    say(f"wrote {ns.out}/: results.json, " + ", ".join(written))
    # A report compares candidates, most of which deviate somewhere: its exit status says
    # whether the report was written (verdicts are in it); `bnspec check` is the gate.
    return 0
