"""SPEC.md, the specification document, against bnspec.spec, bnspec.conventions and the
citations in the repository.

* every clause of ``bnspec.spec.CLAUSES`` has exactly one entry in SPEC.md, with the same
  title, under the section of its group (S1.1 under S1, G1 under G1), and SPEC.md has no
  entry for a clause spec.py lacks;
* every entry names the tests that check it (``path::function``), each of which exists, and
  every test marked ``@pytest.mark.clause(X)`` is named under X;
* every clause id cited anywhere (code, tests, notebooks, committed reports) is a clause
  of spec.py or a section of SPEC.md;
* no file cites the old, unpublished design document: SPEC.md is the document to cite;
* SPEC.md's list of conventions is exactly ``bnspec.conventions.CONVENTIONS``.
"""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
from pathlib import Path

import pytest

from bnspec.conventions import CONVENTIONS
from bnspec.spec import CLAUSES

ROOT = Path(__file__).resolve().parents[1]
SPEC = ROOT / "SPEC.md"

#: A clause id: S<n>[.<m>], G<n>, ST<n> (S3.2, S9, G1, ST1), not part of a longer word.
CLAUSE_ID = re.compile(r"(?<![\w.])(?:ST|S|G)[0-9]+(?:\.[0-9]+)?(?!\w)")
SECTION = re.compile(r"^## ((?:ST|S|G)[0-9]+) — (.+)$", re.M)
ENTRY = re.compile(r"^### (\S+) — (.+)$", re.M)
CITED_TEST = re.compile(r"`([\w./-]+\.py)::(\w+)`")
CONVENTION_LINE = re.compile(r"^- `(\w+)` — (.+)$", re.M)
#: The old design document's name, spelled so that this file does not cite it itself.
OLD_DOCUMENT = re.compile(r"\b" + "DES" + r"IGN\b")

TEXT_SUFFIXES = {".py", ".md", ".csv", ".json", ".ipynb", ".html", ".txt", ".toml", ".yml", ".yaml", ".sh",
                 ".rst", ".cfg", ".ini"}
SKIPPED_DIRS = {".git", ".venv", "venv", "build", "dist", "__pycache__", ".hypothesis", ".pytest_cache",
                "node_modules"}


# ----------------------------------------------------------------------------- reading


def spec_text() -> str:
    return SPEC.read_text(encoding="utf-8")


def sections(text: str) -> dict[str, str]:
    """Clause-group section id -> the text of that section (up to the next ``## ``)."""
    starts = [(m.group(1), m.start()) for m in SECTION.finditer(text)]
    heads = [m.start() for m in re.finditer(r"^## ", text, re.M)] + [len(text)]
    return {sid: text[start:next(h for h in heads if h > start)] for sid, start in starts}


def entries(text: str) -> list[tuple[str, str, str]]:
    """(clause id, title, body) of every ``### id — title`` entry, in order."""
    found = list(ENTRY.finditer(text))
    ends = [m.start() for m in re.finditer(r"^##", text, re.M)] + [len(text)]
    return [(m.group(1), m.group(2).strip(), text[m.end():next(e for e in ends if e > m.start())])
            for m in found]


def group_of(cid: str) -> str:
    """The clause group (section) of a clause id: S3.2 -> S3, G1 -> G1."""
    return cid.split(".")[0]


def repository_files() -> list[Path]:
    """The repository's text files: git's tracked and untracked-but-not-ignored ones, or
    (outside a git checkout) every file outside the environment and build folders."""
    try:
        out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=ROOT,
                             capture_output=True, text=True, check=True).stdout
        paths = [ROOT / p for p in out.split("\0") if p]
    except (OSError, subprocess.CalledProcessError):
        paths = []
        for dirpath, dirnames, filenames in os.walk(ROOT):
            dirnames[:] = [d for d in dirnames if d not in SKIPPED_DIRS and not d.endswith(".egg-info")]
            paths += [Path(dirpath) / f for f in filenames]
    return sorted(p for p in paths if p.is_file() and (p.suffix in TEXT_SUFFIXES or p.name == "Makefile"))


def readable_text(path: Path) -> str:
    """The text a reader sees: a notebook's sources and text outputs (not its images), an
    HTML page without its embedded data, code without linters' ``noqa`` codes."""
    text = path.read_text(encoding="utf-8", errors="replace")
    if path.suffix == ".ipynb":
        parts = []
        for cell in json.loads(text).get("cells", []):
            parts.append("".join(cell.get("source", "")))
            for output in cell.get("outputs", []):
                parts.append("".join(output.get("text", "")))
                data = output.get("data", {})
                parts += ["".join(data[k]) for k in ("text/plain", "text/markdown", "text/html") if k in data]
        text = "\n".join(parts)
    text = re.sub(r"data:[\w/+.-]+;base64,[A-Za-z0-9+/=]+", "", text)
    if path.suffix == ".py":
        text = re.sub(r"#\s*noqa\b[^\n]*", "", text)
    return text


def relative(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def clause_marks() -> dict[str, set[str]]:
    """Clause id -> ``path::function`` of every test function marked ``@pytest.mark.clause(id)``."""
    marks: dict[str, set[str]] = {}
    for path in repository_files():
        if path.suffix != ".py" or path == Path(__file__).resolve():
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for dec in node.decorator_list:
                if (isinstance(dec, ast.Call) and ast.unparse(dec.func) == "pytest.mark.clause" and dec.args
                        and isinstance(dec.args[0], ast.Constant)):
                    marks.setdefault(dec.args[0].value, set()).add(f"{relative(path)}::{node.name}")
    return marks


# ----------------------------------------------------------------------------- the document and spec.py


def test_every_clause_has_exactly_one_entry_with_its_title():
    found = entries(spec_text())
    for cid, clause in CLAUSES.items():
        titles = [title for eid, title, _ in found if eid == cid]
        assert len(titles) == 1, f"SPEC.md has {len(titles)} entries '### {cid} — ...' (expected exactly one)"
        assert titles[0] == clause.title, (f"SPEC.md's title of {cid} is {titles[0]!r}; bnspec/spec.py's is "
                                           f"{clause.title!r}")


def test_the_document_has_no_clause_spec_py_lacks():
    extra = [eid for eid, _, _ in entries(spec_text()) if eid not in CLAUSES]
    assert not extra, f"SPEC.md has entries for clauses bnspec/spec.py does not declare: {extra}"


def test_every_entry_sits_in_the_section_of_its_group():
    text = spec_text()
    groups = sections(text)
    assert set(groups) == {group_of(cid) for cid in CLAUSES}, \
        f"SPEC.md's clause-group sections {sorted(groups)} differ from the groups of bnspec/spec.py's clauses"
    for cid in CLAUSES:
        assert re.search(rf"^### {re.escape(cid)} — ", groups[group_of(cid)], re.M), \
            f"SPEC.md: the entry of {cid} is not in section '## {group_of(cid)} — ...'"


def test_every_entry_names_existing_tests_and_every_marked_test_is_named():
    marks = clause_marks()
    for cid, _, body in entries(spec_text()):
        cited = {f"{path}::{name}" for path, name in CITED_TEST.findall(body)}
        assert cited, f"SPEC.md's entry {cid} names no test ('Checked by: `path::function`')"
        for ref in sorted(cited):
            path, name = ref.split("::")
            file = ROOT / path
            exists = file.is_file() and re.search(rf"^\s*def {name}\(", file.read_text(encoding="utf-8"), re.M)
            assert exists, f"SPEC.md's entry {cid} names {ref}, which does not exist"
        missing = marks.get(cid, set()) - cited
        assert not missing, f"tests marked @pytest.mark.clause({cid!r}) that SPEC.md's entry does not name: " \
                            f"{sorted(missing)}"


# ----------------------------------------------------------------------------- citations in the repository


def test_every_cited_clause_id_exists():
    """Code, tests, notebooks and reports cite only clauses of spec.py or sections of SPEC.md."""
    known = set(CLAUSES) | set(sections(spec_text()))
    unknown = {}
    for path in repository_files():
        for cid in set(CLAUSE_ID.findall(readable_text(path))) - known:
            unknown.setdefault(cid, []).append(relative(path))
    assert not unknown, ("clause ids that are neither a clause of bnspec/spec.py nor a section of SPEC.md: "
                         + "; ".join(f"{cid} in {', '.join(paths)}" for cid, paths in sorted(unknown.items())))


def test_no_file_cites_the_old_design_document():
    citing = {relative(p) for p in repository_files() if OLD_DOCUMENT.search(readable_text(p))}
    assert not citing, (f"these files cite a design document that is not in the repository; cite SPEC.md's "
                            f"section instead (e.g. 'SPEC.md S9'): {sorted(citing)}")


# ----------------------------------------------------------------------------- conventions


def test_the_conventions_listed_are_bnspec_conventions():
    text = spec_text()
    start = text.index("\n## Conventions\n")
    section = text[start:text.find("\n## ", start + 1)]
    listed = dict(CONVENTION_LINE.findall(section))
    expected = "\n".join(f"- `{name}` — {words}" for name, words in CONVENTIONS.items())
    assert listed == CONVENTIONS, f"SPEC.md's Conventions section must list bnspec.conventions.CONVENTIONS:\n{expected}"


@pytest.mark.parametrize("text, found", [
    ("see S3.2. And S9, G1 and ST1", ["S3.2", "S9", "G1", "ST1"]),
    ("clauses S1.1/S1.2", ["S1.1", "S1.2"]),
    ("AS1 xS1.1 S1x 1.S2", []),
])
def test_clause_id_pattern(text, found):
    """Meta test: the pattern the citation check relies on."""
    assert CLAUSE_ID.findall(text) == found
