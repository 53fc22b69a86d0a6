"""From per-test records to per-clause verdicts, and the JSON document ``bnspec check`` writes.

Schema ``bnspec.check/1`` (``--json FILE``)::

    {
      "schema": "bnspec.check/1",
      "conformant": true | false,          # every clause pass (or n/a), none narrowed away
      "candidate": {"target": str, "dims": [int]},
      "versions": {"bnspec": str, "torch": str, "python": str, "hypothesis": str,
                   "candidate": {"torch": str, "candidate": str}},  # as seen in the child
      "profile": "quick" | "ci" | "thorough", "seed": int | null,  # null: derandomized
      "device": str, "clauses_selected": str | null,
      "timeout_s": float, "budget_s": float | null,  # per call; whole check (null: profile default)
      "narrowed": {"dtypes": [str]} | null,  # the user narrowed the contract
      "command": str,                      # reruns exactly this check (same versions, same verdicts)
      "accepted": [str],                   # conventions judged against their own formulas (--accept)
      "contract": {"discovered": bool,     # what the candidate was found to have (class targets)
                   "missing": {piece: why}, "unbuildable": str | null, "summary": str} | null,
      "causes": [{                         # the failures, once per cause, most failing records first
          "summary": str, "convention": str | null, "clauses": [str], "records": int,
          "repro": str,                    # the smallest failing example, every labelled draw included
          "rerun": str,                    # the command that reruns the cause's clauses
          "depends": {"features": [str], "detail": str}}],  # only for a cause found by replays
      "clauses": [{
          "id": "S1.1", "title": str,
          "verdict": "pass" | "fail" | "unsupported" | "error" | "not run" | "n/a",
          # "not run": the candidate was given up (crashed or hung too often) before the clause
          "accepted": [str],               # a pass that needed these accepted conventions
          "reason": str,                   # one line: the worst record's reason ("" for a pass)
          "failures": int,                 # distinct failures hypothesis found in that record
          "detail": str,                   # why (first failure, or the missing capability)
          "repro": str | null,             # command + case for a failure
          "worst_error_over_bound": float | null,
          "tests": int                     # test items run for the clause
      }],
      "records": [{                        # one per test item (timings live only here)
          "nodeid": str, "test": str, "clause": str, "candidate": str, "dims": int,
          "phase": str, "outcome": "passed" | "failed" | "skipped",
          "verdict": "pass" | "fail" | "error" | "not run" | "unsupported" | "n/a",
          # a skip's verdict comes from its exception's type (conformance.outcomes)
          "reason": str,                   # one line: why it did not pass ("" for a pass)
          "failures": int,                 # distinct failures (hypothesis may find several)
          "error_over_bound": float | null,  # worst over the item's comparisons
          "error_over_bound_by_dtype": {dtype: float | null},  # the same, per input dtype
          "detail": str, "duration_s": float,
          "accepted": [str], "conventions": [str],  # matched on failure (named in the detail)
          "not_run": bool,                 # the candidate had been given up before this test
          "case": str | null, "case_repro": str | null,  # the judged case, and code that rebuilds it
          "draws": {label: repr},          # every labelled draw of the failing example
          "suite_error": str | null,       # bnspec's own exception (a bug of the suite, reported as such)
          "depends": {"passes_when": {feature: [str]}, "fails_when": {...}, "now": {...},
                      "summary": str} | null}]  # replays with one feature changed
    }

``fail`` means the candidate did something the spec forbids (including raising where
torch returns a result, crashing, hanging); ``error`` means the check itself could not run
(for example the candidate process could not be started for that test).

``verdict``, ``reason`` and ``failures`` (records) and ``reason``, ``failures`` (clauses)
were added to version 1 without a new version number (readers that skip unknown fields
are unaffected); documents written before them are still read: their clause reasons
come from ``detail``.

Everything in the document except the ``duration_s`` of each record is a function of
the command and the versions: the same seed gives byte-identical JSON apart from those.
What the candidate says (exception messages, its last output) appears only inside
``detail`` strings, with control characters escaped in the human table.
"""

from __future__ import annotations

import math
import platform
import re
import shlex
from collections import defaultdict

from bnspec import diagnosis
from bnspec.conventions import describe
from bnspec.isolation.proxy import NOT_RETRIED, printable
from bnspec.options import DEFAULT_TIMEOUT
from bnspec.spec import CLAUSES

SCHEMA = "bnspec.check/1"
ORDER = {"fail": 0, "error": 1, "not run": 2, "unsupported": 3, "pass": 4, "n/a": 5}


def versions() -> dict:
    import hypothesis
    import torch

    import bnspec

    return {"bnspec": bnspec.__version__, "torch": torch.__version__,
            "python": platform.python_version(), "hypothesis": hypothesis.__version__}


def record_verdict(rec: dict) -> str:
    """The record's own verdict (the plugin or the synced check decided it)."""
    return rec["verdict"]


def clause_verdicts(records: list[dict], *, command: str | None = None, rerun=None) -> list[dict]:
    """One entry per clause that had tests, worst verdict first within the clause.

    ``rerun(dims, clause_id)`` gives the command that reruns one clause (default:
    ``command`` plus ``--dims`` and ``--clauses``)."""
    by_clause: dict[str, list[dict]] = defaultdict(list)
    for rec in records:
        by_clause[rec.get("clause") or "?"].append(rec)
    out = []
    for cid in [c for c in CLAUSES if c in by_clause] + [c for c in by_clause if c not in CLAUSES]:
        recs = by_clause[cid]
        verdicts = [record_verdict(r) for r in recs]
        real = [v for v in verdicts if v != "n/a"] or ["n/a"]
        verdict = min(real, key=ORDER.__getitem__)
        worst_rec = next((r for r, v in zip(recs, verdicts) if v == verdict), recs[0])
        ratios = [r["error_over_bound"] for r in recs if isinstance(r.get("error_over_bound"), (int, float))]
        worst = max(ratios) if ratios else None
        if worst is not None and math.isinf(worst):
            worst = "inf"
        detail = "" if verdict == "pass" else str(worst_rec.get("detail", ""))
        repro = None
        if verdict in ("fail", "error"):
            repro = (rerun(worst_rec.get("dims"), cid) if rerun is not None
                     else f"{command} --dims {worst_rec.get('dims')} --clauses {cid}")
        accepted = sorted({n for r in recs for n in r.get("accepted") or []}) if verdict == "pass" else []
        out.append({
            "id": cid,
            "title": CLAUSES[cid].title if cid in CLAUSES else "",
            "verdict": verdict,
            "accepted": accepted,
            "reason": "" if verdict == "pass" else str(worst_rec.get("reason", "")),
            "failures": 0 if verdict == "pass" else int(worst_rec.get("failures", 0)),
            "detail": detail,
            "repro": repro,
            "worst_error_over_bound": worst,
            "tests": len(recs),
        })
    return out


def with_contract_finding(verdicts: list[dict], contract: dict | None, rerun) -> list[dict]:
    """The clauses, with S5.1 failing on the discovered contract when S5.1 did not run (a
    ``--clauses`` selection): every clause drew only what the candidate can be built with,
    so a check that leaves the gap out must not conform."""
    missing = (contract or {}).get("missing") or {}
    if not missing or any(c["id"] == "S5.1" for c in verdicts):
        return verdicts
    detail = "incomplete contract: " + (contract.get("summary") or ", ".join(missing)) + "\n" + \
        "\n".join(f"  {piece}: {why}" for piece, why in missing.items())
    finding = {"id": "S5.1", "title": CLAUSES["S5.1"].title, "verdict": "fail", "accepted": [],
               "reason": detail.splitlines()[0], "failures": 1, "detail": detail,
               "repro": rerun("S5.1"), "worst_error_over_bound": None, "tests": 0}
    return sorted([*verdicts, finding], key=lambda c: list(CLAUSES).index(c["id"]) if c["id"] in CLAUSES else 10**6)


def conformant(clauses: list[dict]) -> bool:
    return bool(clauses) and all(c["verdict"] in ("pass", "n/a") for c in clauses)


def check_command(target: str, *, profile: str, seed: int | None, device: str,
                  dtypes: list[str] | None, dims: list[int] | None = None, clauses: str | None = None,
                  timeout: float | None = None, budget: float | None = None,
                  accept: list[str] | None = None) -> str:
    """The ``bnspec check`` command line that reruns exactly this check."""
    parts = ["bnspec", "check", target, "--profile", profile]
    if dims:
        parts += ["--dims", ",".join(map(str, dims))]
    if seed is not None:
        parts += ["--seed", str(seed)]
    if device != "cpu":
        parts += ["--device", device]
    if dtypes:
        parts += ["--dtypes", ",".join(dtypes)]
    if clauses:
        parts += ["--clauses", clauses]
    if timeout is not None and timeout != DEFAULT_TIMEOUT:
        parts += ["--timeout", f"{timeout:g}"]
    if budget is not None:
        parts += ["--budget", f"{budget:g}"]
    if accept:
        parts += ["--accept", ",".join(accept)]
    return shlex.join(parts)


def document(*, target: str, dims: list[int], profile: str, seed: int | None, device: str,
             dtypes: list[str] | None, records: list[dict], clauses: str | None = None,
             timeout: float = DEFAULT_TIMEOUT, budget: float | None = None,
             candidate_versions: dict | None = None, accept: list[str] | None = None,
             contract: dict | None = None) -> dict:
    common = dict(profile=profile, seed=seed, device=device, dtypes=dtypes, timeout=timeout, budget=budget,
                  accept=accept)
    command = check_command(target, dims=dims, clauses=clauses, **common)
    verdicts = clause_verdicts(records, rerun=lambda d, cid: check_command(
        target, dims=[d] if d is not None else dims, clauses=cid, **common))
    verdicts = with_contract_finding(verdicts, contract, lambda cid: check_command(
        target, dims=dims, clauses=cid, **common))
    found_causes = diagnosis.causes(records, contract, lambda ids: check_command(
        target, dims=dims, clauses=",".join(ids), **common))
    found = versions()
    if candidate_versions:
        found["candidate"] = {str(k): str(v) for k, v in candidate_versions.items()}
    return {
        "schema": SCHEMA,
        "conformant": conformant(verdicts),
        "candidate": {"target": target, "dims": dims},
        "versions": found,
        "profile": profile,
        "seed": seed,
        "device": device,
        "clauses_selected": clauses,
        "timeout_s": timeout,
        "budget_s": budget,
        "narrowed": {"dtypes": dtypes} if dtypes else None,
        "command": command,
        "accepted": list(accept or []),
        "contract": contract,
        "causes": found_causes,
        "clauses": verdicts,
        "records": records,
    }


def format_table(doc: dict, *, width: int = 100) -> str:
    """The human table: clause, verdict, worst error/bound, reason."""
    lines = [f"bnspec check {doc['candidate']['target']}  (dims {','.join(map(str, doc['candidate']['dims']))}, "
             f"profile {doc['profile']}, seed {doc['seed'] if doc['seed'] is not None else 'derandomized'})"]
    if doc.get("narrowed"):
        lines.append(f"contract NARROWED by the user: dtypes {','.join(doc['narrowed']['dtypes'])}")
    if doc.get("accepted"):
        lines.append(f"accepted conventions (judged against their own formulas): {', '.join(doc['accepted'])}")
    found = doc.get("causes") or []
    if found:
        lines.append(f"\n{len(found)} cause(s), the one that explains the most failures first:")
        for i, c in enumerate(found, 1):
            lines.append(f"{i}. {printable(c['summary'])}")
            if c.get("convention"):
                lines.append(f"   convention: {c['convention']} (accept it with --accept {c['convention']})")
            lines.append(f"   clauses: {', '.join(c['clauses'])} ({c['records']} failing test(s))")
            lines.append(f"   smallest reproduction: {printable(c['repro'])}")
            lines.append(f"   rerun: {c['rerun']}")
        lines.append("")
    lines.append(f"{'clause':7} {'verdict':12} {'err/bound':>9}  reason")
    for c in doc["clauses"]:
        w = c["worst_error_over_bound"]
        ws = "" if w is None else (w if isinstance(w, str) else f"{w:.3g}")
        reason = clause_reason(c) if c["verdict"] != "pass" else c["title"]
        shown = c["verdict"] + (f" ({','.join(c['accepted'])})" if c.get("accepted") else "")
        lines.append(f"{c['id']:7} {shown:12} {ws:>9}  {printable(reason)[: width - 32]}")
    lines.append(f"verdict: {verdict_text(doc)}")
    failing = [c for c in doc["clauses"] if c["verdict"] in ("fail", "error")]
    for c in failing:
        lines.append(f"\n{c['id']} {c['title']}:")
        lines.extend("  " + printable(ln) for ln in c["detail"].strip().splitlines()[:12])
        lines.append(f"  rerun: {c['repro']}")
    return "\n".join(lines)


def verdict_text(doc: dict) -> str:
    """CONFORMS; DOES NOT CONFORM; or, with no failure but missing capabilities, DOES NOT
    CONFORM with what was met (an unsupported clause is never a pass)."""
    if doc["conformant"]:
        used = sorted({n for c in doc["clauses"] for n in c.get("accepted") or []})
        if used:
            return ("conforms to torch's BatchNorm except for the accepted conventions: "
                    + "; ".join(f"{n} ({describe(n)})" for n in used))
        return "CONFORMS"
    verdicts = [c["verdict"] for c in doc["clauses"]]
    if "fail" in verdicts or "error" in verdicts or "not run" in verdicts:
        return "DOES NOT CONFORM"
    missing = verdicts.count("unsupported")
    return (f"DOES NOT CONFORM to the full torch contract: {missing} clause(s) unsupported; "
            "every supported clause passes")


def clause_reason(clause: dict) -> str:
    """The one-line reason of a clause: its worst record's reason, and how many distinct
    failures hypothesis found when there were several."""
    if "reason" not in clause:
        return _reason_from_detail(clause)
    if not clause["reason"]:
        return clause["title"]
    n = clause.get("failures", 0)
    return clause["reason"] + (f" (first of {n} distinct failures)" if n > 1 else "")


_GROUP = re.compile(r"\d+ distinct failures:")


def _reason_from_detail(clause: dict) -> str:
    """A clause of a document written before clauses had a ``reason`` field (the reports
    kept from earlier runs): the reason as it was shown then, from its detail text."""
    lines = [ln.strip().removesuffix(NOT_RETRIED) for ln in clause["detail"].strip().splitlines() if ln.strip()]
    if not lines:
        return clause["title"]
    if _GROUP.fullmatch(lines[0]) and len(lines) > 1:
        count = lines[0].split()[0]
        if count == "1":  # hypothesis' FlakyFailure: the failing case passed when repeated
            return f"flaky (passed when repeated): {lines[1]}"
        return f"{lines[1]} (first of {count} distinct failures)"
    return lines[0]
