"""A kernel author's own tests, as they would write them: one line per layer checks it
against bnspec (only public imports; my_kernels is the author's module)."""

import pytest
import torch

import bnspec.testing
from my_kernels import MyBatchNorm2d

# S3.1, the momentum update of the running statistics, where MyBatchNorm2d's convention
# shows: a few seconds a check (a full check is a plain assert_conforms(MyBatchNorm2d)).
QUICK = dict(dims=2, profile="quick", clauses="S3.1")


def test_torchs_batchnorm_conforms():
    bnspec.testing.assert_conforms(torch.nn.BatchNorm2d, **QUICK)


def test_my_batchnorm_fails_with_its_cause():
    with pytest.raises(AssertionError) as failed:
        bnspec.testing.assert_conforms(MyBatchNorm2d, **QUICK)
    message = str(failed.value)
    assert "1 cause(s)" in message and "convention: momentum_on_old" in message
    assert "S3.1    fail" in message and "verdict: DOES NOT CONFORM" in message


def test_my_batchnorm_conforms_with_its_convention_accepted():
    doc = bnspec.testing.check(MyBatchNorm2d, accept=["momentum_on_old"], **QUICK)  # the results document
    assert doc["schema"] == "bnspec.check/1" and doc["conformant"] is True
    assert doc["accepted"] == ["momentum_on_old"] and doc["causes"] == []
    assert doc["candidate"] == {"target": "my_kernels:MyBatchNorm2d", "dims": [2]}
