# The clothing classifier as two tiers: run `make help` for the list.
# Every target that needs the Python environment builds it first, so any target works on a fresh clone.

SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
export PIPENV_VENV_IN_PROJECT := 1
export PIPENV_IGNORE_VIRTUALENVS := 1
export PIPENV_VERBOSITY := -1
export PIPENV_NOSPIN := 1
PIPENV := $(PYTHON) -m pipenv
RUN := $(PIPENV) run
ENV_STAMP := .venv/.synced-$(shell sha256sum Pipfile.lock 2>/dev/null | cut -c1-12)

MODEL_NAME := clothing-model
MODEL_BASE := models/$(MODEL_NAME)
MODEL_VERSION ?= 1
# A local copy of the course's xception_v4_large_08_0.894.h5 skips the download.
MODEL_H5 ?=
GRPC_PORT ?= 8500
REST_PORT ?= 8501
GATEWAY_PORT ?= 9696

.PHONY: help setup model test lint

help: ## Show the targets
	@grep -hE '^[a-zA-Z0-9_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  \033[36m%-20s\033[0m %s\n", $$1, $$2}'

# ---- environment and model (foundation) -------------------------------------------------------

setup: $(ENV_STAMP) ## Install pipenv if missing, then the locked environment (.venv)

$(ENV_STAMP): Pipfile.lock
	@$(PYTHON) -m pipenv --version >/dev/null 2>&1 || { \
	  echo "pipenv not found: installing it for $(PYTHON) (pip --user)"; \
	  $(PYTHON) -m pip install --user --quiet pipenv || $(PYTHON) -m pip install --quiet pipenv; }
	$(PIPENV) sync --dev
	@rm -f .venv/.synced-*; touch $@

model: $(ENV_STAMP) ## Convert the course model to a SavedModel in models/clothing-model/<version> (notebook 01)
	@mkdir -p build/notebooks
	$(RUN) papermill notebooks/01-convert-model.ipynb build/notebooks/01-convert-model.ipynb \
	  -p model_h5 "$(MODEL_H5)" -p output_base "$(MODEL_BASE)" -p version $(MODEL_VERSION) --cwd .

test: $(ENV_STAMP) ## Run the whole test suite (offline; tests needing Docker, a cluster or the internet skip)
	$(RUN) pytest

lint: $(ENV_STAMP) ## ruff on the code and notebooks, hadolint on the Dockerfiles
	$(RUN) ruff check .
	$(RUN) ruff format --check .
