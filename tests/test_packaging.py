"""Set-up files agree with each other: pyproject ranges, environment.yml, the lock, CI."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import yaml
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
CONDA_NAMES = {"torch": "pytorch"}  # conda-forge's name for the same package


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _pyproject_requirements() -> dict[str, str]:
    project = _pyproject()["project"]
    reqs = [*project["dependencies"], *project["optional-dependencies"]["test"]]
    return {CONDA_NAMES.get(r.name.lower(), r.name.lower()): str(r.specifier) for r in map(Requirement, reqs)}


def _conda_requirements() -> dict[str, str]:
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    out = {}
    for dep in env["dependencies"]:
        if isinstance(dep, str) and dep not in ("pip",) and not dep.startswith("python"):
            name, spec = re.match(r"([A-Za-z0-9_.\-]+)(.*)", dep).groups()
            out[name.lower()] = str(Requirement("x" + spec).specifier)
    return out


def test_environment_yml_lists_the_pyproject_dependencies_with_the_same_ranges():
    assert _conda_requirements() == _pyproject_requirements()


def test_lock_pins_every_dependency_and_torch_cpu_build():
    lock = {}
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            lock[name.lower().replace("_", "-")] = version
    assert lock["torch"] == "2.13.0"  # pip then takes the local CPU build, not a CUDA one
    for name, spec in _pyproject_requirements().items():
        pinned = lock[{v: k for k, v in CONDA_NAMES.items()}.get(name, name).replace("_", "-")]
        assert Requirement(f"x{spec}").specifier.contains(pinned), (name, spec, pinned)


def test_ci_runs_exactly_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    command = re.search(r"^exec (.+)$", ci, re.M).group(1)
    assert command == "make test"
    assert re.search(rf"^{re.escape(command)}\s*$", readme, re.M), "README must show the test command"
