# mmrope front door. `make train` and `make test` set themselves up on a fresh machine.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# CPU machines get the CPU build of torch (a local wheel here); CUDA machines get the default build.
TORCH_SPEC ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo "torch>=2.11" || echo "torch==2.13.0")
export DS_ACCELERATOR ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo cuda || echo cpu)
export WANDB_MODE ?= offline
# DeepSpeed builds some ops on first use (CPU shared-memory all-reduce, CPU Adam): keep them with the torch of this
# venv, so a clean clone never meets builds (or a killed build's lock) from another torch in ~/.cache.
export TORCH_EXTENSIONS_DIR ?= $(abspath $(VENV))/torch_extensions
export PYTHONPATH := $(CURDIR):$(PYTHONPATH)
PYTEST_ARGS ?=

.DEFAULT_GOAL := help
.PHONY: help setup eval-setup train test test-fast lint format bench bench-gpu gpu-check wheelhouse clean

help: ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  make %-10s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	@if [ "$(DS_ACCELERATOR)" = cpu ]; then $(PY) launch/prebuild_ops.py; fi
	@touch $(STAMP)

setup: $(STAMP) ## create .venv with torch (CPU build without CUDA) and all dependencies

# The benchmark environment (issue 20): lmms-eval pins wandb and av and wants a CUDA torch + torchvision, so it
# lives in its own venv, which .venv never sees. It is built on top of .venv rather than from scratch (a fresh
# install of torch and this project's dependencies took ~75 s of the test suite): a .pth file appends .venv's
# site-packages after .venv-eval's own, so .venv-eval installs only what must differ or is missing: this project
# (editable, --no-deps: its dependencies are .venv's), lmms-eval without its dependencies, and the few runtime
# packages its core imports (filelock 4.3 removed `filelock._api`, which lmms-eval imports, so `filelock<4.3` in
# .venv-eval shadows .venv's). pip runs from .venv's copy (visible through the .pth) and only installs into and
# removes from .venv-eval (".. outside environment": it leaves .venv's packages alone). Redone when .venv is.
EVAL_VENV ?= .venv-eval
EVAL_STAMP := $(EVAL_VENV)/.installed
LMMS_EVAL_SPEC ?= lmms-eval==0.7.3
EVAL_RUNTIME := accelerate loguru sacrebleu evaluate pytz tenacity pytablewriter "filelock<4.3"
SITE_PACKAGES := import sysconfig; print(sysconfig.get_paths()["purelib"])

$(EVAL_STAMP): pyproject.toml $(STAMP)
	@test -x $(EVAL_VENV)/bin/python || $(PY) -m venv --without-pip $(EVAL_VENV)
	$(PY) -c '$(SITE_PACKAGES)' > "$$($(EVAL_VENV)/bin/python -c '$(SITE_PACKAGES)')/_mmrope_base_venv.pth"
	$(EVAL_VENV)/bin/python -m pip install -q --no-deps -e .
	$(EVAL_VENV)/bin/python -m pip install -q --no-deps "$(LMMS_EVAL_SPEC)"
	$(EVAL_VENV)/bin/python -m pip install -q $(EVAL_RUNTIME)
	@touch $(EVAL_STAMP)

eval-setup: $(EVAL_STAMP) ## create .venv-eval on top of .venv: this project + lmms-eval 0.7.3 (`.venv-eval/bin/lmms-eval --model mmrope`)

train: $(STAMP) ## run the embedded default: tiny Qwen2.5-VL, synthetic shards, ZeRO-2 on CPU (args: ARGS="rope=vanilla ...")
	$(PY) train.py $(ARGS)

test: $(STAMP) ## run the test suite (unit + 2-rank integration on CPU)
	$(PY) -m pytest -q --timeout 600 --durations=15 --durations-min=5 tests $(PYTEST_ARGS)

test-fast: $(STAMP) ## unit tests only
	$(PY) -m pytest -q --timeout 300 tests/unit $(PYTEST_ARGS)

lint: $(STAMP) ## ruff lint + format check
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP) ## apply ruff fixes and formatting
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

bench: $(STAMP) ## CPU benchmarks (tests/perf/bench_*.py); results go to tests/perf/RESULTS.md by hand
	@for b in tests/perf/bench_*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

# The GPU box may have no package registry: use .venv if it exists, else the machine's own python3.
BENCH_PY ?= $(if $(wildcard $(PY)),$(PY),python3)
bench-gpu: ## GPU step benchmark, mmrope vs the usual recipe at 32K (needs CUDA; torch + transformers only)
	@$(BENCH_PY) -c "import torch,sys; sys.exit(0 if torch.cuda.is_available() else 'bench-gpu needs CUDA')"
	@for b in tests/perf/gpu_bench_*.py; do echo "== $$b"; PYTHONPATH=$(CURDIR) $(BENCH_PY) $$b || exit 1; done

# The prepared device check (issue 14): tests/gpu/gpu_check.py. DRY=1 runs every step on CPU at tiny sizes.
gpu-check: ## run first on a GPU box: GPU tests, CUDA training, 32K step benchmark -> $OUT (DRY=1: CPU, tiny)
	@PYTHONPATH=$(CURDIR) $(BENCH_PY) tests/gpu/gpu_check.py $(if $(DRY),--dry,) $(GPU_CHECK_ARGS)

wheelhouse: $(STAMP) ## download the wheels the GPU box lacks (Python 3.12, x86_64) into .whl/ (git-ignored)
	$(PY) tests/gpu/wheelhouse.py

clean: ## remove run outputs and caches (keeps .venv)
	rm -rf runs outputs multirun .cache .pytest_cache .ruff_cache wandb
