"""Bad input to the command line (issue 6): every ``bnspec check`` and ``bnspec report``
option given a bad value, and every malformed or unusable TARGET, says what is wrong
and what is allowed, on one line of stderr, with exit status 2 and no traceback
(unless ``--verbose``).

Most cases call :func:`bnspec.cli.main` in this process (they fail before any test
runs); a few run the real command to cover the console entry point.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bnspec import cli
from bnspec.options import parse_clauses
from bnspec.spec import CLAUSES

ROOT = Path(__file__).resolve().parents[1]


def invoke(argv: list[str], capsys) -> tuple[int, str, str]:
    try:
        code = cli.main(argv)
    except SystemExit as exc:  # argparse's own errors
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def assert_usage_error(code: int, out: str, err: str, *expected: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == cli.EXIT_UNUSABLE, (code, out, err)
    assert len(lines) == 1, err
    assert lines[0].startswith("bnspec: "), err
    assert "Traceback" not in err and "Traceback" not in out
    assert out == ""
    for text in expected:
        assert text in lines[0], (text, lines[0])
    return lines[0]


# option -> (bad value, texts the message must contain: what is wrong, what is allowed)
CHECK_OPTIONS = [
    ("--dims", "4", ("--dims '4'", "1, 2, 3")),
    ("--dims", "x", ("--dims 'x'", "1, 2, 3")),
    ("--dims", "", ("--dims ''", "1, 2, 3")),
    ("--dims", "1,,7", ("--dims '1,,7'", "1, 2, 3")),
    ("--profile", "fast", ("'fast'", "quick", "ci", "thorough")),
    ("--seed", "-1", ("--seed '-1'", "integer from 0")),
    ("--seed", "x", ("--seed 'x'", "integer from 0")),
    ("--seed", "1.5", ("--seed '1.5'", "integer from 0")),
    ("--seed", str(2**64), ("--seed", "2**63-1")),
    ("--timeout", "0", ("--timeout '0'", "> 0")),
    ("--timeout", "-3", ("--timeout '-3'", "> 0")),
    ("--timeout", "x", ("--timeout 'x'", "number of seconds")),
    ("--timeout", "nan", ("--timeout 'nan'", "> 0")),
    ("--timeout", "inf", ("--timeout 'inf'", "at most")),
    ("--startup-timeout", "0", ("--startup-timeout '0'", "> 0")),
    ("--budget", "-1", ("--budget '-1'", "> 0")),
    ("--dtypes", "float8", ("--dtypes 'float8'", "float64, float32, float16, bfloat16")),
    ("--dtypes", "", ("--dtypes ''", "float64, float32")),
    ("--dtypes", "float32,int64", ("--dtypes 'float32,int64'", "float64, float32")),
    ("--clauses", "", ("--clauses ''", "S1 or S3.2")),
    ("--clauses", "S1;S2", ("--clauses 'S1;S2'", "S1 or S3.2")),
    ("--clauses", "s1", ("--clauses 's1'", "S1 or S3.2")),
    ("--device", "toaster", ("--device 'toaster'", "cpu, cuda")),
]
if not torch.cuda.is_available():
    CHECK_OPTIONS.append(("--device", "cuda", ("--device 'cuda'", "not available", "cpu")))


@pytest.mark.parametrize("option, value, expected", CHECK_OPTIONS,
                         ids=[f"{o}={v!r}" for o, v, _ in CHECK_OPTIONS])
def test_check_option_with_a_bad_value(option, value, expected, capsys):
    assert_usage_error(*invoke(["check", "torch", option, value], capsys), *expected)


def test_check_json_into_a_directory_or_below_a_file(tmp_path, capsys):
    assert_usage_error(*invoke(["check", "torch", "--json", str(tmp_path)], capsys), "--json", "is a directory")
    (tmp_path / "file").write_text("")
    assert_usage_error(*invoke(["check", "torch", "--json", str(tmp_path / "file" / "out.json")], capsys),
                       "--json", "not a directory")


def test_unknown_option_and_missing_arguments(capsys):
    assert_usage_error(*invoke(["check", "torch", "--frobnicate"], capsys), "unrecognized arguments: --frobnicate",
                       "--help")
    assert_usage_error(*invoke(["check"], capsys), "required: target", "--help")
    assert_usage_error(*invoke([], capsys), "required: command", "--help")
    assert_usage_error(*invoke(["chekc", "torch"], capsys), "invalid choice: 'chekc'", "check")


# TARGETs that are malformed or cannot be used; files are written under tmp_path.
FILES = {
    "syntax.py": "class BatchNorm2d(:\n    pass\n",
    "noattr.py": "import torch\nOther = torch.nn.BatchNorm2d\n",
    "notcallable.py": "BatchNorm2d = 3\n",
    "raises.py": "raise RuntimeError('boom at import')\n",
}
TARGETS = [
    ("", ("TARGET ''", "empty", "package.module:Name")),
    ("a:b:c", ("'a:b'", "not a dotted module name", "package.module:Name")),
    ("pkg.mod:", ("after ':' is not a Python name", "package.module:Name")),
    ("pkg.mod:1x", ("'1x' after ':' is not a Python name",)),
    ("no/such/file.py:BatchNorm2d", ("no such file 'no/such/file.py'",)),
    ("not a name", ("'not a name' is not a candidate name", "package.module:Name")),
    # these load the target in a child process
    ("{tmp}/syntax.py:BatchNorm2d", ("syntax error", "line 1")),
    ("{tmp}/noattr.py:BatchNorm2d", ("has no attribute 'BatchNorm2d'",)),
    ("{tmp}/notcallable.py:BatchNorm2d", ("is a int, not a class or factory",)),
    ("{tmp}/raises.py:BatchNorm2d", ("raised RuntimeError: boom at import",)),
    ("bnspec_no_such_module_xyz:BatchNorm2d", ("cannot import module 'bnspec_no_such_module_xyz'",)),
    ("bnspec.no_such_module:BatchNorm2d", ("cannot import module 'bnspec.no_such_module'",)),
    ("nosuchcandidate", ("'nosuchcandidate' is not a built-in candidate", "torch, bnspec")),
]


@pytest.fixture
def target_files(tmp_path):
    for name, text in FILES.items():
        (tmp_path / name).write_text(text)
    return tmp_path


@pytest.mark.parametrize("target, expected", TARGETS, ids=[t or "empty" for t, _ in TARGETS])
def test_check_unusable_target(target, expected, target_files, capsys):
    target = target.replace("{tmp}", str(target_files))
    assert_usage_error(*invoke(["check", target, "--profile", "quick"], capsys), *expected)


def test_one_class_with_several_rank_families(capsys):
    assert_usage_error(*invoke(["check", "tests/hostile/candidates.py:ReturnsNone", "--dims", "1,2"], capsys),
                       "one class", "--dims (1, 2 or 3)")


def test_verbose_adds_the_traceback(target_files, capsys):
    code, out, err = invoke(["check", "no/such/file.py:X", "--verbose"], capsys)
    assert code == 2 and "Traceback" in err and err.rstrip().splitlines()[-1].startswith("bnspec: ")


REPORT_OPTIONS = [
    (["--candidates", ""], ("--candidates ''", "at least one target")),
    (["--candidates", " , "], ("at least one target",)),
    (["--candidates", "torch,a:b:c"], ("'a:b' is not a dotted module name",)),
    (["--candidates", "torch,nosuchcandidate"], ("'nosuchcandidate' is not a built-in candidate",)),
    (["--profile", "fast"], ("'fast'", "quick")),
    (["--seed", "-1"], ("--seed '-1'", "integer from 0")),
    (["--timeout", "0"], ("--timeout '0'", "> 0")),
    (["--clauses", "S1;"], ("--clauses 'S1;'", "S1 or S3.2")),
    (["--out", "{tmp}/file"], ("--out", "not a directory")),
]


@pytest.mark.parametrize("args, expected", REPORT_OPTIONS, ids=[" ".join(a) for a, _ in REPORT_OPTIONS])
def test_report_option_with_a_bad_value(args, expected, tmp_path, capsys):
    (tmp_path / "file").write_text("")
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    out_dir = [] if "--out" in args else ["--out", str(tmp_path / "reports")]
    quick = [] if "--profile" in args or "--clauses" in args else ["--profile", "quick", "--clauses", "S1.1"]
    assert_usage_error(*invoke(["report", *args, *out_dir, *quick], capsys), *expected)


@pytest.mark.parametrize("args, expected", [
    (["check"], "required: target"),
    (["check", "torch", "--profile", "fast"], "invalid choice: 'fast'"),
    (["check", "{tmp}/syntax.py:BatchNorm2d"], "syntax error"),
], ids=["missing-target", "bad-profile", "syntax-error"])
def test_console_command(args, expected, target_files):
    """The same through the real command (a new process)."""
    args = [a.replace("{tmp}", str(target_files)) for a in args]
    p = subprocess.run([sys.executable, "-m", "bnspec.cli", *args], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    assert_usage_error(p.returncode, p.stdout, p.stderr, expected)


@pytest.mark.parametrize("clause_id", sorted(CLAUSES))
def test_every_clause_id_is_accepted_by_clauses(clause_id):
    """Every failure prints ``--clauses ID`` in its rerun command: each id must be accepted
    (ST1's was once refused as malformed)."""
    assert parse_clauses(clause_id) == clause_id
    prefix = clause_id.split(".")[0]
    assert parse_clauses(f"{prefix}, {clause_id}") == f"{prefix},{clause_id}"
