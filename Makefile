# hlss — one command each: make install | test | demo | train | eval CKPT=... | lint | bench | ui
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.hlss-installed
DEMO_DIR ?= demo
ARGS ?=
# test processes: pytest-xdist's `auto` (one per CPU core), at most 4; TEST_WORKERS=0 runs in one
TEST_WORKERS ?= auto

.PHONY: install test demo train eval lint format bench ui clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest tests -n $(TEST_WORKERS) --maxprocesses 4

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

format: $(STAMP)
	$(BIN)/ruff format src tests benchmarks
	$(BIN)/ruff check --fix src tests benchmarks

# Synthetic data -> validation -> HiDisc and HLSS training -> kNN evaluation table (CPU).
demo: $(STAMP)
	$(BIN)/hlss-demo out=$(DEMO_DIR) $(ARGS)

train: $(STAMP)
	$(BIN)/hlss-train $(ARGS)

eval: $(STAMP)
	@test -n "$(CKPT)" || { echo "usage: make eval CKPT=path/to/checkpoint.ckpt-or-run-folder [ARGS=...]"; exit 2; }
	$(BIN)/hlss-eval ckpt=$(CKPT) $(ARGS)

# Every stage against its target (< 10 min on 2 CPU cores): a table, and benchmarks/latest.json.
bench: $(STAMP)
	$(BIN)/python benchmarks/bench.py $(ARGS)

ui: $(STAMP)
	$(BIN)/mlflow ui --backend-store-uri sqlite:///$(abspath outputs)/mlruns.db

clean:
	rm -rf outputs .pytest_cache .ruff_cache
