"""Run a candidate in a child process with a time limit; talk to it over a private pipe.

The parent (the suite, the oracle) never imports the candidate. The child only returns
data (tensors, attribute values, exception names); every verdict is made in the parent.
"""

from bnspec.isolation.proxy import (
    CandidateCrashed,
    CandidateError,
    CandidateRaised,
    CandidateTimeout,
    CandidateProcess,
    TargetUnusable,
)

__all__ = [
    "CandidateProcess",
    "CandidateError",
    "CandidateRaised",
    "CandidateCrashed",
    "CandidateTimeout",
    "TargetUnusable",
]
