"""Tables, plots, ``summary.md`` and ``report.html`` from a ``bnspec.report/1`` document.

Every table is a pandas DataFrame built here and only here; the notebooks' accuracy and
timing reports import these functions, so the numbers in a notebook and in ``reports/``
come from one place.
"""

from __future__ import annotations

import base64
import html
import io
import math
import os

import pandas as pd

from bnspec.conventions import CONVENTIONS
from bnspec.options import DTYPES
from bnspec.diagnosis import conventions_followed
from bnspec.results import clause_reason, conformant, verdict_text
from bnspec.spec import CLAUSES
from bnspec.report.timing import forward_bytes

#: The clauses whose comparisons measure accuracy on finite data (values against the
#: float64 oracle, or against the candidate's own accepted convention); the others judge
#: shapes, state, errors and edge cases. Special values (NaN, inf) are judged by S7.3, a
#: column of its own, so that a NaN-propagation difference does not read as inaccuracy.
VALUE_CLAUSES = ("S1.1", "S2.1", "S2.2", "S3.1", "S3.2", "S4.1", "S4.2", "S4.3", "S4.4", "S7.1", "S7.2", "S7.4",
                 "G1")
SPECIAL_VALUES = "S7.3"
VIEWS = ("strict", "modulo")  #: against torch; with the candidate's own conventions accepted

VERDICT_COLOURS = {"pass": "#d7f0d2", "fail": "#f6c9c4", "error": "#f3b07a", "not run": "#fbe7a6",
                   "unsupported": "#e4e4e4",
                   "n/a": "#f7f7f7", "unusable": "#cfcfcf"}


def _ratio(v) -> float:
    """error/bound as a float (``"inf"`` and None included: inf and NaN)."""
    if v is None:
        return math.nan
    return math.inf if v == "inf" else float(v)


def conventions_named(texts) -> str:
    """The known conventions a failure's text names, e.g. ``momentum_on_old+biased_running_var``
    (for results written before records carried their conventions)."""
    found = [name for name, words in CONVENTIONS.items() if any(words in t for t in texts)]
    return "+".join(found)


def record_conventions(records: list[dict]) -> str:
    """The known conventions failing records matched, as the judge recorded them: ``a+b`` both
    at once, ``a or b`` either (the same values); falls back to the text for older results."""
    shown: list[str] = []
    for r in records:
        for name in r.get("conventions") or []:
            alts = [a for a in name.split("|") if all(p in CONVENTIONS for p in a.split("+"))]
            text = " or ".join(alts)
            if text and text not in shown:
                shown.append(text)
    if shown or any("conventions" in r for r in records):
        return "; ".join(shown)
    return conventions_named([r.get("detail", "") for r in records])


def checked(entry: dict, view: str = "strict") -> dict | None:
    """A candidate's check document in ``view``: ``strict`` as checked against torch;
    ``modulo`` with the re-checked clauses (its own conventions accepted, see
    :func:`bnspec.report.run.modulo_conventions`) in place of the strict ones."""
    doc = entry.get("check")
    again = (entry.get("modulo_conventions") or {}).get("check")
    if doc is None or view == "strict" or not again:
        return doc
    redone = set(entry["modulo_conventions"]["clauses"])
    by_id = {c["id"]: c for c in again["clauses"]}
    clauses = [by_id.get(c["id"], c) if c["id"] in redone else c for c in doc["clauses"]]
    records = [r for r in doc["records"] if r.get("clause") not in redone] + again["records"]
    return {**doc, "clauses": clauses, "records": records, "accept": entry["modulo_conventions"]["accept"],
            "conformant": conformant(clauses)}


def conformance_frame(report: dict, view: str = "strict") -> pd.DataFrame:
    """One row per (candidate, clause): verdict, worst error/bound, convention followed instead
    (``view``: see :func:`checked`; accepted conventions are listed under ``accepted``)."""
    rows = []
    for e in report["candidates"]:
        if e["status"] != "checked":
            rows.append({"candidate": e["target"], "clause": "(all)", "title": "", "verdict": "unusable",
                         "error_over_bound": math.nan, "convention": "", "accepted": "", "detail": e["reason"]})
            continue
        doc = checked(e, view)
        for c in doc["clauses"]:
            failures = _clause_failures(doc, c["id"]) if c["verdict"] == "fail" else []
            rows.append({"candidate": e["target"], "clause": c["id"], "title": c["title"], "verdict": c["verdict"],
                         "error_over_bound": _ratio(c["worst_error_over_bound"]),
                         "convention": record_conventions(failures) if failures else "",
                         "accepted": "+".join(c.get("accepted") or []),
                         "detail": reason(c, 300)})
    return pd.DataFrame(rows, columns=["candidate", "clause", "title", "verdict", "error_over_bound",
                                       "convention", "accepted", "detail"])


def _clause_failures(doc: dict, clause: str) -> list[dict]:
    return [r for r in doc["records"] if r.get("clause") == clause and r.get("outcome") == "failed"]


def verdict_matrix(report: dict, view: str = "strict") -> pd.DataFrame:
    """candidate x clause -> verdict (with the convention in brackets when one is named)."""
    df = conformance_frame(report, view)
    df = df[df["clause"] != "(all)"]
    cell = df["verdict"] + df["convention"].map(lambda c: f" ({c})" if c else "")
    order = [c for c in CLAUSES if c in set(df["clause"])]
    candidates = list(dict.fromkeys(df["candidate"]))  # the report's order (torch first), not sorted
    return (df.assign(cell=cell).pivot(index="candidate", columns="clause", values="cell")
            .reindex(index=candidates, columns=order).fillna("-"))


def _by_clause(matrix: pd.DataFrame) -> pd.DataFrame:
    """The matrix with one row per clause (there are more clauses than candidates) and its title."""
    out = matrix.T
    out.insert(0, "title", [CLAUSES[c].title if c in CLAUSES else "" for c in out.index])
    return out


def accuracy_frame(report: dict, view: str = "strict") -> pd.DataFrame:
    """One row per (candidate, clause, input dtype): the worst error/bound of its comparisons."""
    rows = []
    for e in report["candidates"]:
        if e["status"] != "checked":
            continue
        for r in checked(e, view)["records"]:
            for dtype, v in (r.get("error_over_bound_by_dtype") or {}).items():
                rows.append({"candidate": e["target"], "clause": r.get("clause"), "dtype": dtype,
                             "error_over_bound": _ratio(v)})
    df = pd.DataFrame(rows, columns=["candidate", "clause", "dtype", "error_over_bound"])
    return (df.groupby(["candidate", "clause", "dtype"], as_index=False)["error_over_bound"]
            .agg(lambda s: s.max(skipna=False)))


def accuracy_by_dtype(report: dict) -> pd.DataFrame:
    """candidate x dtype -> worst error/bound over the value clauses on finite data, each judged
    against the candidate's own convention where it follows one (the ``modulo`` view; > 1 is
    really off), and the special-values clause's verdict (S7.3) as its own column."""
    df = accuracy_frame(report, "modulo")
    df = df[df["clause"].isin(VALUE_CLAUSES)]
    dtypes = [d for d in DTYPES if d in set(df["dtype"])]
    table = (df.pivot_table(index="candidate", columns="dtype", values="error_over_bound", aggfunc="max",
                            dropna=False).reindex(columns=dtypes)
             if not df.empty else pd.DataFrame(columns=dtypes))
    special = conformance_frame(report, "modulo")
    special = special[special["clause"] == SPECIAL_VALUES].set_index("candidate")["verdict"]
    present = set(table.index) | set(special.index)
    table = table.reindex([e["target"] for e in report["candidates"] if e["target"] in present])
    table.columns.name = None
    if not special.empty:
        table[f"special values ({SPECIAL_VALUES})"] = special.reindex(table.index).fillna("-")
    table.index.name = "candidate"
    return table


def timing_frame(report: dict) -> pd.DataFrame:
    """One row per timed forward: median, effective GB/s, fraction of the measured copy bandwidth."""
    bw = (report.get("bandwidth") or {}).get("gb_per_s")
    rows = []
    for e in report["candidates"]:
        for t in e.get("timing") or []:
            gbs = (forward_bytes(tuple(t["shape"]), t["dtype"]) / t["median_s"] / 1e9
                   if t.get("median_s") else math.nan)
            rows.append({"candidate": e["target"], "dims": t["dims"], "shape": "x".join(map(str, t["shape"])),
                         "dtype": t["dtype"], "layout": t["layout"], "mode": t["mode"], "status": t["status"],
                         "median_ms": t["median_s"] * 1e3 if t.get("median_s") else math.nan,
                         "iqr_ms": t["iqr_s"] * 1e3 if t.get("iqr_s") is not None else math.nan,
                         "gb_per_s": gbs, "fraction_of_copy_bw": gbs / bw if bw else math.nan,
                         "detail": t.get("detail", "")})
    df = pd.DataFrame(rows, columns=["candidate", "dims", "shape", "dtype", "layout", "mode", "status",
                                     "median_ms", "iqr_ms", "gb_per_s", "fraction_of_copy_bw", "detail"])
    key = ["dims", "shape", "dtype", "layout", "mode"]
    torch_ms = df[df["candidate"] == "torch"].set_index(key)["median_ms"]
    ratio = [row.median_ms / torch_ms.get(tuple(getattr(row, k) for k in key), math.nan) for row in df.itertuples()]
    df.insert(df.columns.get_loc("gb_per_s"), "time_vs_torch", ratio)
    return df


def timing_relative(report: dict) -> pd.DataFrame:
    """candidate x configuration -> median time / torch's median time for the same forward
    (measured in the same run; > 1 is slower than torch). Empty without a timed torch."""
    df = timing_frame(report)
    df = df[df["status"] == "timed"]
    if df.empty or "torch" not in set(df["candidate"]):
        return pd.DataFrame()
    df = df.assign(config=df["dims"].astype(str) + "d " + df["mode"] + " " + df["layout"] + " " + df["shape"])
    table = df.pivot_table(index="candidate", columns="config", values="median_ms", aggfunc="first")
    return table.div(table.loc["torch"], axis="columns")


def _verdict(doc: dict, clause: str) -> str:
    return next((c["verdict"] for c in doc["clauses"] if c["id"] == clause), "-")


def _number(v) -> str:
    return "-" if v is None else f"{v:.3g}"


def conventions_row(entry: dict) -> dict:
    """What a candidate does where frameworks differ, measured: its defaults read from its own
    API by the adapter (``native``), every other cell from the check (the conventions its
    failures matched, the clauses that passed). "-" where the check could not tell."""
    doc, native = entry["check"], entry.get("native") or {}
    mod = checked(entry, "modulo")
    conv = set(conventions_followed(doc)[0])
    weights = native.get("momentum_weights")
    if weights and "momentum_on_old" in conv:
        weights = "old" if weights == "new" else "new"  # the candidate blends the other way round
    if _verdict(mod, "S3.1") == "unsupported":
        weights = None
    elif weights and _verdict(mod, "S3.1") != "pass":
        weights += " (S3.1 fails: unconfirmed)"
    s31 = _verdict(mod, "S3.1")
    running = ("biased" if "biased_running_var" in conv else "unbiased" if s31 == "pass" else
               "-" if s31 in ("unsupported", "-") else "? (S3.1 fails)")
    variance = ("one-pass E[x^2]-E[x]^2" if "one_pass_variance" in conv else
                "two-pass" if _verdict(mod, "S1.1") == "pass" and _verdict(mod, "S7.2") == "pass" else "?")
    dtypes = (entry.get("capabilities") or {}).get("dtypes") or []
    float64 = ("not offered" if "float64" not in dtypes else
               "float32 accuracy only" if "float32_for_float64" in conv else "float64")
    if native.get("float64") and "float64" in dtypes:
        float64 += f"; {native['float64']}"
    s61 = _verdict(doc, "S6.1")
    one_value = ("raises ValueError" if s61 == "pass" else "no error" if "no_error_one_value" in conv else
                 "-" if s61 in ("unsupported", "-") else f"{s61}: " + _first_line(doc, "S6.1"))
    # what else is wrong in the empty-batch clauses shows once the other conventions are accepted
    s15, s36 = _verdict(mod, "S1.5"), _verdict(mod, "S3.6")
    empty = ("NaN running statistics" if "nan_stats_empty_batch" in conv else
             "empty output, statistics kept" if s15 == "pass" and s36 == "pass" else
             f"S1.5 {s15}: " + _first_line(mod, "S1.5") if s15 not in ("pass", "unsupported", "-") else
             f"S3.6 {s36}: " + _first_line(mod, "S3.6") if s36 not in ("pass", "unsupported", "-") else "-")
    return {"candidate": entry["target"], "layer": native.get("layer", "-"),
            "default eps": _number(native.get("eps")), "default momentum": _number(native.get("momentum")),
            "momentum weights": weights or "-", "running variance": running, "batch variance": variance,
            "float64": float64, "one value per channel": one_value, "empty batch": empty,
            "settings": "; ".join(f"{k}: {v}" for k, v in (native.get("settings") or {}).items()) or "-",
            "conventions accepted": ", ".join((entry.get("modulo_conventions") or {}).get("accept") or []) or "-"}


def reason(clause: dict, limit: int = 120) -> str:
    """A clause's one-line reason (:func:`bnspec.results.clause_reason`), empty for a clause
    without a detail (a pass)."""
    return clause_reason(clause)[:limit] if clause["detail"].strip() else ""


def _first_line(doc: dict, clause: str) -> str:
    c = next((c for c in doc["clauses"] if c["id"] == clause), None)
    return reason(c) if c else ""


def conventions_frame(report: dict) -> pd.DataFrame:
    """One row per checked candidate: :func:`conventions_row`."""
    return pd.DataFrame([conventions_row(e) for e in report["candidates"] if e["status"] == "checked"])


def capabilities_frame(report: dict) -> pd.DataFrame:
    rows = []
    for e in report["candidates"]:
        caps = e.get("capabilities") or {}
        row = {"candidate": e["target"], "status": e["status"]}
        for k, v in caps.items():
            row[k] = ", ".join(map(str, v)) if isinstance(v, list) else v
        rows.append(row)
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------- plots


def accuracy_figure(report: dict):
    """Heat map of log10(worst error/bound), candidate x dtype; the colour scale's 0 is the
    bound. None when nothing was compared."""
    import matplotlib.pyplot as plt
    import numpy as np

    table = accuracy_by_dtype(report)
    table = table[[c for c in table.columns if c in DTYPES]].dropna(how="all")
    if table.empty or table.shape[1] == 0:
        return None
    values = np.log10(table.to_numpy(dtype=float).clip(1e-6, 1e6))
    fig, ax = plt.subplots(figsize=(3.5 + 1.2 * table.shape[1], 1.4 + 0.45 * table.shape[0]))
    im = ax.imshow(values, cmap="RdYlGn_r", vmin=-6, vmax=6, aspect="auto")
    ax.set_xticks(range(table.shape[1]), table.columns)
    ax.set_yticks(range(table.shape[0]), table.index)
    for (i, j), v in np.ndenumerate(table.to_numpy(dtype=float)):
        ax.text(j, i, "-" if math.isnan(v) else f"{v:.2g}", ha="center", va="center", fontsize=8)
    ax.set_xlabel("input dtype")
    ax.set_ylabel("candidate")
    ax.set_title("worst error/bound over the value clauses, own conventions accepted\n"
                 "(> 1 is really off; colours clipped to 1e-6..1e6)")
    fig.colorbar(im, ax=ax, label="log10(error/bound)")
    fig.tight_layout()
    return fig


def timing_figure(report: dict):
    """Two panels per candidate and configuration: the forward's time relative to torch's (log
    scale, measured side by side in one run) and its effective throughput as a fraction of the
    measured copy bandwidth. None when nothing was timed."""
    import matplotlib.pyplot as plt

    df = timing_frame(report)
    df = df[df["status"] == "timed"]
    if df.empty:
        return None
    df = df.assign(config=df["dims"].astype(str) + "d " + df["mode"] + " " + df["layout"])
    fraction = df.pivot_table(index="candidate", columns="config", values="fraction_of_copy_bw")
    # barh draws the first row at the bottom: reversed, torch reads first from the top
    fraction = fraction.reindex([e["target"] for e in report["candidates"] if e["target"] in fraction.index][::-1])
    relative = timing_relative(report)
    if not relative.empty:
        relative.columns = [" ".join(c.split(" ")[:3]) for c in relative.columns]
        relative = relative.reindex(fraction.index)
    panels = 2 if not relative.empty else 1
    fig, axes = plt.subplots(1, panels, figsize=(7 * panels, 2.0 + 0.45 * len(fraction)), sharey=True,
                             squeeze=False)
    if panels == 2:
        relative.plot.barh(ax=axes[0][0], width=0.8, logx=True, legend=False)
        axes[0][0].axvline(1.0, color="black", linestyle="--")
        axes[0][0].set_xlabel("time / torch's time (log; < 1 faster than torch)")
        axes[0][0].set_title("forward time relative to torch")
    ax = axes[0][panels - 1]
    fraction.plot.barh(ax=ax, width=0.8)
    ax.axvline(1.0, color="black", linestyle="--")
    bw = (report.get("bandwidth") or {}).get("gb_per_s")
    ax.set_xlabel("effective GB/s / copy bandwidth" + (f" ({bw:.1f} GB/s)" if bw else ""))
    ax.set_title("throughput relative to the measured bandwidth")
    axes[0][0].set_ylabel("candidate")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), title="configuration", title_fontsize=7)
    fig.tight_layout()
    return fig


def save_figure(make, report: dict, path: str) -> bool:
    """Render ``make(report)`` to a PNG without a display; False when there is nothing to plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = make(report)
    if fig is None:
        return False
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# ----------------------------------------------------------------------------- documents


def _duration(seconds) -> str:
    if seconds is None:
        return "?"
    minutes = round(seconds / 60)
    return f"{minutes // 60} h {minutes % 60:02d} min" if minutes >= 60 else f"{max(minutes, 1)} min"


def header_lines(report: dict) -> list[str]:
    s, v, m = report["settings"], report["versions"], report["machine"]
    bw = report.get("bandwidth") or {}
    spent = [e.get("elapsed_s") for e in report["candidates"]]
    kept = sum(1 for e in report["candidates"] if e.get("kept"))
    took = (f" The candidates' checks and timings took {_duration(sum(t for t in spent if t))}, summed over "
            "the candidates" + (f" ({kept} of {len(spent)} checked by earlier runs with the same settings, "
                                "possibly several at once, and kept)" if kept else "") + "."
            if any(spent) else "")
    lines = ["# bnspec conformance report", "",
             f"Command: `{report['command']}`  ",
             f"Generated {report.get('date', '?')}. "
             f"Profile {s['profile']}, seed {s['seed'] if s['seed'] is not None else 'derandomized'}, "
             f"device {s['device']}; bnspec {v['bnspec']}"
             + (f" (commit {report['commit']})" if report.get("commit") else "")
             + f", torch {v['torch']}, Python {v['python']}, "
             f"hypothesis {v['hypothesis']}.{took}  ",
             f"Machine: {m['system']} {m['machine']}, {m['cpu_count']} CPUs, {m['torch_threads']} torch threads, "
             f"{m.get('memory_gib')} GiB" + (f", GPU {m['gpu']}" if m.get("gpu") else "") + "."]
    if bw:
        lines.append(f"Measured copy bandwidth ({bw['device']}, {bw['threads']} thread(s)): {bw['gb_per_s']:.1f} GB/s; "
                     f"load average {m.get('load_average_at_start')} at the start, "
                     f"{m.get('load_average_at_end')} at the end.")
        fractions = timing_frame(report)["fraction_of_copy_bw"]
        if (fractions > 1).any():
            lines.append("Some fractions exceed 1: those inputs fit in the CPU's caches (the small shapes of a "
                         "quick or CI run), which the copy's buffer is sized to miss; time at full size to "
                         "compare with memory bandwidth.")
    return lines


def _counts(doc: dict) -> str:
    counts = pd.Series([c["verdict"] for c in doc["clauses"]]).value_counts().to_dict()
    return ", ".join(f"{n} {k}" for k, n in sorted(counts.items()))


def _left(doc: dict, limit: int = 4) -> str:
    """The clauses that still do not pass, each with its reason's first words."""
    bad = [c for c in doc["clauses"] if c["verdict"] in ("fail", "error", "not run")]
    if not bad:
        return "nothing left: every supported clause passes"
    shown = [f"{c['id']} {c['verdict']} ({reason(c, 90) or c['title']})" for c in bad[:limit]]
    more = f"; and {len(bad) - limit} more" if len(bad) > limit else ""
    return f"{len(bad)} clause(s) left: " + "; ".join(shown) + more


def candidate_summary(report: dict, entry: dict) -> list[str]:
    """2 to 4 lines: conventions, verdicts (strict and modulo conventions), accuracy, speed."""
    name = entry["target"]
    if entry["status"] != "checked":
        return [f"- **{name}**: cannot be used: {entry['reason']}"]
    doc, mod = entry["check"], checked(entry, "modulo")
    row = conventions_row(entry)
    dims = doc["candidate"]["dims"]
    families = "" if len(dims) == 3 else f"; checked: {', '.join(f'BatchNorm{d}d' for d in dims)} only"
    weights = row["momentum weights"].split(" ")[0]
    own_defaults = (f"; defaults eps {row['default eps']}, momentum {row['default momentum']}"
                    + (f" weighting the {weights} value" if weights != "-" else "")) if entry.get("native") else ""
    lines = [f"- **{name}** ({row['layer']}{own_defaults}{families})"]
    mc = entry.get("modulo_conventions") or {}
    own = mc.get("accept") or []
    if own:
        lines.append(f"  - conventions: {', '.join(own)}; modulo these (`--accept {','.join(own)}`): "
                     + (_left(mod) if mc.get("check") else f"not re-checked ({mc.get('reason')})"))
    lines.append(f"  - against torch: {verdict_text(doc)} ({_counts(doc)})"
                 + ("" if own else f"; {_left(doc)}" if not doc["conformant"] else ""))
    acc = accuracy_by_dtype(report)
    worst = accuracy_frame(report, "modulo")
    worst = worst[(worst["candidate"] == name) & worst["clause"].isin(VALUE_CLAUSES)]
    if name in acc.index:
        def where(d: str) -> str:  # the clause of a value out of its bound
            off = worst[(worst["dtype"] == d) & (worst["error_over_bound"] > 1)].sort_values("error_over_bound")
            return f" ({off['clause'].iloc[-1]})" if not off.empty else ""

        cells = [f"{d} {_cell(acc.loc[name, d])}{where(d)}" for d in acc.columns if d.startswith(("float", "bfloat"))
                 and not (isinstance(acc.loc[name, d], float) and math.isnan(acc.loc[name, d]))]
        special = [c for c in acc.columns if c.startswith("special")]
        extra = f"; special values (S7.3): {acc.loc[name, special[0]]}" if special else ""
        lines.append("  - accuracy, worst error/bound (<= 1 within the bound): " + (", ".join(cells) or "-") + extra)
    rel = timing_relative(report)
    fractions = timing_frame(report)
    fractions = fractions[(fractions["candidate"] == name) & (fractions["status"] == "timed")]["fraction_of_copy_bw"]
    if name in rel.index and rel.loc[name].notna().any():
        r = rel.loc[name].dropna()
        geo = math.exp(sum(math.log(v) for v in r) / len(r))
        lines.append(f"  - speed: {geo:.2g}x torch's forward time (geometric mean of {len(r)} forwards, "
                     f"{r.min():.2g}x to {r.max():.2g}x); {fractions.min():.0%} to {fractions.max():.0%} of the "
                     "copy bandwidth")
    elif entry.get("timing"):
        why = next((t.get("detail") for t in entry["timing"] if t.get("status") != "timed"), "")
        lines.append(f"  - speed: not timed ({why[:150]})")
    elif report["settings"].get("timing"):
        lines.append("  - speed: not timed (its entry was checked with --no-timing and not timed since)")
    return lines


def summary_lines(report: dict) -> list[str]:
    """The page's opening: how the report was made, then 2 to 4 lines per candidate."""
    lines = header_lines(report) + ["", "## Summary", "",
                                    "Per candidate: its own defaults; the conventions it follows instead of "
                                    "torch's and what is left once they are accepted; the strict verdict; "
                                    "accuracy in each dtype; speed next to torch and the memory bandwidth.", ""]
    for e in report["candidates"]:
        lines += candidate_summary(report, e)
    return lines


def _md(df: pd.DataFrame) -> str:
    """A Markdown table without the optional tabulate dependency."""
    cols = [str(c) for c in df.columns]
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in df.itertuples(index=False):
        out.append("| " + " | ".join(_cell(v) for v in row) + " |")
    return "\n".join(out)


def _cell(v) -> str:
    if isinstance(v, float):
        return "-" if math.isnan(v) else f"{v:.3g}"
    return str(v).replace("|", "\\|").replace("\n", " ")


MATRIX_NOTE = {"strict": "Against torch. A convention in brackets is what the candidate does instead "
                          "(bnspec/conventions.py).",
               "modulo": "With each candidate's own conventions accepted (`--accept`, listed in the conventions "
                         "table): what is left are real deviations and bugs."}


def sections(report: dict) -> list[tuple[str, str, pd.DataFrame | None]]:
    """The page after the summary, in order: (title, note, table)."""
    out = [("Conventions and defaults", "Measured: defaults read from each framework's API by its adapter; "
            "the other columns from the check (the conventions its failures matched, the clauses that passed).",
            conventions_frame(report))]
    for view in VIEWS:
        matrix = verdict_matrix(report, view)
        title = "Conformance matrix: strict" if view == "strict" else "Conformance matrix: modulo conventions"
        out.append((title, MATRIX_NOTE[view], _by_clause(matrix).reset_index() if not matrix.empty else None))
    acc = accuracy_by_dtype(report)
    out.append(("Accuracy: worst error/bound by input dtype",
                "Over the value clauses (" + ", ".join(VALUE_CLAUSES) + ") on finite data, each judged against the "
                "candidate's own convention where it follows one; > 1 is really off. Special values (NaN, inf) "
                "are the S7.3 column. Per clause: accuracy.csv.", acc.reset_index() if not acc.empty else None))
    fails = conformance_frame(report, "modulo")
    fails = fails[fails["verdict"].isin(["fail", "error", "not run", "unusable"])]
    out.append(("What is left (modulo conventions)", "Every clause that fails with the candidate's own "
                "conventions accepted, and why.", fails[["candidate", "clause", "verdict", "detail"]]
                if not fails.empty else None))
    return out


def write_summary(report: dict, path: str, plots: list[str] = ()) -> None:
    lines = summary_lines(report)
    for title, note, table in sections(report):
        lines += ["", f"## {title}", "", note, "", _md(table) if table is not None else "(none)"]
        if title.startswith("Accuracy"):
            lines += ["", "## Plots", ""] + [f"![{os.path.basename(p)}]({os.path.basename(p)})" for p in plots]
            lines += ["", "Timing: every forward's median, IQR and throughput are in timing.csv."]
    _write_text(path, "\n".join(lines) + "\n")


def _png(path: str) -> str:
    with open(path, "rb") as f:
        return base64.b64encode(f.read()).decode("ascii")


def _inline(text: str) -> str:
    """Markdown's **bold** and `code` of a summary line, as HTML."""
    import re

    text = html.escape(text)
    text = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", text)
    return re.sub(r"`(.+?)`", r"<code>\1</code>", text)


def write_html(report: dict, path: str, plots: list[str]) -> None:
    """One self-contained page (plots inlined), in the order of ``summary.md``: the summary,
    the conventions table, the two matrices, the accuracy table, the plots, what is left."""
    def colour(cell: str) -> str:
        verdict = "not run" if str(cell).startswith("not run") else str(cell).split(" ")[0]
        return f"background-color: {VERDICT_COLOURS.get(verdict, '#ffffff')}"

    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>bnspec report</title><style>",
             "body{font-family:sans-serif;margin:2em;max-width:1600px}table{border-collapse:collapse;"
             "font-size:12px}td,th{border:1px solid #ccc;padding:3px 6px;text-align:left}"
             "th{background:#f0f0f0}code{background:#f4f4f4}li{margin:2px 0}</style></head><body>"]
    in_list = 0
    for line in summary_lines(report):
        depth = 2 if line.startswith("  - ") else 1 if line.startswith("- ") else 0
        while in_list < depth:
            parts.append("<ul>")
            in_list += 1
        while in_list > depth:
            parts.append("</ul>")
            in_list -= 1
        if line.startswith("# "):
            parts.append(f"<h1>{_inline(line[2:])}</h1>")
        elif line.startswith("## "):
            parts.append(f"<h2>{_inline(line[3:])}</h2>")
        elif depth:
            parts.append(f"<li>{_inline(line.strip()[2:])}</li>")
        elif line.strip():
            parts.append(f"<p>{_inline(line.rstrip())}</p>")
    parts += ["</ul>"] * in_list
    for title, note, table in sections(report):
        parts.append(f"<h2>{html.escape(title)}</h2><p>{_inline(note)}</p>")
        if table is None:
            parts.append("<p>(none)</p>")
        elif title.startswith("Conformance matrix"):
            cols = [c for c in table.columns if c not in ("clause", "title")]
            parts.append(table.style.map(colour, subset=cols).hide(axis="index").to_html())
        else:
            parts.append(table.style.format(lambda v: _cell(v)).hide(axis="index").to_html())
        if title.startswith("Accuracy"):
            parts.append("<h2>Plots</h2>")
            parts += [f"<p><img alt='{html.escape(os.path.basename(plot))}' "
                      f"src='data:image/png;base64,{_png(plot)}'></p>" for plot in plots]
            parts.append("<p>Timing: every forward's median, IQR and throughput are in timing.csv.</p>")
    parts.append("</body></html>")
    _write_text(path, "\n".join(parts) + "\n")


def both_views(report: dict) -> pd.DataFrame:
    """The conformance frame of both views, one ``view`` column."""
    return pd.concat([conformance_frame(report, v).assign(view=v) for v in VIEWS], ignore_index=True)


def write_all(report: dict, out: str) -> list[str]:
    """Every derived file under ``out``; returns their names."""
    written = []
    tables = (("conformance.csv", both_views), ("conventions.csv", conventions_frame),
              ("accuracy.csv", lambda r: accuracy_by_dtype(r).reset_index()),
              ("accuracy_by_clause.csv", lambda r: accuracy_frame(r, "modulo")),
              ("timing.csv", timing_frame), ("capabilities.csv", capabilities_frame))
    for name, frame in tables:
        buf = io.StringIO()
        frame(report).to_csv(buf, index=False, float_format="%.6g")
        _write_text(os.path.join(out, name), buf.getvalue())
        written.append(name)
    plots = []
    for name, make in (("accuracy.png", accuracy_figure), ("timing.png", timing_figure)):
        if save_figure(make, report, os.path.join(out, name)):
            plots.append(os.path.join(out, name))
            written.append(name)
    write_summary(report, os.path.join(out, "summary.md"), plots)
    write_html(report, os.path.join(out, "report.html"), plots)
    return written + ["summary.md", "report.html"]


def _write_text(path: str, text: str) -> None:
    """Atomic: write a temporary file next to it, then rename."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)
