# Two entry points for a new user: `make demo` and `make test`.
# VENV may point outside the clone (CI keeps one per dependency hash, see .ci/run).
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
STAMP := $(VENV)/.kdflow-installed
FFCV_STAMP := $(VENV)/.kdflow-ffcv-installed
DEPS := setup.cfg pyproject.toml constraints.txt

.PHONY: demo test check install ffcv bench clean

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

# The complete suite (what CI runs): real SLURM, Ray, mlflow server, FFCV and the demo. Where
# its time goes: bench/suite_time.py test-results/test.xml
test: ffcv
	$(PY) -m pytest -q --durations=20 --junitxml=test-results/test.xml tests

# The fast tier, for an edit-test loop: no root, no services, no minutes of training (the
# markers tests/conftest.py sets: slow, slurm, ray, services, ffcv); about 2 minutes on 2 cores.
check: $(STAMP)
	$(PY) -m pytest -q -m "not slow" -n 2 --durations=10 --junitxml=test-results/check.xml tests

bench: $(STAMP)
	$(PY) bench/step.py

clean:
	rm -rf outputs .pytest_cache test-results
