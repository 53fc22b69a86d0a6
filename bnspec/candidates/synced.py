"""The synced BatchNorm targets: the built-ins ``torch-sync`` and ``bnspec-sync``, and how a
rank of the synced check (:mod:`bnspec.distributed`) loads its candidate class.

The synced built-ins make sense only in K processes (``bnspec check --world-size K``);
loaded anywhere else (``bnspec check torch-sync``, ``bnspec report``, ``pytest
conformance``) they are unusable targets, exit 2, rather than run the single-process
suite, whose S6.2 (wrong input rank raises) a SyncBatchNorm, which takes any rank from 2
on, would fail for no fault of its own.
"""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points

from bnspec.candidates.targets import ENTRY_POINT_GROUP, UnusableTarget, import_object, kind_of

SYNC_BUILTINS = {"torch-sync": "torch.nn:SyncBatchNorm", "bnspec-sync": "bnspec:SyncBatchNorm"}
MAX_WORLD_SIZE = 8


def needs_world_size(target: str) -> str:
    return (f"{target!r} is a synced BatchNorm: check it in K processes with "
            f"bnspec check --world-size K {target} (K from 1 to {MAX_WORLD_SIZE})")


def torch_sync(device: str = "cpu"):
    """Loader of the built-in ``torch-sync`` outside ``--world-size``: not usable there."""
    raise UnusableTarget(needs_world_size("torch-sync"))


def bnspec_sync(device: str = "cpu"):
    """Loader of the built-in ``bnspec-sync`` outside ``--world-size``: not usable there."""
    raise UnusableTarget(needs_world_size("bnspec-sync"))


def load_synced_class(target: str):
    """The candidate class: a synced built-in, an entry point, ``package.module:Name`` or
    ``file.py:Name``."""
    if target in SYNC_BUILTINS:
        module, _, name = SYNC_BUILTINS[target].partition(":")
        return getattr(importlib.import_module(module), name)
    kind = kind_of(target)
    if kind == "builtin":
        raise UnusableTarget(f"built-in {target!r} is not a synced BatchNorm (synced built-ins: "
                             f"{', '.join(SYNC_BUILTINS)})")
    if kind == "entrypoint":
        found = [ep for ep in entry_points(group=ENTRY_POINT_GROUP) if ep.name == target]
        if not found:
            raise UnusableTarget(f"{target!r} is not registered under the entry-point group {ENTRY_POINT_GROUP!r}")
        return found[0].load()
    obj = import_object(target)
    if not callable(obj):
        raise UnusableTarget(f"{target!r} is a {type(obj).__name__}, not a class or factory")
    return obj
