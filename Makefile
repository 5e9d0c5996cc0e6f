# The two commands of the README: `make demo` (main job) and `make test`.
PY := .venv/bin/python
SETUP_STAMP := .venv/.mlla-mm-setup

.PHONY: setup lint test test-fast demo demo-seg benchmark gpu-check check-cuda-toolchain clean

setup:
	@bash tools/setup_env.sh

# Two pytest-xdist workers (one per core), one torch thread each (tests/conftest.py); a test
# file stays on one worker (--dist loadfile), so its module fixtures are built once; files are
# handed out in tests/conftest.py's order, slow ones first (--no-loadscope-reorder).
PYTEST := $(PY) -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder --durations=15

# ruff (pinned in setup.cfg's tests extra; rules in pyproject.toml): `make test` lints first;
# TEST_LINT is `lint` (set it empty to skip the lint step).
TEST_LINT := lint

lint: setup
	$(PY) -m ruff check .

test: setup $(TEST_LINT)
	$(PYTEST) tests

test-fast: setup $(TEST_LINT)
	$(PYTEST) -m "not slow" tests

demo: setup
	$(PY) tools/demo.py det

demo-seg: setup
	$(PY) tools/demo.py seg

benchmark: setup
	$(PY) tools/benchmark.py

# On a machine with a GPU: the prepared GPU check, one JSON and a table (docs/gpu.md); without one: one line.
gpu-check: setup
	$(PY) tools/gpu_check.py

# Compile two of mmcv's CUDA files with the pip nvcc and the build's flags (any machine, a few minutes).
check-cuda-toolchain: setup
	@bash tools/setup_env.sh --check-cuda-toolchain

clean:
	rm -rf work_dirs outputs
