"""``bnspec report``: check and time every candidate, keep each result, write ``reports/``.

Each candidate's outcome is written to ``OUT/candidates/<name>.json`` (atomically) as soon
as it is known, so an interrupted report keeps every finished candidate and a rerun
with the same settings resumes: a candidate whose file matches the settings, the
versions, the suite's source (a digest of bnspec's and the conformance suite's code) and
the candidate's own code (its framework's installed versions, or a digest of its source
file) is not run again. A candidate that cannot be used (its framework is not
installed, its import fails) gets an entry saying why; it never stops the others.

Schema ``bnspec.report/1`` (``OUT/results.json``)::

    {"schema": "bnspec.report/1", "command": str, "date": str (UTC, ISO 8601), "commit": str | null,
     "settings": {profile, seed, device, clauses, timing, threads, bnspec, torch, suite},
     "versions": {...}, "machine": {..., load_average_at_start, load_average_at_end},
     "bandwidth": {"device", "bytes", "median_s", "gb_per_s", "threads"} | null,
     "candidates": [{"target", "fingerprint", "status": "checked" | "unusable", "reason",
                     "capabilities", "check": <bnspec.check/1 document> | null,
                     "native": {"layer", "eps", "momentum", "momentum_weights", "float64", "settings"},
                     "modulo_conventions": {"accept": [str], "clauses": [str], "reason": str,
                                            "check": <bnspec.check/1 document of those clauses> | null}
                                           | null,  # no failure named a convention
                     "elapsed_s": float,  # seconds its check, recheck and timing took
                     "kept": bool,  # in results.json only: taken from an earlier run with the same settings
                     # "timing": null while the check is done and the timing is still to come
                     "timing": [{"dims", "shape", "dtype", "layout", "mode", "status",
                                 "median_s", "iqr_s", "runs", "detail"}]}]}

The tables (CSV), ``summary.md``, ``report.html`` and the plots are derived from that
file alone (:mod:`bnspec.report.render`), so they can be rebuilt without rerunning.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import sys
import time
from typing import Callable

from bnspec.report import timing as TM

SCHEMA = "bnspec.report/1"
#: Modules that only turn results.json into tables and pages: a change to them cannot change
#: an entry, so it does not invalidate finished ones (``bnspec report`` re-renders them).
RENDERING = ("report/render.py",)  #: paths inside the bnspec package
MODES = ("train", "eval")


def slug(target: str) -> str:
    """A file name for a target (``pkg.mod:Name`` -> ``pkg.mod_Name``)."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", target).strip("._") or "candidate"


def _local_prefixes() -> list[tuple[str, str]]:
    """This machine's paths, longest first, and what a report shows instead."""
    import tempfile

    places = [(sys.prefix, "<python>"), (sys.base_prefix, "<python>"), (os.getcwd(), "<cwd>"),
              (tempfile.gettempdir(), "<tmp>"), (os.path.expanduser("~"), "~")]
    return sorted(((p, name) for p, name in places if p and p != os.sep), key=lambda t: -len(t[0]))


def scrub(obj):
    """``obj`` with this machine's paths replaced (a report is committed and shared; what a
    candidate raised may name files in the environment it was installed in)."""
    if isinstance(obj, str):
        for prefix, name in _local_prefixes():
            obj = obj.replace(prefix, name)
        return obj
    if isinstance(obj, dict):
        return {k: scrub(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [scrub(v) for v in obj]
    return obj


def installed_builtins() -> list[str]:
    """Every installed built-in a one-process check can run (synced ones need --world-size)."""
    from bnspec.candidates.targets import describe_builtins
    from bnspec.candidates.synced import SYNC_BUILTINS

    return [name for name, _, installed in describe_builtins() if installed and name not in SYNC_BUILTINS]


def machine_facts() -> dict:
    """What the timings depend on (no host name, no paths)."""
    import torch

    facts = {"system": platform.system(), "machine": platform.machine(), "processor": platform.processor(),
             "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
             "python": platform.python_version()}
    try:
        facts["memory_gib"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        facts["memory_gib"] = None
    if torch.cuda.is_available():
        facts["gpu"] = torch.cuda.get_device_name(0)
    return facts


def settings_key(entry_or_settings: dict) -> dict:
    """What an entry's check depends on. Not ``timing``: a check made with ``--no-timing`` is
    the same check, and a later timed run times it (its ``timing`` is null until then), so
    the checks can run in several processes at once and the timings after, side by side."""
    return {k: entry_or_settings.get(k) for k in ("profile", "seed", "device", "clauses", "accept", "threads",
                                                  "bnspec", "torch", "suite")}


def _digest(paths: list[str], root: str | None = None) -> str:
    h = hashlib.sha256()
    for path in paths:
        h.update((os.path.relpath(path, root) if root else "").encode() + b"\0")
        with open(path, "rb") as f:
            h.update(f.read())
    return h.hexdigest()[:16]


def suite_fingerprint() -> str:
    """A digest of bnspec's and the conformance suite's Python source: an entry written by
    another revision of the suite (a changed bound, a new convention) is not reused. Rendering
    is left out, and so are the framework adapters (``*_adapter.py``): each is part of its own
    candidate's fingerprint (:func:`target_fingerprint`)."""
    import glob

    import bnspec
    import conformance

    paths = []
    for pkg in (bnspec, conformance):
        root = os.path.dirname(os.path.dirname(os.path.abspath(pkg.__file__)))
        here = os.path.dirname(pkg.__file__)
        paths += sorted(p for p in glob.glob(os.path.join(here, "**", "*.py"), recursive=True)
                        if os.path.relpath(p, here).replace(os.sep, "/") not in RENDERING
                        and not p.endswith("_adapter.py"))
    return _digest(paths, root)


def _extra_distributions(extra: str) -> list[str]:
    """The distributions bnspec's pip extra ``extra`` installs here (from bnspec's metadata)."""
    from importlib.metadata import PackageNotFoundError, requires

    from packaging.requirements import Requirement

    try:
        reqs = [Requirement(r) for r in requires("bnspec") or []]
    except PackageNotFoundError:
        return []
    return sorted({r.name for r in reqs if r.marker is not None and r.marker.evaluate({"extra": extra})})


def target_fingerprint(target: str) -> dict:
    """What identifies a candidate's code, found without importing it: the installed versions
    of a built-in's framework, an entry point's distribution version, or a digest of a file
    or module target's source file (None where it cannot be found)."""
    from importlib.metadata import PackageNotFoundError, entry_points, version

    from bnspec.candidates.targets import BUILTINS, ENTRY_POINT_GROUP, kind_of

    kind = kind_of(target)
    if kind == "builtin":
        found = {}
        for dist in _extra_distributions(BUILTINS[target].extra) if BUILTINS[target].extra else []:
            try:
                found[dist] = version(dist)
            except PackageNotFoundError:
                found[dist] = None
        adapters = adapter_sources(BUILTINS[target].loader.partition(":")[0])
        return {"distributions": found, **({"adapter": _digest(adapters)} if adapters else {})}
    if kind == "entrypoint":
        eps = [ep for ep in entry_points(group=ENTRY_POINT_GROUP) if ep.name == target]
        dist = eps[0].dist if eps else None
        return {"distribution": f"{dist.name} {dist.version}" if dist is not None else None}
    path = target.rpartition(":")[0]
    if kind == "module":
        import importlib.util

        top, _, rest = path.partition(".")
        spec = importlib.util.find_spec(top)  # a top-level name: nothing is imported
        base = (spec.submodule_search_locations or [None])[0] if spec and spec.submodule_search_locations else None
        if spec is None or (rest and base is None):
            return {"source": None}
        path = os.path.join(base, *rest.split(".")) + ".py" if rest else spec.origin
        if rest and not os.path.isfile(path):
            path = os.path.join(base, *rest.split("."), "__init__.py")
    return {"source": _digest([path]) if path and os.path.isfile(path) else None}


def adapter_sources(module: str) -> list[str]:
    """The framework adapter files (``bnspec/candidates/*_adapter.py``) a built-in's loader
    module is, and those it imports (the Keras adapter uses the TensorFlow one's), found
    by reading the source, never by importing it."""
    import glob

    here = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "candidates")
    known = {os.path.basename(p)[:-3]: p for p in glob.glob(os.path.join(here, "*_adapter.py"))}
    todo, found = [module.rpartition(".")[2]], []
    while todo:
        name = todo.pop()
        if name not in known or known[name] in found:
            continue
        found.append(known[name])
        with open(known[name], encoding="utf-8") as f:
            todo += re.findall(r"bnspec\.candidates\.(\w+_adapter)\b", f.read())
    return sorted(found)


def load_entry(path: str, settings: dict, fingerprint: dict | None = None) -> dict | None:
    """A finished entry from an earlier run with the same settings and candidate code, or None."""
    try:
        with open(path) as f:
            entry = json.load(f)
    except (OSError, ValueError):
        return None  # missing, or unreadable: run the candidate again
    if not isinstance(entry, dict) or entry.get("status") != "checked":
        return None  # unusable last time: perhaps installed since
    if settings_key(entry.get("settings", {})) != settings_key(settings):
        return None
    if entry.get("fingerprint") != fingerprint:
        return None  # the framework was upgraded, or the candidate's source changed
    return entry


def timing_plan(dims: list[int], size: str) -> list[dict]:
    """Float32 forward in training and eval per rank family; channels_last for 2-D/3-D."""
    plan = []
    for d in dims:
        shape = list(TM.SHAPES[d][size])
        for mode in MODES:
            plan.append({"dims": d, "shape": shape, "dtype": "float32", "layout": "contiguous", "mode": mode})
        if d in (2, 3):
            plan.append({"dims": d, "shape": shape, "dtype": "float32", "layout": "channels_last", "mode": "train"})
    return plan


def time_candidate(proc, dims: list[int], size: str, min_run_time: float, threads: int | None = 1) -> list[dict]:
    """Each timing in the candidate's child process; a refusal is a row, not an abort.

    One torch thread by default: on a shared machine, multi-threaded timings swing with
    the load of other work while one-thread timings hold."""
    from bnspec.isolation import CandidateError, CandidateRaised

    rows = []
    for row in timing_plan(dims, size):
        try:
            t = proc.call("time_forward", dims=row["dims"], shape=row["shape"], dtype=row["dtype"],
                          layout=row["layout"], training=row["mode"] == "train", min_run_time=min_run_time,
                          threads=threads)
            rows.append({**row, "status": "timed", "detail": "", **t})
        except CandidateRaised as exc:
            rows.append({**row, "status": "unsupported", "detail": f"{exc.type_name}: {exc.message}"[:300],
                         "median_s": None, "iqr_s": None, "runs": 0})
        except CandidateError as exc:
            # A crash or a hang: the remaining timings are not attempted (each would wait
            # out the time limit again).
            rows.append({**row, "status": "error", "detail": str(exc)[:300],
                         "median_s": None, "iqr_s": None, "runs": 0})
            rest = timing_plan(dims, size)[len(rows):]
            rows += [{**r, "status": "not timed", "detail": "an earlier timing call crashed or hung",
                      "median_s": None, "iqr_s": None, "runs": 0} for r in rest]
            break
    return rows


def modulo_conventions(target: str, doc: dict, check: Callable, emit: Callable[[str], None], step: str) -> dict | None:
    """The clauses that failed on a named convention, checked again with the candidate's own
    conventions accepted (``--accept``): what is left there are real deviations. None when no
    failure named a convention.

    Only those clauses run again: accepting a convention only lets a failing comparison
    pass, so a clause that passed (or failed without naming one) gets the same verdict."""
    from bnspec.diagnosis import conventions_followed

    own, clauses = conventions_followed(doc)
    if not own or not clauses:
        return None
    emit(f"{step}: checking {', '.join(clauses)} again with --accept {','.join(own)}")
    status, payload, _ = check(target, own, ",".join(clauses))
    if status != "checked":  # it loaded a minute ago: say why not now, keep the strict check
        return {"accept": own, "clauses": clauses, "check": None, "reason": str(payload)}
    return {"accept": own, "clauses": clauses, "check": payload, "reason": ""}


def run(targets: list[str], *, out: str, settings: dict, check: Callable[[str], tuple],
        start_timing: Callable[[str], object] | None, emit: Callable[[str], None],
        fresh: bool = False) -> list[dict]:
    """Every target checked (``check(target, own=None, only=None) -> ("checked", doc, hello) |
    ("unusable", reason, None)``; with ``own`` the clauses ``only`` again with those conventions
    accepted, see :func:`modulo_conventions`), then every checked one timed
    (``start_timing(target)`` -> a started candidate process).

    The timings come after all the checks, one after another, so that they are measured
    side by side on a machine the checks no longer load. Each entry is saved as soon as its
    check is done (``"timing": null`` until timed) and again when timed; earlier entries
    with the same settings are reused (and timed if they were not) unless ``fresh``."""
    from bnspec.output import write_json_atomic

    entries, paths = [], []
    for i, target in enumerate(targets, 1):
        step = f"[{i}/{len(targets)}] {target}"
        path = os.path.join(out, "candidates", slug(target) + ".json")
        fingerprint = target_fingerprint(target)
        entry = None if fresh else load_entry(path, settings, fingerprint)
        if entry is not None:
            emit(f"{step}: kept from the earlier run ({os.path.basename(path)})")
            entry["kept"] = True
        else:
            emit(f"{step}: checking (profile {settings['profile']})")
            started = time.monotonic()
            status, payload, hello = check(target)
            entry = {"target": target, "fingerprint": fingerprint, "settings": settings, "status": status,
                     "reason": payload if status == "unusable" else "",
                     "check": payload if status == "checked" else None,
                     "capabilities": (hello or {}).get("capabilities"),
                     "native": (hello or {}).get("native") or {}, "modulo_conventions": None,
                     "timing": None if status == "checked" else []}
            if status == "checked":
                entry["modulo_conventions"] = modulo_conventions(target, payload, check, emit, step)
            entry["elapsed_s"] = round(time.monotonic() - started, 1)  # the check and its recheck
            entry = scrub(entry)
            write_json_atomic(path, entry)
        entries.append(entry)
        paths.append(path)
    for i, (entry, path) in enumerate(zip(entries, paths), 1):
        if entry["status"] == "checked" and entry.get("timing") is None and start_timing is not None:
            emit(f"[{i}/{len(targets)}] {entry['target']}: timing")
            started = time.monotonic()
            entry["timing"] = scrub(time_entry(entry, settings, start_timing))
            entry["elapsed_s"] = round(entry.get("elapsed_s", 0) + time.monotonic() - started, 1)
            write_json_atomic(path, entry)
    return entries


def time_entry(entry: dict, settings: dict, start_timing: Callable[[str], object]) -> list[dict]:
    """The timing rows of a checked candidate (every row an error when it cannot start now)."""
    size = TM.size_for(settings["profile"])
    min_run_time = 0.2 if size == "small" else 0.5
    dims = [d for d in entry["check"]["candidate"]["dims"] if d in TM.SHAPES]
    try:
        proc = start_timing(entry["target"])
    except Exception as exc:  # noqa: BLE001 - it loaded for the check; say why not now
        return [{**r, "status": "error", "detail": f"could not start: {exc}"[:300],
                 "median_s": None, "iqr_s": None, "runs": 0} for r in timing_plan(dims, size)]
    try:
        return time_candidate(proc, dims, size, min_run_time, settings.get("threads"))
    finally:
        proc.close()


def source_commit() -> str | None:
    """The git commit bnspec runs from, with ``+dirty`` for uncommitted edits of its code (None
    outside a checkout): a committed report says which code produced it."""
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        sha = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=root, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        # the code only: the report being written into a tracked reports/ is not an edit of it
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", "bnspec",
                                "conformance", "pyproject.toml", "requirements.lock"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (sha + ("+dirty" if dirty else "")) if sha else None


def assemble(entries: list[dict], *, settings: dict, bandwidth: dict | None, command: str,
             load_at_start: list[float]) -> dict:
    import datetime

    from bnspec.results import versions

    machine = {**machine_facts(), "load_average_at_start": load_at_start,
               "load_average_at_end": [round(v, 2) for v in os.getloadavg()]}
    return scrub({"schema": SCHEMA, "command": command, "settings": settings, "versions": versions(),
            "commit": source_commit(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": machine, "bandwidth": bandwidth, "candidates": entries})


def report_command(argv: list[str]) -> str:
    import shlex

    return "bnspec report " + " ".join(shlex.quote(a) for a in argv)
