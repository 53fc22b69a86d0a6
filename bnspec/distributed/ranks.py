"""Run a synced BatchNorm candidate in K processes on shards of seeded batches.

The parent starts K ranks with torch's own helper, ``torch.multiprocessing.start_processes``
(no transport of ours: the ranks find each other through ``torch.distributed``'s TCP
rendezvous on 127.0.0.1, gloo on the CPU, NCCL on CUDA). Each rank builds the candidate,
runs every :class:`SyncCase` on its shard (training steps with backward, then an eval
forward) and writes each case's results to a file of a private temporary folder, which
also tells the parent how far it got. Nothing here judges: :mod:`bnspec.distributed.check`
compares the results with the reference.

Start method, measured here (2 cores, torch 2.13 CPU, a gloo group of 2 doing one
all_reduce): ``spawn`` 4.0-5.2 s per group, ``torch.distributed.launcher``'s elastic
launch 4.1-4.8 s, ``forkserver`` with torch preloaded 1.6 s for the first group and
0.05-0.1 s for each later one (the server is started once per bnspec process and forks
ranks with torch already imported). So: forkserver where the platform has it, else spawn.

Time limits: loading the candidate and joining the group must end within
``startup_timeout`` seconds; after that every case must finish on every rank within
``timeout`` seconds. A rank that raises, dies or hangs ends the group: every rank is put
in its own process group at start, and all of them (with anything they started) are
killed with SIGKILL, so no rank outlives the check; a rank whose parent goes away exits.
"""

from __future__ import annotations

import math
import multiprocessing
import multiprocessing.connection
import os
import signal
import socket
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass, field

import torch

from bnspec.candidates.synced import load_synced_class

#: Samples' drift across the batch axis, in units of the channel's scale: it makes the
#: shards' means differ, so a merge without the between-shard term is caught.
DRIFT = 2.0
#: (C, *spatial) of the input per rank family (BatchNorm1d/2d/3d-shaped inputs).
TAILS = {1: (3,), 2: (2, 3, 2), 3: (2, 2, 2, 2)}
#: Seconds the other ranks get to end on their own after one failed (each then says why:
#: a symmetric refusal is raised on every rank) before they are killed.
GRACE_S = 1.0
EXIT_RAISED, EXIT_UNUSABLE, EXIT_SETUP, EXIT_ORPHANED = 3, 4, 5, 6
#: Imported once by the fork server, so each rank starts with them: the last one is what
#: the first autograd.grad with explicit output gradients imports (sympy, 0.5 s measured).
_PRELOAD = ["torch", "torch.distributed", "bnspec", "bnspec.sync", "bnspec.distributed.ranks",
            "conformance.strategies", "torch.fx.experimental.symbolic_shapes"]


# ----------------------------------------------------------------------------- cases


@dataclass(frozen=True)
class SyncCase:
    """One synced configuration; its batches are rebuilt from ``seed`` on every rank and in
    the parent, so the oracle sees exactly the values the candidate sees."""

    scenario: str  #: "even", "uneven" or "empty" (one rank holds no sample)
    sizes: tuple[int, ...]  #: samples on each rank, in rank order
    dims: int  #: 1, 2, 3: the rank family of the input shape
    dtype: str = "float32"
    dist: str = "normal"  #: a conformance.strategies value distribution
    momentum: float | None = 0.1
    eps: float = 1e-5
    seed: int = 0
    steps: int = 3  #: training steps; one more batch is the eval batch

    @property
    def shape(self) -> tuple[int, ...]:
        """The concatenated batch's shape."""
        return (sum(self.sizes), *TAILS[self.dims])

    @property
    def count(self) -> int:
        """n over all ranks: values per channel of the concatenated batch."""
        return self.shape[0] * math.prod(self.shape[2:])

    @property
    def label(self) -> str:
        return (f"{self.scenario} split {list(self.sizes)}, input {self.shape} {self.dtype}, {self.dist} values, "
                f"momentum {self.momentum}, eps {self.eps:g}, seed {self.seed}")

    def spec_case(self):
        """The conformance Case of the concatenated batch: its weight, bias and the oracle's
        dtype rules (conformance.oracle takes one)."""
        from conformance.strategies import Case

        return Case(shape=self.shape, dtype=self.dtype, eps=self.eps, momentum=self.momentum, dist=self.dist,
                    seed=self.seed)

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Input and upstream gradient of the concatenated batch at ``step`` (float64 values
        rounded once to ``dtype``); step ``steps`` is the eval batch."""
        from conformance.strategies import make_values

        g = torch.Generator().manual_seed((self.seed * 1_000_003 + 7_919 * (step + 1)) % 2**63)
        x = make_values(self.shape, self.dist, g, eps=self.eps)
        n = self.shape[0]
        if n > 1:  # sample i of n moves by DRIFT * (2 i / (n - 1) - 1) channel standard deviations
            ramp = torch.linspace(-1.0, 1.0, n, dtype=torch.float64).reshape(-1, *([1] * (x.dim() - 1)))
            spread = x.std(dim=(0, *range(2, x.dim())), keepdim=True).clamp_min(1e-3)
            x = x + DRIFT * ramp * spread
        dy = torch.randn(self.shape, generator=g, dtype=torch.float64)
        dtype = getattr(torch, self.dtype)
        return x.to(dtype), dy.to(dtype)

    def rows(self, rank: int) -> slice:
        start = sum(self.sizes[:rank])
        return slice(start, start + self.sizes[rank])


# ----------------------------------------------------------------------------- rank side


def _cpu(t):
    return t.detach().to("cpu").clone() if isinstance(t, torch.Tensor) else t


def _state(m) -> dict:
    return {k: _cpu(getattr(m, k, None)) for k in ("running_mean", "running_var", "num_batches_tracked")}


def run_case(cls, case: SyncCase, rank: int, device: torch.device) -> dict:
    """Build the candidate on ``device``, run ``case.steps`` training steps on this rank's
    shard (forward, backward with the seeded upstream gradient), then an eval forward."""
    spec = case.spec_case()
    m = cls(spec.channels, eps=case.eps, momentum=case.momentum, device=device, dtype=getattr(torch, case.dtype))
    with torch.no_grad():
        m.weight.copy_(spec.weight())
        m.bias.copy_(spec.bias_values())
    m.train()
    out = {"init": _state(m), "steps": []}
    rows = case.rows(rank)
    for step in range(case.steps):
        x, dy = case.batch(step)
        xs = x[rows].clone().to(device).requires_grad_()
        y = m(xs)
        inputs = [xs, m.weight, m.bias]
        grads = torch.autograd.grad(y, inputs, dy[rows].to(device), allow_unused=True)
        # None: the candidate's backward gave no gradient (torch's for an empty shard): zeros.
        dx, dw, db = (torch.zeros_like(i) if g is None else g for g, i in zip(grads, inputs))
        out["steps"].append({"y": _cpu(y), "device": str(y.device), "dx": _cpu(dx), "dw": _cpu(dw),
                             "db": _cpu(db), **_state(m)})
    m.eval()
    with torch.no_grad():
        out["eval_y"] = _cpu(m(case.batch(case.steps)[0][rows].to(device)))
    return out


def _save(path: str, obj) -> None:
    """Written whole or not at all: the parent treats the file's existence as progress."""
    torch.save(obj, path + ".tmp")
    os.replace(path + ".tmp", path)


def _exit_with_parent() -> None:
    """End this rank when the process that started it goes away (bnspec killed): a rank
    blocked in a collective would otherwise wait for its peers forever."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(EXIT_ORPHANED)

    threading.Thread(target=watch, daemon=True).start()


def _why(exc: BaseException) -> dict:
    return {"type": type(exc).__qualname__, "message": str(exc)[:4000],
            "traceback": "".join(traceback.format_exception(exc))[-4000:]}


def rank_main(rank: int, plan: dict) -> None:
    """One rank: join the group, run every case, write ``case{rank}.{i}.pt`` per case.

    Ends with ``os._exit``: a rank that raised must not wait in interpreter teardown for
    peers that are blocked in a collective."""
    try:
        os.setpgid(0, 0)  # the parent kills this group: the rank and anything it started
    except (AttributeError, OSError):  # no process groups here: the parent kills the rank alone
        pass
    _exit_with_parent()
    folder = plan["dir"]
    log = os.open(os.path.join(folder, f"log{rank}"), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.dup2(log, 1)  # what the candidate prints must not mix into bnspec's table
    os.dup2(log, 2)
    stage, index = "load", None
    try:
        cls = load_synced_class(plan["target"])
        stage = "setup"
        device = torch.device(plan["devices"][rank])
        if device.type == "cuda":
            torch.cuda.set_device(device)
        import datetime

        import torch.distributed as dist

        dist.init_process_group(plan["backend"], init_method=f"tcp://127.0.0.1:{plan['port']}", rank=rank,
                                world_size=len(plan["devices"]),
                                timeout=datetime.timedelta(seconds=plan["collective_timeout"]))
        open(os.path.join(folder, f"ready{rank}"), "w").close()
        stage = "case"
        for index, case in enumerate(plan["cases"]):
            _save(os.path.join(folder, f"case{rank}.{index}.pt"), run_case(cls, case, rank, device))
        stage = "teardown"
        dist.destroy_process_group()
    except BaseException as exc:  # noqa: BLE001 - candidate code: every failure is reported
        unusable = stage == "load"
        _save(os.path.join(folder, f"error{rank}.pt"), {"stage": stage, "case": index, **_why(exc)})
        os._exit(EXIT_UNUSABLE if unusable else EXIT_SETUP if stage == "setup" else EXIT_RAISED)
    os._exit(0)


# ----------------------------------------------------------------------------- parent side


@dataclass
class GroupResult:
    """What K ranks produced: per rank, the results of the cases every rank finished, and
    how the group ended (``failure`` None when every rank finished every case)."""

    cases: list[list[dict]]  #: cases[i][rank]
    errors: dict[int, dict] = field(default_factory=dict)  #: rank -> what it raised (stage, case, type, message)
    failure: str | None = None  #: "raised", "died", "hang", "startup", "budget"
    detail: str = ""  #: one line for the failure
    failed_case: int | None = None  #: index of the case running when it failed
    logs: dict[int, str] = field(default_factory=dict)  #: rank -> the end of what it printed


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (the OS picks it); rank 0's rendezvous binds it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_method() -> str:
    """forkserver with torch preloaded where available (see the module docstring), else spawn."""
    if "forkserver" in multiprocessing.get_all_start_methods():
        multiprocessing.set_forkserver_preload(_PRELOAD)  # no effect once this process's server runs
        return "forkserver"
    return "spawn"


def run_ranks(target: str, cases: list[SyncCase], devices: list[str], *, backend: str, timeout: float,
              startup_timeout: float, deadline: float | None = None) -> GroupResult:
    """Run ``cases`` on ``len(devices)`` ranks (rank r on ``devices[r]``); never hangs:
    see the module docstring for the time limits. ``deadline`` (time.monotonic) bounds the
    whole run too."""
    import torch.multiprocessing as tmp_mp

    with tempfile.TemporaryDirectory(prefix="bnspec-sync-") as folder:
        plan = {"target": target, "cases": cases, "devices": devices, "backend": backend, "port": free_port(),
                "dir": folder, "collective_timeout": startup_timeout + timeout * max(len(cases), 1)}
        ctx = tmp_mp.start_processes(rank_main, args=(plan,), nprocs=len(devices), join=False,
                                     start_method=start_method())
        procs = ctx.processes
        try:
            result = _watch(procs, folder, len(cases), timeout, startup_timeout, deadline)
        finally:
            _kill(procs)
        return _collect(result, folder, len(devices), len(cases))


def _done(folder: str, rank: int, index: int) -> bool:
    return os.path.exists(os.path.join(folder, f"case{rank}.{index}.pt"))


def _watch(procs, folder: str, n_cases: int, timeout: float, startup_timeout: float,
           deadline: float | None) -> GroupResult:
    k = len(procs)
    start = time.monotonic()
    ready_at = None
    finished, since = 0, None  # cases finished on every rank, and since when
    while True:
        codes = [p.exitcode for p in procs]
        if all(c == 0 for c in codes):
            return GroupResult([])
        bad = [r for r, c in enumerate(codes) if c not in (None, 0)]
        if bad:
            _wait(procs, GRACE_S)
            codes = [p.exitcode for p in procs]
            return GroupResult([], failure="exit", detail=_exit_text(codes), failed_case=finished)
        now = time.monotonic()
        if deadline is not None and now > deadline:
            return GroupResult([], failure="budget", detail="the check's time budget (--budget) ran out",
                               failed_case=finished)
        if ready_at is None:
            if all(os.path.exists(os.path.join(folder, f"ready{r}")) for r in range(k)):
                ready_at = since = now
            elif now - start > startup_timeout:
                waiting = [r for r in range(k) if not os.path.exists(os.path.join(folder, f"ready{r}"))]
                return GroupResult([], failure="startup", detail=f"rank(s) {waiting} did not load the candidate and "
                                   f"join the group within {startup_timeout:g} s; all {k} processes killed")
        else:
            while finished < n_cases and all(_done(folder, r, finished) for r in range(k)):
                finished, since = finished + 1, now
            if now - since > timeout:
                late = [r for r in range(k) if not _done(folder, r, finished)]
                return GroupResult([], failure="hang", failed_case=finished,
                                   detail=f"rank(s) {late} did not finish the case within {timeout:g} s "
                                          f"(--timeout); all {k} processes killed")
        alive = [p.sentinel for p in procs if p.exitcode is None]
        multiprocessing.connection.wait(alive, timeout=0.05)


def _wait(procs, seconds: float) -> None:
    end = time.monotonic() + seconds
    for p in procs:
        p.join(max(0.0, end - time.monotonic()))


def _exit_text(codes: list[int | None]) -> str:
    parts = []
    for r, c in enumerate(codes):
        if c is None or c == 0:
            continue
        if c < 0:
            parts.append(f"rank {r} was killed by {signal.Signals(-c).name}")
        elif c not in (EXIT_RAISED, EXIT_UNUSABLE, EXIT_SETUP):
            parts.append(f"rank {r} exited with status {c}")
    return "; ".join(parts)


def _kill(procs) -> None:
    """SIGKILL every rank's process group (each rank leads its own), then the rank itself
    if it had not yet made its group; reap them."""
    for p in procs:
        if p.pid is None:
            continue
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            if p.exitcode is None:
                try:
                    os.kill(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
    for p in procs:
        p.join(5)


def _collect(result: GroupResult, folder: str, k: int, n_cases: int) -> GroupResult:
    complete = 0
    while complete < n_cases and all(_done(folder, r, complete) for r in range(k)):
        complete += 1
    result.cases = [[torch.load(os.path.join(folder, f"case{r}.{i}.pt"), weights_only=True) for r in range(k)]
                    for i in range(complete)]
    for r in range(k):
        path = os.path.join(folder, f"error{r}.pt")
        if os.path.exists(path):
            result.errors[r] = torch.load(path, weights_only=True)
        log = os.path.join(folder, f"log{r}")
        if os.path.exists(log):
            with open(log, "rb") as f:
                f.seek(max(0, os.path.getsize(log) - 2000))
                result.logs[r] = f.read().decode("utf-8", "replace")
    if result.failure == "exit":
        result.failure = "raised" if result.errors else "died"
    if result.failure is not None and result.failed_case is None:
        result.failed_case = complete
    return result
