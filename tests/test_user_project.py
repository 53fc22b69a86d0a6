"""bnspec.testing beyond what a kernel author's tests show (tests/user_project, another
project's test folder with only public imports, collected with the suite: pytest puts
that folder on sys.path, as it does in the author's project)."""

import pytest

import bnspec
from bnspec.testing import UnusableLayer, check, target_of


def test_an_unusable_layer_raises_unusable_layer_not_assertion_error():
    with pytest.raises(UnusableLayer, match="cannot import module 'no_such_module_here'"):
        check("no_such_module_here:BatchNorm2d", profile="quick")


def test_targets_of_classes():
    assert target_of(bnspec.BatchNorm2d) == "bnspec.modules:BatchNorm2d"
    assert target_of("torch") == "torch"
