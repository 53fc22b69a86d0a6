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

from bnspec.conventions import CONVENTIONS, atoms, describe
from bnspec.options import DTYPES
from bnspec.spec import CLAUSES

_SHAPE = re.compile(r"shape=\(([0-9, ]*)\)")


def failing(records: list[dict]) -> list[dict]:
    # a test never run (the candidate was given up before it) is no evidence of a cause
    return [r for r in records if r.get("outcome") == "failed" and not r.get("not_run")]


#: A convention's formula explains failures that show up as these too: under
#: ``stats_by_grad_mode`` an eval call with autograd on normalizes with the batch statistics;
#: under ``running_stats_in_training`` and ``stats_by_grad_mode`` a module without running
#: statistics (tracking off) behaves as torch's, so the replays find "passes with
#: track_running_stats=False".
IMPLIED_TEXT = {"stats_by_grad_mode": ("normalizes with the batch statistics in eval", "batch statistics in eval")}
#: A frozen layer never uses batch statistics, so it raises nothing a batch needs.
IMPLIED_CONVENTIONS = {"running_stats_in_training": ("no_error_one_value",)}
IMPLIED_DEPENDENCE = {"running_stats_in_training": {"tracking": "track_running_stats=False"},
                      "stats_by_grad_mode": {"tracking": "track_running_stats=False"}}


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
        gap = {id(r) for r in records if r.get("outcome") == "skipped"
               and "listed in the S5.1 contract finding" in str(r.get("detail", ""))}
        touched = sorted({r["clause"] for r in records if id(r) in gap}, key=_order)
        whole = [c for c in touched if all(id(r) in gap for r in records if r.get("clause") == c)]
        part = [c for c in touched if c not in whole]
        summary = "incomplete module contract: " + (contract.get("summary") or ", ".join(missing))
        if whole:
            summary += f" (so {', '.join(whole)} could not be checked: unsupported"
            summary += f"; {', '.join(part)} only in part)" if part else ")"
        elif part:
            summary += f" (so {', '.join(part)} could be checked only in part)"
        first = next(iter(missing.items()))
        more = f" (and {len(missing) - 1} more: 'contract' in the JSON)" if len(missing) > 1 else ""
        groups.append({"summary": summary, "convention": None, "records": mine, "gap": True,
                       "repro_text": f"{first[0]}: {first[1]}{more}"})
    named = _by_convention(rest)
    explained = {id(r) for g in named for r in g["records"]}
    rest = [r for r in rest if id(r) not in explained]
    found = _by_dependence([r for r in rest if _passes(r)])
    rest = [r for r in rest if not _passes(r)]
    for r in list(rest):  # a sequence (no single case to replay) that drew a failing value joins its cause
        home = [g for g in found if _drew_failing(r, g)]
        if len(home) == 1:
            home[0]["records"].append(r)
            rest.remove(r)
    by_text: dict[str, list[dict]] = {}
    for r in [r for r in rest if r.get("conventions")]:
        by_text.setdefault(r["conventions"][0], []).append(r)
    rest = [r for r in rest if not r.get("conventions")]
    text_groups = [{"summary": describe(name), "convention": None, "records": recs, "text": name}
                   for name, recs in by_text.items()]
    by_clause: dict[str, list[dict]] = {}
    for r in rest:
        by_clause.setdefault(r.get("clause") or "?", []).append(r)
    clause_groups = [{"summary": f"{cid} ({CLAUSES[cid].title if cid in CLAUSES else cid}): {_first_line(recs[0])}",
                      "convention": None, "records": recs} for cid, recs in by_clause.items()]
    groups += _merged(named + found + text_groups) + clause_groups
    out = [_entry(g, rerun) for g in groups]
    out.sort(key=lambda c: (-c["records"], _order(c["clauses"][0])))
    return out


def _by_convention(records: list[dict]) -> list[dict]:
    """One group per named convention. Each name a record carries explains one of its
    comparisons (all hold at once); a name whose value two conventions give alike (``a|b``)
    goes to the one that explains more comparisons on its own."""
    support: Counter = Counter()
    for r in records:
        for alts in named_alternatives(r):
            if len(alts) == 1:
                support.update(alts[0])
    groups: dict[str, list[dict]] = {}
    for r in records:
        for alts in named_alternatives(r):
            best = max(alts, key=lambda alt: (sum(support[c] for c in alt), -len(alt)))
            for name in best:
                if r not in groups.setdefault(name, []):
                    groups[name].append(r)
    return [{"summary": describe(name), "convention": name, "records": recs} for name, recs in groups.items()]


def named_alternatives(record: dict) -> list[list[list[str]]]:
    """Per name the record carries, its explanations by named conventions (each a list of
    conventions at once); names with none are left out."""
    out = []
    for name in record.get("conventions") or []:
        alts = [alt for alt in atoms(name) if all(c in CONVENTIONS for c in alt)]
        if alts:
            out.append(alts)
    return out


def _merged(groups: list[dict]) -> list[dict]:
    """Groups of the same convention as one; failures a convention implies (IMPLIED_*) join it."""
    by_name: dict[str, dict] = {}
    out = []
    for g in groups:
        name = g["convention"]
        if name is None:
            continue
        if name in by_name:
            by_name[name]["records"] += [r for r in g["records"] if r not in by_name[name]["records"]]
            if "depends" in g:
                by_name[name].setdefault("depends", g["depends"])
        else:
            by_name[name] = dict(g, records=list(g["records"]), summary=describe(name))
            out.append(by_name[name])
    for main, implied in IMPLIED_CONVENTIONS.items():
        for name in implied:
            if main in by_name and name in by_name:
                by_name[main]["records"] += [r for r in by_name[name]["records"] if r not in by_name[main]["records"]]
                out.remove(by_name.pop(name))
    for g in groups:
        if g["convention"] is not None:
            continue
        home = next((by_name[n] for n, texts in IMPLIED_TEXT.items()
                     if n in by_name and g.get("text", "").startswith(texts)), None)
        if home is None and "depends" in g:
            home = next((by_name[n] for n, dep in IMPLIED_DEPENDENCE.items() if n in by_name
                         and set(g["depends"]["features"]) == set(dep)
                         and all(v in g["depends"]["passing"].get(f, ()) for f, v in dep.items())), None)
        if home is not None:
            home["records"] += [r for r in g["records"] if r not in home["records"]]
        else:
            out.append(g)
    return out


def _entry(g: dict, rerun) -> dict:
    recs = g["records"]
    clauses = sorted({r.get("clause") or "?" for r in recs}, key=_order) or ["S5.1"]
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
        entry["depends"] = {k: v for k, v in g["depends"].items() if k in ("features", "detail")}
    return entry


def repro(record: dict) -> str:
    """Paste-able code that rebuilds the failing example: the case and every other labelled draw."""
    case = record.get("case")
    draws = {k: v for k, v in (record.get("draws") or {}).items() if k != "case" and not k.startswith("case (")}
    text = record.get("case_repro") or (f"from conformance.strategies import Case; case = {case}" if case else "")
    if draws:
        shown = ", ".join(f"{k!r}: {v}" for k, v in draws.items())
        text += ("; " if text else "") + f"draws = {{{shown}}}"
    return text or _first_line(record)


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
        # A value fails when any example failed with it; it passes when it never did.
        failing_values = {f: sorted((v for v in dict.fromkeys(fails[f]) if v), key=_canonical) for f in key}
        passing_values = {f: sorted((v for v in dict.fromkeys(passes[f]) if v not in failing_values[f]),
                                    key=_canonical) for f in key}
        parts = [dependence_text(f, failing_values[f], passing_values[f]) for f in sorted(key)]
        convention = "stats_by_grad_mode" if "grad mode" in key else None
        summary = describe(convention) + ": " + parts[0] if convention else "depends on " + \
            ", ".join(sorted(key)) + ": " + "; ".join(parts)
        groups.append({"summary": summary, "convention": convention, "records": recs,
                       "depends": {"features": sorted(key), "detail": "; ".join(parts), "failing": failing_values,
                                   "passing": passing_values}})
    return groups


def dependence_text(feature: str, failing: list[str], passing: list[str]) -> str:
    """One clause of a dependence: "fails only for channels_last and noncontiguous; contiguous
    passes" (the grad-mode variation has words of its own)."""
    if feature == "grad mode":
        return "statistics follow torch.is_grad_enabled(), not module.training: with autograd off in eval it passes"
    return f"fails only for {' and '.join(failing) or 'the drawn ' + feature}; {', '.join(passing)} passes"


#: The order values are listed in (others keep the order they were seen in).
_VALUE_ORDER = ("contiguous", "channels_last", "noncontiguous", *DTYPES)


def _canonical(value: str) -> int:
    return _VALUE_ORDER.index(value) if value in _VALUE_ORDER else len(_VALUE_ORDER)


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


def conventions_followed(doc: dict) -> tuple[list[str], list[str]]:
    """The known conventions a check's failures matched, and the failing clauses they named:
    what ``--accept`` takes to show what is left once the candidate's own conventions are
    allowed (both alternatives of ``a|b``, which give the same values, every part of ``a+b``)."""
    names: list[str] = []
    clauses: list[str] = []
    failed = {c["id"] for c in doc["clauses"] if c["verdict"] == "fail"}
    for r in failing(doc["records"]):
        found = [part for name in r.get("conventions") or [] for alt in atoms(name) for part in alt
                 if part in CONVENTIONS]
        names += [n for n in found if n not in names]
        if found and r.get("clause") in failed and r["clause"] not in clauses:
            clauses.append(r["clause"])
    return names, [c for c in CLAUSES if c in clauses]

