"""``bnspec report`` (issues 5 and 6): every file written, nothing lost, a rerun resumes.

The runs here are cut down (profile quick, one clause, no timing or small timing) so
that they take seconds; what is tested is the bookkeeping, not the verdicts (those are
the conformance suite's).
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from bnspec import report as RP
from bnspec import report_render as RR
from bnspec.conventions import CONVENTIONS

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "TQDM_DISABLE": "1", "CI": "1"}  # CI: the small timing shapes
FAST = ["--profile", "quick", "--clauses", "S1.1"]


def report(out: Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bnspec.cli", "report", "--out", str(out), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout, env=ENV)


@pytest.fixture(scope="module")
def full_run(tmp_path_factory) -> Path:
    """torch and an unusable target, with timing: the whole set of files."""
    out = tmp_path_factory.mktemp("report")
    bad = out / "bad.py"
    bad.write_text("X = 1\n")
    p = report(out, "--candidates", f"torch,{bad}:Missing", *FAST)
    assert p.returncode == 0, p.stderr[-3000:]
    return out


def test_every_file_is_written(full_run):
    names = {"results.json", "conformance.csv", "accuracy.csv", "timing.csv", "capabilities.csv",
             "summary.md", "report.html", "accuracy.png", "timing.png"}
    assert names <= {p.name for p in full_run.iterdir()}
    assert not [p.name for p in full_run.rglob("*") if ".tmp-" in p.name], "temporary files left behind"
    doc = json.loads((full_run / "results.json").read_text())
    assert doc["schema"] == RP.SCHEMA
    assert {"bnspec", "torch", "python", "hypothesis"} <= set(doc["versions"])
    assert doc["settings"]["profile"] == "quick" and doc["bandwidth"]["gb_per_s"] > 0
    assert doc["machine"]["cpu_count"] >= 1


def test_an_unusable_candidate_is_reported_and_loses_nothing(full_run):
    doc = json.loads((full_run / "results.json").read_text())
    by_target = {e["target"].split("/")[-1]: e for e in doc["candidates"]}
    assert by_target["torch"]["status"] == "checked" and by_target["torch"]["check"]["conformant"]
    bad = by_target["bad.py:Missing"]
    assert bad["status"] == "unusable" and "Missing" in bad["reason"]
    matrix = pd.read_csv(full_run / "conformance.csv")
    assert set(matrix.loc[matrix["candidate"].str.endswith("bad.py:Missing"), "verdict"]) == {"unusable"}
    assert "cannot be used" in (full_run / "summary.md").read_text()


def test_tables_agree_with_the_results(full_run):
    doc = json.loads((full_run / "results.json").read_text())
    torch_doc = next(e for e in doc["candidates"] if e["target"] == "torch")["check"]
    conf = pd.read_csv(full_run / "conformance.csv")
    row = conf[(conf["candidate"] == "torch") & (conf["clause"] == "S1.1")].iloc[0]
    assert row["verdict"] == "pass"
    assert math.isclose(row["error_over_bound"], torch_doc["clauses"][0]["worst_error_over_bound"], rel_tol=1e-5)
    acc = pd.read_csv(full_run / "accuracy.csv")
    assert set(acc["dtype"]) <= {"float64", "float32", "float16", "bfloat16"} and len(acc) > 0
    assert (acc["error_over_bound"] <= 1).all()  # torch passes S1.1, so every dtype is inside its bound
    timing = pd.read_csv(full_run / "timing.csv")
    assert set(timing["status"]) == {"timed"} and (timing["gb_per_s"] > 0).all()
    assert set(timing["dims"]) == {1, 2, 3}
    html = (full_run / "report.html").read_text()
    assert "Conformance matrix" in html and "data:image/png;base64," in html and "S1.1" in html


def test_a_rerun_keeps_finished_candidates(full_run, tmp_path):
    out = tmp_path / "r"
    first = report(out, "--candidates", "torch", *FAST, "--no-timing")
    assert first.returncode == 0, first.stderr[-2000:]
    saved = (out / "candidates" / "torch.json").read_bytes()
    second = report(out, "--candidates", "torch,bnspec", *FAST, "--no-timing")
    assert second.returncode == 0, second.stderr[-2000:]
    assert "torch: kept from the earlier run" in second.stderr
    assert "bnspec: checking" in second.stderr
    assert (out / "candidates" / "torch.json").read_bytes() == saved
    targets = [e["target"] for e in json.loads((out / "results.json").read_text())["candidates"]]
    assert targets == ["torch", "bnspec"]
    # other settings: not reused
    third = report(out, "--candidates", "torch", "--profile", "quick", "--clauses", "S1.2", "--no-timing")
    assert "torch: checking" in third.stderr


def test_a_rerun_redoes_a_candidate_whose_code_or_suite_changed(tmp_path):
    """Resuming never mixes in results of other code: a file target whose source changed,
    and an entry written by another revision of the suite, are checked again."""
    out = tmp_path / "c"
    target = tmp_path / "mybn.py"
    target.write_text("from torch.nn import BatchNorm2d as MyBN\n")
    first = report(out, "--candidates", f"{target}:MyBN,torch", *FAST, "--no-timing")
    assert first.returncode == 0, first.stderr[-2000:]
    target.write_text("from torch.nn import BatchNorm2d as MyBN  # edited\n")
    saved = out / "candidates" / "torch.json"
    entry = json.loads(saved.read_text())
    entry["settings"]["suite"] = "0" * 16  # as written by another revision of bnspec
    saved.write_text(json.dumps(entry))
    second = report(out, "--candidates", f"{target}:MyBN,torch", *FAST, "--no-timing")
    assert second.returncode == 0, second.stderr[-2000:]
    assert "kept from the earlier run" not in second.stderr
    assert f"{target}:MyBN: checking" in second.stderr and "torch: checking" in second.stderr
    third = report(out, "--candidates", f"{target}:MyBN,torch", *FAST, "--no-timing")
    assert third.stderr.count("kept from the earlier run") == 2


def test_fingerprints_are_found_without_importing_the_candidate(tmp_path):
    assert set(RP._extra_distributions("flax")) == {"flax", "jax"}
    assert set(RP._extra_distributions("tensorflow")) >= {"keras"}
    fp = RP.target_fingerprint("flax-linen")["distributions"]
    assert set(fp) == {"flax", "jax"}  # a version, or None where it is not installed
    src = tmp_path / "side_effect.py"
    src.write_text("raise SystemExit('imported')\n")
    digest = RP.target_fingerprint(f"{src}:X")["source"]
    assert isinstance(digest, str) and len(digest) == 16
    assert RP.target_fingerprint("bnspec.modules:BatchNorm2d")["source"] is not None
    assert RP.target_fingerprint("no_such_package_here.mod:X") == {"source": None}
    assert RP.suite_fingerprint() == RP.suite_fingerprint()


def test_a_killed_report_keeps_what_it_finished(tmp_path):
    out = tmp_path / "k"
    proc = subprocess.Popen([sys.executable, "-m", "bnspec.cli", "report", "--out", str(out), "--candidates",
                             "torch,bnspec", "--profile", "quick", "--clauses", "S1,S2", "--no-timing"],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV,
                            start_new_session=True)
    finished = out / "candidates" / "torch.json"
    deadline = time.monotonic() + 300
    while not finished.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert finished.exists(), "the first candidate never finished"
    assert json.loads(finished.read_text())["status"] == "checked"  # whole, never half-written
    for path in out.rglob("*.json"):
        json.loads(path.read_text())  # every JSON file present is complete
    again = report(out, "--candidates", "torch,bnspec", "--profile", "quick", "--clauses", "S1,S2", "--no-timing")
    assert again.returncode == 0 and "torch: kept from the earlier run" in again.stderr


def test_bad_options_exit_2(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    for args, words in ((["--candidates", ","], "at least one target"),
                        (["--candidates", "torch", "--out", str(blocker)], "--out"),
                        (["--candidates", "torch", "--device", "nonsense"], "--device"),
                        (["--candidates", "torch", "--clauses", "S1;"], "--clauses")):
        p = report(tmp_path / "o", *args)
        assert p.returncode == 2 and words in p.stderr, (args, p.returncode, p.stderr[-500:])
        assert "Traceback" not in p.stderr


def test_conventions_are_named_from_failure_text():
    text = "error/bound = 40\n  what it does instead: " + CONVENTIONS["momentum_on_old"]
    assert RR.conventions_named([text]) == "momentum_on_old"
    assert RR.conventions_named(["error/bound = 40"]) == ""


def test_conventions_are_named_from_the_records():
    recs = [{"conventions": ["momentum_on_old|running_stats_in_training"]},
            {"conventions": ["momentum_on_old+biased_running_var", "normalizes with the batch statistics in eval"]},
            {"conventions": []}]
    assert RR.record_conventions(recs) == ("momentum_on_old or running_stats_in_training; "
                                           "momentum_on_old+biased_running_var")
    assert RR.record_conventions([{"conventions": []}]) == ""
    old = {"detail": "what it does instead: " + CONVENTIONS["momentum_on_old"]}  # results written before
    assert RR.record_conventions([old]) == "momentum_on_old"


def test_slugs_are_file_names():
    assert RP.slug("torch") == "torch"
    assert RP.slug("pkg.mod:Name") == "pkg.mod_Name"
    assert "/" not in RP.slug("path/to/file.py:Name")


def test_machine_paths_are_scrubbed(tmp_path, monkeypatch):
    import tempfile

    monkeypatch.chdir(tmp_path)
    text = f"raised in {sys.prefix}/lib/x.py, file {tmp_path}/bad.py, scratch {tempfile.gettempdir()}/y"
    out = RP.scrub({"detail": [text]})["detail"][0]
    assert sys.prefix not in out and str(tmp_path) not in out
    assert "<python>/lib/x.py" in out and "<cwd>/bad.py" in out
