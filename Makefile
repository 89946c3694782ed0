# Two entry points for a new user: `make demo` and `make test`.
# VENV may point outside the clone (CI keeps one per dependency hash, see .ci/run).
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
STAMP := $(VENV)/.kdflow-installed
DEPS := setup.cfg pyproject.toml

.PHONY: demo test install bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(STAMP): $(PY) $(DEPS)
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/kdflow run

test: $(STAMP)
	$(PY) -m pytest -q tests

bench: $(STAMP)
	$(PY) bench/step.py

clean:
	rm -rf outputs .pytest_cache
