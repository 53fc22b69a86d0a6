"""How long `bnspec check` takes per profile, and whether the built-ins pass across seeds.

A benchmark, not a test: it prints what it measured and always exits 0.

    python scripts/bench_profiles.py                  # quick, ci, thorough for torch and bnspec
    python scripts/bench_profiles.py --seeds 20       # plus `ci` under seeds 1..20: count conformant runs
    python scripts/bench_profiles.py --profiles quick --targets torch

Budgets on 2 cores (issue 3): quick under 15 s and ci under 60 s for one candidate; the
time of thorough is reported. Wall times include starting the candidate's process.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

BUDGETS = {"quick": 15.0, "ci": 60.0}


def check(target: str, profile: str, seed: int | None) -> tuple[float, int]:
    cmd = [sys.executable, "-m", "bnspec.cli", "check", target, "--profile", profile]
    if seed is not None:
        cmd += ["--seed", str(seed)]
    start = time.perf_counter()
    code = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode
    return time.perf_counter() - start, code


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--targets", default="torch,bnspec")
    p.add_argument("--profiles", default="quick,ci,thorough")
    p.add_argument("--seeds", type=int, default=0, help="also run ci under seeds 1..N")
    ns = p.parse_args()
    targets = [t for t in ns.targets.split(",") if t]
    print(f"load average at start: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    print(f"{'target':8} {'profile':9} {'seed':>5} {'wall s':>8} {'budget':>7}  verdict")
    for target in targets:
        for profile in [q for q in ns.profiles.split(",") if q]:
            wall, code = check(target, profile, None)
            budget = BUDGETS.get(profile)
            over = "" if budget is None else ("within" if wall <= budget else "OVER")
            print(f"{target:8} {profile:9} {'-':>5} {wall:8.1f} {over:>7}  "
                  f"{'conforms' if code == 0 else f'exit {code}'}", flush=True)
        if ns.seeds:
            passed = 0
            for seed in range(1, ns.seeds + 1):
                wall, code = check(target, "ci", seed)
                passed += code == 0
                print(f"{target:8} {'ci':9} {seed:5d} {wall:8.1f} {'':>7}  "
                      f"{'conforms' if code == 0 else f'exit {code}'}", flush=True)
            print(f"{target}: {passed}/{ns.seeds} seeded ci runs conform")
    print(f"load average at end: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
