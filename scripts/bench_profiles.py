"""How long `bnspec check` takes per profile, and whether the built-ins pass across seeds.

A benchmark, not a test: it prints what it measured and always exits 0.

    python scripts/bench_profiles.py                  # quick, ci, thorough for torch and bnspec
    python scripts/bench_profiles.py --seeds 20       # plus `ci` under seeds 1..20: count conformant runs
    python scripts/bench_profiles.py --profiles quick --targets torch
    python scripts/bench_profiles.py --users-only     # only the two user-class rows below

Budgets on 2 cores: quick under 15 s and ci under 60 s for one built-in; the time of
thorough is reported. Users' classes (``--profile ci``, diagnosis included): a conforming
one (the zoo's from-scratch BatchNorm2d) in at most 30 s, a failing one (the textbook
style of tests/corpus, whose failures are replayed to find their causes) in at most 60 s.
Wall times include starting the candidate's process.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

BUDGETS = {"quick": 15.0, "ci": 60.0}
#: (label, target and options, budget in seconds) for users' classes under --profile ci
USER_CLASSES = (
    ("conforming class", ["tests/zoo/correct.py:FromScratch", "--dims", "2"], 30.0),
    ("failing class (textbook)", ["tests/corpus/textbook.py:TextbookBatchNorm2d"], 60.0),
)


def check(target: str | list[str], profile: str, seed: int | None) -> tuple[float, int]:
    cmd = [sys.executable, "-m", "bnspec.cli", "check", *([target] if isinstance(target, str) else target),
           "--profile", profile]
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
    p.add_argument("--users-only", action="store_true", help="only the users' classes (ci profile)")
    ns = p.parse_args()
    targets = [] if ns.users_only else [t for t in ns.targets.split(",") if t]
    print(f"load average at start: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    for label, args, budget in USER_CLASSES:
        wall, code = check(args, "ci", None)
        print(f"{label}: bnspec check {' '.join(args)} --profile ci: {wall:.1f} s (budget {budget:g} s, "
              f"{'within' if wall <= budget else 'OVER'}), exit {code}", flush=True)
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
