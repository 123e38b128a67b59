# percept: the two set-up commands are `make run` and `make test`; every other target is
# reachable from them or documented in README.md.
SHELL := /bin/bash
VENV  := .venv
PY    := $(VENV)/bin/python
PERCEPT := $(VENV)/bin/percept
SETUP_STAMP := $(VENV)/.percept-setup
PROTO_DIR := protos
PROTOS := $(wildcard $(PROTO_DIR)/percept/v1/*.proto)
STYLE ?= starry-night

.PHONY: setup run test protos bench lint data train-superres train-style train-devise \
        image deploy deploy-validate clean

## setup: install everything that is missing (idempotent)
setup:
	@scripts/setup.sh

## run: the local cluster on the committed default models, with the demo (Ctrl-C stops it)
run: setup
	@$(PERCEPT) run

## test: the whole suite, on up to 4 cores (pytest-xdist); scripts/setup_tests.sh adds what
## only the tests need (Node.js and the grpc-js interop client's npm packages)
test: setup
	@scripts/setup_tests.sh
	@$(PY) -m pytest -q -n auto --maxprocesses 4 --dist loadgroup

## protos: regenerate percept/v1 Python code from the .proto files
protos: setup
	@$(PY) scripts/protogen.py

## bench: speed and memory benchmarks, each against a baseline from the same run
bench: setup
	@$(PY) -m benchmarks.run $(ARGS)

## lint: ruff and mypy
lint: setup
	@$(VENV)/bin/ruff check . && $(VENV)/bin/mypy services training benchmarks

## data: the training photos (Debian wallpapers + scikit-image, with a held-out split) and
## the prepared arrays every trainer reads (288 px crops and their 72 px bicubic pairs)
data: setup
	@$(PERCEPT) data photos
	@$(PERCEPT) data prepare --photos data/photos/train --out data/prepared/sr288 \
		--sizes 288 72 --crops-per-image 64 --seed 0

## train-*: train a default model (ARGS adds or overrides trainer flags). Only train-style
## depends on the device: the paper's recipe on a GPU, a reduced one on a CPU; superres and
## devise train with the same defaults on either (ARGS sets their size and length)
train-superres: data
	@$(PERCEPT) train superres --data data/prepared/sr288 --out models/superres-psnr $(ARGS)

train-style: data
	@$(PERCEPT) train style --style $(STYLE) --data data/prepared/sr288 $(ARGS)

## train-devise: train, then evaluate DEVISE_MODEL and write its metrics.json. DEVISE_MODEL
## is the artifact the training writes: models/devise-minilm unless ARGS names another
## (--word-vectors, --name or --out), and then it must be given, e.g.
##   make train-devise ARGS="--word-vectors glove.6B.300d.txt" \
##        DEVISE_MODEL=models/devise-glove-6b-300d
## `percept eval search` has no --model (it scores the first DeViSE map in the MiniLM space
## under models/, i.e. devise-minilm), so it runs for the default model only.
DEVISE_DEFAULT := models/devise-minilm
DEVISE_MODEL ?= $(DEVISE_DEFAULT)
DEVISE_NAMING_ARGS := $(filter --word-vectors% --name% --out%,$(ARGS))
ifneq ($(filter train-devise,$(MAKECMDGOALS)),)
ifneq ($(DEVISE_NAMING_ARGS),)
ifeq ($(origin DEVISE_MODEL),file)
$(error train-devise: ARGS ($(DEVISE_NAMING_ARGS)) trains another model than \
$(DEVISE_DEFAULT); name its folder with DEVISE_MODEL=models/NAME (for --word-vectors \
glove.6B.300d.txt: models/devise-glove-6b-300d) so that the evaluations score it and not \
$(DEVISE_DEFAULT))
endif
endif
endif
train-devise: data
	@$(PERCEPT) train devise $(ARGS)
	@$(PERCEPT) eval devise --model $(DEVISE_MODEL) --update-metrics
	@if [ "$(abspath $(DEVISE_MODEL))" = "$(abspath $(DEVISE_DEFAULT))" ]; then \
	  $(PERCEPT) eval search --method both --update-metrics; \
	else \
	  echo "train-devise: percept eval search skipped: it has no --model and would score" \
	       "$(DEVISE_DEFAULT), not $(DEVISE_MODEL)"; \
	fi

## deploy-validate: render every overlay, validate offline, run the policy checks
deploy-validate: setup
	@$(PY) deploy/validate.py

## image: build the image variants (IMAGE_VARIANTS: gpu and cpu) as IMAGE_REPO:IMAGE_VERSION-
## <variant>, recording the commit (PERCEPT_GIT_SHA) that trained models will name; push
## them yourself (deploy/README.md, step 2)
IMAGE_REPO ?= ghcr.io/percept/percept
IMAGE_VERSION ?= 0.1.0
IMAGE_VARIANTS ?= gpu cpu
image:
	@git diff --quiet HEAD -- || echo "image: tracked files differ from HEAD; the image" \
	  "records $$(git rev-parse HEAD) all the same" >&2
	@set -e; sha=$$(git rev-parse HEAD); for variant in $(IMAGE_VARIANTS); do \
	  echo "docker build ... VARIANT=$$variant -> $(IMAGE_REPO):$(IMAGE_VERSION)-$$variant"; \
	  docker build -f deploy/docker/Dockerfile --build-arg VARIANT=$$variant \
	    --build-arg PERCEPT_GIT_SHA=$$sha -t $(IMAGE_REPO):$(IMAGE_VERSION)-$$variant .; \
	done

## deploy: apply deploy/k8s/cluster (the namespace and the models claim, which outlive the
## overlay) and the gpu overlay to the current kubectl context, then wait for each rollout.
## A Deployment replaces its pods one at a time, and the controller fails a step that makes
## no progress within progressDeadlineSeconds (30 min: grace + image pull + startup), which
## ends `rollout status` at once; so each wait may last replicas x that deadline, the time
## a slow but healthy rollout can take. search is one pod (grace + pull + startup < 30 min).
deploy: deploy-validate
	kubectl apply -k deploy/k8s/cluster
	kubectl apply -k deploy/k8s/overlays/gpu
	@set -e; for d in superres style embed; do \
	  read -r replicas deadline <<< "$$(kubectl -n percept get deployment $$d \
	    -o jsonpath='{.spec.replicas} {.spec.progressDeadlineSeconds}')"; \
	  timeout=$$(( $${replicas:-1} * $${deadline:-1800} ))s; \
	  echo "kubectl -n percept rollout status deployment/$$d --timeout=$$timeout"; \
	  kubectl -n percept rollout status deployment/$$d --timeout=$$timeout; \
	done
	kubectl -n percept rollout status statefulset/search --timeout=30m

clean:
	rm -rf out runs .pytest_cache .mypy_cache .ruff_cache
