# The two commands of the README: `make demo` (main job) and `make test`.
PY := .venv/bin/python
SETUP_STAMP := .venv/.mlla-mm-setup

.PHONY: setup test test-fast demo demo-seg benchmark clean

setup:
	@bash tools/setup_env.sh

# Two pytest-xdist workers (one per core), one torch thread each (tests/conftest.py); a test
# file stays on one worker (--dist loadfile), so its module fixtures are built once.
PYTEST := $(PY) -m pytest -q -n 2 --dist loadfile --durations=15

test: setup
	$(PYTEST) tests

test-fast: setup
	$(PYTEST) -m "not slow" tests

demo: setup
	$(PY) tools/demo.py det

demo-seg: setup
	$(PY) tools/demo.py seg

benchmark: setup
	$(PY) tools/benchmark.py

clean:
	rm -rf work_dirs outputs
