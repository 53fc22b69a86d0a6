"""The diagnosis' pieces: the contract's building rules, draws read back from hypothesis'
notes, causes from records, and --accept (judged against the convention's own formula)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bnspec import diagnosis
from bnspec.contract import Contract
from bnspec.conventions import CONVENTIONS, atoms, describe, unknown_conventions
from bnspec.pytest_plugin import drawn
from conformance import strategies as cs
from conformance.judge import ConformanceFailure, Judge, covered
from conformance.oracle import Expected

ROOT = Path(__file__).resolve().parent.parent


# ----------------------------------------------------------------------------- contract


def test_a_missing_keyword_is_left_out_at_torch_default_and_refused_elsewhere():
    c = Contract.from_found({"constructor": {"bias=False": "TypeError: no bias", "dtype": "TypeError: no dtype",
                                             "eps": None}, "instance": {"num_batches_tracked buffer": "no attribute"}})
    assert c.discovered and not c.builds("bias=False") and c.builds("bias") and c.builds("eps")
    kw, cast, missing = c.buildable_kwargs({"eps": 1e-3, "bias": True, "dtype": "float64", "affine": True})
    assert missing is None and cast == "float64" and kw == {"eps": 1e-3, "bias": True, "affine": True}
    assert c.buildable_kwargs({"bias": False})[2] == "bias=False"
    assert not c.has("num_batches_tracked buffer")
    assert "bias=False" in c.summary() and "num_batches_tracked buffer" in c.summary()


def test_a_missing_keyword_refuses_its_values_but_not_its_default():
    c = Contract.from_found({"constructor": {"momentum": "TypeError", "momentum=None": "TypeError"}})
    assert c.buildable_kwargs({"momentum": 0.1})[0] == {}
    assert c.buildable_kwargs({"momentum": 0.5})[2] == "momentum"
    assert c.buildable_kwargs({"momentum": None})[2] == "momentum=None"


def test_cases_draw_only_what_can_be_built():
    from hypothesis import given, settings

    c = Contract.from_found({"constructor": {"eps": "x", "momentum=None": "x", "affine=False": "x", "bias=False": "x",
                                             "track_running_stats=False": "x"}})
    seen = []

    @settings(max_examples=60, derandomize=True, database=None)
    @given(case=cs.cases(dims=2, contract=c))
    def draw(case):
        seen.append(case)

    draw()
    assert seen and all(k.eps == 1e-5 and k.momentum is not None and k.affine and k.bias and k.track_running_stats
                        for k in seen)
    assert len({k.momentum for k in seen}) > 1  # the momentum keyword itself is there


# ----------------------------------------------------------------------------- draws


def test_draws_are_read_back_with_labels_and_without_explain_comments():
    exc = AssertionError("x")
    exc.add_note("Draw 1 (case (momentum_outside_0_1)): Case(shape=(2, 1, 1, 1), dtype='float64')")
    exc.add_note("Draw 2 (momentum): 1.5  # or any other generated value")
    exc.add_note("Draw 3: True")
    exc.add_note("Falsifying example: ...")
    assert drawn(exc) == {"case (momentum_outside_0_1)": "Case(shape=(2, 1, 1, 1), dtype='float64')",
                          "momentum": "1.5", "#3": "True"}


# ----------------------------------------------------------------------------- causes


def _rec(clause, *, conventions=(), depends=None, case="Case(shape=(2, 3, 4, 4))", draws=None):
    return {"clause": clause, "outcome": "failed", "phase": "call", "verdict": "fail", "reason": f"{clause} failed",
            "failures": 1, "detail": f"{clause} failed\n  more",
            "conventions": list(conventions), "case": case, "draws": draws or {"case": case}, "depends": depends}


def _dep(passes: dict, now: dict, fails: dict | None = None):
    return {"passes_when": passes, "fails_when": fails or {}, "now": now, "summary": ""}


def test_one_cause_per_convention_ranked_by_records():
    recs = [_rec("S1.1", conventions=["unbiased_normalization"]), _rec("S4.1", conventions=["unbiased_normalization"]),
            _rec("S3.1", conventions=["momentum_on_old", "momentum_on_old+biased_running_var"])]
    causes = diagnosis.causes(recs, None, lambda ids: "rerun " + ",".join(ids))
    first = causes[0]
    assert first["convention"] == "unbiased_normalization"
    assert first["clauses"] == ["S1.1", "S4.1"] and first["records"] == 2 and first["rerun"] == "rerun S1.1,S4.1"
    assert {c["convention"] for c in causes} == {"unbiased_normalization", "momentum_on_old", "biased_running_var"}


def test_either_convention_goes_to_the_one_with_more_support():
    recs = [_rec("S1.1", conventions=["running_stats_in_training"]), _rec("S4.1", conventions=["running_stats_in_training"]),
            _rec("S3.2", conventions=["momentum_on_old|running_stats_in_training"])]
    causes = diagnosis.causes(recs, None, lambda ids: "")
    assert len(causes) == 1 and causes[0]["convention"] == "running_stats_in_training" and causes[0]["records"] == 3


def test_same_dependence_is_one_cause_and_a_superset_joins_it():
    lay = {"layout": ["contiguous"]}
    recs = [_rec("S1.1", depends=_dep(lay, {"layout": "channels_last"}, {"layout": ["noncontiguous"]})),
            _rec("S2.1", depends=_dep(lay, {"layout": "noncontiguous"})),
            _rec("S6.3", depends=_dep({**lay, "affine": ["affine=False"]}, {"layout": "channels_last", "affine": "affine=True"})),
            _rec("ST1", case=None, draws={"layout": "'channels_last'"})]
    causes = diagnosis.causes(recs, None, lambda ids: "")
    assert len(causes) == 1, causes
    assert causes[0]["clauses"] == ["S1.1", "S2.1", "S6.3", "ST1"]
    assert "fails only for channels_last and noncontiguous; contiguous passes" in causes[0]["summary"]


def test_grad_mode_dependence_is_the_convention():
    recs = [_rec("S2.1", depends=_dep({"grad mode": ["autograd off in eval"]}, {"grad mode": "grad mode"})),
            _rec("S4.2", conventions=["batch statistics in eval (the training-mode backward)"])]
    causes = diagnosis.causes(recs, None, lambda ids: "")
    assert len(causes) == 1 and causes[0]["convention"] == "stats_by_grad_mode" and causes[0]["records"] == 2


def test_contract_cause_lists_the_gaps_and_what_could_not_be_checked():
    contract = Contract.from_found({"constructor": {"bias=False": "TypeError"}}).to_dict()
    recs = [_rec("S5.1"), {"clause": "S3.3", "outcome": "skipped", "phase": "call", "verdict": "unsupported",
                           "detail": "unsupported: x has no num_batches_tracked buffer (...; listed in the S5.1 contract finding)"}]
    causes = diagnosis.causes(recs, contract, lambda ids: "")
    assert len(causes) == 1 and causes[0]["clauses"] == ["S5.1"]
    assert "bias=False" in causes[0]["summary"] and "S3.3" in causes[0]["summary"]


def test_repro_keeps_every_labelled_draw():
    rec = _rec("S3.1", conventions=["momentum_on_old"], draws={"case": "Case(shape=(2, 3))", "start_count": "9",
                                                              "momentum": "0.5"})
    (cause,) = diagnosis.causes([rec], None, lambda ids: "")
    assert "case = Case(shape=(2, 3, 4, 4))" in cause["repro"] and "'start_count': 9" in cause["repro"] \
        and "'momentum': 0.5" in cause["repro"]


# ----------------------------------------------------------------------------- accept


class _Item:
    def __init__(self):
        self.user_properties = []


def test_names_and_words():
    assert atoms("a+b|c") == [["a", "b"], ["c"]]
    assert " OR " in describe("momentum_on_old|running_stats_in_training")
    assert covered("momentum_on_old+biased_running_var", frozenset({"momentum_on_old", "biased_running_var"}))
    assert not covered("momentum_on_old+biased_running_var", frozenset({"momentum_on_old"}))
    assert unknown_conventions("momentum_on_old") is None
    assert "known:" in unknown_conventions("momentum_on_new")
    assert set(CONVENTIONS) >= {"stats_by_grad_mode", "running_stats_in_training", "own_defaults"}


def test_an_accepted_convention_is_judged_against_its_own_formula():
    torch.manual_seed(0)
    x = torch.randn(4, 3, dtype=torch.float64)
    case = cs.Case(shape=(4, 3), dtype="float64")
    expected = Expected(torch.zeros(4, 3, dtype=torch.float64), torch.full((4, 3), 1e-12, dtype=torch.float64))
    alternatives = lambda: {"eps_outside_root": x}  # noqa: E731
    judge = Judge(_Item(), accept=frozenset({"eps_outside_root"}))
    judge.close("y", x, expected, case=case, alternatives=alternatives)  # matches the accepted formula: passes
    assert judge.accepted == {"eps_outside_root"}
    with pytest.raises(ConformanceFailure):  # what matches neither formula still fails
        judge.close("y", x + 1, expected, case=case, alternatives=alternatives)
    with pytest.raises(ConformanceFailure) as info:  # not accepted: named, and fails
        Judge(_Item(), accept=frozenset()).close("y", x, expected, case=case, alternatives=alternatives)
    assert info.value.conventions == ("eps_outside_root",)


def _check(*args: str) -> tuple[int, str, dict | None]:
    out = ROOT / "tests" / ".accept-check.json"
    try:
        proc = subprocess.run([sys.executable, "-m", "bnspec.cli", "check", *args, "--json", str(out)], cwd=ROOT,
                              capture_output=True, text=True, timeout=600)
        doc = json.loads(out.read_text()) if out.exists() else None
    finally:
        out.unlink(missing_ok=True)
    return proc.returncode, proc.stdout + proc.stderr, doc


def test_accept_passes_what_matches_and_keeps_every_other_failure():
    code, text, doc = _check("tests/zoo/mutants.py:MomentumOnOldValue", "--profile", "quick",
                             "--accept", "momentum_on_old", "--clauses", "S3,G1")
    assert code == 0, text
    assert "except for the accepted conventions: momentum_on_old" in text and "pass (momentum_on_old)" in text
    assert doc["accepted"] == ["momentum_on_old"] and doc["conformant"]
    code, text, doc = _check("tests/zoo/mutants.py:BiasedRunningVar", "--profile", "quick",
                             "--accept", "momentum_on_old", "--clauses", "S3.1")
    assert code == 1 and not doc["conformant"], text
    assert [c["convention"] for c in doc["causes"]] == ["biased_running_var"]


def test_an_unknown_convention_is_a_usage_error():
    proc = subprocess.run([sys.executable, "-m", "bnspec.cli", "check", "torch", "--accept", "momentum_on_new"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "unknown convention" in proc.stderr and "momentum_on_old" in proc.stderr
