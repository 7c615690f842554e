# One-command set-up: every target creates the virtual environment first (idempotent).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)

.PHONY: install quickstart quickstart-full test lint bench clean

install: $(STAMP)

# torch first: 2.13.0 is the local CPU wheel; an unpinned torch would pull a multi-GB CUDA build.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[train,dev]'
	rm -f $(VENV)/.installed-* && touch $@

# Until the learning benchmark meets its target (see README), the main job evaluates the scripted policies;
# `make quickstart-full` runs the whole base -> SFT -> PPO -> report pipeline.
quickstart: install
	$(BIN)/dialogrl quickstart scripted_only=true eval_episodes=500

quickstart-full: install
	$(BIN)/dialogrl quickstart

test: install
	$(BIN)/ruff check .
	$(BIN)/python -m pytest

lint: install
	$(BIN)/ruff check .

bench: install
	$(BIN)/python benchmarks/env_speed.py --out benchmarks/results/env_speed.json

clean:
	rm -rf $(VENV) build *.egg-info
