#!/usr/bin/env python
r"""Benchmark: forward+backward time of bnspec's BatchNorm against torch's, on the CPU.

What is measured
----------------
One *step* is a training-mode forward pass followed by the backward pass that gives
the gradients of the input, the weight and the bias, for a float32 input. Four
candidates are timed side by side, shape by shape:

(a) ``torch``      ``torch.nn.BatchNorm{1,2}d`` in training mode, then
                   ``torch.autograd.grad(y, (x, weight, bias), dy)``.
(b) ``bnspec``     bnspec's drop-in module (``bnspec.BatchNorm{1,2}d``, native mode:
                   the reference functions behind a custom ``autograd.Function``),
                   exactly as (a). Both modules also update their running statistics,
                   as a training step does; that cost is part of the drop-in.
(c) ``oracle``     ``reference.train_forward(x, w, b, mode="oracle")`` then
                   ``reference.train_backward(dy, x, w, mode="oracle")``, called as
                   plain functions (float64 accumulation and results; the float32 ->
                   float64 conversions are part of what the oracle costs).
(d) ``fn-native``  the same two calls with ``mode="native"``: the reference functions
                   without the module and autograd machinery, to separate the cost of
                   the formulas from the cost of the wrapping.

``torch.autograd.grad`` is used rather than ``.backward()`` so that no candidate pays
for accumulating into ``.grad``. ``dy`` has the memory layout of ``x``.

Shapes: BatchNorm2d (32,64,56,56), (64,256,14,14), (8,16,7,7), each contiguous and
channels_last; BatchNorm1d (256,1024). The small 4-D shape is dominated by Python
overhead, the large ones by memory traffic; both matter for a drop-in replacement.

Why it is measured this way
---------------------------
The targets are relative (bnspec native within 3x of torch for forward+backward, the
oracle within 6x), so what matters is the ratio, and a ratio is only meaningful when
both sides saw the same machine. The benchmark machine is a small shared box, so:

* the candidates of a shape are *interleaved*: ``--rounds`` rounds, each running every
  candidate's ``torch.utils.benchmark.Timer.blocked_autorange(min_run_time=...)`` once,
  the order rotated from round to round, so a change of load (or of CPU frequency)
  hits every candidate alike. The per-block times of all rounds are pooled; the table
  reports their median and interquartile range (IQR), in milliseconds per step;
* it runs on 1 thread by default (``--threads`` to change), since multi-threaded
  timings on 2 shared cores mostly measure the neighbours;
* ``os.getloadavg()`` is recorded before, during and after the run.

A ratio is the median of the candidate divided by the median of torch. Before timing,
each shape is run once through every candidate and the results are compared with
torch's (largest difference of y, dx, dweight, dbias, relative to each tensor's
largest magnitude), so that a fast but wrong candidate is noticed; this check only
reports.

Where the time goes (measured for issue 14, torch.profiler and cProfile, 1 thread)
-------------------------------------------------------------------------------
* Large shapes are memory bound, and a fresh full-size tensor costs its page faults on
  top of its pass: glibc hands blocks above its mmap threshold (at most 32 MB) back to
  the OS, so each one is faulted in anew. A float64 (32,64,56,56) tensor is 51 MB: an
  allocating ``addcmul`` took 27 ms there, the in-place ``addcmul_`` on the same data 7 ms.
* The module (native) makes three full-size tensors in the forward (x - mu, its square,
  y) and three in the backward (x - mu, dy (x - mu), dx), about 17 passes; torch's kernel
  makes two (y, dx) in about 8. Large shapes: 1.3-2.6x, except (64,256,14,14)
  channels_last, where torch's kernel is fastest (3.7-10 ms): 2.4-2.8x at load 1-3,
  3.1x at load 6 (the module's passes suffer more from a shared memory bus).
* The oracle does the same in float64 (twice the bytes per pass), plus float64 copies of
  x (in both calls: ``train_backward`` without ``stats`` recomputes the statistics so
  autograd sees them) and of dy: eight float64 tensors per step. torch's channels_last
  kernel is about twice as fast as its contiguous one on this CPU; the oracle's passes
  cost the same in either layout. It misses 6x on (32,64,56,56) (both layouts, 6.9-7.4x
  at best) and (64,256,14,14) channels_last (7.4-9.6x). Getting there would take fewer passes than the two-pass
  variance, a fused kernel, or float32 intermediates: each gives up what the oracle is
  (readable formulas, two-pass, float64 throughout).
* (8,16,7,7) is dispatch bound: the module's step issues 64 top-level aten calls (the
  formulas as torch ops, the running-statistics update, autograd's Function), torch's 3,
  at 2-5 us each. It misses 3x (4.5-4.9x); the functions alone (``fn-native``, no
  module, no autograd) are about 2.1-2.4x.

Before and after
----------------
``--before REF`` (``make bench`` passes the commit before issue 14's speed work) also
imports bnspec as of the git commit REF, beside the current one, and times its module
and oracle as two more candidates (``bnspec@before``, ``oracle@before``) in the same
interleaved rounds; the table then shows the ratio of each before and after side by
side, measured under the same load.

This is a benchmark, not a test: it prints its table (and writes ``--json FILE``)
and exits 0 whether the targets are met or not.

Usage::

    python scripts/bench_reference.py            # full run, a few minutes
    python scripts/bench_reference.py --quick    # fewer, shorter rounds
    python scripts/bench_reference.py --threads 2 --json bench.json
    python scripts/bench_reference.py --before main   # also time bnspec as of main
"""

from __future__ import annotations

import argparse
import importlib
import io
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
import traceback
from pathlib import Path

# Run from a checkout without installing: the package is one directory up.
_ROOT = Path(__file__).resolve().parent.parent
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

import torch  # noqa: E402
from torch.utils.benchmark import Timer  # noqa: E402

import bnspec  # noqa: E402
from bnspec import reference  # noqa: E402

SHAPES = [(32, 64, 56, 56), (64, 256, 14, 14), (8, 16, 7, 7), (256, 1024)]
CANDIDATES = ("torch", "bnspec", "oracle", "fn-native")
BEFORE = ("bnspec@before", "oracle@before")  # with --before REF: bnspec as of REF
NATIVE_TARGET = 3.0  # bnspec module (native) / torch, forward+backward
ORACLE_TARGET = 6.0  # oracle / torch, forward+backward


# ----------------------------------------------------------------------------- steps


def _cases():
    """(shape, layout) pairs: every shape contiguous, the 4-D ones channels_last too."""
    for shape in SHAPES:
        yield shape, "contiguous"
        if len(shape) == 4:
            yield shape, "channels_last"


def _load_before(ref):
    """The ``bnspec`` package as of git commit ``ref``, imported beside the current one.

    ``git archive`` writes its files to a temporary folder; the current bnspec modules
    leave ``sys.modules`` while that folder's ``bnspec`` is imported, then come back.
    The old modules keep working: every function holds its own module's globals.
    """
    folder = tempfile.mkdtemp(prefix="bnspec-before-")
    archive = subprocess.run(["git", "-C", str(_ROOT), "archive", ref, "bnspec"],
                             capture_output=True, check=True).stdout
    tarfile.open(fileobj=io.BytesIO(archive)).extractall(folder, filter="data")
    ours = [k for k in sys.modules if k == "bnspec" or k.startswith("bnspec.")]
    current = {k: sys.modules.pop(k) for k in ours}
    sys.path.insert(0, folder)
    try:
        before = importlib.import_module("bnspec")
    finally:
        sys.path.remove(folder)
        for k in [k for k in sys.modules if k == "bnspec" or k.startswith("bnspec.")]:
            del sys.modules[k]
        sys.modules.update(current)
    return before


def _make_steps(shape, layout, seed=0, before=None):
    """The candidates' step functions for one case; each returns (y, dx, dw, db).
    ``before``: an older bnspec package (:func:`_load_before`) timed beside the current one."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen)
    dy = torch.randn(shape, generator=gen)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
        dy = dy.contiguous(memory_format=torch.channels_last)
    channels = shape[1]
    # Non-trivial affine parameters, the same for every candidate.
    w0 = 1.0 + 0.1 * torch.randn(channels, generator=gen)
    b0 = 0.1 * torch.randn(channels, generator=gen)

    torch_cls = torch.nn.BatchNorm2d if len(shape) == 4 else torch.nn.BatchNorm1d
    bnspec_cls = bnspec.BatchNorm2d if len(shape) == 4 else bnspec.BatchNorm1d
    modules = {"torch": torch_cls(channels), "bnspec": bnspec_cls(channels)}
    if before is not None:
        modules["bnspec@before"] = getattr(before, bnspec_cls.__name__)(channels)
    for m in modules.values():
        with torch.no_grad():
            m.weight.copy_(w0)
            m.bias.copy_(b0)
        m.train()

    xr = x.detach().clone(memory_format=torch.preserve_format).requires_grad_(True)

    def module_step(m):
        params = (xr, m.weight, m.bias)

        def step():
            y = m(xr)
            grads = torch.autograd.grad(y, params, dy)
            return (y, *grads)

        return step

    def function_step(mode, ref=reference):
        def step():
            out = ref.train_forward(x, w0, b0, mode=mode)
            g = ref.train_backward(dy, x, w0, mode=mode)
            return (out.y, g.dx, g.dweight, g.dbias)

        return step

    steps = {
        "torch": module_step(modules["torch"]),
        "bnspec": module_step(modules["bnspec"]),
        "oracle": function_step("oracle"),
        "fn-native": function_step("native"),
    }
    if before is not None:
        steps["bnspec@before"] = module_step(modules["bnspec@before"])
        steps["oracle@before"] = function_step("oracle", before.reference)
    return steps


def _rel_diff(got, ref):
    """max |got - ref| / max |ref|: the error relative to the tensor's own scale."""
    scale = ref.abs().max().item()
    return (got - ref).abs().max().item() / (scale if scale > 0 else 1.0)


def _check(steps):
    """Largest relative difference from torch over y, dx, dweight, dbias, per candidate.

    Relative to each tensor's largest magnitude: dweight and dbias are sums over up to
    1e5 values, where torch's own float32 rounding is ~1e-5 of their size.
    """
    ref = [t.detach().double() for t in steps["torch"]()]
    out = {}
    for name in list(steps)[1:]:
        try:
            got = [t.detach().double() for t in steps[name]()]
            out[name] = max(_rel_diff(a, b) for a, b in zip(got, ref))
        except Exception as exc:  # report, don't stop the benchmark
            out[name] = f"{type(exc).__name__}: {exc}"
    return out


# ----------------------------------------------------------------------------- timing


def _quantile(sorted_xs, q):
    """Linear-interpolation quantile of an already sorted list."""
    if len(sorted_xs) == 1:
        return sorted_xs[0]
    pos = q * (len(sorted_xs) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_xs) - 1)
    return sorted_xs[lo] + (sorted_xs[hi] - sorted_xs[lo]) * (pos - lo)


def _summary(times):
    xs = sorted(times)
    return {
        "median_ms": 1e3 * statistics.median(xs),
        "iqr_ms": 1e3 * (_quantile(xs, 0.75) - _quantile(xs, 0.25)),
        "min_ms": 1e3 * xs[0],
        "samples": len(xs),
    }


def _time_case(steps, *, rounds, min_run_time, threads, label):
    """Interleaved blocked_autorange: per round every candidate once, order rotated."""
    names = tuple(steps)
    timers = {
        name: Timer(
            stmt="step()",
            globals={"step": steps[name]},
            num_threads=threads,
            label=label,
            description=name,
        )
        for name in names
    }
    times = {name: [] for name in names}
    errors = {}
    for r in range(rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            if name in errors:
                continue
            try:
                m = timers[name].blocked_autorange(min_run_time=min_run_time)
            except Exception as exc:  # report, don't stop the benchmark
                errors[name] = f"{type(exc).__name__}: {exc}"
                traceback.print_exc(file=sys.stderr)
                continue
            times[name].extend(m.times)  # seconds per step, one value per block
    result = {}
    for name in names:
        if name in errors:
            result[name] = {"error": errors[name]}
        elif times[name]:
            result[name] = {**_summary(times[name]), "times_s": times[name]}
        else:
            result[name] = {"error": "no samples"}
    return result


# ----------------------------------------------------------------------------- report


def _cell(res):
    if "error" in res:
        return "ERROR"
    return f"{res['median_ms']:.3f} [{res['iqr_ms']:.3f}]"


def _ratio(res, base):
    if "error" in res or "error" in base or base["median_ms"] <= 0:
        return None
    return res["median_ms"] / base["median_ms"]


def _fmt_ratio(r):
    return "-" if r is None else f"{r:.2f}x"


def _table(rows):
    """One line per case; with --before, each ratio's before value beside it."""
    before = any("bnspec@before" in row["ratios"] for row in rows)
    header = ["shape", "layout", "torch ms", "bnspec-native ms", "ratio", *(["before"] if before else []),
              "oracle ms", "ratio", *(["before"] if before else []), "fn-native ms", "ratio"]
    body = []
    for row in rows:
        res, ratios = row["results"], row["ratios"]
        body.append([
            "(" + ",".join(map(str, row["shape"])) + ")",
            row["layout"],
            _cell(res["torch"]),
            _cell(res["bnspec"]),
            _fmt_ratio(ratios["bnspec"]),
            *([_fmt_ratio(ratios.get("bnspec@before"))] if before else []),
            _cell(res["oracle"]),
            _fmt_ratio(ratios["oracle"]),
            *([_fmt_ratio(ratios.get("oracle@before"))] if before else []),
            _cell(res["fn-native"]),
            _fmt_ratio(ratios["fn-native"]),
        ])
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
    left = {0, 1}  # text columns left-aligned, numbers right-aligned

    def line(cells):
        return "  ".join(c.ljust(w) if i in left else c.rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths)))

    out = [line(header), "  ".join("-" * w for w in widths)]
    out.extend(line(r) for r in body)
    return "\n".join(out)


def _verdict(rows):
    """One line: are the targets met, and the worst case of each."""
    parts = []
    met_all = True
    for name, target, text in (("bnspec", NATIVE_TARGET, "native (module) <= 3x torch"),
                               ("oracle", ORACLE_TARGET, "oracle <= 6x torch")):
        ratios = [(row["ratios"][name], row) for row in rows]
        missing = [row for r, row in ratios if r is None]
        known = [(r, row) for r, row in ratios if r is not None]
        if not known:
            parts.append(f"{text}: UNKNOWN (no measurement)")
            met_all = False
            continue
        worst, wrow = max(known, key=lambda t: t[0])
        misses = sum(r > target for r, _ in known) + len(missing)
        ok = misses == 0
        met_all &= ok
        where = "(" + ",".join(map(str, wrow["shape"])) + f") {wrow['layout']}"
        parts.append(f"{text}: {'MET' if ok else 'NOT MET'} "
                     f"({misses}/{len(ratios)} cases over; worst {worst:.2f}x at {where})")
    head = "TARGETS MET" if met_all else "TARGETS NOT MET"
    return f"{head}: " + "; ".join(parts)


def _loadavg():
    try:
        return list(os.getloadavg())
    except (AttributeError, OSError):
        return None


def _fmt_load(load):
    return "n/a" if load is None else " ".join(f"{v:.2f}" for v in load)


def _cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# ----------------------------------------------------------------------------- main


def _parse(argv):
    p = argparse.ArgumentParser(
        description="Forward+backward time of bnspec's BatchNorm vs torch's (CPU, float32).")
    p.add_argument("--quick", action="store_true",
                   help="fewer and shorter rounds (a rough look in well under a minute)")
    p.add_argument("--threads", type=int, default=1, metavar="N",
                   help="torch intra-op threads (default 1: the box is shared and small)")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON to FILE")
    p.add_argument("--rounds", type=int, default=None,
                   help="interleaved rounds per shape (default 5, 2 with --quick)")
    p.add_argument("--before", metavar="REF", default=None,
                   help="also time bnspec as of this git commit (module and oracle), side by side")
    p.add_argument("--min-run-time", type=float, default=None, metavar="S",
                   help="blocked_autorange min_run_time per candidate and round, seconds "
                        "(default 0.4, 0.1 with --quick)")
    args = p.parse_args(argv)
    if args.rounds is None:
        args.rounds = 2 if args.quick else 5
    if args.min_run_time is None:
        args.min_run_time = 0.1 if args.quick else 0.4
    args.threads = max(1, args.threads)
    args.rounds = max(1, args.rounds)
    return args


def main(argv=None) -> int:
    args = _parse(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    load_start = _loadavg()
    started = time.time()
    print(f"bnspec {bnspec.__version__}, torch {torch.__version__}, Python "
          f"{platform.python_version()}, {_cpu_name()}, {os.cpu_count()} CPUs")
    print(f"threads={args.threads} rounds={args.rounds} min_run_time={args.min_run_time}s "
          f"per candidate and round{' (quick)' if args.quick else ''}")
    print(f"loadavg at start (1/5/15 min): {_fmt_load(load_start)}")
    before = None
    if args.before:
        try:
            before = _load_before(args.before)
            print(f"before: bnspec as of git commit {args.before} (columns 'before': its ratio to torch)")
        except Exception as exc:  # report, don't stop the benchmark
            print(f"before: could not load bnspec as of {args.before!r} ({type(exc).__name__}: {exc}); "
                  "timing the current code only")
    print()

    rows = []
    for shape, layout in _cases():
        label = f"{shape} {layout}"
        print(f"  timing {label} ...", file=sys.stderr, flush=True)
        row = {"shape": list(shape), "layout": layout}
        steps = None
        try:
            steps = _make_steps(shape, layout, before=before)
            row["max_rel_diff_vs_torch"] = _check(steps)
            row["results"] = _time_case(steps, rounds=args.rounds,
                                        min_run_time=args.min_run_time,
                                        threads=args.threads, label=label)
        except Exception as exc:  # report, don't stop the benchmark
            traceback.print_exc(file=sys.stderr)
            row.setdefault("max_rel_diff_vs_torch", {})
            names = CANDIDATES + (BEFORE if before is not None else ())
            row["results"] = {name: {"error": f"{type(exc).__name__}: {exc}"} for name in names}
        row["ratios"] = {name: _ratio(res, row["results"]["torch"])
                         for name, res in row["results"].items() if name != "torch"}
        row["loadavg_after"] = _loadavg()
        del steps
        rows.append(row)

    load_end = _loadavg()
    elapsed = time.time() - started
    print("forward+backward per step; cells: median ms [IQR ms]; ratio = median / torch median")
    print(_table(rows))
    print()
    notes = []
    for row in rows:
        for name, diff in row["max_rel_diff_vs_torch"].items():
            # float32 rounding gives ~1e-5 of the scale; a wrong formula gives O(1).
            if isinstance(diff, str) or not diff < 1e-3:
                notes.append(f"  check: {tuple(row['shape'])} {row['layout']} {name}: "
                             f"max relative |diff| vs torch = {diff}")
    if notes:
        print("results that differ from torch's by more than 1e-3 relative "
              "(their timings may not mean much):")
        print("\n".join(notes))
    else:
        worst = max((d for row in rows for d in row["max_rel_diff_vs_torch"].values()
                     if not isinstance(d, str)), default=float("nan"))
        print(f"check: every candidate agrees with torch (largest relative |diff| {worst:.1e})")
    print(f"loadavg at end (1/5/15 min): {_fmt_load(load_end)}; took {elapsed:.0f} s")
    busiest = max((l[0] for l in [load_start, load_end] + [r["loadavg_after"] for r in rows]
                   if l is not None), default=None)
    if busiest is not None and os.cpu_count() and busiest > os.cpu_count():
        # This process accounts for about `threads` of the load; more than the CPUs
        # means it shared them, which slows every candidate (ratios are less affected).
        print(f"note: 1-min load average reached {busiest:.2f} on {os.cpu_count()} CPUs: "
              "the timings were contended; compare ratios rather than milliseconds")
    print(_verdict(rows))

    if args.json:
        payload = {
            "what": "training-mode forward+backward per step, float32, CPU",
            "torch": torch.__version__,
            "bnspec": bnspec.__version__,
            "python": platform.python_version(),
            "cpu": _cpu_name(),
            "cpu_count": os.cpu_count(),
            "threads": args.threads,
            "rounds": args.rounds,
            "min_run_time_s": args.min_run_time,
            "quick": args.quick,
            "before": args.before if before is not None else None,
            "targets": {"bnspec_over_torch": NATIVE_TARGET, "oracle_over_torch": ORACLE_TARGET},
            "loadavg_start": load_start,
            "loadavg_end": load_end,
            "elapsed_s": elapsed,
            "verdict": _verdict(rows),
            "rows": rows,
        }
        try:
            Path(args.json).write_text(json.dumps(payload, indent=2) + "\n")
        except OSError as exc:
            print(f"could not write {args.json}: {exc}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        pass
    except Exception:  # a benchmark reports; it never fails the caller
        traceback.print_exc()
    sys.exit(0)
