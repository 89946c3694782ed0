# Two entry points for a new user: `make demo` and `make test`.
# VENV may point outside the clone (CI keeps one per dependency hash, see .ci/run).
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
STAMP := $(VENV)/.kdflow-installed
FFCV_STAMP := $(VENV)/.kdflow-ffcv-installed
DEPS := setup.cfg pyproject.toml constraints.txt

.PHONY: demo test install ffcv bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(STAMP): $(PY) $(DEPS)
	$(PY) -m pip install --quiet -c constraints.txt -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

# FFCV (data.loader=ffcv): its system libraries from Debian's packages, then the ffcv extra,
# built from source. The library check runs every time: a reused venv needs them at run time.
$(FFCV_STAMP): $(STAMP)
	scripts/ffcv-system-deps.sh
	$(PY) -m pip install --quiet -c constraints.txt -e '.[test,ffcv]'
	touch $(FFCV_STAMP)

ffcv: $(FFCV_STAMP)
	scripts/ffcv-system-deps.sh

demo: $(STAMP)
	$(VENV)/bin/kdflow run

test: ffcv
	$(PY) -m pytest -q --durations=20 tests

bench: $(STAMP)
	$(PY) bench/step.py

clean:
	rm -rf outputs .pytest_cache
