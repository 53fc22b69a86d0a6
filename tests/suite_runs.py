"""``pytest conformance`` runs over many candidates, in subprocesses, started in the background.

The zoo's and the corpus' tests judge the records of such runs. Each run keeps about one
core busy (the suite and its candidate's process take turns) for a minute or two. The
session starts them as soon as the tests are collected (``tests/conftest.py``), one at a
time, on the core the other tests leave idle; the tests that read them run last, and find
them finished. A run a test asks for before its turn starts at once.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
#: Wall-clock limit of one suite run. Not a performance claim: far above the measured
#: times (see the zoo's report), only there so a hung run ends instead of blocking CI.
RUN_TIMEOUT_S = 3600
#: Set in a run's environment: the zoo's plugin turns hypothesis' shrinking off there.
NO_SHRINK_ENV = "BNSPEC_ZOO_NO_SHRINK"
#: The zoo's plugin prints this line (CPU seconds of the run and its candidate processes).
CPU_TAG = "bnspec-zoo-cpu-seconds:"


class SuiteRun:
    """``pytest conformance`` with some candidates, in a subprocess started at once."""

    def __init__(self, name: str, candidates: list[str], *, dims: str, profile: str, workdir: Path,
                 shrink: bool) -> None:
        self.name = name
        self.results = workdir / f"{name}.json"
        self.log = workdir / f"{name}.log"
        cmd = [sys.executable, "-m", "pytest", "conformance", "--rootdir", str(ROOT), "-p", "no:cacheprovider",
               "-p", "test_zoo", "-q", "--no-header", "-o", "addopts=", "--bn-profile", profile, "--dims", dims,
               "--bn-results", str(self.results),
               # The records carry the failures' messages, not pytest's tracebacks; its default
               # ones re-parse the test's source file per failing example (a third of a mutant run).
               "--tb=native"]
        for target in candidates:
            cmd += ["--candidate", target]
        env = dict(os.environ)
        env.pop("PYTEST_ADDOPTS", None)  # the outer session's options are not this run's
        here = str(Path(__file__).resolve().parent)  # so that "-p test_zoo" finds the zoo's plugin
        env["PYTHONPATH"] = here + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        env.pop(NO_SHRINK_ENV, None)
        if not shrink:
            env[NO_SHRINK_ENV] = "1"
        self.start = time.monotonic()
        self._out = open(self.log, "w")
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=self._out, stderr=subprocess.STDOUT, text=True)
        self.end: float | None = None
        self._reaper = threading.Thread(target=self._reap, daemon=True)
        self._reaper.start()
        self._done: tuple[list[dict], float, float | None] | None = None

    def _reap(self) -> None:
        """Wait for the run in the background, so its own wall time is known exactly."""
        try:
            self.proc.wait(timeout=RUN_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.end = time.monotonic()

    def join(self) -> None:
        """Wait until the run has ended (without judging how)."""
        self._reaper.join()

    def contracts(self) -> dict:
        """The contracts the run discovered, by candidate id (``target-2d``)."""
        self.wait()
        return json.loads(self.results.read_text()).get("contracts", {})

    def wait(self) -> tuple[list[dict], float, float | None]:
        """(records, wall seconds, CPU seconds or None)."""
        if self._done is None:
            self.join()
            wall = self.end - self.start
            self._out.close()
            text = self.log.read_text()
            tail = text[-3000:]
            # 0: all passed, 1: some failed; anything else (usage error, internal error,
            # nothing collected, killed) means the run itself is broken.
            assert self.proc.returncode in (0, 1), f"{self.name} run exited {self.proc.returncode}:\n{tail}"
            assert self.results.exists(), f"{self.name} run wrote no results file:\n{tail}"
            cpu = None
            for line in text.splitlines():
                if line.startswith(CPU_TAG):
                    cpu = float(line[len(CPU_TAG):])
            self._done = (json.loads(self.results.read_text())["records"], wall, cpu)
        return self._done

    def stop(self) -> None:
        """Kill the run if it is still going (the session is ending)."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


class ShardedRun:
    """One suite run split into parts, read as one: each candidate's tests run in exactly
    one part, as they would in a single run (the examples are derandomized per test, not
    per run). Parts started together share the cores."""

    def __init__(self, name: str, parts: list[SuiteRun]) -> None:
        self.name, self.parts = name, parts

    def wait(self) -> tuple[list[dict], float, float | None]:
        """(records of all parts, the longest part's wall seconds, their CPU seconds or None)."""
        done = [part.wait() for part in self.parts]
        cpus = [cpu for _, _, cpu in done]
        return ([r for records, _, _ in done for r in records], max(wall for _, wall, _ in done),
                None if None in cpus else sum(cpus))

    def contracts(self) -> dict:
        return {k: v for part in self.parts for k, v in part.contracts().items()}

    def stop(self) -> None:
        for part in self.parts:
            part.stop()


Start = Callable[[Path], SuiteRun]  #: starts a run that writes into the given folder


class Backlog:
    """Runs started one after another by a background thread, in the order they were
    added; :meth:`take` gives a run, starting it at once when its turn has not come."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.pending: dict[str, Start] = {}
        self.started: dict[str, SuiteRun] = {}
        self.lock = threading.Lock()
        self.thread: threading.Thread | None = None
        self.closed = False

    def add(self, key: str, start: Start) -> None:
        with self.lock:
            if key not in self.started:
                self.pending.setdefault(key, start)

    def start_in_background(self) -> None:
        if self.thread is None:
            self.thread = threading.Thread(target=self._work, name="suite-runs", daemon=True)
            self.thread.start()

    def _work(self) -> None:
        while True:
            with self.lock:
                if self.closed or not self.pending:
                    return
                key = next(iter(self.pending))
                run = self.started[key] = self.pending.pop(key)(self.workdir)
            run.join()

    def take(self, key: str, start: Start) -> SuiteRun:
        """The run under ``key``: already started, started now from the backlog, or from ``start``."""
        with self.lock:
            if key not in self.started:
                self.started[key] = self.pending.pop(key, start)(self.workdir)
            return self.started[key]

    def stop(self) -> None:
        """Start nothing more and kill the runs still going (the session is ending)."""
        with self.lock:
            self.closed = True
            self.pending.clear()
            runs = list(self.started.values())
        for run in runs:
            run.stop()


_backlog: Backlog | None = None


def selected_names(session, module) -> set[str]:
    """The function names of the session's selected tests in ``module``."""
    # getattr: items of other plugins (nbval's notebook cells) have no module
    return {getattr(item, "originalname", item.name) for item in session.items
            if getattr(item, "module", None) is module}


def take_all(plan: dict[str, Start]) -> dict[str, SuiteRun]:
    """The planned runs: those started in the background, the others started now (together)."""
    return {key: session_backlog().take(key, start) for key, start in plan.items()}


def session_backlog() -> Backlog:
    """This session's backlog; its folder (results and logs of the runs) is removed by
    :func:`stop_backlog` (a failing run's test shows the end of its log)."""
    global _backlog
    if _backlog is None:
        _backlog = Backlog(Path(tempfile.mkdtemp(prefix="bnspec-suite-runs-")))
    return _backlog


def stop_backlog() -> None:
    """Kill the runs still going and remove their folder (the session is ending)."""
    global _backlog
    if _backlog is not None:
        _backlog.stop()
        shutil.rmtree(_backlog.workdir, ignore_errors=True)
        _backlog = None
