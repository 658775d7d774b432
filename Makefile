# Two commands that work on a fresh machine: `make demo` (render on the tiny model) and `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
OUT ?= out/demo

.PHONY: setup demo test lint bench clean

$(BIN)/tokentrim: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# The CPU wheel first, so the torch range below does not pull a CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	touch $(BIN)/tokentrim

setup: $(BIN)/tokentrim

demo: setup
	$(BIN)/tokentrim render "a red panda walking through a snowy bamboo forest, cinematic" --model tiny --chunks 8 --out $(OUT)

test: setup
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q tests

lint: setup
	$(BIN)/ruff check .

bench: setup
	$(BIN)/python -m bench.run_all

clean:
	rm -rf $(VENV) out .pytest_cache
