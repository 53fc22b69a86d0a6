"""Candidate processes forked by the fork server are what a fresh interpreter was.

A candidate here records, when it is constructed, what its process looks like from the
inside; the tests compare that with what ``python -m bnspec.isolation.child`` gives (its
own session and process group, stdin from /dev/null, no descriptor but 0, 1, 2 and its
socket, the suite's environment, fresh random seeds), and check that the suite survives
the server's death.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time

import pytest

from bnspec.isolation import CandidateProcess
from bnspec.isolation.launch import FORKSERVER_ENV

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the fork server runs on Linux only")

FACTS_ENV = "BNSPEC_TEST_FACTS"
RECORDER = '''
import json, os, random

import numpy
import torch


class Recorder(torch.nn.BatchNorm2d):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        fds = sorted(int(fd) for fd in os.listdir("/proc/self/fd"))
        facts = {"pid": os.getpid(), "ppid": os.getppid(), "sid": os.getsid(0), "pgid": os.getpgid(0),
                 "fds": fds, "stdin": os.readlink("/proc/self/fd/0"),
                 "current_test": os.environ.get("PYTEST_CURRENT_TEST"),
                 "numpy_draw": float(numpy.random.random()), "random_draw": random.random()}
        with open(os.environ["BNSPEC_TEST_FACTS"], "a") as f:
            f.write(json.dumps(facts) + "\\n")
'''


@pytest.fixture
def recorder(tmp_path, monkeypatch):
    """(target, read_facts): a candidate that appends its process' facts to a file."""
    path = tmp_path / "recorder.py"
    path.write_text(RECORDER)
    facts = tmp_path / "facts.jsonl"
    monkeypatch.setenv(FACTS_ENV, str(facts))
    return f"{path}:Recorder", lambda: [json.loads(line) for line in facts.read_text().splitlines()]


def constructed(target: str) -> CandidateProcess:
    proc = CandidateProcess(target, dims=2, timeout=30)
    proc.call("construct", dims=2, num_features=3, kwargs={})
    return proc


def alive(pid: int) -> bool:
    """Running (a zombie, ended but not yet reaped by its parent, is not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


def gone_within(pid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    return not alive(pid)


def test_a_forked_candidate_is_a_fresh_process(recorder, monkeypatch):
    target, read = recorder
    monkeypatch.delenv(FORKSERVER_ENV, raising=False)
    procs = [constructed(target), constructed(target)]
    try:
        first, second = read()
    finally:
        for proc in procs:
            proc.close()
    for facts in (first, second):
        assert facts["ppid"] != os.getpid()  # forked by the server, not started by this process
        assert facts["sid"] == facts["pid"] and facts["pgid"] == facts["pid"]
        # 0, 1, 2, its socket, and the descriptor that listed /proc/self/fd
        assert facts["fds"][:3] == [0, 1, 2] and len(facts["fds"]) == 5, facts["fds"]
        assert facts["stdin"] == os.devnull
        # pytest changes this variable for every test; the child sees the current value
        assert facts["current_test"] == os.environ["PYTEST_CURRENT_TEST"]
    assert first["ppid"] == second["ppid"]  # one server for one working directory and environment
    assert first["numpy_draw"] != second["numpy_draw"] and first["random_draw"] != second["random_draw"]


def test_without_the_server_the_candidate_is_a_fresh_interpreter(recorder, monkeypatch):
    target, read = recorder
    monkeypatch.setenv(FORKSERVER_ENV, "0")
    proc = constructed(target)
    try:
        (facts,) = read()
    finally:
        proc.close()
    assert facts["ppid"] == os.getpid()
    assert facts["sid"] == facts["pid"] and facts["stdin"] == os.devnull


def test_a_killed_server_leaves_no_candidate_behind_and_the_next_one_starts(recorder, monkeypatch):
    target, read = recorder
    monkeypatch.delenv(FORKSERVER_ENV, raising=False)
    before = constructed(target)
    (orphan,) = read()
    os.kill(orphan["ppid"], signal.SIGKILL)  # the server, as a candidate killing its parent would
    assert gone_within(orphan["ppid"], 10)
    after = constructed(target)  # a new server, or a fresh interpreter: either way it runs
    try:
        assert len(read()) == 2
        assert after.call("construct", dims=2, num_features=2, kwargs={}) is not None
    finally:
        after.close()
        before.close()
    assert gone_within(orphan["pid"], 10), "the first candidate outlived its close()"
