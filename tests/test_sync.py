"""Synced BatchNorm (SPEC.md S9): the parallel merge, bnspec.SyncBatchNorm in 2 and 3 gloo
processes against single-process BatchNorm on the concatenated batch, and
``bnspec check --world-size K``.

Process start-up dominates the time: every group here is started by the same fork server
(bnspec.distributed.ranks), which pays for importing torch once per test session. Tolerances
are bnspec.tolerance's bounds; where two float64 computations are compared, each is
within the bound of the exact value, so they may differ by twice the bound.
"""

from __future__ import annotations

import inspect
import json
import math
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import bnspec
from bnspec import cli
from bnspec import reference as R
from bnspec import sync as S
from bnspec import tolerance as T
from bnspec.candidates.targets import UnusableTarget, load_adapter
from bnspec.distributed.check import split_sizes
from bnspec.distributed.ranks import SyncCase, run_ranks
from conformance import oracle as O
from conformance.strategies import Case

ROOT = Path(__file__).resolve().parents[1]
MUTANTS = ROOT / "tests" / "zoo" / "sync_mutants.py"
REFUSAL = "SyncBatchNorm expected input tensor to be on GPU or XPU or privateuseone"
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def invoke(argv: list[str], capsys) -> tuple[int, str, str]:
    try:
        code = cli.main(argv)
    except SystemExit as exc:  # argparse's own errors
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def _stack(moments: list[S.Moments]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return (torch.stack([m.count for m in moments]), torch.stack([m.mean for m in moments]),
            torch.stack([m.m2 for m in moments]))


# ----------------------------------------------------------------------------- the merge


@settings(max_examples=60, deadline=None)
@given(sizes=st.lists(st.integers(0, 6), min_size=1, max_size=5), channels=st.integers(1, 3),
       offset=st.sampled_from([0.0, -3.0, 1e3]), seed=st.integers(0, 2**31 - 1))
def test_merge_equals_the_direct_computation_on_the_concatenation(sizes, channels, offset, seed):
    g = torch.Generator().manual_seed(seed)
    shards = [torch.randn(n, channels, generator=g, dtype=torch.float64) * (1 + i) + offset + 2 * i
              for i, n in enumerate(sizes)]
    counts, means, m2s = _stack([S.local_moments(s) for s in shards])
    means[counts == 0] = math.nan  # what an empty shard sends must not matter
    m2s[counts == 0] = math.nan
    total = S.merge_moments(counts, means, m2s)
    cat = torch.cat(shards)
    n = cat.shape[0]
    assert int(total.count) == n
    if n == 0:  # as batch_stats on an empty batch
        assert torch.isnan(total.mean).all() and torch.isnan(total.m2).all()
        return
    mean, var = R.batch_stats(cat, mode="oracle")
    e_mu, e_var = T.stats_bounds(mean, var, n, torch.float64)
    assert ((total.mean - mean).abs() <= 2 * e_mu).all()
    assert ((total.m2 / n - var).abs() <= 2 * e_var).all()
    # Order-independent up to rounding.
    perm = torch.randperm(len(sizes), generator=g)
    again = S.merge_moments(counts[perm], means[perm], m2s[perm])
    assert ((again.mean - total.mean).abs() <= 2 * e_mu).all()
    assert ((again.m2 / n - total.m2 / n).abs() <= 2 * e_var).all()


def test_merge_is_stable_at_a_large_offset_where_a_sum_of_squares_merge_is_not():
    """float32 shards at offset 1e4 with unit spread: the merge stays within the S7 bound
    of the float64 truth; merging per-shard sums of x and x^2 (one-pass) does not."""
    g = torch.Generator().manual_seed(7)
    shards = [(torch.randn(n, 3, generator=g, dtype=torch.float64) + 1e4).float() for n in (40, 1, 0, 57, 30)]
    cat = torch.cat(shards)
    n = cat.shape[0]
    mean64, var64 = R.batch_stats(cat, mode="oracle")
    _, e_var = T.stats_bounds(mean64, var64, n, torch.float32)
    total = S.merge_moments(*_stack([S.local_moments(s) for s in shards]))
    assert total.mean.dtype == torch.float32
    ours = T.ratio(total.m2 / n, var64, e_var)
    assert ours <= 1.0, ours
    s1 = sum(s.sum(0) for s in shards)
    s2 = sum((s * s).sum(0) for s in shards)
    naive = s2 / n - (s1 / n) ** 2
    assert T.ratio(naive, var64, e_var) > 10.0  # the bound is tight enough to tell them apart


def test_one_shard_or_no_group_is_the_reference():
    """World size 1 (no process group): the synced functions are the single-process ones."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(5, 3, 2, generator=g) * 3 + 100
    w, b, dy = torch.rand(3, generator=g) + 0.5, torch.randn(3, generator=g), torch.randn(5, 3, 2, generator=g)
    case = Case(shape=tuple(x.shape), dtype="float32")
    single = R.train_forward(x, w, b)
    synced = S.sync_train_forward(x, w, b)
    assert synced.count == 10 and synced.y.dtype == torch.float32
    y = O.train(case, x, w, b)[0]
    assert T.ratio(synced.y, single.y, 2 * y.bound) <= 1.0
    grads = O.train_grads(case, dy, x, w, single.mean.double(), single.var.double())
    got = S.sync_train_backward(dy, x, w, (synced.mean, synced.var), synced.count)
    want = R.train_backward(dy, x, w)
    for name, a, e in (("x", got.dx, want.dx), ("weight", got.dweight, want.dweight), ("bias", got.dbias, want.dbias)):
        assert T.ratio(a, e, 2 * grads[name].bound) <= 1.0, name


# ----------------------------------------------------------------------------- the module, one process


def test_module_has_torchs_constructor_and_state():
    ours = inspect.signature(bnspec.SyncBatchNorm.__init__).parameters
    theirs = inspect.signature(torch.nn.SyncBatchNorm.__init__).parameters
    assert [(p.name, p.default, p.kind) for p in ours.values()] == \
        [(p.name, p.default, p.kind) for p in theirs.values()]
    m, t = bnspec.SyncBatchNorm(4, momentum=None), torch.nn.SyncBatchNorm(4, momentum=None)
    assert list(m.state_dict()) == list(t.state_dict())
    t.running_mean.fill_(2.0)
    m.load_state_dict(t.state_dict())
    assert torch.equal(m.running_mean, t.running_mean) and m.process_group is None


def test_module_without_a_process_group_is_batchnorm():
    torch.manual_seed(0)
    sync, plain = bnspec.SyncBatchNorm(3), bnspec.BatchNorm2d(3)
    x = torch.randn(4, 3, 2, 2, requires_grad=True)
    assert torch.equal(sync(x), plain(x))
    assert torch.equal(sync.running_var, plain.running_var) and int(sync.num_batches_tracked) == 1
    for shape in ((6, 3), (2, 3, 4), (2, 3, 2, 2, 2)):  # any rank from 2 on, like torch's
        assert sync(torch.randn(shape)).shape == shape
    with pytest.raises(ValueError, match=r"expected at least 2D input \(got 1D input\)"):
        sync(torch.randn(3))
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        sync(torch.randn(1, 3))


def test_synced_builtins_need_world_size_outside_the_synced_check():
    for name in ("torch-sync", "bnspec-sync"):
        with pytest.raises(UnusableTarget, match="--world-size K"):
            load_adapter(name, dims=2)


# ----------------------------------------------------------------------------- the module, k processes


def _module_cases(k: int) -> list[SyncCase]:
    """float64, so the comparison with single-process BatchNorm is tight; offset values
    and momentum None in half of them; the last one is an empty global batch."""
    cases = []
    for scenario in ("even", "uneven", "empty"):
        for dims, (dist, momentum, eps) in ((1, ("normal", 0.1, 1e-5)), (2, ("offset", None, 1e-3))):
            cases.append(SyncCase(scenario, split_sizes(scenario, k), dims, "float64", dist, momentum, eps,
                                  seed=10 * k + dims, steps=2))
    return cases + [SyncCase("global-empty", (0,) * k, 1, "float64", steps=2)]


def _single_process(case: SyncCase) -> dict:
    """bnspec.BatchNorm{1,2}d on the concatenated batch, the same training steps."""
    spec = case.spec_case()
    m = {1: bnspec.BatchNorm1d, 2: bnspec.BatchNorm2d}[case.dims](
        spec.channels, eps=case.eps, momentum=case.momentum, dtype=torch.float64)
    with torch.no_grad():
        m.weight.copy_(spec.weight())
        m.bias.copy_(spec.bias_values())
    steps = []
    for t in range(case.steps):
        x, dy = case.batch(t)
        x = x.clone().requires_grad_()
        y = m(x)
        dx, dw, db = torch.autograd.grad(y, [x, m.weight, m.bias], dy)
        steps.append({"y": y.detach(), "dx": dx, "dw": dw, "db": db, "running_mean": m.running_mean.clone(),
                      "running_var": m.running_var.clone(), "num_batches_tracked": m.num_batches_tracked.clone()})
    return {"steps": steps}


def _assert_same(case: SyncCase, ranks: list[dict]) -> None:
    """Every rank's results equal single-process BatchNorm's within twice the bound
    (parameter gradients: summed over ranks)."""
    single, spec = _single_process(case), case.spec_case()
    w, b = spec.weight(), spec.bias_values()
    for t, want in enumerate(single["steps"]):
        x, dy = case.batch(t)
        y, mean, var = O.train(spec, x, w, b)
        grads = O.train_grads(spec, dy, x, w, mean, var)
        for r, res in enumerate(ranks):
            got, rows = res["steps"][t], case.rows(r)
            where = f"{case.label}: rank {r}, step {t}"
            assert T.ratio(got["y"], want["y"][rows], 2 * y.bound[rows]) <= 1, f"y, {where}"
            assert T.ratio(got["dx"], want["dx"][rows], 2 * grads["x"].bound[rows]) <= 1, f"dx, {where}"
            assert got["num_batches_tracked"].dtype == torch.int64
            assert int(got["num_batches_tracked"]) == int(want["num_batches_tracked"]) == t + 1, where
            old = res["init"] if t == 0 else res["steps"][t - 1]
            e_mean, e_var, _ = O.running(spec, old["running_mean"], old["running_var"], t, mean, var,
                                         case.count, case.momentum)
            assert T.ratio(got["running_mean"], want["running_mean"], 2 * e_mean.bound) <= 1, f"mean, {where}"
            assert T.ratio(got["running_var"], want["running_var"], 2 * e_var.bound) <= 1, f"var, {where}"
        for key, name in (("dw", "weight"), ("db", "bias")):
            parts = [res["steps"][t][key] for res in ranks]
            # adding the k partial sums rounds k - 1 more times: u (k - 1) sum |partial|
            slack = T.unit_roundoff(torch.float64) * (len(parts) - 1) * sum(p.abs() for p in parts)
            assert T.ratio(sum(parts), want[key], 2 * grads[name].bound + slack) <= 1, \
                f"d{name}, {case.label}, step {t}"
    # Eval normalizes with the rank's own running statistics (equal to single-process ones
    # within their bound, checked above): the reference's eval forward with them.
    x_eval = case.batch(case.steps)[0]
    for r, res in enumerate(ranks):
        rows, last = case.rows(r), res["steps"][-1]
        want = R.eval_forward(x_eval[rows], last["running_mean"], last["running_var"], w, b, eps=case.eps)
        e = O.eval_(spec, x_eval[rows], last["running_mean"], last["running_var"], w, b)
        assert T.ratio(res["eval_y"], want, 2 * e.bound) <= 1, f"eval y, {case.label}, rank {r}"


@pytest.mark.parametrize("k", [2, 3])
def test_synced_module_in_k_gloo_processes_equals_single_process_batchnorm(k):
    cases = _module_cases(k)
    res = run_ranks("bnspec-sync", cases, ["cpu"] * k, backend="gloo", timeout=60, startup_timeout=120)
    assert res.failure is None, (res.failure, res.detail, res.errors)
    assert len(res.cases) == len(cases)
    for case, ranks in zip(cases, res.cases):
        _assert_same(case, ranks)
    empty = res.cases[-1]  # an empty global batch: statistics unchanged, the step counted
    assert all(torch.equal(r["steps"][-1]["running_var"], r["init"]["running_var"]) for r in empty)


def test_one_value_per_channel_over_all_processes_raises_on_every_rank():
    """Rank 0 holds one sample of (N, C) input, rank 1 none: n = 1 over the group."""
    case = SyncCase("global-one", (1, 0), 1, "float64", steps=1)
    res = run_ranks("bnspec-sync", [case], ["cpu"] * 2, backend="gloo", timeout=60, startup_timeout=120)
    assert res.failure == "raised"
    assert sorted(res.errors) == [0, 1]
    for err in res.errors.values():
        assert err["type"] == "ValueError"
        assert err["message"].startswith("Expected more than 1 value per channel when training")


# ----------------------------------------------------------------------------- bnspec check --world-size


def test_check_passes_bnspec_sync_in_two_processes(capsys, tmp_path):
    out_json = tmp_path / "sync.json"
    code, out, err = invoke(["check", "--world-size", "2", "bnspec-sync", "--profile", "quick",
                             "--json", str(out_json)], capsys)
    assert code == 0, out + err
    doc = json.loads(out_json.read_text())
    assert doc["schema"] == "bnspec.check/1" and doc["conformant"] and doc["world_size"] == 2
    assert [c["id"] for c in doc["clauses"]] == ["S9.1", "S9.2", "S9.3", "S9.4"]
    assert all(c["verdict"] == "pass" for c in doc["clauses"])
    assert {r["error_over_bound_by_dtype"].popitem()[0] for r in doc["records"]} == \
        {"float64", "float32", "float16", "bfloat16"}
    assert doc["command"].startswith("bnspec check --world-size 2 bnspec-sync")


def test_check_world_size_one_has_no_unequal_shards(capsys):
    code, out, err = invoke(["check", "--world-size", "1", "bnspec-sync", "--profile", "quick",
                             "--dtypes", "float32"], capsys)
    assert code == 0, out + err
    assert "S9.4    n/a" in out


def test_torch_sync_is_unsupported_on_cpu_with_torchs_reason(capsys, tmp_path):
    out_json = tmp_path / "torch-sync.json"
    code, out, err = invoke(["check", "--world-size", "2", "torch-sync", "--json", str(out_json)], capsys)
    assert code == 1, out + err
    assert f"ValueError: {REFUSAL}" in out
    doc = json.loads(out_json.read_text())
    assert {c["verdict"] for c in doc["clauses"]} == {"unsupported"}
    assert all(REFUSAL in c["detail"] for c in doc["clauses"])


@pytest.mark.parametrize("mutant", ["LocalStats", "NoBetweenTerm"])
def test_check_fails_a_broken_synced_batchnorm(mutant, capsys):
    code, out, err = invoke(["check", "--world-size", "2", f"{MUTANTS}:{mutant}", "--profile", "quick",
                             "--dtypes", "float32"], capsys)
    assert code == 1, out + err
    assert "S9.1    fail" in out
    assert "rerun: bnspec check --world-size 2" in out


@pytest.mark.parametrize("mutant, expected", [("HangOnRank1", "did not finish the case within 2 s"),
                                              ("CrashOnRank1", "rank 1 was killed by SIGKILL")])
def test_a_hung_or_killed_rank_fails_within_the_time_limit(mutant, expected, capsys):
    code, out, err = invoke(["check", "--world-size", "2", f"{MUTANTS}:{mutant}", "--clauses", "S9.1",
                             "--profile", "quick", "--dtypes", "float32", "--dims", "1", "--timeout", "2"], capsys)
    assert code == 1, out + err
    assert "S9.1    fail" in out and expected in out


@pytest.mark.parametrize("value", ["0", "9", "-1", "two", "1.5", ""])
def test_bad_world_size_exits_2(value, capsys):
    code, out, err = invoke(["check", "--world-size", value, "bnspec-sync"], capsys)
    assert code == 2
    assert "--world-size" in err and "1 to 8" in err


@pytest.mark.parametrize("argv, expected", [
    (["check", "torch-sync"], "--world-size K torch-sync"),
    (["check", "--world-size", "2", "torch"], "not a synced BatchNorm"),
    (["check", "--world-size", "2", "bnspec-sync", "--clauses", "S1"], "selects no clause"),
])
def test_unusable_synced_checks_exit_2(argv, expected, capsys):
    code, out, err = invoke(argv, capsys)
    assert code == 2 and expected in err and out == ""


# ----------------------------------------------------------------------------- CUDA (NCCL)


@needs_cuda
@pytest.mark.parametrize("target", ["torch-sync", "bnspec-sync"])
def test_check_synced_on_cuda_with_nccl(target, capsys):
    code, out, err = invoke(["check", "--world-size", "1", target, "--device", "cuda", "--profile", "quick"], capsys)
    assert code == 0, out + err


@needs_cuda
def test_sync_functions_on_cuda_equal_the_cpu_reference():
    """No process group: the synced forward on CUDA is the reference on CUDA, within the bound."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(6, 3, 4, generator=g) + 10
    case = Case(shape=tuple(x.shape), dtype="float32")
    y = O.train(case, x, None, None)[0]
    synced = S.sync_train_forward(x.cuda())
    assert synced.y.device.type == "cuda" and synced.count == 24
    assert T.ratio(synced.y, y.value, y.bound) <= 1.0


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices (NCCL: one GPU per process)")
def test_check_torch_sync_on_two_cuda_devices(capsys):
    code, out, err = invoke(["check", "--world-size", "2", "torch-sync", "--device", "cuda", "--profile", "quick"],
                            capsys)
    assert code == 0, out + err
