# The two README commands. Both create .venv when missing and install from the lock.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.bnspec-installed

.PHONY: setup report report-all test bench

setup: $(STAMP)

# pip reads torch==2.13.0 from requirements.lock, which takes the CPU build.
$(STAMP): pyproject.toml requirements.lock
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -c requirements.lock -e '.[test]'
	touch $@

# A user's report goes to build/report/ (ignored by git): the committed reports/ holds every
# framework, and a machine without them would otherwise replace it with a smaller one.
REPORT_OUT ?= build/report
REPORT_ARGS ?=

report: $(STAMP)
	$(VENV)/bin/bnspec report --out $(REPORT_OUT) $(REPORT_ARGS)

# Every framework extra (flax, onnx, onnxruntime, tinygrad, mlx, keras, paddle, tensorflow), then the
# full matrix, as committed in reports/. The JAX-based candidates recompile for each new shape and
# need 10-15 minutes each on 2 cores, past the quick profile's default budget of 600 s.
report-all: $(STAMP)
	$(PY) -m pip install --quiet --disable-pip-version-check -c requirements.lock -c requirements-extras.lock -e '.[all]'
	$(VENV)/bin/bnspec report --profile quick --budget 3600 --out reports

# Unit tests, the conformance suite against the built-in candidates (torch, bnspec) and
# the zoo, the hostile candidates, and the notebooks (nbval, strict output comparison).
test: $(STAMP)
	$(PY) scripts/check_notebooks.py
	$(PY) -m pytest tests conformance --nbval notebooks -p no:cacheprovider

# Before and after side by side: BENCH_BEFORE is the last commit before issue 14's speed
# work (make bench BENCH_BEFORE=<ref> for another; BENCH_BEFORE= times the current code only).
BENCH_BEFORE ?= 451a20a
bench: $(STAMP)
	$(PY) scripts/bench_reference.py $(if $(BENCH_BEFORE),--before $(BENCH_BEFORE))
