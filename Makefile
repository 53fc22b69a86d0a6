# The two README commands. Both create .venv when missing and install from the lock.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.bnspec-installed

.PHONY: setup report test bench

setup: $(STAMP)

# pip reads torch==2.13.0 from requirements.lock, which takes the CPU build.
$(STAMP): pyproject.toml requirements.lock
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -c requirements.lock -e '.[test]'
	touch $@

report: $(STAMP)
	$(VENV)/bin/bnspec report

test: $(STAMP)
	$(PY) -m pytest

bench: $(STAMP)
	$(PY) scripts/bench_reference.py
