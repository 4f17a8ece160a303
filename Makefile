# One toolchain: every target installs what it needs into .venv, so a fresh clone works.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install serve test test-quick lint format bench clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first and pinned, so pip takes the CPU wheel and not a multi-GB CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

serve: $(STAMP)
	$(BIN)/casa serve

# test: the whole suite, system tests included (CI runs it).
test: $(STAMP)
	TRITON_INTERPRET=1 $(BIN)/python -m pytest

# test-quick: the development loop, stopping at the first failure. Leaves out the system tests (the
# podman image and compose stack) and the tests marked slow (the browser demo, the GPU check's smoke
# run, the sm_90 AOT compile, the 3-replica cluster, the training run, the compiled decode step, the
# bundled model's held-out evaluation: each 20 s or more on a 2-core box). `make test` runs everything.
test-quick: $(STAMP)
	TRITON_INTERPRET=1 $(BIN)/python -m pytest -x -m "not system and not slow"

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	# the layers and no import cycles: [tool.importlinter] in pyproject.toml (tests/test_layers.py runs it too)
	$(BIN)/lint-imports --no-cache

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench: $(STAMP)
	$(BIN)/python -m benchmarks.bench_streaming

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
