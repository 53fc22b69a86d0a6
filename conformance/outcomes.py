"""The two ways a test ends without a verdict on the candidate, as types.

A record's verdict is read from the exception's type, never from its message:
``Unsupported`` (the candidate does not provide what the test needs: its declared
capabilities, a dtype, a piece of torch's module contract) and ``NotApplicable`` (the
drawn combination does not exist in torch's contract either, e.g. channels_last for a
3-D input). Both are pytest skips, so plain pytest shows them as skipped with the reason.
"""

from __future__ import annotations

import pytest


class Unsupported(pytest.skip.Exception):
    """The candidate lacks what this test needs; never counted as a pass."""

    __module__ = "builtins"  # pytest's own outcome classes do this: short names in its summary


class NotApplicable(pytest.skip.Exception):
    """The test's subject does not exist for this rank family or combination."""

    __module__ = "builtins"


def unsupported(reason: str):
    raise Unsupported(f"unsupported: {reason}", _use_item_location=True)  # reported at the test, not here


def not_applicable(reason: str):
    raise NotApplicable(f"not applicable: {reason}", _use_item_location=True)
