"""A zoo of BatchNorms for testing the conformance suite itself (each mutant breaks one
clause of SPEC.md).

* :mod:`tests.zoo.base` - a from-scratch BatchNorm in plain torch ops, cut into small
  overridable pieces so that a mutant changes exactly one of them;
* :mod:`tests.zoo.mutants` - single-bug variants of the base, with the clause each one
  must fail (``MUTANTS``);
* :mod:`tests.zoo.correct` - three independently written correct BatchNorms that the
  suite must pass.

Every file is also usable as a suite target, e.g.
``pytest conformance --candidate tests/zoo/correct.py:FromScratch --dims 1,2,3``
(a mapping ``{1: .., 2: .., 3: ..}``) or
``pytest conformance --candidate tests/zoo/mutants.py:EpsOutsideRoot`` (a 2-D class).
None of them calls torch's own batch norm or imports ``bnspec.reference``.
"""
