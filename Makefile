# The README's two commands: `make run` and `make test`. Both set everything up first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install test lint run demo bench clean

# torch is pinned to the CPU build in constraints.txt, so no install ever pulls CUDA wheels;
# the project's venv gets every extra (server, openai, postgres, eval, langchain) and dev.
$(BIN)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[all,dev]'
	touch $@

install: $(BIN)/.installed

lint: install
	$(BIN)/ruff check semcache tests evals

test: install lint
	bash scripts/ensure_postgres_logical.sh
	bash scripts/ensure_chromium.sh
	$(BIN)/pytest -q -p no:cacheprovider

run: install
	$(BIN)/semcache serve --data indexes/default --host 127.0.0.1 --port 8080

demo: install
	$(BIN)/python -m semcache.demo indexes/demo

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
