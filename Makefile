# The two commands the README documents: `make demo` and `make test`.
UV ?= $(shell command -v uv 2>/dev/null || echo "python3 -m uv")

.PHONY: setup demo test test-slow test-all lint bench bench-gpu

setup:
	@command -v uv >/dev/null 2>&1 || python3 -m pip install --quiet uv
	$(UV) sync --frozen

demo: setup
	$(UV) run --frozen spear demo --out demo-out

# pytest exits 5 when it collects no test; that must fail, and it does (non-zero).
test: setup
	$(UV) run --frozen ruff check .
	$(UV) run --frozen ruff format --check .
	$(UV) run --frozen mypy
	$(UV) run --frozen pytest -q --durations=15

# The tests marked slow (fault injection, job server, two training workers, long fuzzing,
# learning): CI runs them after `make test`.
test-slow: setup
	$(UV) run --frozen pytest -q --durations=15 -m "slow and not gpu"

test-all: setup
	$(UV) run --frozen pytest -q --durations=15 -m ""

bench: setup
	@for b in benchmarks/*.py; do echo "== $$b"; $(UV) run --frozen python $$b; done

# The GPU check in one command (sized for 8 minutes on one H100/H200): teachers, MVQ, the
# tokenize actor and the student step at real size; writes spear/measured_rates/<device>.json,
# which `spear plan` reads.
# Without CUDA it runs the tiny presets on CPU as a test (rates to a temporary folder).
bench-gpu: setup
	$(UV) run --frozen python benchmarks/gpu.py
