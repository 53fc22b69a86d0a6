"""Determinism (issue 6): the same command gives the same verdicts and byte-identical
JSON apart from timings (the ``duration_s`` of each record), and the JSON records what
is needed to rerun it: versions, profile, seed and the command itself.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
TIMINGS = re.compile(rb'("duration_s": )[-+0-9.eE]+')


def check_json(args: list[str], path: Path) -> bytes:
    p = subprocess.run([sys.executable, "-m", "bnspec.cli", "check", *args, "--json", str(path)], cwd=ROOT,
                       capture_output=True, text=True, timeout=900, env={**os.environ, "TQDM_DISABLE": "1"})
    assert p.returncode in (0, 1), (p.returncode, p.stderr[-2000:])
    return path.read_bytes()


def without_timings(data: bytes) -> bytes:
    return TIMINGS.sub(rb"\g<1>0", data)


def test_same_seed_same_json_apart_from_timings(tmp_path):
    args = ["bnspec", "--profile", "quick", "--seed", "7"]
    first = check_json(args, tmp_path / "a.json")
    second = check_json(args, tmp_path / "b.json")
    assert b'"duration_s"' in first
    assert without_timings(first) == without_timings(second)


def test_results_record_what_reproduces_them(tmp_path):
    import bnspec
    import torch

    data = json.loads(check_json(["tests/hostile/candidates.py:WrongShape", "--profile", "quick", "--seed", "3",
                                  "--clauses", "S1.1", "--timeout", "30"], tmp_path / "r.json"))
    assert data["versions"]["bnspec"] == bnspec.__version__
    assert data["versions"]["torch"] == torch.__version__
    assert data["versions"]["candidate"]["torch"] == torch.__version__  # as the child process saw it
    assert {"python", "hypothesis"} <= set(data["versions"])
    assert (data["profile"], data["seed"], data["timeout_s"]) == ("quick", 3, 30.0)
    command = shlex.split(data["command"])
    assert command == ["bnspec", "check", "tests/hostile/candidates.py:WrongShape", "--profile", "quick",
                       "--dims", "2", "--seed", "3", "--clauses", "S1.1", "--timeout", "30"]
    (clause,) = data["clauses"]
    assert clause["verdict"] == "fail"
    assert shlex.split(clause["repro"])[:2] == ["bnspec", "check"] and "--clauses" in clause["repro"]
    # the printed command, run again, gives the same document (failure details included)
    again = check_json(command[2:], tmp_path / "again.json")
    assert without_timings(again) == without_timings((tmp_path / "r.json").read_bytes())
