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

from bnspec.report import run as RP
from bnspec.report import render as RR
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
    acc = pd.read_csv(full_run / "accuracy_by_clause.csv")
    assert set(acc["dtype"]) <= {"float64", "float32", "float16", "bfloat16"} and len(acc) > 0
    assert (acc["error_over_bound"] <= 1).all()  # torch passes S1.1, so every dtype is inside its bound
    worst = pd.read_csv(full_run / "accuracy.csv").set_index("candidate")
    assert worst.loc["torch", "float32"] == acc[acc["dtype"] == "float32"]["error_over_bound"].max()
    timing = pd.read_csv(full_run / "timing.csv")
    assert set(timing["status"]) == {"timed"} and (timing["gb_per_s"] > 0).all()
    assert (timing.loc[timing["candidate"] == "torch", "time_vs_torch"] == 1).all()
    assert set(timing["dims"]) == {1, 2, 3}
    html = (full_run / "report.html").read_text()
    assert "Conformance matrix" in html and "data:image/png;base64," in html and "S1.1" in html


@pytest.fixture(scope="module")
def modulo_run(tmp_path_factory) -> Path:
    """A layer that follows one known convention (biased running variance): checked strictly,
    then its failing clause again with the convention accepted."""
    out = tmp_path_factory.mktemp("modulo")
    target = f"{ROOT / 'tests' / 'zoo' / 'mutants.py'}:BiasedRunningVar"
    # no timing: the timed files are full_run's
    p = report(out, "--candidates", f"torch,{target}", "--profile", "quick", "--clauses", "S1.1,S3.1", "--no-timing")
    assert p.returncode == 0, p.stderr[-3000:]
    return out


def test_the_modulo_view_accepts_the_candidates_own_conventions(modulo_run):
    doc = json.loads((modulo_run / "results.json").read_text())
    entry = next(e for e in doc["candidates"] if e["target"].endswith(":BiasedRunningVar"))
    assert {c["id"]: c["verdict"] for c in entry["check"]["clauses"]} == {"S1.1": "pass", "S3.1": "fail"}
    mc = entry["modulo_conventions"]
    assert mc["accept"] == ["biased_running_var"] and mc["clauses"] == ["S3.1"]  # only the failing clause again
    assert [c["verdict"] for c in mc["check"]["clauses"]] == ["pass"]
    assert mc["check"]["clauses"][0]["accepted"] == ["biased_running_var"]
    assert next(e for e in doc["candidates"] if e["target"] == "torch")["modulo_conventions"] is None
    both = pd.read_csv(modulo_run / "conformance.csv")
    mine = both[both["candidate"].str.endswith(":BiasedRunningVar") & (both["clause"] == "S3.1")]
    assert dict(zip(mine["view"], mine["verdict"])) == {"strict": "fail", "modulo": "pass"}
    conv = pd.read_csv(modulo_run / "conventions.csv").set_index("candidate")
    row = conv.loc[conv.index.str.endswith(":BiasedRunningVar")].iloc[0]
    assert row["running variance"] == "biased" and row["momentum weights"] == "new"
    assert conv.loc["torch", "running variance"] == "unbiased" and conv.loc["torch", "default eps"] == 1e-05
    # judged against its own convention, its float32 running variance is accurate
    acc = pd.read_csv(modulo_run / "accuracy.csv").set_index("candidate")
    assert (acc.loc[acc.index.str.endswith(":BiasedRunningVar"), "float32"] <= 1).all()


def test_the_page_opens_with_the_summary_then_the_conventions(modulo_run, full_run):
    text = (modulo_run / "summary.md").read_text()
    order = [text.index(h) for h in ("## Summary", "## Conventions and defaults", "## Conformance matrix: strict",
                                     "## Conformance matrix: modulo conventions", "## Accuracy", "## Plots")]
    assert order == sorted(order)
    summary = text[text.index("## Summary"):text.index("## Conventions and defaults")]
    assert "conventions: biased_running_var; modulo these (`--accept biased_running_var`): nothing left" in summary
    timed = (full_run / "summary.md").read_text()
    assert "- speed: 1x torch's forward time" in timed  # relative to torch, measured in the same run
    assert "median_ms" not in timed  # the long timing table lives in timing.csv
    html = (modulo_run / "report.html").read_text()
    assert html.index("Summary") < html.index("Conventions and defaults") < html.index("modulo conventions")


def test_make_report_leaves_a_fresh_clone_clean(tmp_path):
    """The README's main command writes where git does not look: a machine without the
    optional frameworks must not replace the committed reports/ with a smaller report."""
    import shutil

    if shutil.which("git") is None or shutil.which("make") is None or not (ROOT / ".git").exists():
        pytest.skip("needs git, make and a git checkout")
    clone = tmp_path / "clone"
    # the working tree as it is (uncommitted edits included: `git stash create`), else HEAD;
    # --shared lets the clone reach that commit, which no branch holds
    tree = subprocess.run(["git", "stash", "create"], cwd=ROOT, capture_output=True, text=True,
                          check=True).stdout.strip() or "HEAD"
    sha = subprocess.run(["git", "rev-parse", tree], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout.strip()
    subprocess.run(["git", "clone", "--quiet", "--shared", "--no-checkout", str(ROOT), str(clone)], check=True,
                   timeout=120)
    subprocess.run(["git", "checkout", "--quiet", sha], cwd=clone, check=True, timeout=120)
    venv = Path(sys.prefix)
    # this environment stands in for the clone's .venv (make's install stamp is then present)
    stamp = venv / ".bnspec-installed"
    if not stamp.exists():
        pytest.skip("the test environment was not made by make setup (no install stamp)")
    # -o: the clone's files are newer than the stamp; never reinstall into this environment
    p = subprocess.run(["make", "-o", str(stamp), "report", f"VENV={venv}",
                        "REPORT_ARGS=--candidates torch --profile quick --clauses S1.1 --no-timing"],
                       cwd=clone, capture_output=True, text=True, timeout=600, env=ENV)
    assert p.returncode == 0, p.stderr[-3000:]
    assert (clone / "build" / "report" / "summary.md").exists()
    status = subprocess.run(["git", "status", "--porcelain", "--ignored=no"], cwd=clone, capture_output=True,
                            text=True, check=True).stdout
    assert status == "", status


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
    accepted = report(out, "--candidates", "torch", *FAST, "--no-timing", "--accept", "biased_running_var")
    assert "torch: checking" in accepted.stderr  # a check with accepted conventions is another check


def test_checks_made_without_timing_are_timed_by_a_later_run(tmp_path):
    """Checks may run in several processes at once (``--no-timing``); a later run keeps them
    and times them one after another."""
    out = tmp_path / "t"
    first = report(out, "--candidates", "torch", *FAST, "--no-timing")
    assert first.returncode == 0, first.stderr[-2000:]
    assert json.loads((out / "candidates" / "torch.json").read_text())["timing"] is None
    second = report(out, "--candidates", "torch", *FAST)
    assert second.returncode == 0, second.stderr[-2000:]
    assert "torch: kept from the earlier run" in second.stderr and "torch: timing" in second.stderr
    timed = json.loads((out / "candidates" / "torch.json").read_text())["timing"]
    assert timed and {t["status"] for t in timed} == {"timed"}


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
    # an adapter's code is its own candidate's, not the suite's: editing it redoes that candidate only
    assert len(RP.target_fingerprint("flax-linen")["adapter"]) == 16
    assert [os.path.basename(p) for p in RP.adapter_sources("bnspec.candidates.keras_adapter")] == [
        "keras_adapter.py", "tf_fused_adapter.py"]  # Keras' TensorFlow backend uses tf_fused's helper
    assert [os.path.basename(p) for p in RP.adapter_sources("bnspec.candidates.tf_fused_adapter")] == [
        "tf_fused_adapter.py"]
    assert "adapter" not in RP.target_fingerprint("torch")
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


def test_a_clause_never_run_is_not_run_not_fail():
    """After the candidate was given up, the clauses it never reached say so; the check still
    does not conform, and the diagnosis draws no cause from them."""
    from bnspec.diagnosis import failing
    from bnspec.results import clause_verdicts, conformant, record_verdict

    hang = {"clause": "S1.1", "outcome": "failed", "phase": "call", "detail": "forward: no answer within 20 s",
            "not_run": False, "verdict": "fail", "reason": "forward: no answer within 20 s", "failures": 1}
    never = {"clause": "S2.1", "outcome": "failed", "phase": "call",
             "detail": "forward: no answer within 20 s (earlier in this check; not retried)", "not_run": True,
             "verdict": "not run", "reason": "forward: no answer within 20 s", "failures": 1}
    assert [record_verdict(r) for r in (hang, never)] == ["fail", "not run"]
    verdicts = clause_verdicts([hang, never], command="bnspec check x")
    assert [c["verdict"] for c in verdicts] == ["fail", "not run"]
    assert not conformant(verdicts[1:])
    assert failing([hang, never]) == [hang]


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


def _entry(target: str, clauses: dict[str, str], failures: dict[str, list[str]], *, native: dict | None = None,
           modulo: dict | None = None) -> dict:
    """A checked report entry built by hand: clause -> verdict, clause -> conventions its failure named."""
    records = [{"clause": cid, "outcome": "failed" if v == "fail" else "passed", "conventions": failures.get(cid, []),
                "error_over_bound_by_dtype": {}} for cid, v in clauses.items()]
    doc = {"clauses": [{"id": cid, "title": cid, "verdict": v, "detail": "", "accepted": [],
                        "worst_error_over_bound": None} for cid, v in clauses.items()],
           "records": records, "candidate": {"dims": [1, 2, 3]}, "conformant": False}
    return {"target": target, "status": "checked", "check": doc, "native": native or {},
            "capabilities": {"dtypes": ["float64", "float32"]}, "modulo_conventions": modulo, "timing": []}


def test_the_conventions_table_takes_the_checks_word_over_the_adapters():
    """A candidate whose failures name momentum_on_old blends the other way round from what
    its translation says; S3.1 failing modulo conventions leaves the direction unconfirmed."""
    native = {"layer": "L", "eps": 1e-3, "momentum": 0.9, "momentum_weights": "new", "float64": "", "settings": {}}
    clauses = {"S1.1": "pass", "S1.5": "pass", "S3.1": "fail", "S3.6": "fail", "S6.1": "fail", "S7.2": "pass"}
    strict = _entry("x", clauses, {"S3.1": ["momentum_on_old+biased_running_var"], "S3.6": ["nan_stats_empty_batch"],
                                   "S6.1": ["no_error_one_value"]}, native=native)
    again = _entry("x", {"S3.1": "pass", "S3.6": "pass", "S6.1": "pass"}, {})["check"]
    strict["modulo_conventions"] = {"accept": ["momentum_on_old", "biased_running_var", "nan_stats_empty_batch",
                                               "no_error_one_value"], "clauses": ["S3.1", "S3.6", "S6.1"],
                                    "check": again, "reason": ""}
    row = RR.conventions_row(strict)
    assert (row["momentum weights"], row["running variance"], row["batch variance"]) == ("old", "biased", "two-pass")
    assert (row["one value per channel"], row["empty batch"], row["default eps"]) == (
        "no error", "NaN running statistics", "0.001")
    assert RR.checked(strict, "modulo")["conformant"] and not RR.checked(strict, "strict")["conformant"]
    failing_again = _entry("x", {"S3.1": "fail", "S3.6": "pass", "S6.1": "pass"}, {})["check"]
    strict["modulo_conventions"]["check"] = failing_again
    assert RR.conventions_row(strict)["momentum weights"] == "old (S3.1 fails: unconfirmed)"
