# Two commands that work on a fresh machine: `make demo` (a Ray job on the canary model) and `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
OUT ?= out/demo

.PHONY: setup demo test lint bench clean

$(BIN)/tokentrim: pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# The CPU wheel first (the version in constraints.txt, which infra/Dockerfile installs too), so the torch range
	# below does not pull a CUDA build.
	$(BIN)/pip install -q -c constraints.txt torch
	$(BIN)/pip install -q -c constraints.txt -e '.[dev]'
	touch $(BIN)/tokentrim

setup: $(BIN)/tokentrim

# a local Ray cluster on 127.0.0.1 without token auth; on a real cluster set RAY_ADDRESS instead
demo: setup
	RAY_AUTH_MODE=disabled RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 $(BIN)/tokentrim submit jobs/data/canary_prompts.parquet \
		--out $(OUT) --model canary --chunks 3 --limit 4 --workers 1
	$(BIN)/tokentrim status $(OUT)

test: setup
	$(BIN)/ruff check .
	$(BIN)/mypy tokentrim pipeline canary jobs
	$(BIN)/python -m pytest -q --durations=20 tests

lint: setup
	$(BIN)/ruff check .
	$(BIN)/mypy tokentrim pipeline canary jobs

bench: setup
	$(BIN)/python -m bench.run_all

clean:
	rm -rf $(VENV) out .pytest_cache
