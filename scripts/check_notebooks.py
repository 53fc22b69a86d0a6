"""Check that the stored notebooks are ready for ``pytest --nbval notebooks/``.

    python scripts/check_notebooks.py                   # every notebooks/*.ipynb
    python scripts/check_notebooks.py notebooks/01_seed_reproduced.ipynb ...

Fails (exit status 1, one line per problem) when a notebook

* is not valid nbformat 4.5, or a cell lacks an id (or ids repeat);
* was not executed, or only partly: a code cell without an execution count, execution
  counts other than 1, 2, 3, ... in cell order, or an execute_result whose count differs
  from its cell's;
* is missing outputs: no outputs at all, a cell that calls ``print`` with no stream
  output, or a cell ending in a bare expression with no result;
* stored an error output, or per-cell timing metadata (run with ``record_timing=False``);
* contains a path of this machine (``/work/``, ``/root/``, ``/tmp/``, ``/home/<user>``,
  ``/Users/<user>``, ``C:\\Users``) anywhere: sources, outputs or metadata.

Prints warnings (without failing) for stderr outputs and for ``NBVAL_IGNORE_OUTPUT``
cells that carry no other comment saying why. ``scripts/run_notebooks.py`` refreshes
the notebooks.
"""

from __future__ import annotations

import ast
import json
import re
import sys
import warnings as _warnings
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "notebooks"
MACHINE_PATH = re.compile(r"(/work/|/root/|/tmp/|/home/[^/\s\"']+|/Users/[^/\s\"']+|[A-Za-z]:\\\\+Users)")


def _python_source(source: str) -> str:
    """The cell's source without IPython magics and shell escapes, for ``ast``."""
    return "\n".join("" if line.lstrip().startswith(("%", "!")) else line for line in source.splitlines())


def _expects_output(source: str) -> tuple[bool, bool]:
    """(calls print, ends in a bare non-call expression) for a parseable cell."""
    try:
        tree = ast.parse(_python_source(source))
    except SyntaxError:
        return False, False
    prints = any(isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "print"
                 for node in ast.walk(tree))
    last = tree.body[-1] if tree.body else None
    bare = (isinstance(last, ast.Expr) and not isinstance(last.value, (ast.Call, ast.Constant, ast.Await))
            and not source.rstrip().endswith(";"))
    return prints, bare


def check(path: Path) -> tuple[list[str], list[str]]:
    """Problems and warnings for one notebook."""
    problems: list[str] = []
    warnings: list[str] = []
    text = path.read_text(encoding="utf-8")
    for match in sorted(set(MACHINE_PATH.findall(text))):
        problems.append(f"machine path {match!r} in the file")
    try:
        raw = json.loads(text)
        with _warnings.catch_warnings():  # nbformat fills in missing ids (with a warning): check the raw file
            _warnings.simplefilter("ignore")
            nb = nbformat.reads(text, as_version=4)
            nbformat.validate(nb)
    except Exception as err:  # noqa: BLE001 - any reading/validation error is a finding
        return problems + [f"not a valid notebook: {str(err).splitlines()[0]}"], warnings
    if (raw.get("nbformat"), raw.get("nbformat_minor", 0)) < (4, 5):
        problems.append(f"nbformat {raw.get('nbformat')}.{raw.get('nbformat_minor')}: cell ids need 4.5")

    ids = [cell.get("id") for cell in raw.get("cells", [])]
    if any(not i for i in ids):
        problems.append("a cell has no id")
    if len(set(ids)) != len(ids):
        problems.append("cell ids repeat")

    expected = 0
    any_output = False
    for index, cell in enumerate(nb.cells):
        where = f"cell {index}"
        if "execution" in cell.get("metadata", {}):
            problems.append(f"{where}: timing metadata (execute with record_timing=False)")
        if cell.cell_type != "code":
            continue
        expected += 1
        count = cell.get("execution_count")
        if count is None:
            problems.append(f"{where}: not executed (no execution count)")
        elif count != expected:
            problems.append(f"{where}: execution count {count}, expected {expected}")
        outputs = cell.get("outputs", [])
        any_output = any_output or bool(outputs)
        for out in outputs:
            kind = out.get("output_type")
            if kind == "error":
                problems.append(f"{where}: error output {out.get('ename')}: {out.get('evalue')}")
            elif kind == "execute_result" and count is not None and out.get("execution_count") != count:
                problems.append(f"{where}: result count {out.get('execution_count')} differs from the cell's {count}")
            elif kind == "stream" and out.get("name") == "stderr":
                warnings.append(f"{where}: writes to stderr (nbval compares it): {out.get('text', '')[:60]!r}")
        prints, bare = _expects_output(cell.source)
        if prints and not any(o.get("output_type") == "stream" for o in outputs):
            problems.append(f"{where}: calls print but has no stored stream output")
        if bare and not any(o.get("output_type") == "execute_result" for o in outputs):
            problems.append(f"{where}: ends in an expression but has no stored result")
        if "NBVAL_IGNORE_OUTPUT" in cell.source:
            comments = [line for line in cell.source.splitlines()
                        if line.strip().startswith("#") and "NBVAL_IGNORE_OUTPUT" not in line]
            if not comments:
                warnings.append(f"{where}: NBVAL_IGNORE_OUTPUT without a comment saying why")
    if expected and not any_output:
        problems.append("no outputs stored (run scripts/run_notebooks.py)")
    return problems, warnings


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    paths = [Path(a) for a in args] or sorted(NOTEBOOKS.glob("*.ipynb"))
    if not paths:
        print("check_notebooks: no notebooks found", file=sys.stderr)
        return 1
    failed = 0
    for path in paths:
        problems, warnings = check(path)
        shown = path.resolve().relative_to(ROOT) if path.resolve().is_relative_to(ROOT) else path
        for w in warnings:
            print(f"warning: {shown}: {w}", file=sys.stderr)
        for p in problems:
            print(f"{shown}: {p}", file=sys.stderr)
        failed += bool(problems)
    if failed:
        print(f"check_notebooks: {failed} of {len(paths)} notebook(s) failed", file=sys.stderr)
        return 1
    print(f"check_notebooks: {len(paths)} notebook(s) OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
