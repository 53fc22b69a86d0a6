"""``bnspec check --world-size K TARGET``: does a synced BatchNorm in K processes give what
single-process BatchNorm gives on the concatenated batch? (SPEC.md S9)

TARGET is a synced built-in (``torch-sync``: torch.nn.SyncBatchNorm, ``bnspec-sync``:
bnspec.SyncBatchNorm) or ``package.module:Name`` / ``path/to/file.py:Name``, a class with
``torch.nn.SyncBatchNorm``'s constructor. :mod:`bnspec.distributed.ranks` runs it in K
processes (gloo over 127.0.0.1 on the CPU, NCCL on CUDA, one GPU per process) on seeded
cases: every rank family (``--dims``), every dtype (``--dtypes``), and three splits of
each batch: even, uneven (rank 0 holds one sample) and one empty shard. Each case runs
a few training steps (forward, backward) and an eval forward. Here, in the parent, every
rank's results are compared with the float64 oracle (:mod:`conformance.oracle`, the
bounds of :mod:`bnspec.tolerance`) on the concatenated batch:

* S9.1 the forward (training and eval) on every rank: its rows of the output;
* S9.2 running statistics (momentum update with the GLOBAL unbiased variance) and the
  counter, on every rank;
* S9.3 the input gradient (every rank's rows), and the weight and bias gradients
  summed over ranks, which is what data-parallel training does with them (torch's
  SyncBatchNorm leaves each rank its shard's sums; see :mod:`bnspec.sync`);
* S9.4 all of these with unequal shards and with one empty shard (n/a for K = 1).

A candidate that torch refuses on this device (torch.nn.SyncBatchNorm on the CPU) is
"unsupported" with torch's message, exit 1, like any missing capability. A rank that
raises, dies or hangs fails the clauses of its split; a candidate that cannot be loaded,
or a group that cannot be started, exits 2.

The synced built-ins make sense only here: ``bnspec check torch-sync`` without
``--world-size`` (and ``bnspec report`` or ``pytest conformance`` with them) says so and
exits 2 rather than run the single-process suite, whose S6.2 (wrong input rank raises)
a SyncBatchNorm, which takes any rank from 2 on, would fail for no fault of its own.
"""

from __future__ import annotations

import math
import re
import shlex
import time

import torch

from bnspec import tolerance as T
from bnspec.candidates.synced import SYNC_BUILTINS, needs_world_size
from bnspec.distributed.ranks import SyncCase, run_ranks
from bnspec.options import DTYPES, CheckOptions, UsageProblem, target_kind

SYNC_CLAUSES = ("S9.1", "S9.2", "S9.3", "S9.4")
#: torch 2.13 refuses to sync on the CPU: every rank's first training forward raises
#: ValueError "SyncBatchNorm expected input tensor to be on GPU or XPU or privateuseone"
#: (torch/nn/modules/batchnorm.py), once a process group is initialized.
REFUSAL = re.compile(r"SyncBatchNorm expected input tensor to be on GPU")
STEPS = {"quick": 2, "ci": 3, "thorough": 4}  #: training steps per case
SEEDS = {"quick": 1, "ci": 1, "thorough": 4}  #: cases per (split, rank family, dtype)
#: (values, momentum, eps), cycled over the cases: offset values (|mean|/std up to 1e4)
#: catch a one-pass merge, momentum None the cumulative factor, eps 1e-3 a lost eps.
VARIANTS = (("normal", 0.1, 1e-5), ("offset", None, 1e-5), ("normal", 0.5, 1e-3))
KIND_CLAUSE = {"forward": "S9.1", "running": "S9.2", "grads": "S9.3"}


# ----------------------------------------------------------------------------- cases


def split_sizes(scenario: str, k: int) -> tuple[int, ...]:
    """Samples per rank: even (3 each), uneven (1, 3, 5, ...: rank 0 holds ONE sample,
    which single-process BatchNorm1d would refuse), empty (rank 1 holds none)."""
    if scenario == "even":
        return (3,) * k
    if scenario == "uneven":
        return tuple(1 + 2 * r for r in range(k))
    return tuple(0 if r == 1 else 3 + r for r in range(k))


def plan_cases(k: int, dims: list[int], dtypes: list[str], profile: str, seed: int) -> dict[str, list[SyncCase]]:
    """The cases of each split (K = 1 has only the even one), deterministic in ``seed``."""
    scenarios = ("even", "uneven", "empty") if k > 1 else ("even",)
    plan, i = {}, 0
    for scenario in scenarios:
        plan[scenario] = []
        for d in dims:
            for dtype in dtypes:
                for _ in range(SEEDS[profile]):
                    dist, momentum, eps = VARIANTS[i % len(VARIANTS)]
                    plan[scenario].append(SyncCase(scenario, split_sizes(scenario, k), d, dtype, dist, momentum,
                                                   eps, seed=seed * 7_919 + i, steps=STEPS[profile]))
                    i += 1
    return plan


# ----------------------------------------------------------------------------- judging


class _Judge:
    """Worst error/bound and the first failure, per kind (forward, running, grads)."""

    def __init__(self) -> None:
        self.worst = {k: 0.0 for k in KIND_CLAUSE}
        self.first: dict[str, str] = {}

    def _note(self, kind: str, ratio: float, message: str | None) -> None:
        if ratio > self.worst[kind] or math.isnan(ratio):
            self.worst[kind] = ratio
        if message and kind not in self.first:
            self.first[kind] = message

    def fail(self, kind: str, message: str) -> None:
        self._note(kind, math.inf, message)

    def close(self, kind: str, what: str, observed, value: torch.Tensor, bound: torch.Tensor, *,
              dtype: torch.dtype | None = None, hint: str = "") -> None:
        if not isinstance(observed, torch.Tensor):
            return self.fail(kind, f"{what}: expected a tensor, got {type(observed).__name__}")
        if dtype is not None and observed.dtype != dtype:
            return self.fail(kind, f"{what}: dtype {observed.dtype}, expected {dtype}")
        if tuple(observed.shape) != tuple(value.shape):
            return self.fail(kind, f"{what}: shape {tuple(observed.shape)}, expected {tuple(value.shape)}")
        ratio = T.ratio(observed, value, bound)
        self._note(kind, ratio, None if ratio <= 1.0 else _explain(what, observed, value, bound, ratio) + hint)

    def exact(self, kind: str, what: str, observed, expected: int) -> None:
        ok = isinstance(observed, torch.Tensor) and observed.dtype == torch.int64 and observed.numel() == 1 \
            and int(observed) == expected
        got = f"{int(observed)} ({observed.dtype})" if isinstance(observed, torch.Tensor) and observed.numel() == 1 \
            else repr(observed)[:80]
        self._note(kind, 0.0 if ok else math.inf, None if ok else f"{what}: got {got}, expected {expected} (int64)")


def _explain(what: str, observed: torch.Tensor, value: torch.Tensor, bound: torch.Tensor, ratio: float) -> str:
    o, e, b = observed.double(), value.double(), bound.double().expand_as(value)
    q = torch.where(torch.isfinite(e), (o - e).abs() / b.clamp_min(1e-300), torch.zeros_like(e))
    q = torch.where(torch.isnan(q) | (torch.isnan(o) != torch.isnan(e)), torch.full_like(q, math.inf), q)
    idx = tuple(int(i) for i in (q == q.max()).nonzero()[0]) if q.numel() else ()
    at = f" at {idx}: got {o[idx].item():.9g}, expected {e[idx].item():.9g} (bound {b[idx].item():.3g})" if idx else ""
    return f"{what}: error/bound = {ratio:.3g}{at}"


def _pc(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.reshape(1, -1, *([1] * (like.dim() - 2)))


def judge_case(case: SyncCase, ranks: list[dict]) -> dict[str, tuple[float, str | None]]:
    """Per kind (forward, running, grads): worst error/bound over ranks and steps, and the
    first failure. ``ranks[r]`` is what :func:`bnspec.distributed.ranks.run_case` returned on rank r."""
    from conformance import oracle as O

    spec = case.spec_case()
    w, b = spec.weight(), spec.bias_values()
    j = _Judge()
    old = [r["init"] for r in ranks]
    u_param = T.unit_roundoff(spec.tparam_dtype)
    axes = (0, *range(2, len(case.shape)))
    for t in range(case.steps):
        x, dy = case.batch(t)
        y_exp, mean, var = O.train(spec, x, w, b)
        g_exp = O.train_grads(spec, dy, x, w, mean, var)
        xhat = (x.double() - _pc(mean, x)) * _pc(torch.rsqrt(var + case.eps), x)
        for r, res in enumerate(ranks):
            st, rows, at = res["steps"][t], case.rows(r), f"rank {r}, step {t}"
            j.close("forward", f"y ({at})", st["y"], y_exp.value[rows], y_exp.bound[rows], dtype=spec.tdtype)
            j.close("grads", f"dx ({at})", st["dx"], g_exp["x"].value[rows], g_exp["x"].bound[rows], dtype=spec.tdtype)
            if any(old[r][k] is None for k in ("running_mean", "running_var", "num_batches_tracked")):
                j.fail("running", f"running statistics ({at}): missing (None) with track_running_stats=True")
                continue
            e_mean, e_var, count = O.running(spec, old[r]["running_mean"], old[r]["running_var"],
                                             int(old[r]["num_batches_tracked"]), mean, var, case.count, case.momentum)
            j.close("running", f"running_mean ({at})", st["running_mean"], e_mean.value, e_mean.bound,
                    dtype=spec.tparam_dtype)
            j.close("running", f"running_var ({at})", st["running_var"], e_var.value, e_var.bound,
                    dtype=spec.tparam_dtype)
            j.exact("running", f"num_batches_tracked ({at})", st["num_batches_tracked"], count)
            old[r] = st
        # Parameter gradients: each rank's partial sums add up over ranks, as data-parallel
        # training adds them. Each partial sum is rounded once to the parameter dtype,
        # which adds u_param |partial| per rank to the single-process bound.
        for name, key, terms in (("weight", "dw", dy.double() * xhat), ("bias", "db", dy.double())):
            parts = [res["steps"][t][key] for res in ranks]
            if not all(isinstance(p, torch.Tensor) and p.shape == (spec.channels,) for p in parts):
                j.fail("grads", f"d{name} (step {t}): expected a tensor of shape ({spec.channels},) on every rank")
                continue
            partial = sum(terms[case.rows(r)].sum(axes).abs() for r in range(len(ranks)))
            bound = g_exp[name].bound + T.C_OUT * u_param * partial
            hint = ""
            if len(ranks) > 1 and all(T.ratio(p, g_exp[name].value, bound) <= 1 for p in parts):
                hint = ("\n  every rank holds the whole batch's gradient (already summed over ranks); torch leaves "
                        "that sum to the data-parallel wrapper, which would count it K times")
            j.close("grads", f"d{name} summed over ranks (step {t})", sum(p.double() for p in parts),
                    g_exp[name].value, bound, hint=hint)
    x_eval = case.batch(case.steps)[0]
    for r, res in enumerate(ranks):
        if any(old[r][k] is None for k in ("running_mean", "running_var")):
            continue
        rows = case.rows(r)
        e = O.eval_(spec, x_eval[rows], old[r]["running_mean"], old[r]["running_var"], w, b)
        j.close("forward", f"eval y (rank {r})", res["eval_y"], e.value, e.bound, dtype=spec.tdtype)
    return {k: (j.worst[k], j.first.get(k)) for k in KIND_CLAUSE}


# ----------------------------------------------------------------------------- records and the document


def _clauses_of(scenario: str) -> tuple[str, ...]:
    return ("S9.1", "S9.2", "S9.3") if scenario == "even" else ("S9.4",)


def _record(target: str, case: SyncCase, clause: str, verdict: str, ratio: float | None, detail: str,
            duration: float) -> dict:
    """A record of the plugin's schema (:mod:`bnspec.results`) for one clause of one case."""
    outcome = {"pass": "passed", "fail": "failed"}.get(verdict, "skipped")
    return {"nodeid": f"sync::{case.scenario}::{case.dims}d-{case.dtype}-seed{case.seed}::{clause}",
            "test": f"synced_{case.scenario}_split", "clause": clause, "candidate": target, "dims": case.dims,
            "phase": "call", "outcome": outcome, "verdict": verdict,
            "reason": (detail.strip().splitlines() or [""])[0], "failures": int(verdict == "fail"),
            "error_over_bound": ratio, "error_over_bound_by_dtype": {case.dtype: ratio}, "detail": detail,
            "duration_s": round(duration, 6)}


def _judged_records(target: str, case: SyncCase, ranks: list[dict], duration: float) -> list[dict]:
    verdicts = judge_case(case, ranks)
    if case.scenario == "even":
        groups = [(KIND_CLAUSE[k], [k]) for k in KIND_CLAUSE]
    else:
        groups = [("S9.4", list(KIND_CLAUSE))]
    out = []
    for clause, kinds in groups:
        ratio = max(verdicts[k][0] for k in kinds)
        first = next((verdicts[k][1] for k in kinds if verdicts[k][1]), None)
        ok = first is None and ratio <= 1.0
        detail = "" if ok else f"{first}\n  case: {case.label}"
        out.append(_record(target, case, clause, "pass" if ok else "fail",
                           None if math.isnan(ratio) else ratio, detail, duration))
    return out


def _rank_errors(res) -> str:
    lines = []
    for r, err in sorted(res.errors.items()):
        first = (err["message"].strip().splitlines() or [""])[0]
        lines.append(f"rank {r} raised {err['type']}: {first}")
    return "; ".join(lines)


def _failure_text(res) -> str:
    """How the group ended: first the rank that died or hung (the cause), then what the
    others raised (often only their peer's loss: "Connection closed by peer")."""
    parts = [res.detail] if res.detail else []
    if res.errors:
        parts.append(_rank_errors(res))
    silent = [r for r, t in res.logs.items() if r not in res.errors and t.strip()]
    if res.failure in ("raised", "died"):
        parts += [f"rank {r} printed: {' | '.join(res.logs[r].strip().splitlines()[-3:])}" for r in silent[:2]]
    return "; ".join(parts) or "a rank ended without a result"


def _run_scenario(target: str, cases: list[SyncCase], devices: list[str], backend: str, *, timeout: float,
                  startup_timeout: float, deadline: float | None):
    """Run one split's cases; a failed rendezvous on a port taken in between is retried once."""
    for attempt in (1, 2):
        res = run_ranks(target, cases, devices, backend=backend, timeout=timeout,
                        startup_timeout=startup_timeout, deadline=deadline)
        load = [e for e in res.errors.values() if e["stage"] == "load"]
        if load:
            why = load[0]["message"] if load[0]["type"] == "UnusableTarget" else \
                f"{target!r} could not be loaded: {load[0]['type']}: {load[0]['message']}"
            raise UsageProblem(why)
        setup = [e for e in res.errors.values() if e["stage"] == "setup"]
        if setup and attempt == 1 and "address already in use" in setup[0]["message"].lower():
            continue
        if setup:
            raise UsageProblem(f"could not start a {backend} group of {len(devices)} processes: "
                               f"{setup[0]['type']}: {setup[0]['message']}")
        if res.failure == "startup":
            raise UsageProblem(f"{target!r} could not be started: {res.detail}")
        return res


def check_synced(target: str, world_size: int, *, dims: list[int], dtypes: list[str], profile: str,
                 seed: int | None, device: str, clauses: list[str], timeout: float, startup_timeout: float,
                 budget: float | None = None) -> tuple[list[dict], str | None]:
    """The per-case records of the check, and torch's refusal (None when it ran)."""
    dev = torch.device(device)
    if dev.type == "cuda":
        base = dev.index or 0
        devices, backend = [f"cuda:{base + r}" for r in range(world_size)], "nccl"
    else:
        devices, backend = [device] * world_size, "gloo"
    deadline = time.monotonic() + budget if budget is not None else None
    records: list[dict] = []
    plan = plan_cases(world_size, dims, dtypes, profile, seed or 0)
    for scenario, cases in plan.items():
        if not set(_clauses_of(scenario)) & set(clauses):
            continue
        start = time.monotonic()
        res = _run_scenario(target, cases, devices, backend, timeout=timeout, startup_timeout=startup_timeout,
                            deadline=deadline)
        refusal = next((e for e in res.errors.values() if REFUSAL.search(e["message"])), None)
        if refusal is not None:
            return [], f"{refusal['type']}: {refusal['message'].strip().splitlines()[0]}"
        per_case = (time.monotonic() - start) / max(len(cases), 1)
        for case, ranks in zip(cases, res.cases):
            records += _judged_records(target, case, ranks, per_case)
        if res.failure is not None:
            bad = cases[res.failed_case] if res.failed_case < len(cases) else cases[-1]
            skipped = len(cases) - len(res.cases) - 1
            text = _failure_text(res) + (f" ({skipped} later case(s) of this split not run)" if skipped > 0 else "")
            detail = f"{text}\n  case: {bad.label}"
            records += [_record(target, bad, c, "fail", math.inf, detail, per_case) for c in _clauses_of(scenario)]
    if world_size == 1 and "S9.4" in clauses:
        lone = SyncCase("uneven", (1,), dims[0], dtypes[0])
        records.append(_record(target, lone, "S9.4", "n/a", None,
                               "not applicable: world size 1 has one shard, so no unequal or empty shard", 0.0))
    return [r for r in records if r["clause"] in clauses], None


def _unsupported_records(target: str, reason: str, clauses: list[str], device: str, dims: int) -> list[dict]:
    case = SyncCase("even", (1,), dims)
    return [_record(target, case, c, "unsupported", None, f"unsupported on {device}: {reason}", 0.0) for c in clauses]


def _with_world_size(command: str, k: int) -> str:
    parts = shlex.split(command)
    return shlex.join(parts[:2] + ["--world-size", str(k)] + parts[2:])


def synced_document(target: str, options: CheckOptions) -> dict:
    """``bnspec check --world-size K TARGET``'s results document (a synced built-in without
    ``--world-size``: :class:`UsageProblem`). Beyond a check's document it has
    ``world_size``, ``backend`` and ``refused`` (torch's refusal on this device, or null)."""
    from bnspec.results import document

    k = options.world_size
    if k is None:
        raise UsageProblem(needs_world_size(target))
    kind = target_kind(target)
    if kind == "builtin" and target not in SYNC_BUILTINS:
        raise UsageProblem(f"built-in {target!r} is not a synced BatchNorm; with --world-size give "
                           f"{' or '.join(SYNC_BUILTINS)}, package.module:Name or path/to/file.py:Name")
    dims = list(options.dims or [1, 2, 3])
    dtypes = list(options.dtypes) if options.dtypes else None
    raw = options.clauses
    wanted = raw.split(",") if raw else ["S9"]
    clauses = [c for c in SYNC_CLAUSES if any(c == w or c.startswith(w + ".") for w in wanted)]
    if not clauses:
        raise UsageProblem(f"--clauses {raw!r} selects no clause of a synced check ({', '.join(SYNC_CLAUSES)})")
    device = options.device
    if torch.device(device).type == "cuda":
        first = torch.device(device).index or 0
        if first + k > torch.cuda.device_count():
            raise UsageProblem(f"--world-size {k} on {device}: NCCL needs one GPU per process and this machine has "
                               f"{torch.cuda.device_count()} from cuda:{first} on; use a smaller --world-size")
    elif torch.device(device).type != "cpu":
        raise UsageProblem(f"--device {device!r}: a synced check runs on cpu (gloo) or cuda (NCCL)")
    records, refusal = check_synced(target, k, dims=dims, dtypes=dtypes or list(DTYPES), profile=options.profile,
                                    seed=options.seed, device=device, clauses=clauses, timeout=options.timeout,
                                    startup_timeout=options.startup_timeout, budget=options.budget)
    if refusal is not None:
        records = _unsupported_records(target, refusal, clauses, device, dims[0])
    doc = document(target=target, dims=dims, profile=options.profile, seed=options.seed, device=device,
                   dtypes=dtypes, records=records, clauses=raw, timeout=options.timeout, budget=options.budget,
                   candidate_versions={"torch": torch.__version__})
    doc["world_size"] = k
    doc["backend"] = "nccl" if torch.device(device).type == "cuda" else "gloo"
    doc["refused"] = refusal
    doc["command"] = _with_world_size(doc["command"], k)
    for c in doc["clauses"]:
        if c["repro"]:
            c["repro"] = _with_world_size(c["repro"], k)
    return doc


def synced_table(doc: dict, table: str) -> str:
    """What ``bnspec check --world-size K`` prints: the group, the table, and torch's whole
    refusal (the table cuts each reason to its width)."""
    target, device = doc["candidate"]["target"], doc["device"]
    if doc.get("refused") is not None:
        table += f"\nunsupported: torch refuses {target} on {device}: {doc['refused']}"
    return (f"world size {doc['world_size']}: {doc['backend']} on {device}, processes started by "
            f"torch.multiprocessing\n" + table)
