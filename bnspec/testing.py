"""bnspec's check from another project's test suite: one line per BatchNorm kernel. ::

    import bnspec.testing
    from my_kernels import MyBatchNorm2d

    def test_my_batchnorm_conforms():
        bnspec.testing.assert_conforms(MyBatchNorm2d, dims=2, profile="ci")

Both functions run exactly ``bnspec check`` (the same command, in a separate Python
process, so the layer runs in its own child process with the same per-call time
limits and budget as on the command line, and nothing of the caller's test session,
its plugins or its pytest run leaks into the check). :func:`check` returns the results
document (schema ``bnspec.check/1``, see :mod:`bnspec.results`); :func:`assert_conforms`
raises ``AssertionError`` whose message is the check's causes and clause table, the
text ``bnspec check`` prints.

``layer`` is a class or factory with ``torch.nn.BatchNorm{1,2,3}d``'s constructor,
defined at module level (the check imports it in a fresh process), or a TARGET string
as ``bnspec check`` takes (``package.module:Name``, ``path/to/file.py:Name``, a built-in
name). The caller's ``sys.path`` is passed on, so a class the test can import, the
check can import too.
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import os
import subprocess
import sys
import tempfile
from typing import Iterable

from bnspec.options import EXIT_CONFORMS, EXIT_DOES_NOT_CONFORM  # bnspec check's; 2: unusable
from bnspec.results import format_table

__all__ = ["check", "assert_conforms", "UnusableLayer", "target_of"]



class UnusableLayer(RuntimeError):
    """The layer could not be checked (it cannot be imported or built, a bad option):
    ``bnspec check`` exits 2; the message is its reason."""


def target_of(layer: object) -> str:
    """The ``bnspec check`` TARGET for ``layer``: ``module:Name`` when its module can be
    imported by name, else ``path/to/file.py:Name``; a string is returned as it is."""
    if isinstance(layer, str):
        return layer
    module, name = getattr(layer, "__module__", None), getattr(layer, "__qualname__", "")
    if not module or not name or "<locals>" in name:
        raise TypeError(f"{layer!r}: give a class or factory defined at module level (the check imports it "
                        "in a fresh process), or a TARGET string")
    if module != "__main__" and _importable(module):
        return f"{module}:{name}"
    source = inspect.getsourcefile(layer)
    if source is None:
        raise TypeError(f"{layer!r}: its module {module!r} cannot be imported by name and has no source file")
    return f"{source}:{name}"


def check(layer: object, *, dims: int = 2, profile: str = "ci", accept: Iterable[str] = (),
          clauses: str | None = None, dtypes: Iterable[str] = (), device: str = "cpu",
          seed: int | None = None, timeout: float | None = None, budget: float | None = None) -> dict:
    """Run ``bnspec check`` on ``layer`` for one rank family ``dims`` and return its
    results document (``doc["conformant"]``, ``doc["causes"]``, ``doc["clauses"]``).

    The options are ``bnspec check``'s: ``profile`` quick, ci or thorough; ``accept``
    conventions judged against their own formulas (names in :mod:`bnspec.conventions`);
    ``clauses`` ids or prefixes such as ``"S1,S3.2"``; ``dtypes`` to narrow the contract.
    Raises :class:`UnusableLayer` when the layer cannot be checked.
    """
    target = target_of(layer)
    args = [target, "--dims", str(dims), "--profile", profile, "--device", device]
    for option, value in (("--accept", ",".join(accept)), ("--dtypes", ",".join(dtypes)),
                          ("--clauses", clauses), ("--seed", seed), ("--timeout", timeout), ("--budget", budget)):
        if value not in (None, ""):
            args += [option, str(value)]
    fd, path = tempfile.mkstemp(prefix="bnspec-check-", suffix=".json")
    os.close(fd)
    try:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if isinstance(p, str)))
        done = subprocess.run([sys.executable, "-m", "bnspec.cli", "check", *args, "--json", path],
                              stdin=subprocess.DEVNULL, capture_output=True, text=True, env=env)
        if done.returncode not in (EXIT_CONFORMS, EXIT_DOES_NOT_CONFORM):
            reason = done.stderr.strip().splitlines()[-1:] or [f"exit status {done.returncode}"]
            raise UnusableLayer(f"bnspec check {target} could not check the layer: {reason[0]}")
        with open(path) as f:
            return json.load(f)
    finally:
        os.unlink(path)


def assert_conforms(layer: object, **options) -> None:
    """Raise ``AssertionError`` unless ``layer`` conforms; the message is the causes and
    clause table ``bnspec check`` prints. ``options`` are :func:`check`'s."""
    doc = check(layer, **options)
    if not doc["conformant"]:
        raise AssertionError(format_table(doc))


def _importable(module: str) -> bool:
    """True when ``module`` is found by name on ``sys.path`` (runs no code)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False
