"""The notebooks compute with bnspec, never with a second copy of its formulas (issue 4).

A formula changed in ``bnspec.reference`` must change what the notebooks compute. This
check reads every code cell and fails on the shapes a re-implementation of the forward or
of the closed-form backward takes; the patterns are themselves tested on re-implementations
written in several styles, so the check can fail. (Notebook 03 derives the backward by
the chain rule and compares each intermediate with autograd: those steps are not the
closed form and do not match.)
"""

from __future__ import annotations

import re
from pathlib import Path

import nbformat
import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))

#: name -> pattern of a re-implemented formula
FORMULAS = {
    "normalization (x - mean) / ...": re.compile(
        r"\(\s*\w[\w.]*(\[[^\]]*\])?\s*-\s*[\w.]*(mean|mu)\w*(\[[^\]]*\]|\([^)]*\))*\s*\)\s*(/|\*\s*(torch\.|np\.)?r?sqrt)"),
    "rsqrt of a variance": re.compile(r"rsqrt\(\s*[\w.\[\]\"']*var"),
    "sqrt(var + eps)": re.compile(r"sqrt\(\s*[\w.\[\]\"']*var[\w.\[\]()\"']*\s*\+\s*[\w.\[\]\"']*eps", re.IGNORECASE),
    "closed-form dx: n*dy - sum(dy)": re.compile(r"\bn\s*\*\s*dy\b[\w.\[\]\"']*\s*-"),
    "closed-form dx: dy - mean/sum(dy)": re.compile(r"\bdy\w*\s*-\s*[\w.\[\]\"']*(mean|sum)\w*\(?\s*(dy|axis|dim|[\w.]*AXES)"),
}

REIMPLEMENTATIONS = [
    "y = (x - mean) / torch.sqrt(var + eps) * w + b",
    "y = (x - x.mean(0)) / np.sqrt(x.var(0) + 1e-5)",
    "y = (x - mu) * torch.rsqrt(var + eps)",
    "xhat = (x - batch_mean[None, :, None]) / (batch_var + eps) ** 0.5",
    "inv = 1.0 / torch.sqrt(running_var + self.eps)",
    "dx = w * invstd / n * (n * dy - dy.sum(0) - xhat * (dy * xhat).sum(0))",
    "dx = (dy - dy.mean(dim=(0, 2, 3), keepdim=True) - xhat * m2) * r",
    "dx = r * (dy - sum_dy / n - xhat * sum_dy_xhat / n)",
]

ALLOWED = [
    "out = R.train_forward(x, w, b, eps=EPS)",
    "yt = F.batch_norm(xt, None, None, wt, bt, training=True, eps=EPS)",
    'grad["xhat"] * pc(r) + pc(grad["var"]) * 2 * centered / n + pc(grad["mean"]) / n',
    "(dy * xhat0).sum(AXES)",
    "np.sqrt(rho + 1.0) / (root_rho + root_eps) - 1.0",
    "stderr = (biased.var().item() / BATCHES) ** 0.5",
]


STRING = re.compile(r"\"[^\"\n]*\"|'[^'\n]*'")


def found(source: str) -> list[str]:
    """The formulas ``source`` re-implements (text inside string literals is prose, not code)."""
    code = STRING.sub('""', source)
    return [name for name, pattern in FORMULAS.items() if pattern.search(code)]


@pytest.mark.parametrize("snippet", REIMPLEMENTATIONS)
def test_the_patterns_catch_reimplementations(snippet):
    assert found(snippet), f"no pattern catches: {snippet}"


@pytest.mark.parametrize("snippet", ALLOWED)
def test_the_patterns_leave_uses_of_bnspec_alone(snippet):
    assert not found(snippet), f"{found(snippet)} flags: {snippet}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_no_formula_is_reimplemented_in_a_notebook(path):
    nb = nbformat.read(path, as_version=4)
    hits = [(i, line.strip(), found(line)) for i, cell in enumerate(nb.cells) if cell.cell_type == "code"
            for line in cell.source.splitlines() if found(line)]
    assert not hits, f"{path.name}: re-implemented formulas (use bnspec.reference): {hits}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_every_notebook_computes_with_bnspec(path):
    code = "\n".join(c.source for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code")
    assert re.search(r"^\s*(from bnspec\b|import bnspec\b)", code, re.MULTILINE), f"{path.name} never imports bnspec"


def test_all_seven_notebooks_are_checked():
    assert [p.name[:2] for p in NOTEBOOKS] == ["01", "02", "03", "04", "05", "06", "07"]
