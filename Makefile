# The two commands of the README: `make demo` (main job) and `make test`.
PY := .venv/bin/python
SETUP_STAMP := .venv/.mlla-mm-setup

.PHONY: setup test test-fast demo demo-seg benchmark clean

setup:
	@bash tools/setup_env.sh

test: setup
	$(PY) -m pytest -q tests

test-fast: setup
	$(PY) -m pytest -q -m "not slow" tests

demo: setup
	$(PY) tools/demo.py det

demo-seg: setup
	$(PY) tools/demo.py seg

benchmark: setup
	$(PY) tools/benchmark.py

clean:
	rm -rf work_dirs outputs
