# The two commands: `make demo` and `make test` (`make test-fast`: the tests that need no trained
# model or server, in about a minute). Both create or update .venv themselves.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
STAMP := $(VENV)/.installed
PORT ?= 3000

.PHONY: demo test test-fast lint tools image

# Reinstall only when pyproject.toml changed since the last install.
$(STAMP): pyproject.toml
	@test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e ".[dev]"
	@touch $(STAMP)

# kubectl, Prometheus, qemu-user and tmux, which the tests drive; installed when missing.
tools:
	@bash scripts/install-test-tools.sh

demo: $(STAMP)
	PORT=$(PORT) $(VENV)/bin/tailorgpt quickstart --train_file samples/corpus --name demo --output_dir runs/demo

test: $(STAMP) tools
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports
	$(VENV)/bin/python -m pytest

# The inner loop: every test but those marked `model` (see tests/conftest.py).
test-fast: $(STAMP) tools
	$(VENV)/bin/python -m pytest -m "not model"

# The container image of the Bento: IMAGE (tailorgpt:<model version>), MODEL (store tag; the demo
# model by default), BASE_IMAGE (see README, "Containers"). Docker when it answers, else podman.
image: $(STAMP)
	VENV=$(VENV) bash scripts/build-image.sh

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports
