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
        deploy deploy-validate clean

## setup: install everything that is missing (idempotent)
setup:
	@scripts/setup.sh

## run: the local cluster on the committed default models, with the demo (Ctrl-C stops it)
run: setup
	@$(PERCEPT) run

## test: the whole suite, on up to 4 cores (pytest-xdist)
test: setup
	@$(PY) -m pytest -q -n auto --maxprocesses 4

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

## train-*: train a default model (ARGS adds or overrides trainer flags); CPU runs are
## reduced-size, a GPU trains at full size
train-superres: data
	@$(PERCEPT) train superres --data data/prepared/sr288 --out models/superres-psnr $(ARGS)

train-style: data
	@$(PERCEPT) train style --style $(STYLE) --data data/prepared/sr288 $(ARGS)

train-devise: data
	@$(PERCEPT) train devise $(ARGS)
	@$(PERCEPT) eval devise --update-metrics
	@$(PERCEPT) eval search --method both --update-metrics

## deploy-validate: render every overlay, validate offline, run the policy checks
deploy-validate: setup
	@$(PY) deploy/validate.py

## deploy: apply the gpu overlay to the current kubectl context and wait for the rollout
deploy: deploy-validate
	kubectl apply -k deploy/k8s/overlays/gpu
	kubectl -n percept rollout status deployment --timeout=10m
	kubectl -n percept rollout status statefulset --timeout=10m

clean:
	rm -rf out runs .pytest_cache .mypy_cache .ruff_cache
