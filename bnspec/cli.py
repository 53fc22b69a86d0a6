"""``bnspec check | list | report``: the command-line front of the conformance suite.

``bnspec check TARGET`` runs the tests in ``conformance/`` through pytest with bnspec's
plugin (the same tests ``pytest conformance --candidate TARGET`` runs), then prints a
table per clause. Exit status: 0 conforms, 1 does not, 2 the target or an option cannot
be used (one line on stderr; ``--verbose`` adds the traceback).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import traceback

EXIT_CONFORMS, EXIT_DOES_NOT_CONFORM, EXIT_UNUSABLE = 0, 1, 2
PROFILES = ("quick", "ci", "thorough")
DTYPES = ("float64", "float32", "float16", "bfloat16")


class UsageProblem(Exception):
    """A bad option value or an unusable target: exit 2 with this one-line reason."""


def _dims(raw: str) -> list[int]:
    try:
        dims = sorted({int(d) for d in raw.split(",")})
    except ValueError:
        raise UsageProblem(f"--dims {raw!r}: expected 1, 2, 3 or a comma-separated list of them") from None
    if not dims or set(dims) - {1, 2, 3}:
        raise UsageProblem(f"--dims {raw!r}: allowed values are 1, 2, 3")
    return dims


def _dtypes(raw: str | None) -> list[str] | None:
    if raw is None:
        return None
    got = [d.strip() for d in raw.split(",") if d.strip()]
    bad = [d for d in got if d not in DTYPES]
    if bad or not got:
        raise UsageProblem(f"--dtypes {raw!r}: allowed values are {', '.join(DTYPES)}")
    return got


def _positive(name: str):
    def parse(raw: str) -> float:
        try:
            value = float(raw)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} {raw!r}: expected a number of seconds") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"{name} {raw!r}: must be > 0")
        return value
    return parse


def _seed(raw: str) -> int:
    try:
        value = int(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--seed {raw!r}: expected a non-negative integer") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"--seed {raw!r}: expected a non-negative integer")
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
    c.add_argument("--profile", default="ci", choices=PROFILES, help="how many examples per property (default ci)")
    c.add_argument("--seed", type=_seed, default=None, help="random seed (default: derandomized)")
    c.add_argument("--device", default="cpu", help="torch device the candidate runs on (default cpu)")
    c.add_argument("--dtypes", default=None, help="narrow the contract to these dtypes, e.g. float32,float64")
    c.add_argument("--clauses", default=None, help="only these clause ids or prefixes, e.g. S1,S3.2")
    c.add_argument("--timeout", type=_positive("--timeout"), default=20.0,
                   help="seconds one call into the candidate may take (default 20)")
    c.add_argument("--json", dest="json_path", default=None, help="write the results document here")
    c.add_argument("--verbose", action="store_true", help="tracebacks for unusable targets; pytest output")

    sub.add_parser("list", help="list the built-in and registered candidates")

    r = sub.add_parser("report", help="check the built-in candidates and write reports/")
    r.add_argument("--candidates", default="torch,bnspec", help="comma-separated targets (default torch,bnspec)")
    r.add_argument("--profile", default="ci", choices=PROFILES)
    r.add_argument("--seed", type=_seed, default=None)
    r.add_argument("--out", default="reports", help="output folder (default reports/)")
    r.add_argument("--timeout", type=_positive("--timeout"), default=20.0)
    return p


# ----------------------------------------------------------------------------- check


def _validate_target(target: str, dims: list[int] | None, device: str, timeout: float) -> list[int]:
    """Load the target once in a child process; the rank families it will be checked for."""
    from bnspec.candidates.targets import UnusableTarget, kind_of
    from bnspec.isolation import CandidateError, CandidateProcess, TargetUnusable
    from bnspec.pytest_plugin import dims_for

    try:
        kind = kind_of(target)
    except UnusableTarget as exc:
        raise UsageProblem(str(exc)) from None
    wanted = dims_for(target, dims)
    if kind != "builtin" and len(wanted) > 1:
        raise UsageProblem(f"{target!r} is one class; give one rank family with --dims (1, 2 or 3)")
    proc = CandidateProcess(target, dims=wanted[0], device=device, timeout=timeout)
    try:
        hello = proc.start()
    except TargetUnusable as exc:
        raise UsageProblem(exc.reason) from None
    except CandidateError as exc:
        raise UsageProblem(f"{target!r} could not be loaded: {exc.reason}") from None
    finally:
        proc.close()
    missing = [d for d in wanted if d not in hello.get("dims", [])]
    if missing:
        raise UsageProblem(f"{target!r} does not provide BatchNorm{missing[0]}d")
    return wanted


class _Progress:
    """A progress bar on stderr (shown only when the run lasts more than a few seconds)."""

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


def run_suite(targets: list[str], *, dims: list[int] | None, profile: str, seed: int | None,
              device: str, dtypes: list[str] | None, clauses: str | None, timeout: float,
              verbose: bool = False) -> list[dict]:
    """Run the conformance tests for ``targets`` in this process; the per-test records."""
    import pytest

    import conformance

    suite = os.path.dirname(conformance.__file__)
    fd, results = tempfile.mkstemp(prefix="bnspec-records-", suffix=".json")
    os.close(fd)
    args = [suite, "-p", "no:cacheprovider", "-o", "addopts=", "--bn-profile", profile,
            "--device", device, "--call-timeout", str(timeout), "--bn-results", results]
    args += ["-q"] if verbose else ["-p", "no:terminal"]
    for t in targets:
        args += ["--candidate", t]
    if dims:
        args += ["--dims", ",".join(map(str, dims))]
    if seed is not None:
        args += ["--bn-seed", str(seed)]
    if dtypes:
        args += ["--dtypes", ",".join(dtypes)]
    if clauses:
        args += ["--clauses", clauses]
    try:
        code = pytest.main(args, plugins=[_Progress(", ".join(targets))])
        if code not in (0, 1):  # 0 all passed, 1 some failed; anything else is a usage/internal error
            raise UsageProblem(f"the conformance run could not complete (pytest exit status {int(code)})")
        with open(results) as f:
            return json.load(f)["records"]
    finally:
        os.unlink(results)


def cmd_check(ns: argparse.Namespace) -> int:
    from bnspec.pytest_plugin import write_json_atomic
    from bnspec.results import document, format_table

    dims = _dims(ns.dims) if ns.dims else None
    dtypes = _dtypes(ns.dtypes)
    wanted = _validate_target(ns.target, dims, ns.device, ns.timeout)
    records = run_suite([ns.target], dims=wanted, profile=ns.profile, seed=ns.seed, device=ns.device,
                        dtypes=dtypes, clauses=ns.clauses, timeout=ns.timeout, verbose=ns.verbose)
    if not records:
        raise UsageProblem(f"no conformance test ran (--clauses {ns.clauses!r} matched nothing?)")
    doc = document(target=ns.target, dims=wanted, profile=ns.profile, seed=ns.seed, device=ns.device,
                   dtypes=dtypes, records=records)
    if ns.json_path:
        write_json_atomic(ns.json_path, doc)
    print(format_table(doc))
    return EXIT_CONFORMS if doc["conformant"] else EXIT_DOES_NOT_CONFORM


def cmd_list(ns: argparse.Namespace) -> int:
    from importlib.metadata import entry_points

    from bnspec.candidates.targets import ENTRY_POINT_GROUP, describe_builtins

    print("built-in candidates:")
    for name, description, installed in describe_builtins():
        print(f"  {name:12} {'' if installed else '(not installed) '}{description}")
    registered = list(entry_points(group=ENTRY_POINT_GROUP))
    print(f"registered under the entry-point group {ENTRY_POINT_GROUP!r}:")
    for ep in registered:
        print(f"  {ep.name:12} {ep.value}")
    if not registered:
        print("  (none)")
    return 0


def cmd_report(ns: argparse.Namespace) -> int:
    from bnspec.pytest_plugin import write_json_atomic
    from bnspec.results import document, format_table

    targets = [t.strip() for t in ns.candidates.split(",") if t.strip()]
    if not targets:
        raise UsageProblem("--candidates: give at least one target")
    docs = []
    for target in targets:
        wanted = _validate_target(target, None, "cpu", ns.timeout)
        records = run_suite([target], dims=wanted, profile=ns.profile, seed=ns.seed, device="cpu",
                            dtypes=None, clauses=None, timeout=ns.timeout)
        doc = document(target=target, dims=wanted, profile=ns.profile, seed=ns.seed, device="cpu",
                       dtypes=None, records=records)
        docs.append(doc)
        print(format_table(doc), end="\n\n", flush=True)
    write_json_atomic(os.path.join(ns.out, "results.json"), {"checks": docs})
    return EXIT_CONFORMS if all(d["conformant"] for d in docs) else EXIT_DOES_NOT_CONFORM


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    ns = parser.parse_args(argv)
    try:
        return {"check": cmd_check, "list": cmd_list, "report": cmd_report}[ns.command](ns)
    except UsageProblem as exc:
        if getattr(ns, "verbose", False):
            traceback.print_exc()
        print(f"bnspec: {exc}", file=sys.stderr)
        return EXIT_UNUSABLE


if __name__ == "__main__":
    sys.exit(main())
