"""``bnspec check | list | report``: the command-line front of the conformance suite.

``bnspec check TARGET`` runs the tests in ``conformance/`` through pytest with bnspec's
plugin (the same tests ``pytest conformance --candidate TARGET`` runs), then prints a
table per clause. Exit status: 0 conforms, 1 does not, 2 the target or an option cannot
be used (one line on stderr; ``--verbose`` adds the traceback).

``bnspec report`` checks and times several candidates and writes ``reports/`` (see
:mod:`bnspec.report`); it exits 0 when the report was written, whatever the verdicts,
and 2 for a bad option.

Time: each call into the candidate has ``--timeout`` seconds; loading it (importing the
target in the child process) has ``--startup-timeout``; the whole check may spend at
most ``--budget`` seconds waiting for the candidate's answers (default per profile, see
:data:`BUDGETS`; loading is not counted). A candidate whose import hangs cannot be used: exit 2, like one whose
import raises. Everything the candidate does after loading is a verdict: exit 1.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import tempfile
import traceback

import pytest

EXIT_CONFORMS, EXIT_DOES_NOT_CONFORM, EXIT_UNUSABLE = 0, 1, 2
PROFILES = ("quick", "ci", "thorough")
DTYPES = ("float64", "float32", "float16", "bfloat16")
DEFAULT_TIMEOUT = 20.0
DEFAULT_STARTUP_TIMEOUT = 120.0
#: Seconds a check may spend waiting for the answers of the candidate (loading not counted).
BUDGETS = {"quick": 600.0, "ci": 3600.0, "thorough": 6 * 3600.0}
MAX_SECONDS = 7 * 24 * 3600.0
_CLAUSE_ID = re.compile(r"[A-Z]+[0-9]*(\.[0-9]+)*")  # S1, S3.2, G1, ST1
TARGET_FORMS = "a built-in name (see bnspec list), package.module:Name or path/to/file.py:Name"


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


def _threads(raw: str) -> int:
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if not 1 <= value <= 1024:
        raise argparse.ArgumentTypeError(f"--threads {raw!r}: expected a whole number from 1 to 1024")
    return value


def _dtypes(raw: str | None) -> list[str] | None:
    if raw is None:
        return None
    got = [d.strip() for d in raw.split(",") if d.strip()]
    bad = [d for d in got if d not in DTYPES]
    if bad or not got:
        raise UsageProblem(f"--dtypes {raw!r}: allowed values are {', '.join(DTYPES)} (comma-separated)")
    return list(dict.fromkeys(got))


def _clauses(raw: str | None) -> str | None:
    """Clause ids or prefixes, e.g. ``S1,S3.2`` (checked for form here; a list that
    matches no test is reported after collection)."""
    if raw is None:
        return None
    got = [c.strip() for c in raw.split(",") if c.strip()]
    bad = [c for c in got if not _CLAUSE_ID.fullmatch(c)]
    if bad or not got:
        raise UsageProblem(f"--clauses {raw!r}: expected clause ids or prefixes like S1 or S3.2, comma-separated")
    return ",".join(got)


def _device(raw: str) -> str:
    """A torch device string this machine has (the candidate runs there)."""
    import torch

    try:
        device = torch.device(raw)
    except (RuntimeError, ValueError, TypeError):
        raise UsageProblem(f"--device {raw!r}: not a torch device; expected cpu, cuda, cuda:N, mps, ...") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageProblem(f"--device {raw!r}: CUDA is not available on this machine; use cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageProblem(f"--device {raw!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif device.type != "cpu":
        try:
            torch.empty(0, device=device)
        except Exception:  # noqa: BLE001 - whatever the backend raises
            raise UsageProblem(f"--device {raw!r}: not available on this machine; use cpu") from None
    return raw


def _check_output_path(path: str, option: str, *, directory: bool = False) -> None:
    """Fail now, not after the run, when the results could not be written there."""
    target_dir = path if directory else (os.path.dirname(os.path.abspath(path)) or ".")
    if not directory and os.path.isdir(path):
        raise UsageProblem(f"{option} {path!r} is a directory; give a file name")
    if os.path.exists(target_dir) and not os.path.isdir(target_dir):
        raise UsageProblem(f"{option} {path!r}: {target_dir!r} is not a directory")
    try:
        os.makedirs(target_dir, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".bnspec-probe-", dir=target_dir)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise UsageProblem(f"{option} {path!r}: cannot write there ({exc.strerror or exc})") from None


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
    if not 1 <= value <= 8:
        raise argparse.ArgumentTypeError(f"--world-size {raw!r}: expected a number of processes from 1 to 8")
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
    c.add_argument("--timeout", type=_positive("--timeout"), default=DEFAULT_TIMEOUT,
                   help=f"seconds one call into the candidate may take (default {DEFAULT_TIMEOUT:g})")
    c.add_argument("--startup-timeout", type=_positive("--startup-timeout"), default=DEFAULT_STARTUP_TIMEOUT,
                   help=f"seconds loading the candidate may take (default {DEFAULT_STARTUP_TIMEOUT:g})")
    c.add_argument("--budget", type=_positive("--budget"), default=None,
                   help="seconds the whole check may spend waiting for the candidate's answers "
                        f"(default per profile: {', '.join(f'{k} {v:g}' for k, v in BUDGETS.items())})")
    c.add_argument("--json", dest="json_path", default=None, help="write the results document here")
    c.add_argument("--accept", default=None, metavar="NAME[,NAME...]",
                   help="judge these known conventions against their own formulas instead of torch's "
                        "(names: bnspec.conventions; the causes name them)")
    c.add_argument("--world-size", type=_world_size, default=None, metavar="K",
                   help="check a synced BatchNorm (torch-sync, bnspec-sync, module:Name) in K processes (1 to 8): "
                        "gloo on cpu, NCCL on cuda")
    c.add_argument("--verbose", action="store_true", help="tracebacks for unusable targets; pytest output")

    sub.add_parser("list", help="list the built-in and registered candidates")

    r = sub.add_parser("report", help="check the built-in candidates and write reports/")
    r.add_argument("--candidates", default=None,
                   help="comma-separated targets (default: every installed built-in, see bnspec list)")
    r.add_argument("--profile", default="ci", choices=PROFILES)
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


# ----------------------------------------------------------------------------- check


def _check_target_syntax(target: str) -> str:
    """The target's kind; a malformed TARGET is a usage problem found before any import."""
    from bnspec.candidates.targets import UnusableTarget, kind_of

    if not target.strip():
        raise UsageProblem(f"TARGET {target!r} is empty; expected {TARGET_FORMS}")
    try:
        kind = kind_of(target)
    except UnusableTarget as exc:
        raise UsageProblem(f"{exc}; expected {TARGET_FORMS}") from None
    path, _, name = target.rpartition(":")
    if kind == "module" and not all(part.isidentifier() for part in path.split(".")):
        raise UsageProblem(f"TARGET {target!r}: {path!r} is not a dotted module name; expected {TARGET_FORMS}")
    if kind == "entrypoint":
        from importlib.metadata import entry_points

        from bnspec.candidates.targets import BUILTINS, ENTRY_POINT_GROUP

        if not re.fullmatch(r"[A-Za-z0-9_.\-]+", target):
            raise UsageProblem(f"TARGET {target!r} is not a candidate name; expected {TARGET_FORMS}")
        if target not in {ep.name for ep in entry_points(group=ENTRY_POINT_GROUP)}:
            raise UsageProblem(f"{target!r} is not a built-in candidate ({', '.join(BUILTINS)}) and not "
                               f"registered under the entry-point group {ENTRY_POINT_GROUP!r}; expected {TARGET_FORMS}")
    if kind == "file" and not os.path.isfile(path):
        raise UsageProblem(f"TARGET {target!r}: no such file {path!r}")
    if kind == "module":
        import importlib.util

        top = path.split(".")[0]
        try:
            found = importlib.util.find_spec(top) is not None  # the top-level package only: runs no code
        except (ImportError, ValueError):
            found = False
        if not found:
            raise UsageProblem(f"TARGET {target!r}: cannot import module {top!r} (not installed, or not on "
                               "the path from here)")
    return kind


def _validate_target(target: str, dims: list[int] | None, device: str, timeout: float, *,
                     startup_timeout: float = DEFAULT_STARTUP_TIMEOUT, budget: float | None = None,
                     provided_only: bool = False):
    """Load the target once in a child process: the rank families it will be checked for,
    and that (started) process, which then runs the tests."""
    from bnspec.isolation import CandidateError, CandidateProcess, TargetUnusable
    from bnspec.pytest_plugin import dims_for

    kind = _check_target_syntax(target)
    wanted = dims_for(target, dims)
    if kind != "builtin" and len(wanted) > 1:
        raise UsageProblem(f"{target!r} is one class; give one rank family with --dims (1, 2 or 3)")
    proc = CandidateProcess(target, dims=wanted[0], device=device, timeout=timeout,
                            startup_timeout=startup_timeout, budget=budget)
    try:
        hello = proc.start()
    except TargetUnusable as exc:
        proc.close()
        raise UsageProblem(_one_line(exc.reason)) from None
    except CandidateError as exc:
        proc.close()
        raise UsageProblem(_one_line(f"{target!r} could not be loaded: {exc.reason}")) from None
    missing = [d for d in wanted if d not in hello.get("dims", [])]
    if missing and provided_only and kind == "builtin" and dims is None:
        # A framework without some rank family (MLX has no BatchNorm3d): check the ones it has.
        wanted = [d for d in wanted if d not in missing]
        missing = [] if wanted else missing
    if missing:
        proc.close()
        raise UsageProblem(f"{target!r} does not provide BatchNorm{missing[0]}d")
    from bnspec.runner import discover

    for d in wanted:  # what it can be built with, before any clause draws (cached on the process)
        discover(proc, d)
    return wanted, proc


def _one_line(text: str, limit: int = 500) -> str:
    from bnspec.isolation.proxy import printable

    text = printable(" ".join(str(text).split()))
    return text if len(text) <= limit else text[: limit - 3] + "..."


class _Progress:
    """A progress bar on stderr (shown only when the run lasts more than a few seconds);
    also hands the already started candidate processes to bnspec's plugin."""

    def __init__(self, label: str, processes: dict | None = None) -> None:
        self.label, self.bar = label, None
        self.processes = processes or {}

    @pytest.hookimpl(trylast=True)
    def pytest_configure(self, config) -> None:
        from bnspec.pytest_plugin import _STATE

        state = getattr(config, _STATE, None)
        if state is not None:
            state["processes"].update(self.processes)

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
              verbose: bool = False, processes: dict | None = None, accept: list[str] | None = None) -> list[dict]:
    """Run the conformance tests for ``targets`` in this process; the per-test records.

    ``processes`` maps a target to its already started :class:`CandidateProcess` (the
    one that validated it), which the tests then use instead of starting another."""

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
    if accept:
        args += ["--bn-accept", ",".join(accept)]
    try:
        code = pytest.main(args, plugins=[_Progress(", ".join(targets), processes)])
        if code not in (0, 1):  # 0 all passed, 1 some failed; anything else is a usage/internal error
            raise UsageProblem(f"the conformance run could not complete (pytest exit status {int(code)})")
        with open(results) as f:
            return json.load(f)["records"]
    finally:
        os.unlink(results)


def cmd_check(ns: argparse.Namespace) -> int:
    from bnspec.distributed_check import SYNC_BUILTINS, cmd_check_synced
    from bnspec.pytest_plugin import write_json_atomic
    from bnspec.results import document, format_table

    if getattr(ns, "world_size", None) is not None or ns.target in SYNC_BUILTINS:
        return cmd_check_synced(ns)  # synced BatchNorm in K processes (DESIGN S9)
    dims = _dims(ns.dims) if ns.dims is not None else None
    dtypes = _dtypes(ns.dtypes)
    clauses = _clauses(ns.clauses)
    accept = _accept(ns.accept)
    device = _device(ns.device)
    if ns.json_path is not None:
        _check_output_path(ns.json_path, "--json")
    budget = ns.budget if ns.budget is not None else BUDGETS[ns.profile]
    wanted, proc = _validate_target(ns.target, dims, device, ns.timeout, startup_timeout=ns.startup_timeout,
                                    budget=budget)
    hello = dict(proc.hello)
    try:
        records = run_suite([ns.target], dims=wanted, profile=ns.profile, seed=ns.seed, device=device,
                            dtypes=dtypes, clauses=clauses, timeout=ns.timeout, verbose=ns.verbose,
                            processes={ns.target: proc}, accept=accept)
    finally:
        proc.close()
    contract = _contract(proc, wanted)
    if not records:
        raise UsageProblem(f"no conformance test ran: --clauses {clauses!r} matched no test")
    doc = document(target=ns.target, dims=wanted, profile=ns.profile, seed=ns.seed, device=device,
                   dtypes=dtypes, records=records, clauses=clauses, timeout=ns.timeout,
                   budget=ns.budget, candidate_versions=hello.get("versions"), accept=accept,
                   contract=contract)
    problem = None
    if ns.json_path:  # first: a closed stdout must not lose the results
        try:
            write_json_atomic(ns.json_path, doc)
        except OSError as exc:
            problem = UsageProblem(f"--json {ns.json_path!r}: could not write the results ({exc})")
    _emit(format_table(doc))
    if problem is not None:
        raise problem
    return EXIT_CONFORMS if doc["conformant"] else EXIT_DOES_NOT_CONFORM


def _accept(raw: str | None) -> list[str] | None:
    from bnspec.conventions import unknown_conventions

    problem = unknown_conventions(raw)
    if problem:
        raise UsageProblem(problem)
    return list(dict.fromkeys(n.strip() for n in raw.split(",") if n.strip())) if raw else None


def _contract(proc, dims: list[int]) -> dict | None:
    """The contract the suite discovered (cached on the process; one rank family for a class)."""
    found = proc.contracts
    if not found:
        return None
    if len(dims) == 1 or len(found) == 1:
        return next(iter(found.values())).to_dict()
    return {str(d): found[d].to_dict() for d in dims if d in found}


def _emit(text: str) -> None:
    """Print to stdout; a reader that went away (``| head``) does not stop the run."""
    try:
        print(text, flush=True)
    except BrokenPipeError:
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except OSError:
            pass


def cmd_list(ns: argparse.Namespace) -> int:
    from importlib.metadata import entry_points

    from bnspec.candidates.targets import ENTRY_POINT_GROUP, describe_builtins

    print("built-in candidates:")
    rows = describe_builtins()
    width = max(len(name) for name, _, _ in rows)
    for name, description, installed in rows:
        print(f"  {name:{width}} {'' if installed else '(not installed) '}{description}")
    registered = list(entry_points(group=ENTRY_POINT_GROUP))
    print(f"registered under the entry-point group {ENTRY_POINT_GROUP!r}:")
    for ep in registered:
        print(f"  {ep.name:12} {ep.value}")
    if not registered:
        print("  (none)")
    return 0


def cmd_report(ns: argparse.Namespace) -> int:
    from bnspec import report as RP
    from bnspec import report_render
    from bnspec.isolation import CandidateProcess
    from bnspec.pytest_plugin import write_json_atomic
    from bnspec.results import document, format_table, versions

    if ns.candidates is None:
        targets = RP.installed_builtins()
    else:
        targets = list(dict.fromkeys(t.strip() for t in ns.candidates.split(",") if t.strip()))
    if not targets:
        raise UsageProblem(f"--candidates {ns.candidates!r}: give at least one target, comma-separated "
                           f"({TARGET_FORMS})")
    for target in targets:
        _check_target_syntax(target)
    clauses = _clauses(ns.clauses)
    accept = _accept(ns.accept)
    device = _device(ns.device)
    _check_output_path(ns.out, "--out", directory=True)
    budget = ns.budget if ns.budget is not None else BUDGETS[ns.profile]
    found = versions()
    settings = {"profile": ns.profile, "seed": ns.seed, "device": device, "clauses": clauses, "accept": accept,
                "timing": not ns.no_timing, "threads": ns.threads, "bnspec": found["bnspec"],
                "torch": found["torch"], "suite": RP.suite_fingerprint()}
    load_at_start = [round(v, 2) for v in os.getloadavg()]

    def check(target: str, own: list[str] | None = None, only: str | None = None) -> tuple:
        """The strict check; with ``own``, the check again of the clauses ``only`` with the
        candidate's own conventions accepted (the report's "modulo conventions" view)."""
        run_accept = sorted({*(accept or []), *own}) if own else accept
        run_clauses = only if only is not None else clauses
        try:
            wanted, proc = _validate_target(target, None, device, ns.timeout, startup_timeout=ns.startup_timeout,
                                            budget=budget, provided_only=True)
        except UsageProblem as exc:  # this candidate only: the others still run
            _emit(f"{target}: cannot be used: {exc}")
            return "unusable", str(exc), None
        hello = dict(proc.hello)
        try:
            records = run_suite([target], dims=wanted, profile=ns.profile, seed=ns.seed, device=device,
                                dtypes=None, clauses=run_clauses, timeout=ns.timeout, processes={target: proc},
                                accept=run_accept)
        finally:
            proc.close()
        contract = _contract(proc, wanted)
        if not records:
            raise UsageProblem(f"no conformance test ran: --clauses {run_clauses!r} matched no test")
        doc = document(target=target, dims=wanted, profile=ns.profile, seed=ns.seed, device=device,
                       dtypes=None, records=records, clauses=run_clauses, timeout=ns.timeout, budget=ns.budget,
                       candidate_versions=hello.get("versions"), accept=run_accept, contract=contract)
        _emit(format_table(doc) + "\n")
        return "checked", doc, hello

    def start_timing(target: str):
        from bnspec.pytest_plugin import dims_for

        # Per call: one warm-up (a compile, for JIT frameworks) and about a second of timed runs.
        proc = CandidateProcess(target, dims=dims_for(target, None)[0], device=device,
                                timeout=ns.timeout, startup_timeout=ns.startup_timeout, budget=None)
        proc.start()
        return proc

    def emit(line: str) -> None:
        print(f"bnspec report: {line}", file=sys.stderr, flush=True)

    entries = RP.run(targets, out=ns.out, settings=settings, check=check,
                     start_timing=None if ns.no_timing else start_timing, emit=emit, fresh=ns.fresh)
    bandwidth = None
    if not ns.no_timing:
        from bnspec.timing import copy_bandwidth

        emit("measuring this machine's copy bandwidth")
        bandwidth = copy_bandwidth(device, size="small" if ns.profile == "quick" or os.environ.get("CI") else "full",
                                   threads=ns.threads)
    report = RP.assemble(entries, settings=settings, bandwidth=bandwidth,
                         command=RP.report_command(sys.argv[2:] if ns.argv is None else ns.argv),
                         load_at_start=load_at_start)
    try:
        write_json_atomic(os.path.join(ns.out, "results.json"), report)
        written = report_render.write_all(report, ns.out)
    except OSError as exc:
        raise UsageProblem(f"--out {ns.out!r}: could not write the report ({exc})") from None
    emit(f"wrote {ns.out}/: results.json, " + ", ".join(written))
    # A report compares candidates, most of which deviate somewhere: its exit status says
    # whether the report was written (verdicts are in it); `bnspec check` is the gate.
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    ns = parser.parse_args(argv)
    ns.argv = None if argv is None else argv[1:]
    try:
        return {"check": cmd_check, "list": cmd_list, "report": cmd_report}[ns.command](ns)
    except UsageProblem as exc:
        if getattr(ns, "verbose", False):
            traceback.print_exc()
        print(f"bnspec: {_one_line(str(exc))}", file=sys.stderr)
        return EXIT_UNUSABLE
    except KeyboardInterrupt:
        print("bnspec: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # stdout closed early (``bnspec list | head``): not an error of ours
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except OSError:
            pass
        return 1


if __name__ == "__main__":
    sys.exit(main())
