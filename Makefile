# One entry point for every task; the README uses these targets.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
# Elsewhere, add --index-url https://download.pytorch.org/whl/cpu to get the CPU build.
TORCH_PIP_ARGS ?=
PACKAGES = -e shared -e services/weights -e services/loader -e services/scheduler \
           -e services/gateway -e cli
STAMP = $(VENV)/.installed

.PHONY: install test lint typecheck checkpoints bench coldstart up clean

install: $(STAMP)

$(STAMP): constraints.txt requirements-dev.txt shared/pyproject.toml services/*/pyproject.toml cli/pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check torch==2.13.0 $(TORCH_PIP_ARGS)
	$(BIN)/pip install --quiet --disable-pip-version-check -c constraints.txt \
		$(PACKAGES) -r requirements-dev.txt
	touch $(STAMP)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: install
	$(BIN)/mypy shared/src services/weights/src services/loader/src services/scheduler/src \
		services/gateway/src cli/src tests

# The test command: lint, types, then every test (RabbitMQ must be reachable for the mesh tests).
test: lint typecheck
	$(BIN)/pytest

checkpoints: install
	$(BIN)/cicada checkpoints --dir models

bench: install
	$(BIN)/cicada bench coldstart --json docs/bench-coldstart.json

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache bench-out

# Start the mesh on this machine (RabbitMQ must be reachable at CICADA_AMQP_URL).
up: install
	$(BIN)/cicada up

# Write a random-weight GPT-2 (once) and cold-start it; prints the timeline summary.
coldstart: install
	test -f models/gpt2/config.json || $(BIN)/cicada checkpoints --models gpt2 --dir models
	$(BIN)/cicada coldstart models/gpt2
