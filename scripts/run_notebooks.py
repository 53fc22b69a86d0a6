"""Re-execute the notebooks in notebooks/ in place, storing their outputs.

    python scripts/run_notebooks.py                 # every notebooks/*.ipynb, in name order
    python scripts/run_notebooks.py notebooks/03_backward.ipynb ...

Each notebook runs top to bottom in a fresh ``python3`` kernel (the interpreter running
this script), from the repository root with ``notebooks/`` as the working directory, with
no per-cell timing metadata, so the stored outputs, cell ids and execution counts
(1, 2, 3, ...) are what ``pytest --nbval notebooks/`` compares against. Run
``scripts/check_notebooks.py`` afterwards.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = "notebooks"


def execute(path: Path) -> float:
    """Execute one notebook in place; return the seconds it took."""
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(
        nb,
        timeout=600,
        kernel_name="python3",
        record_timing=False,
        resources={"metadata": {"path": NOTEBOOKS}},
    )
    start = time.perf_counter()
    client.execute()
    elapsed = time.perf_counter() - start
    nbformat.validate(nb)
    nbformat.write(nb, path)
    return elapsed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("notebooks", nargs="*", help="notebooks to run (default: notebooks/*.ipynb)")
    args = parser.parse_args(argv)
    given = [Path(p).resolve() for p in args.notebooks]  # relative to the caller's directory
    os.chdir(ROOT)  # relative paths below, and nothing of this machine in the outputs
    paths = [p.relative_to(ROOT) for p in given] or sorted(Path(NOTEBOOKS).glob("*.ipynb"))
    if not paths:
        print(f"no notebooks in {NOTEBOOKS}/", file=sys.stderr)
        return 1
    total = 0.0
    for path in paths:
        try:
            seconds = execute(path)
        except CellExecutionError as err:
            print(f"FAILED {path}:\n{err}", file=sys.stderr)
            return 1
        total += seconds
        print(f"{path}: {seconds:.1f} s")
    print(f"{len(paths)} notebook(s) in {total:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
