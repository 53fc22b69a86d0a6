"""``bnspec check | list | report``: the command line, parsed and dispatched to
:mod:`bnspec.commands` (one module per command). Exit status: 0 conforms, 1 does not, 2 the
target or an option cannot be used (one line on stderr; ``--verbose`` adds the traceback).
``bnspec report`` exits 0 when the report was written, whatever the verdicts.

Time limits and their defaults: :mod:`bnspec.options` (``--timeout`` per call,
``--startup-timeout`` for loading, ``--budget`` for the whole check, default per profile).
"""

from __future__ import annotations

import argparse
import math
import sys
import traceback

from bnspec.candidates.synced import MAX_WORLD_SIZE
from bnspec.options import (BUDGETS, CLI_PROFILES, DEFAULT_PROFILE, DEFAULT_STARTUP_TIMEOUT, DEFAULT_TIMEOUT,
                            EXIT_CONFORMS, EXIT_DOES_NOT_CONFORM, EXIT_UNUSABLE, MAX_SECONDS, UsageProblem)
from bnspec.output import one_line, silence_stdout

__all__ = ["main", "build_parser", "BUDGETS", "EXIT_CONFORMS", "EXIT_DOES_NOT_CONFORM", "EXIT_UNUSABLE",
           "UsageProblem"]


def _threads(raw: str) -> int:
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if not 1 <= value <= 1024:
        raise argparse.ArgumentTypeError(f"--threads {raw!r}: expected a whole number from 1 to 1024")
    return value


def _positive(name: str):
    def parse(raw: str) -> float:
        try:
            value = float(raw)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} {raw!r}: expected a number of seconds") from None
        if not (value > 0 and math.isfinite(value) and value <= MAX_SECONDS):
            raise argparse.ArgumentTypeError(f"{name} {raw!r}: must be a number of seconds > 0 and at most "
                                             f"{MAX_SECONDS:g}")
        return value
    return parse


def _seed(raw: str) -> int:
    try:
        value = int(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--seed {raw!r}: expected an integer from 0 to 2**63-1") from None
    if not 0 <= value < 2**63:
        raise argparse.ArgumentTypeError(f"--seed {raw!r}: expected an integer from 0 to 2**63-1")
    return value


def _world_size(raw: str) -> int:
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if not 1 <= value <= MAX_WORLD_SIZE:
        raise argparse.ArgumentTypeError(f"--world-size {raw!r}: expected a number of processes from 1 to "
                                         f"{MAX_WORLD_SIZE}")
    return value


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # exit 2 with one line, as argparse does, plus a hint
        self.exit(EXIT_UNUSABLE, f"bnspec: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="bnspec", description="The executable specification of Batch Normalization.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    c = sub.add_parser("check", help="check one BatchNorm against the specification")
    c.add_argument("target", help="built-in name (bnspec list), package.module:Name, path/to/file.py:Name, "
                                  "or an entry point of the group bnspec.candidates")
    c.add_argument("--dims", default=None, help="rank families: 1, 2, 3 or a list like 1,2,3 "
                                                "(default: all a built-in provides; 2 for a class)")
    c.add_argument("--profile", default=DEFAULT_PROFILE, choices=CLI_PROFILES,
                   help=f"how many examples per property (default {DEFAULT_PROFILE})")
    c.add_argument("--seed", type=_seed, default=None, help="random seed (default: derandomized)")
    c.add_argument("--device", default="cpu", help="torch device the candidate runs on (default cpu)")
    c.add_argument("--dtypes", default=None, help="narrow the contract to these dtypes, e.g. float32,float64")
    c.add_argument("--clauses", default=None, help="only these clause ids or prefixes, e.g. S1,S3.2")
    c.add_argument("--timeout", type=_positive("--timeout"), default=DEFAULT_TIMEOUT,
                   help=f"seconds one call into the candidate may take (default {DEFAULT_TIMEOUT:g})")
    c.add_argument("--startup-timeout", type=_positive("--startup-timeout"), default=DEFAULT_STARTUP_TIMEOUT,
                   help=f"seconds loading the candidate may take (default {DEFAULT_STARTUP_TIMEOUT:g})")
    c.add_argument("--budget", type=_positive("--budget"), default=None,
                   help="seconds the whole check may spend waiting for the candidate's answers "
                        f"(default per profile: {', '.join(f'{k} {BUDGETS[k]:g}' for k in CLI_PROFILES)})")
    c.add_argument("--json", dest="json_path", default=None, help="write the results document here")
    c.add_argument("--accept", default=None, metavar="NAME[,NAME...]",
                   help="judge these known conventions against their own formulas instead of torch's "
                        "(names: bnspec.conventions; the causes name them)")
    c.add_argument("--world-size", type=_world_size, default=None, metavar="K",
                   help="check a synced BatchNorm (torch-sync, bnspec-sync, module:Name) "
                        f"in K processes (1 to {MAX_WORLD_SIZE}): "
                        "gloo on cpu, NCCL on cuda")
    c.add_argument("--verbose", action="store_true", help="tracebacks for unusable targets; pytest output")

    sub.add_parser("list", help="list the built-in and registered candidates")

    r = sub.add_parser("report", help="check the built-in candidates and write reports/")
    r.add_argument("--candidates", default=None,
                   help="comma-separated targets (default: every installed built-in, see bnspec list)")
    r.add_argument("--profile", default=DEFAULT_PROFILE, choices=CLI_PROFILES)
    r.add_argument("--seed", type=_seed, default=None)
    r.add_argument("--out", default="reports", help="output folder (default reports/)")
    r.add_argument("--clauses", default=None, help="only these clause ids or prefixes, e.g. S1,S3.2")
    r.add_argument("--timeout", type=_positive("--timeout"), default=DEFAULT_TIMEOUT,
                   help=f"seconds one call into a candidate may take (default {DEFAULT_TIMEOUT:g})")
    r.add_argument("--startup-timeout", type=_positive("--startup-timeout"), default=DEFAULT_STARTUP_TIMEOUT)
    r.add_argument("--budget", type=_positive("--budget"), default=None,
                   help="seconds each candidate's check may spend waiting for it (default per profile)")
    r.add_argument("--device", default="cpu", help="where the candidates run (cpu, cuda, ...)")
    r.add_argument("--no-timing", action="store_true", help="skip the timing runs and the bandwidth measurement")
    r.add_argument("--threads", type=_threads, default=1,
                   help="torch threads for the timings and the bandwidth measurement (default 1: "
                        "multi-threaded timings swing with the load of other work)")
    r.add_argument("--accept", default=None, metavar="NAME[,NAME...]",
                   help="judge these known conventions against their own formulas instead of torch's")
    r.add_argument("--fresh", action="store_true",
                   help="run every candidate again instead of keeping finished ones from an earlier run")
    return p


def _command(name: str):
    """The command's function; its module is imported only when it runs (``bnspec list``
    needs neither torch's nor pytest's start-up)."""
    if name == "check":
        from bnspec.commands.check import cmd_check

        return cmd_check
    if name == "report":
        from bnspec.commands.report import cmd_report

        return cmd_report
    from bnspec.commands.list import cmd_list

    return cmd_list


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    ns = parser.parse_args(argv)
    ns.argv = None if argv is None else argv[1:]
    try:
        return _command(ns.command)(ns)
    except UsageProblem as exc:
        if getattr(ns, "verbose", False):
            traceback.print_exc()
        print(f"bnspec: {one_line(str(exc))}", file=sys.stderr)
        return EXIT_UNUSABLE
    except KeyboardInterrupt:
        print("bnspec: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # stdout closed early (``bnspec list | head``): not an error of ours
        silence_stdout()
        return 1


if __name__ == "__main__":
    sys.exit(main())
