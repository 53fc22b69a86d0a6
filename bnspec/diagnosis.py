"""From failing records to causes: once per cause, ranked, each with its smallest reproduction.

A failure belongs to a cause when
* it is the discovered contract gap (the S5.1 finding: missing keywords, buffers, methods);
* its result matches a named convention's formula within the bound (``conventions``
  recorded by the judge), one cause per convention;
* it depends on the same features as others (the diagnosis' replays: "fails only for
  channels_last and noncontiguous input; contiguous passes"); a grad-mode dependence is
  the ``stats_by_grad_mode`` convention;
* otherwise it is its clause's own cause, described by its first line.

Causes are ranked by the number of failing test items they explain.
"""

from __future__ import annotations

import math
import re
from collections import Counter

from bnspec.conventions import CONVENTIONS, describe
from bnspec.spec import CLAUSES

_SHAPE = re.compile(r"shape=\(([0-9, ]*)\)")


def failing(records: list[dict]) -> list[dict]:
    return [r for r in records if r.get("outcome") == "failed"]


def causes(records: list[dict], contract: dict | None, rerun) -> list[dict]:
    """``[{"summary", "convention", "clauses", "records", "repro", "rerun", "depends"?}]``, the
    cause that explains the most failing records first. ``rerun(clause_ids)`` gives the command
    that reruns those clauses."""
    groups: list[dict] = []
    rest = failing(records)
    missing = (contract or {}).get("missing") or {}
    if missing:
        mine = [r for r in rest if r.get("clause") == "S5.1"]
        rest = [r for r in rest if r not in mine]
        unsupported = sorted({r["clause"] for r in records if r.get("outcome") == "skipped"
                              and "listed in the S5.1 contract finding" in str(r.get("detail", ""))}, key=_order)
        summary = "incomplete module contract: " + (contract.get("summary") or ", ".join(missing))
        if unsupported:
            summary += f" (so {', '.join(unsupported)} could not be checked: unsupported)"
        groups.append({"summary": summary, "convention": None, "records": mine or [], "gap": True,
                       "repro_text": "the constructor and module as discovered (see 'contract' in the JSON)"})
    by_convention: dict[str, list[dict]] = {}
    for r in rest:
        for name in _atoms(r.get("conventions") or []):
            by_convention.setdefault(name, []).append(r)
    explained = {id(r) for recs in by_convention.values() for r in recs}
    for name, recs in by_convention.items():
        groups.append({"summary": describe(name), "convention": name if name in CONVENTIONS else None,
                       "records": recs})
    rest = [r for r in rest if id(r) not in explained]
    found = _by_dependence([r for r in rest if _passes(r)])
    rest = [r for r in rest if not _passes(r)]
    for r in list(rest):  # a sequence (no single case to replay) that drew a failing value joins its cause
        home = [g for g in found if _drew_failing(r, g)]
        if len(home) == 1:
            home[0]["records"].append(r)
            rest.remove(r)
    groups += found
    by_clause: dict[str, list[dict]] = {}
    for r in rest:
        by_clause.setdefault(r.get("clause") or "?", []).append(r)
    for cid, recs in by_clause.items():
        title = CLAUSES[cid].title if cid in CLAUSES else cid
        groups.append({"summary": f"{cid} ({title}): {_first_line(recs[0])}", "convention": None, "records": recs})
    out = []
    for g in groups:
        recs = g["records"]
        clauses = sorted({r.get("clause") or "?" for r in recs}, key=_order)
        if g.get("gap") and not clauses:
            clauses = ["S5.1"]
        small = _smallest(recs)
        entry = {
            "summary": g["summary"],
            "convention": g["convention"],
            "clauses": clauses,
            "records": len(recs) or 1,
            "repro": g.get("repro_text") or (repro(small) if small else "(no drawn case: rerun the clause)"),
            "rerun": rerun(clauses),
        }
        if "depends" in g:
            entry["depends"] = g["depends"]
        out.append(entry)
    out.sort(key=lambda c: (-c["records"], _order(c["clauses"][0])))
    return out


def repro(record: dict) -> str:
    """Paste-able code that rebuilds the failing example: the case and every other labelled draw."""
    case = record.get("case")
    draws = {k: v for k, v in (record.get("draws") or {}).items() if k != "case"}
    text = f"from conformance.strategies import Case; case = {case}" if case else ""
    if draws:
        shown = ", ".join(f"{k!r}: {v}" for k, v in draws.items())
        text += ("; " if text else "") + f"draws = {{{shown}}}"
    return text or _first_line(record)


def _atoms(names: list[str]) -> list[str]:
    out = []
    for name in names:
        for part in name.split("+"):
            if part not in out:
                out.append(part)
    return out


def _passes(record: dict) -> bool:
    dep = record.get("depends")
    return bool(dep and dep.get("passes_when"))


def _by_dependence(records: list[dict]) -> list[dict]:
    """One group per set of features whose change makes the failure pass; a record whose set
    contains a more common group's set joins that group (one layout bug, one cause)."""
    keys = {id(r): frozenset(r["depends"]["passes_when"]) for r in records}
    freq = Counter(keys.values())
    assigned: dict[frozenset, list[dict]] = {}
    for r in records:
        own = keys[id(r)]
        best = max((k for k in freq if k <= own), key=lambda k: (freq[k], -len(k)))
        assigned.setdefault(best, []).append(r)
    groups = []
    for key, recs in assigned.items():
        passes: dict[str, list[str]] = {}
        fails: dict[str, list[str]] = {}
        for r in recs:
            for feature in key:
                passes.setdefault(feature, []).extend(r["depends"]["passes_when"].get(feature, []))
                fails.setdefault(feature, []).extend(r["depends"]["fails_when"].get(feature, []))
                fails[feature].append(r["depends"].get("now", {}).get(feature, ""))
        parts = []
        for feature in sorted(key):
            # A value fails when any example failed with it; it passes when it never did.
            bad = [v for v in dict.fromkeys(fails[feature]) if v]
            ok = [v for v in dict.fromkeys(passes[feature]) if v not in bad]
            if feature == "grad mode":
                parts.append("statistics follow torch.is_grad_enabled(), not module.training: with autograd "
                             "off in eval it passes")
            else:
                parts.append(f"fails only for {' and '.join(bad) or 'the drawn ' + feature}; {', '.join(ok)} passes")
        convention = "stats_by_grad_mode" if "grad mode" in key else None
        summary = describe(convention) + ": " + parts[0] if convention else "depends on " + \
            ", ".join(sorted(key)) + ": " + "; ".join(parts)
        failing_values = {f: [v for v in dict.fromkeys(fails[f]) if v] for f in key}
        groups.append({"summary": summary, "convention": convention, "records": recs,
                       "depends": {"features": sorted(key), "detail": "; ".join(parts), "failing": failing_values}})
    return groups


#: replay feature -> the label under which a sequence test draws it
_LABELS = {"layout": "layout", "dtype": "dtype"}


def _drew_failing(record: dict, group: dict) -> bool:
    draws = record.get("draws") or {}
    features = group["depends"]["features"]
    if not features or any(f not in _LABELS for f in features):
        return False
    return all(str(draws.get(_LABELS[f], "")).strip("'\"") in group["depends"]["failing"].get(f, ())
               for f in features)


def _smallest(records: list[dict]) -> dict | None:
    with_case = [r for r in records if r.get("case")]
    if not with_case:
        return records[0] if records else None
    return min(with_case, key=lambda r: (_numel(r["case"]), len(r.get("draws") or {})))


def _numel(case: str) -> int:
    m = _SHAPE.search(case)
    if not m:
        return 1 << 62
    return math.prod(int(v) for v in m.group(1).split(",") if v.strip())


def _order(cid: str) -> int:
    ids = list(CLAUSES)
    return ids.index(cid) if cid in ids else len(ids)


def _first_line(record: dict) -> str:
    lines = [ln.strip() for ln in str(record.get("detail", "")).splitlines() if ln.strip()]
    return lines[0][:300] if lines else "failed"
