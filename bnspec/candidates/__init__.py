"""Candidates: how any BatchNorm is reached (targets, adapters, capabilities)."""

from bnspec.candidates.protocol import FULL, Capabilities
from bnspec.candidates.targets import BUILTINS, UnusableTarget, kind_of, load_adapter

__all__ = ["Capabilities", "FULL", "BUILTINS", "UnusableTarget", "kind_of", "load_adapter"]
