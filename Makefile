# One-command set-up: every target creates the virtual environment first (idempotent).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)

.PHONY: install quickstart quickstart-scripted test lint bench clean

install: $(STAMP)

# torch first: 2.13.0 is the local CPU wheel; an unpinned torch would pull a multi-GB CUDA build.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[train,dev]'
	rm -f $(VENV)/.installed-* && touch $@

# The main job: base model (built once, cached) -> logs -> SFT -> filtered SFT -> PPO -> DPO -> report.
quickstart: install
	$(BIN)/dialogrl quickstart

# Seconds: only the scripted policies (random, historical, expert) on 500 held-out scenarios.
quickstart-scripted: install
	$(BIN)/dialogrl quickstart scripted_only=true eval_episodes=500

test: install
	$(BIN)/ruff check .
	$(BIN)/python -m pytest

lint: install
	$(BIN)/ruff check .

bench: install
	$(BIN)/python benchmarks/env_speed.py --out benchmarks/results/env_speed.json

clean:
	rm -rf $(VENV) build *.egg-info
