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
from bnspec.results import verdict_text
from bnspec.spec import CLAUSES
from bnspec.timing import forward_bytes

VERDICT_COLOURS = {"pass": "#d7f0d2", "fail": "#f6c9c4", "error": "#f3b07a", "unsupported": "#e4e4e4",
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


def conformance_frame(report: dict) -> pd.DataFrame:
    """One row per (candidate, clause): verdict, worst error/bound, convention followed instead."""
    rows = []
    for e in report["candidates"]:
        if e["status"] != "checked":
            rows.append({"candidate": e["target"], "clause": "(all)", "title": "", "verdict": "unusable",
                         "error_over_bound": math.nan, "convention": "", "detail": e["reason"]})
            continue
        failed = [r.get("detail", "") for r in e["check"]["records"] if r.get("outcome") == "failed"]
        for c in e["check"]["clauses"]:
            texts = [t for t in failed if t] if c["verdict"] == "fail" else []
            mine = [t for t, r in zip(failed, e["check"]["records"]) if r.get("clause") == c["id"]]
            rows.append({"candidate": e["target"], "clause": c["id"], "title": c["title"], "verdict": c["verdict"],
                         "error_over_bound": _ratio(c["worst_error_over_bound"]),
                         "convention": (record_conventions(_clause_failures(e["check"], c["id"]))
                                        if texts or mine else ""),
                         "detail": c["detail"].splitlines()[0] if c["detail"] else ""})
    return pd.DataFrame(rows, columns=["candidate", "clause", "title", "verdict", "error_over_bound",
                                       "convention", "detail"])


def _clause_failures(doc: dict, clause: str) -> list[dict]:
    return [r for r in doc["records"] if r.get("clause") == clause and r.get("outcome") == "failed"]


def verdict_matrix(report: dict) -> pd.DataFrame:
    """candidate x clause -> verdict (with the convention in brackets when one is named)."""
    df = conformance_frame(report)
    df = df[df["clause"] != "(all)"]
    cell = df["verdict"] + df["convention"].map(lambda c: f" ({c})" if c else "")
    order = [c for c in CLAUSES if c in set(df["clause"])]
    return (df.assign(cell=cell).pivot(index="candidate", columns="clause", values="cell")
            .reindex(columns=order).fillna("-"))


def _by_clause(matrix: pd.DataFrame) -> pd.DataFrame:
    """The matrix with one row per clause (there are more clauses than candidates) and its title."""
    out = matrix.T
    out.insert(0, "title", [CLAUSES[c].title if c in CLAUSES else "" for c in out.index])
    return out


def accuracy_frame(report: dict) -> pd.DataFrame:
    """One row per (candidate, clause, input dtype): the worst error/bound of its comparisons."""
    rows = []
    for e in report["candidates"]:
        if e["status"] != "checked":
            continue
        for r in e["check"]["records"]:
            for dtype, v in (r.get("error_over_bound_by_dtype") or {}).items():
                rows.append({"candidate": e["target"], "clause": r.get("clause"), "dtype": dtype,
                             "error_over_bound": _ratio(v)})
    df = pd.DataFrame(rows, columns=["candidate", "clause", "dtype", "error_over_bound"])
    return (df.groupby(["candidate", "clause", "dtype"], as_index=False)["error_over_bound"]
            .agg(lambda s: s.max(skipna=False)))


def accuracy_by_dtype(report: dict) -> pd.DataFrame:
    """candidate x dtype -> worst error/bound over all clauses (> 1 fails)."""
    df = accuracy_frame(report)
    dtypes = [d for d in ("float64", "float32", "float16", "bfloat16") if d in set(df["dtype"])]
    return df.pivot_table(index="candidate", columns="dtype", values="error_over_bound",
                          aggfunc="max").reindex(columns=dtypes)


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
    return pd.DataFrame(rows, columns=["candidate", "dims", "shape", "dtype", "layout", "mode", "status",
                                       "median_ms", "iqr_ms", "gb_per_s", "fraction_of_copy_bw", "detail"])


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
    if table.empty:
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
    ax.set_title("worst error/bound over all clauses\n(> 1 fails; colours clipped to 1e-6..1e6)")
    fig.colorbar(im, ax=ax, label="log10(error/bound)")
    fig.tight_layout()
    return fig


def timing_figure(report: dict):
    """Effective GB/s per candidate and configuration, the measured copy bandwidth as a
    line. None when nothing was timed."""
    import matplotlib.pyplot as plt

    df = timing_frame(report)
    df = df[df["status"] == "timed"]
    if df.empty:
        return None
    df = df.assign(config=df["dims"].astype(str) + "d " + df["mode"] + " " + df["layout"])
    table = df.pivot_table(index="candidate", columns="config", values="gb_per_s")
    fig, ax = plt.subplots(figsize=(10, 1.8 + 0.6 * len(table)))
    table.plot.barh(ax=ax, width=0.8)
    bw = (report.get("bandwidth") or {}).get("gb_per_s")
    if bw:
        ax.axvline(bw, color="black", linestyle="--", label=f"copy bandwidth {bw:.1f} GB/s")
    ax.set_xlabel("effective GB/s (x read once + y written once, float32)")
    ax.set_ylabel("candidate")
    ax.set_title("BatchNorm forward throughput")
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


def summary_lines(report: dict) -> list[str]:
    s = report["settings"]
    v = report["versions"]
    m = report["machine"]
    bw = report.get("bandwidth") or {}
    lines = ["# bnspec conformance report", "",
             f"Command: `{report['command']}`  ",
             f"Generated {report.get('date', '?')}. "
             f"Profile {s['profile']}, seed {s['seed'] if s['seed'] is not None else 'derandomized'}, "
             f"device {s['device']}; bnspec {v['bnspec']}, torch {v['torch']}, Python {v['python']}, "
             f"hypothesis {v['hypothesis']}.  ",
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
    lines += ["", "## Verdicts", ""]
    for e in report["candidates"]:
        if e["status"] != "checked":
            lines.append(f"- **{e['target']}**: cannot be used: {e['reason']}")
        else:
            doc = e["check"]
            counts = pd.Series([c["verdict"] for c in doc["clauses"]]).value_counts().to_dict()
            verdict = verdict_text(doc)
            dims = doc["candidate"]["dims"]
            families = "" if len(dims) == 3 else f" [checked: {', '.join(f'BatchNorm{d}d' for d in dims)} only]"
            lines.append(f"- **{e['target']}**: {verdict} ("
                         + ", ".join(f"{n} {k}" for k, n in sorted(counts.items())) + ")" + families)
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


def write_summary(report: dict, path: str) -> None:
    lines = summary_lines(report)
    matrix = verdict_matrix(report)
    lines += ["", "## Conformance matrix (clause x candidate)", "",
              "A convention in brackets is what the candidate does instead (bnspec/conventions.py).", "",
              _md(_by_clause(matrix).reset_index()) if not matrix.empty else "(no checked candidate)"]
    acc = accuracy_by_dtype(report)
    lines += ["", "## Accuracy: worst error/bound by input dtype (> 1 fails)", "",
              _md(acc.reset_index()) if not acc.empty else "(no comparisons)"]
    tim = timing_frame(report)
    lines += ["", "## Timing (forward, median of blocked runs)", "",
              _md(tim.drop(columns=["detail"])) if not tim.empty else "(not timed)"]
    fails = conformance_frame(report)
    fails = fails[fails["verdict"].isin(["fail", "error"])]
    if not fails.empty:
        lines += ["", "## Deviations", "", _md(fails[["candidate", "clause", "convention", "detail"]])]
    _write_text(path, "\n".join(lines) + "\n")


def _png(path: str) -> str:
    with open(path, "rb") as f:
        return base64.b64encode(f.read()).decode("ascii")


def write_html(report: dict, path: str, plots: list[str]) -> None:
    """One self-contained page (plots inlined): readable offline and as an artifact."""
    def colour(cell: str) -> str:
        verdict = str(cell).split(" ")[0]
        return f"background-color: {VERDICT_COLOURS.get(verdict, '#ffffff')}"

    matrix = verdict_matrix(report)
    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>bnspec report</title><style>",
             "body{font-family:sans-serif;margin:2em;max-width:1400px}table{border-collapse:collapse;"
             "font-size:12px}td,th{border:1px solid #ccc;padding:3px 6px;text-align:left}"
             "th{background:#f0f0f0}code{background:#f4f4f4}</style></head><body>"]
    summary = summary_lines(report)
    parts.append(f"<h1>{html.escape(summary[0].lstrip('# '))}</h1>")
    parts += [f"<p>{html.escape(line.rstrip(' '))}</p>" for line in summary[2:] if line and not line.startswith("#")
              and not line.startswith("- ")]
    parts.append("<h2>Verdicts</h2><ul>")
    parts += [f"<li>{html.escape(line[2:]).replace('**', '')}</li>" for line in summary if line.startswith("- ")]
    parts.append("</ul><h2>Conformance matrix</h2><p>A convention in brackets is what the candidate does "
                 "instead.</p>")
    if not matrix.empty:
        parts.append(_by_clause(matrix).style.map(colour, subset=list(matrix.index)).to_html())
    parts.append("<h2>Accuracy</h2>")
    acc = accuracy_by_dtype(report)
    if not acc.empty:
        parts.append(acc.style.format("{:.3g}", na_rep="-").to_html())
    parts.append("<h2>Timing</h2>")
    tim = timing_frame(report)
    if not tim.empty:
        parts.append(tim.drop(columns=["detail"]).style.format(
            {"median_ms": "{:.3f}", "iqr_ms": "{:.3f}", "gb_per_s": "{:.2f}", "fraction_of_copy_bw": "{:.2f}"},
            na_rep="-").hide(axis="index").to_html())
    for plot in plots:
        parts.append(f"<p><img alt='{html.escape(os.path.basename(plot))}' "
                     f"src='data:image/png;base64,{_png(plot)}'></p>")
    fails = conformance_frame(report)
    fails = fails[fails["verdict"].isin(["fail", "error", "unusable"])]
    if not fails.empty:
        parts.append("<h2>Deviations</h2>")
        parts.append(fails[["candidate", "clause", "verdict", "convention", "detail"]].style.hide(axis="index")
                     .to_html())
    parts.append("</body></html>")
    _write_text(path, "\n".join(parts) + "\n")


def write_all(report: dict, out: str) -> list[str]:
    """Every derived file under ``out``; returns their names."""
    written = []
    for name, frame in (("conformance.csv", conformance_frame), ("accuracy.csv", accuracy_frame),
                        ("timing.csv", timing_frame), ("capabilities.csv", capabilities_frame)):
        buf = io.StringIO()
        frame(report).to_csv(buf, index=False, float_format="%.6g")
        _write_text(os.path.join(out, name), buf.getvalue())
        written.append(name)
    plots = []
    for name, make in (("accuracy.png", accuracy_figure), ("timing.png", timing_figure)):
        if save_figure(make, report, os.path.join(out, name)):
            plots.append(os.path.join(out, name))
            written.append(name)
    write_summary(report, os.path.join(out, "summary.md"))
    write_html(report, os.path.join(out, "report.html"), plots)
    return written + ["summary.md", "report.html"]


def _write_text(path: str, text: str) -> None:
    """Atomic: write a temporary file next to it, then rename."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)
