"""The long suite runs (``tests/suite_runs.py``) start in the background as soon as the
tests are collected, and the tests that read them run last.

A test module takes part by defining ``planned_runs(wanted) -> {name: start}``: the runs
its selected tests (``wanted``, their function names) will read.
"""

from __future__ import annotations

import pytest

import suite_runs


def _reads_runs(item) -> bool:
    return hasattr(getattr(item, "module", None), "planned_runs")


def pytest_collection_modifyitems(session, config, items) -> None:
    # Stable: every other item keeps its place, and these keep their order among themselves.
    items.sort(key=_reads_runs)


def pytest_collection_finish(session) -> None:
    if session.config.option.collectonly:
        return
    modules = []
    for item in session.items:
        if _reads_runs(item) and item.module not in modules:
            modules.append(item.module)
    if not modules:
        return
    backlog = suite_runs.session_backlog()
    for module in modules:
        for name, start in module.planned_runs(suite_runs.selected_names(session, module)).items():
            backlog.add(name, start)
    backlog.start_in_background()


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session) -> None:
    suite_runs.stop_backlog()
