"""The options of a check, in one place: their defaults, their limits, and how their text
is read (``--dims``, ``--dtypes``, ``--clauses``, ``--device``, ``--accept``, TARGET).

``bnspec check``, ``bnspec report``, the synced check and plain ``pytest conformance
--candidate X`` all take their values from here, so the same option means the same
thing (and has the same default) wherever it is given. A value that cannot be used is a
:class:`UsageProblem`: exit status 2 with its one-line reason.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, replace

from bnspec.candidates.protocol import DTYPES

__all__ = ["DTYPES", "PROFILES", "Profile", "CLI_PROFILES", "DEFAULT_PROFILE", "DEFAULT_TIMEOUT",
           "DEFAULT_STARTUP_TIMEOUT", "BUDGETS", "MAX_SECONDS", "EXIT_CONFORMS", "EXIT_DOES_NOT_CONFORM",
           "EXIT_UNUSABLE", "TARGET_FORMS", "UsageProblem", "CheckOptions", "budget_for", "parse_dims",
           "parse_dtypes", "parse_clauses", "parse_device", "parse_accept", "target_kind", "dims_for"]

EXIT_CONFORMS, EXIT_DOES_NOT_CONFORM, EXIT_UNUSABLE = 0, 1, 2


@dataclass(frozen=True)
class Profile:
    """How hard hypothesis looks: examples per property; derandomized runs draw the same
    examples every time (seeds from the test's source)."""

    examples: int
    derandomize: bool


PROFILES = {
    "quick": Profile(6, True),
    "dev": Profile(6, True),  # pytest only: quick under the name a developer's loop uses
    "ci": Profile(25, True),
    "thorough": Profile(150, False),
}
CLI_PROFILES = ("quick", "ci", "thorough")  #: the profiles ``bnspec check`` offers
DEFAULT_PROFILE = "ci"
DEFAULT_TIMEOUT = 20.0  #: seconds one call into the candidate may take
DEFAULT_STARTUP_TIMEOUT = 120.0  #: seconds the child may take to import and build the candidate
#: Seconds a check may spend waiting for the answers of the candidate (loading not counted).
BUDGETS = {"quick": 600.0, "dev": 600.0, "ci": 3600.0, "thorough": 6 * 3600.0}
MAX_SECONDS = 7 * 24 * 3600.0
TARGET_FORMS = "a built-in name (see bnspec list), package.module:Name or path/to/file.py:Name"
_CLAUSE_ID = re.compile(r"[A-Z]+[0-9]*(\.[0-9]+)*")  # S1, S3.2, G1, ST1


class UsageProblem(Exception):
    """A bad option value or an unusable target: exit 2 with this one-line reason."""


def budget_for(profile: str, budget: float | None) -> float:
    """The whole check's waiting budget: the given one, else the profile's."""
    return budget if budget is not None else BUDGETS[profile]


@dataclass(frozen=True)
class CheckOptions:
    """Everything a check of one target depends on besides the target (already parsed)."""

    dims: tuple[int, ...] | None = None  #: None: all a built-in provides, 2 for a class
    profile: str = DEFAULT_PROFILE
    seed: int | None = None  #: None: derandomized
    device: str = "cpu"
    dtypes: tuple[str, ...] | None = None  #: the user narrowed the contract to these
    clauses: str | None = None  #: ids or prefixes, comma-separated
    timeout: float = DEFAULT_TIMEOUT
    startup_timeout: float = DEFAULT_STARTUP_TIMEOUT
    budget: float | None = None  #: None: the profile's (:data:`BUDGETS`)
    accept: tuple[str, ...] | None = None  #: conventions judged against their own formulas
    world_size: int | None = None  #: K processes: the synced check
    provided_only: bool = False  #: a built-in without some rank family is checked for those it has
    verbose: bool = False  #: pytest's own output

    @property
    def effective_budget(self) -> float:
        return budget_for(self.profile, self.budget)

    def but(self, **changes) -> "CheckOptions":
        return replace(self, **changes)


def parse_dims(raw: str) -> list[int]:
    """``"1,3"`` -> ``[1, 3]``: rank families of BatchNorm1d/2d/3d."""
    try:
        dims = sorted({int(d) for d in raw.split(",")})
    except ValueError:
        raise UsageProblem(f"--dims {raw!r}: expected 1, 2, 3 or a comma-separated list of them") from None
    if not dims or set(dims) - {1, 2, 3}:
        raise UsageProblem(f"--dims {raw!r}: allowed values are 1, 2, 3")
    return dims


def parse_dtypes(raw: str | None) -> list[str] | None:
    if raw is None:
        return None
    got = [d.strip() for d in raw.split(",") if d.strip()]
    bad = [d for d in got if d not in DTYPES]
    if bad or not got:
        raise UsageProblem(f"--dtypes {raw!r}: allowed values are {', '.join(DTYPES)} (comma-separated)")
    return list(dict.fromkeys(got))


def parse_clauses(raw: str | None) -> str | None:
    """Clause ids or prefixes, e.g. ``S1,S3.2`` (checked for form here; a list that
    matches no test is reported after collection)."""
    if raw is None:
        return None
    got = [c.strip() for c in raw.split(",") if c.strip()]
    bad = [c for c in got if not _CLAUSE_ID.fullmatch(c)]
    if bad or not got:
        raise UsageProblem(f"--clauses {raw!r}: expected clause ids or prefixes like S1 or S3.2, comma-separated")
    return ",".join(got)


def parse_device(raw: str) -> str:
    """A torch device string this machine has (the candidate runs there)."""
    import torch

    try:
        device = torch.device(raw)
    except (RuntimeError, ValueError, TypeError):
        raise UsageProblem(f"--device {raw!r}: not a torch device; expected cpu, cuda, cuda:N, mps, ...") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageProblem(f"--device {raw!r}: CUDA is not available on this machine; use cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageProblem(f"--device {raw!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif device.type != "cpu":
        try:
            torch.empty(0, device=device)
        except Exception:  # noqa: BLE001 - whatever the backend raises
            raise UsageProblem(f"--device {raw!r}: not available on this machine; use cpu") from None
    return raw


def parse_accept(raw: str | None) -> list[str] | None:
    """Names of known conventions (:mod:`bnspec.conventions`), comma-separated."""
    from bnspec.conventions import unknown_conventions

    problem = unknown_conventions(raw)
    if problem:
        raise UsageProblem(problem)
    return list(dict.fromkeys(n.strip() for n in raw.split(",") if n.strip())) if raw else None


def target_kind(target: str) -> str:
    """The target's kind (builtin, entrypoint, file, module); a malformed TARGET is a usage
    problem found before anything of it is imported."""
    from bnspec.candidates.targets import BUILTINS, ENTRY_POINT_GROUP, UnusableTarget, kind_of

    if not target.strip():
        raise UsageProblem(f"TARGET {target!r} is empty; expected {TARGET_FORMS}")
    try:
        kind = kind_of(target)
    except UnusableTarget as exc:
        raise UsageProblem(f"{exc}; expected {TARGET_FORMS}") from None
    path, _, name = target.rpartition(":")
    if kind == "module" and not all(part.isidentifier() for part in path.split(".")):
        raise UsageProblem(f"TARGET {target!r}: {path!r} is not a dotted module name; expected {TARGET_FORMS}")
    if kind == "entrypoint":
        from importlib.metadata import entry_points

        if not re.fullmatch(r"[A-Za-z0-9_.\-]+", target):
            raise UsageProblem(f"TARGET {target!r} is not a candidate name; expected {TARGET_FORMS}")
        if target not in {ep.name for ep in entry_points(group=ENTRY_POINT_GROUP)}:
            raise UsageProblem(f"{target!r} is not a built-in candidate ({', '.join(BUILTINS)}) and not "
                               f"registered under the entry-point group {ENTRY_POINT_GROUP!r}; expected {TARGET_FORMS}")
    if kind == "file" and not os.path.isfile(path):
        raise UsageProblem(f"TARGET {target!r}: no such file {path!r}")
    if kind == "module":
        import importlib.util

        top = path.split(".")[0]
        try:
            found = importlib.util.find_spec(top) is not None  # the top-level package only: runs no code
        except (ImportError, ValueError):
            found = False
        if not found:
            raise UsageProblem(f"TARGET {target!r}: cannot import module {top!r} (not installed, or not on "
                               "the path from here)")
    return kind


def dims_for(target: str, explicit: list[int] | tuple[int, ...] | None) -> list[int]:
    """Built-ins provide 1, 2, 3; a single class provides the family --dims names (default 2)."""
    from bnspec.candidates.targets import kind_of

    if explicit:
        return list(explicit)
    return [1, 2, 3] if kind_of(target) == "builtin" else [2]
