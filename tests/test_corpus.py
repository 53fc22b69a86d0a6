"""The diagnosis on BatchNorms written the way people write them (``tests/corpus/``).

Pytest subprocesses run the conformance suite over the corpus layers (as the zoo's runs
do, in the background from the session's start: ``tests/suite_runs.py``); the causes are built from their records and discovered
contracts by the same function ``bnspec check`` uses. For each layer the causes must
name exactly the conventions the corpus says it follows, one contract cause listing
exactly its gaps (or none), and for the layers whose only difference is their contract
or their memory layout, exactly one cause. Verdicts stay strict: no layer conforms.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from bnspec import diagnosis
from bnspec.contract import CONSTRUCTOR_PIECES, INSTANCE_PIECES
from bnspec.results import clause_verdicts, conformant

import suite_runs
from corpus import CORPUS
from suite_runs import ShardedRun, Start, SuiteRun
from zoo.partial import PARTIAL

#: The corpus' profile and shrinking: the CLI's defaults, so these are the causes a user
#: sees. Shrinking matters here: a float32 one-pass variance is named by reproducing its
#: rounding, which the small shrunk counterexamples do and large ones need not.
PROFILE, SHRINK = "ci", True
#: The partial layers are correct apart from one piece: a few examples per clause drive
#: every clause; what is checked is that nothing but S5.1 fails and nothing errors.
PARTIAL_FILE, PARTIAL_PROFILE = "tests/zoo/partial.py", "quick"
DISCOVERABLE = set(CONSTRUCTOR_PIECES) | set(INSTANCE_PIECES)


def target(key: str) -> str:
    return f"tests/corpus/{key}"


#: The corpus in two parts of about equal time (two runs in the background, or together when
#: a test asks for them before the background has started them).
#: The layout layer alone takes about 40% of the corpus' time (its failures take longest
#: to shrink): its part has two short layers more, the other part the other six.
LAYOUT_PART = ("layout.py:ContiguousMemoryBatchNorm2d", "keras_style.py:KerasStyleBatchNorm2d",
               "interview.py:InterviewBatchNorm2d")


def planned_runs(wanted: set[str]) -> dict[str, Start]:
    """The corpus' two parts and the partial layers' run, as the selected tests (``wanted``)
    need them; ``tests/conftest.py`` starts them in the background when the session begins."""
    shards = [[target(k) for k in CORPUS if k in LAYOUT_PART], [target(k) for k in CORPUS if k not in LAYOUT_PART]]
    plan: dict[str, Start] = {}
    if wanted & {"test_causes_of_each_style", "test_correct_but_partial_layer_has_exactly_one_cause"}:
        for i, targets in enumerate(shards):
            plan[f"corpus-{i}"] = lambda workdir, name=f"corpus-{i}", targets=targets: SuiteRun(
                name, targets, dims="2", profile=PROFILE, workdir=workdir, shrink=SHRINK)
    if "test_a_missing_piece_is_one_cause_and_no_internal_error" in wanted:
        plan["partial"] = lambda workdir: SuiteRun("partial", [f"{PARTIAL_FILE}:{n}" for n in PARTIAL], dims="2",
                                                   profile=PARTIAL_PROFILE, workdir=workdir, shrink=SHRINK)
    return plan


@pytest.fixture(scope="module")
def runs(request) -> dict[str, SuiteRun | ShardedRun]:
    """The corpus (its parts read as one run) and the partial layers."""
    started = suite_runs.take_all(planned_runs(suite_runs.selected_names(request.session, request.module)))
    parts = [started[k] for k in sorted(started) if k.startswith("corpus-")]
    grouped = {"corpus": ShardedRun("corpus", parts)} if parts else {}
    if "partial" in started:
        grouped["partial"] = started["partial"]
    yield grouped
    for run in started.values():
        run.stop()


def _diagnosed(run: SuiteRun | ShardedRun, targets: dict[str, str]) -> dict:
    """name -> {"records", "contract", "causes"} for each target of a finished run."""
    records, wall, _ = run.wait()
    contracts = run.contracts()
    print(f"\n{run.name} run: {wall:.0f} s wall")
    out = {}
    for name, tgt in targets.items():
        mine = [r for r in records if r["candidate"] == tgt]
        contract = contracts.get(f"{tgt}-2d")
        out[name] = {"records": mine, "contract": contract,
                     "causes": diagnosis.causes(mine, contract, lambda ids: ",".join(ids))}
    return out


@pytest.fixture(scope="module")
def corpus_run(runs) -> dict:
    return _diagnosed(runs["corpus"], {k: target(k) for k in CORPUS})


@pytest.fixture(scope="module")
def partial_run(runs) -> dict:
    return _diagnosed(runs["partial"], {n: f"{PARTIAL_FILE}:{n}" for n in PARTIAL})


def _named(causes: list[dict]) -> set[str]:
    return {c["convention"] for c in causes if c["convention"]}


def _show(causes: list[dict]) -> str:
    return "\n".join(f"  {c['summary'][:160]} [{','.join(c['clauses'])}]" for c in causes)


@pytest.mark.parametrize("key", list(CORPUS), ids=[k.split(":")[1] for k in CORPUS])
def test_causes_of_each_style(corpus_run, key):
    facts, got = CORPUS[key], corpus_run[key]
    causes, records = got["causes"], got["records"]
    assert records, f"no records for {key}"
    assert not conformant(clause_verdicts(records)), f"{key} follows conventions of its own: it must not conform"
    want = set(facts["conventions"]) | ({"own_defaults"} if facts["default_differences"] else set())
    assert _named(causes) == want, f"{key}: named {sorted(_named(causes))}, expected {sorted(want)}\n{_show(causes)}"
    gaps = set(facts["contract_gaps"]) & DISCOVERABLE
    found = set((got["contract"] or {}).get("missing") or {})
    assert found == gaps, f"{key}: discovered missing {sorted(found)}, the corpus says {sorted(gaps)}"
    contract_causes = [c for c in causes if c["summary"].startswith("incomplete module contract")]
    assert len(contract_causes) == (1 if gaps else 0), _show(causes)
    for c in causes:
        assert c["repro"] and c["clauses"] and c["records"] >= 1, c
    if facts["layout_bug"]:
        assert len(causes) == 1 and causes[0].get("depends", {}).get("features") == ["layout"], _show(causes)
    internal = [(r["test"], r.get("suite_error") or r["detail"][:200]) for r in records
                if r.get("suite_error") or (r["outcome"] == "failed" and r["phase"] != "call")]
    assert not internal, f"{key}: the suite failed with its own error: {internal}"


@pytest.mark.parametrize("key", ["older.py:OlderBatchNorm2d", "nocounter.py:NoCounterBatchNorm2d"])
def test_correct_but_partial_layer_has_exactly_one_cause(corpus_run, key):
    """Right values, gradients, statistics and errors: the contract is the one cause, and every
    other clause passes (or is unsupported for what the layer lacks)."""
    got = corpus_run[key]
    assert len(got["causes"]) == 1, _show(got["causes"])
    verdicts = {c["id"]: c["verdict"] for c in clause_verdicts(got["records"])}
    bad = {cid: v for cid, v in verdicts.items() if cid != "S5.1" and v not in ("pass", "unsupported", "n/a")}
    assert not bad, bad
    assert verdicts["S5.1"] == "fail"
    if key.startswith("older"):
        assert all(v == "pass" for cid, v in verdicts.items() if cid != "S5.1"), verdicts


@pytest.mark.parametrize("name", list(PARTIAL))
def test_a_missing_piece_is_one_cause_and_no_internal_error(partial_run, name):
    """Every clause driven against a correct layer that lacks one piece of the contract: the
    piece is discovered, it is the only cause, and the suite never fails with its own error."""
    got = partial_run[name]
    records = got["records"]
    assert records, f"no records for {name}"
    internal = [(r["clause"], r["test"], r.get("suite_error") or r["detail"][:200]) for r in records
                if r.get("suite_error") or (r["outcome"] == "failed" and r["phase"] != "call")]
    assert not internal, f"{name}: the suite failed with its own error: {internal}"
    assert set((got["contract"] or {}).get("missing") or {}) == PARTIAL[name]
    assert len(got["causes"]) == 1, _show(got["causes"])
    assert got["causes"][0]["summary"].startswith("incomplete module contract"), _show(got["causes"])
    failing = {r["clause"] for r in records if r["outcome"] == "failed"}
    assert failing == {"S5.1"}, failing


def test_corpus_files_exist():
    for key in CORPUS:
        assert (Path(__file__).parent / "corpus" / key.split(":")[0]).is_file(), key
