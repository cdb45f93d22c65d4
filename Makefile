# One-command set-up: every target creates the local virtual environment (.venv) when missing.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# A CPU build of torch pinned to the release this machine kind has on disk; cluster users
# install cgflow into their own environment and get their CUDA build of torch (pyproject: torch>=2.4).
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: venv test test-slow lint format bench run clean-venv

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $@

venv: $(BIN)/.installed

## Lint, then run the test suite (fast tests; `make test-slow` for the long validations)
test: venv
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

test-slow: venv
	$(BIN)/python -m pytest -m slow $(PYTEST_ARGS)

lint: venv
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

format: venv
	$(BIN)/ruff format src tests benchmarks
	$(BIN)/ruff check --fix src tests benchmarks

bench: venv
	$(BIN)/python benchmarks/energy_throughput.py

clean-venv:
	rm -rf $(VENV)

## Run the main job: the default campaign (config/config.yaml) with the local profile
run: venv
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/snakemake --profile profiles/local $(SNAKEMAKE_ARGS)
