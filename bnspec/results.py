"""From per-test records to per-clause verdicts, and the JSON document ``bnspec check`` writes.

Schema ``bnspec.check/1`` (``--json FILE``)::

    {
      "schema": "bnspec.check/1",
      "conformant": true | false,          # every clause pass (or n/a), none narrowed away
      "candidate": {"target": str, "dims": [int]},
      "versions": {"bnspec": str, "torch": str, "python": str, "hypothesis": str},
      "profile": "quick" | "ci" | "thorough", "seed": int | null,
      "narrowed": {"dtypes": [str]} | null,  # the user narrowed the contract
      "command": str,                      # reruns exactly this check
      "clauses": [{
          "id": "S1.1", "title": str,
          "verdict": "pass" | "fail" | "unsupported" | "error" | "n/a",
          "detail": str,                   # why (first failure, or the missing capability)
          "repro": str | null,             # command + case for a failure
          "worst_error_over_bound": float | null,
          "tests": int                     # test items run for the clause
      }],
      "records": [...]                     # one per test item (timings live only here)
    }

``fail`` means the candidate did something the spec forbids (including raising where
torch returns a result, crashing, hanging); ``error`` means the check itself could not run
(for example the candidate process could not be started for that test).
"""

from __future__ import annotations

import math
import platform
import shlex
from collections import defaultdict

from bnspec.spec import CLAUSES

SCHEMA = "bnspec.check/1"
ORDER = {"fail": 0, "error": 1, "unsupported": 2, "pass": 3, "n/a": 4}


def versions() -> dict:
    import hypothesis
    import torch

    import bnspec

    return {"bnspec": bnspec.__version__, "torch": torch.__version__,
            "python": platform.python_version(), "hypothesis": hypothesis.__version__}


def record_verdict(rec: dict) -> str:
    if rec["outcome"] == "passed":
        return "pass"
    if rec["outcome"] == "skipped":
        return "n/a" if str(rec.get("detail", "")).startswith("not applicable") else "unsupported"
    return "error" if rec.get("phase") == "setup" else "fail"


def clause_verdicts(records: list[dict], *, command: str) -> list[dict]:
    """One entry per clause that had tests, worst verdict first within the clause."""
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
            repro = f"{command} --dims {worst_rec.get('dims')} --clauses {cid}"
        out.append({
            "id": cid,
            "title": CLAUSES[cid].title if cid in CLAUSES else "",
            "verdict": verdict,
            "detail": detail,
            "repro": repro,
            "worst_error_over_bound": worst,
            "tests": len(recs),
        })
    return out


def conformant(clauses: list[dict]) -> bool:
    return bool(clauses) and all(c["verdict"] in ("pass", "n/a") for c in clauses)


def check_command(target: str, *, profile: str, seed: int | None, device: str,
                  dtypes: list[str] | None) -> str:
    parts = ["bnspec", "check", target, "--profile", profile]
    if seed is not None:
        parts += ["--seed", str(seed)]
    if device != "cpu":
        parts += ["--device", device]
    if dtypes:
        parts += ["--dtypes", ",".join(dtypes)]
    return shlex.join(parts)


def document(*, target: str, dims: list[int], profile: str, seed: int | None, device: str,
             dtypes: list[str] | None, records: list[dict]) -> dict:
    command = check_command(target, profile=profile, seed=seed, device=device, dtypes=dtypes)
    clauses = clause_verdicts(records, command=command)
    return {
        "schema": SCHEMA,
        "conformant": conformant(clauses),
        "candidate": {"target": target, "dims": dims},
        "versions": versions(),
        "profile": profile,
        "seed": seed,
        "device": device,
        "narrowed": {"dtypes": dtypes} if dtypes else None,
        "command": command,
        "clauses": clauses,
        "records": records,
    }


def format_table(doc: dict, *, width: int = 100) -> str:
    """The human table: clause, verdict, worst error/bound, reason."""
    lines = [f"bnspec check {doc['candidate']['target']}  (dims {','.join(map(str, doc['candidate']['dims']))}, "
             f"profile {doc['profile']}, seed {doc['seed'] if doc['seed'] is not None else 'derandomized'})"]
    if doc.get("narrowed"):
        lines.append(f"contract NARROWED by the user: dtypes {','.join(doc['narrowed']['dtypes'])}")
    lines.append(f"{'clause':7} {'verdict':12} {'err/bound':>9}  reason")
    for c in doc["clauses"]:
        w = c["worst_error_over_bound"]
        ws = "" if w is None else (w if isinstance(w, str) else f"{w:.3g}")
        reason = (c["detail"].strip().splitlines() or [c["title"]])[0] if c["verdict"] != "pass" else c["title"]
        lines.append(f"{c['id']:7} {c['verdict']:12} {ws:>9}  {reason[: width - 32]}")
    verdict = "CONFORMS" if doc["conformant"] else "DOES NOT CONFORM"
    lines.append(f"verdict: {verdict}")
    failing = [c for c in doc["clauses"] if c["verdict"] in ("fail", "error")]
    for c in failing:
        lines.append(f"\n{c['id']} {c['title']}:")
        lines.extend("  " + ln for ln in c["detail"].strip().splitlines()[:12])
        lines.append(f"  rerun: {c['repro']}")
    return "\n".join(lines)
