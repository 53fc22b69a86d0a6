"""``bnspec list``: the built-in candidates (and whether their framework is installed), and
those other packages registered under the entry-point group."""

from __future__ import annotations

import argparse


def cmd_list(ns: argparse.Namespace) -> int:
    from importlib.metadata import entry_points

    from bnspec.candidates.targets import ENTRY_POINT_GROUP, describe_builtins

    print("built-in candidates:")
    rows = describe_builtins()
    width = max(len(name) for name, _, _ in rows)
    for name, description, installed in rows:
        print(f"  {name:{width}} {'' if installed else '(not installed) '}{description}")
    registered = list(entry_points(group=ENTRY_POINT_GROUP))
    print(f"registered under the entry-point group {ENTRY_POINT_GROUP!r}:")
    for ep in registered:
        print(f"  {ep.name:12} {ep.value}")
    if not registered:
        print("  (none)")
    return 0
