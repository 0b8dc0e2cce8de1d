# Granite 4.0 H micro SageMaker container. `make help` lists the targets.
SHELL := /bin/bash
PY ?= python3
VENV ?= .venv
WHEELS ?= build/wheels
# LATEST=1 (make test-latest): the newest releases pyproject.toml allows instead of the lock, in their own venv.
# mamba-ssm is built here as a Triton-only wheel (py3-none-any, no CUDA), which `make gpu-check` also carries to a
# GPU machine; it is installed without its dependencies (its setup.py needs torch to report them).
ifeq ($(LATEST),1)
VENV := .venv-latest
MAMBA_WHEELS := build/wheels-latest
MAMBA_SSM := mamba-ssm
# (that venv is not the lock by design: the one test that checks it is left out, by name)
TEST_ARGS := --deselect tests/test_lock.py::test_the_environment_is_exactly_the_lock
INSTALL_DEPS = $(UV) pip install -q --python $(VPY) $(FIND_TORCH) --upgrade "$(TORCH_CPU)" '.[dev]'
else
MAMBA_SSM ?= mamba-ssm==2.3.2.post1
MAMBA_WHEELS := $(WHEELS)
INSTALL_DEPS = $(UV) pip sync -q --python $(VPY) $(FIND_TORCH) $(LOCK)
endif
VPY := $(VENV)/bin/python
UV := $(VENV)/bin/uv
HOST ?= 127.0.0.1
PORT ?= 8080
IMAGE ?= granite-h-sagemaker
CONTAINER ?= docker
# The one lock (`make lock` regenerates it from pyproject.toml with uv; README "Dependencies and the lock"): the exact
# CPU dev/test environment that `make install` and .ci/run install, and the source of the images' pins.
LOCK := .ci/lock.txt
# Lock inputs besides pyproject.toml: the CPU torch build (a local file: where pip finds it, PIP_FIND_LINKS, or
# TORCH_FIND_LINKS) and the triton that torch pins (the CPU wheel does not install it): its interpreter runs
# mamba-ssm's Triton kernels on CPU tensors in tests/triton.
TORCH_CPU ?= torch==2.13.0
TRITON_CPU ?= triton==3.7.1
TORCH_FIND_LINKS ?= $(PIP_FIND_LINKS)
LOCK_ARGS ?=
# What `make gpu-check` carries to a CUDA machine that has only torch, triton, transformers and nvcc:
# the causal-conv1d sdist (compiled there for its GPU) and pure-Python wheels (unpacked there, no pip).
CAUSAL_CONV1D ?= causal-conv1d==1.6.2.post1
# (each at the lock's version; gpu_check unpacks one only where the GPU machine's python lacks it)
GPU_PURE_WHEELS ?= $(shell sed -n -E 's/^((einops|pytest|pluggy|iniconfig|pygments|packaging|pytest-timeout)==[^ ]+).*/\1/p' $(LOCK))
# The GPU targets run with the CUDA machine's python (CUDA torch + kernels), never the CPU .venv.
GPU_PY ?= python3
OUT ?= build/gpu-check
GPU_TORCH_CHECK = $(GPU_PY) -c "import sys, torch; sys.exit(None if torch.version.cuda and torch.cuda.is_available() \
  else sys.executable + ' has no usable CUDA torch (torch ' + torch.__version__ + '): set GPU_PY, or run make gpu-check')"

.DEFAULT_GOAL := help
.PHONY: help install lock test-latest serve test test-fast test-gpu test-gpu-image gpu-wheels gpu-check test-container bench bench-gpu lint \
  image image-cpu clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-16s %s\n", $$1, $$2}'

FIND_TORCH = $(if $(TORCH_FIND_LINKS),--find-links $(TORCH_FIND_LINKS))

$(VENV)/.installed: $(LOCK) pyproject.toml
	test -x $(VPY) || $(PY) -m venv $(VENV)
	# uv installs the lock exactly (sync: nothing more, nothing less); uv itself is in the lock, so this
	# bootstrap takes the locked uv.
	$(VPY) -m pip install -q "$$(grep -E '^uv==' $(LOCK))"
	$(INSTALL_DEPS)
	$(UV) pip install -q --python $(VPY) --no-deps --no-build-isolation -e .
	ls $(MAMBA_WHEELS)/mamba_ssm-*-py3-none-any.whl >/dev/null 2>&1 || MAMBA_SKIP_CUDA_BUILD=TRUE MAMBA_FORCE_BUILD=TRUE \
	  $(VPY) -m pip wheel -q --no-build-isolation --no-deps -w $(MAMBA_WHEELS) "$(MAMBA_SSM)"
	$(UV) pip install -q --python $(VPY) --no-deps $(MAMBA_WHEELS)/mamba_ssm-*-py3-none-any.whl
	$(UV) pip freeze -q --python $(VPY) > $(VENV)/versions.txt
	@echo "installed: $$(grep -E '^(torch|triton|transformers|mamba.ssm|tokenizers)( @|==)' $(VENV)/versions.txt | tr '\n' ' ')"
	touch $@

install: $(VENV)/.installed ## create .venv with exactly the lock (.ci/lock.txt): CPU runtime and dev tools

lock: install ## regenerate the lock and the images' pins from pyproject.toml (keeps pins; LOCK_ARGS=--upgrade moves them)
	UV=$(UV) TORCH_CPU="$(TORCH_CPU)" TRITON_CPU="$(TRITON_CPU)" TORCH_FIND_LINKS="$(TORCH_FIND_LINKS)" \
	  bash .ci/lock.sh $(LOCK_ARGS)

test-latest: ## the CPU tests against the newest releases pyproject.toml allows (own venv, no lock; not in .ci/run)
	$(MAKE) test LATEST=1

serve: install ## run the server on $(HOST):$(PORT) (demo model unless MODEL_DIR/HF_MODEL_ID is set)
	@if [ -z "$$MODEL_ID$$HF_MODEL_ID" ] && [ ! -f "$${MODEL_DIR:-/opt/ml/model}/config.json" ]; then \
	  echo "no model configured: using the built-in demo model (random weights, meaningless text)"; \
	  export MODEL_ID=demo; fi; \
	$(VPY) -m serve serve --host $(HOST) --port $(PORT)

test: install $(WHEELS)/.gpu-wheels ## every CPU test (what .ci/run runs), then the Triton-interpreter suite and the sm_80-90 compile report, each in its own process
	$(VPY) -m pytest -q -m "not gpu and not container" $(TEST_ARGS) tests
	TRITON_INTERPRET=1 MAMBA_DETERMINISTIC=1 $(VPY) -m pytest -q -p no:cacheprovider tests/triton
	TRITON_CACHE_DIR=$${TRITON_CACHE_DIR:-/var/tmp/granite-h-triton} $(VPY) -m pytest -q -p no:cacheprovider \
	  $(if $(filter 1,$(COMPILE_TRITON36)),,-m "not triton36") tests/compile

test-fast: install ## the tests minus the slow server/fuzz/notebook ones
	$(VPY) -m pytest -q -x -m "not gpu and not container and not slow" tests

test-gpu: ## on a CUDA machine with the kernels installed ($(GPU_PY)): fused-kernel tests + full-size graphs
	@$(GPU_TORCH_CHECK)
	$(GPU_PY) -m pytest -q -p no:cacheprovider -m gpu tests/gpu

$(WHEELS)/.gpu-wheels: $(VENV)/.installed
	ls $(WHEELS)/causal_conv1d-*.tar.gz >/dev/null 2>&1 || CAUSAL_CONV1D_SKIP_CUDA_BUILD=TRUE $(VPY) -m pip download -q \
	  --no-deps --no-binary :all: --no-build-isolation -d $(WHEELS) "$(CAUSAL_CONV1D)"
	$(VPY) -m pip download -q --no-deps --only-binary :all: -d $(WHEELS) $(GPU_PURE_WHEELS)
	touch $@

gpu-wheels: $(WHEELS)/.gpu-wheels ## the files gpu-check carries to a CUDA machine: build/wheels (mamba-ssm, causal-conv1d sdist, ...)

gpu-check: $(if $(DRY_RUN),$(WHEELS)/.gpu-wheels) ## on a CUDA machine (no make needed: bash bench/gpu_check.sh OUT): build/wheels, tests/gpu, GPU bench -> $(OUT); DRY_RUN=1: step plan + estimate, dry run on this CPU
	bash bench/gpu_check.sh $(if $(DRY_RUN),--dry-run )$(OUT)

test-container: install ## build the CPU image with podman and check the SageMaker contract (~5 min cold, ~1 min warm)
	bash .ci/container.sh

test-gpu-image: ## on a CUDA host with Docker + NVIDIA toolkit: kernel check, then gpu-check --installed inside $(IMAGE):cuda -> $(OUT)
	docker run --rm --gpus all -v "$(CURDIR):/src" -w /src -e PYTHONPATH=/src $(IMAGE):cuda \
	  bash -c "pip install -q pytest pytest-timeout && python serve/container/check_kernels.py && python bench/gpu_check.py --installed --out $(OUT)"

image: ## build the CUDA image (needs Docker Hub for nvidia/cuda, PyPI and GitHub release downloads)
	$(CONTAINER) build -t $(IMAGE):cuda .

image-cpu: install ## build the CPU image offline from a local wheelhouse (.container/wheelhouse)
	PY=$(VPY) bash tests/container/wheelhouse.sh .container/wheelhouse
	$(CONTAINER) build --build-arg FLAVOR=cpu --build-context wheelhouse=.container/wheelhouse -t $(IMAGE):cpu .

bench: install ## CPU benchmark: engine vs Hugging Face generate, writes bench/results/*.json
	$(VPY) -m bench.run

bench-gpu: ## on a CUDA machine with the kernels installed ($(GPU_PY)): full-size architecture benchmark
	@$(GPU_TORCH_CHECK)
	$(GPU_PY) bench/gpu_bench.py --out bench/results/gpu-$$(date +%Y%m%d).json

lint: install ## ruff, hadolint (Dockerfile), shellcheck
	$(VENV)/bin/ruff check serve model code bench tests
	$(VENV)/bin/hadolint Dockerfile
	$(VENV)/bin/shellcheck -x serve/container/entrypoint.sh tests/container/*.sh .ci/container.sh .ci/run .ci/lock.sh bench/gpu_check.sh

clean: ## remove caches (not .venv)
	rm -rf .pytest_cache .ruff_cache .hypothesis
