# hlss — one command each: make install | test | demo | train | eval CKPT=... | lint | bench | ui
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.hlss-installed
DEMO_DIR ?= demo
ARGS ?=

.PHONY: install test demo train eval lint format bench ui clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest tests

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

format: $(STAMP)
	$(BIN)/ruff format src tests benchmarks
	$(BIN)/ruff check --fix src tests benchmarks

# Synthetic data -> validation -> training (the CPU demo experiment).
demo: $(STAMP)
	test -f $(DEMO_DIR)/data/meta/opensrh.json || $(BIN)/hlss-synth out=$(DEMO_DIR)/data patients_per_class=6 size=64
	$(BIN)/hlss-validate root=$(DEMO_DIR)/data
	$(BIN)/hlss-train experiment=demo_cpu dataset=opensrh dataset.root=$(abspath $(DEMO_DIR))/data $(ARGS)

train: $(STAMP)
	$(BIN)/hlss-train $(ARGS)

eval: $(STAMP)
	@test -n "$(CKPT)" || { echo "usage: make eval CKPT=path/to/checkpoint.ckpt"; exit 2; }
	@echo "hlss-eval: evaluation is not yet available in this version."

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_data.py

ui: $(STAMP)
	$(BIN)/mlflow ui --backend-store-uri sqlite:///$(abspath mlruns.db)

clean:
	rm -rf outputs multirun .pytest_cache .ruff_cache
