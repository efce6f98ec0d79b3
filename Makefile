# The two commands a newcomer needs are `make demo` and `make test`; the rest are helpers.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
BENCH_STAMP := $(VENV)/.bench-installed
PYTEST_ARGS ?=

.PHONY: venv serve test unit integration acceptance lint proto demo bench clean compose-check

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $(STAMP)

venv: $(STAMP)

## Run every component of the service in one process (configuration: environment, see README).
serve: $(STAMP)
	$(BIN)/python -m scripts.local_databases
	$(BIN)/financing serve

## Every test: unit, integration (real PostgreSQL and RabbitMQ) and acceptance (the running
## service) in $(WORKERS) processes, each with databases and a vhost of its own; the faults one
## test at a time (some restart the machine's servers); then the acceptance suite again against
## a split deployment (each component twice). Each part runs whatever an earlier one found.
WORKERS ?= 3
test: $(STAMP)
	status=0; \
	$(BIN)/pytest -q -n $(WORKERS) --ignore=tests/faults $(PYTEST_ARGS) || status=1; \
	$(BIN)/pytest -q tests/faults $(PYTEST_ARGS) || status=1; \
	FINANCING_ACCEPTANCE_TARGET=split $(BIN)/pytest -q -m acceptance tests/acceptance $(PYTEST_ARGS) \
		|| status=1; \
	exit $$status

unit: $(STAMP)
	$(BIN)/pytest -q tests/unit $(PYTEST_ARGS)

integration: $(STAMP)
	$(BIN)/pytest -q tests/integration $(PYTEST_ARGS)

## Acceptance tests; `make acceptance TARGET=external` runs them against an already running deployment.
acceptance: $(STAMP)
	FINANCING_ACCEPTANCE_TARGET=$(TARGET) $(BIN)/pytest -q -m acceptance tests/acceptance $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check src tests
	$(BIN)/mypy

## Regenerate the gRPC messages and stubs, and the descriptors reflection serves, from protos/.
proto: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m grpc_tools.protoc -I protos \
		--python_betterproto_out=src/financing/generated protos/financing.proto
	$(BIN)/python -m grpc_tools.protoc -I protos --include_imports \
		--descriptor_set_out=src/financing/generated/financing.binpb protos/financing.proto

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .mypy_cache .ruff_cache

## A complete financing story on a throwaway deployment: events next to read models.
demo: $(STAMP)
	$(BIN)/python -m scripts.demo

$(BENCH_STAMP): pyproject.toml $(STAMP)
	$(BIN)/pip install --quiet -e ".[dev,bench]"
	touch $(BENCH_STAMP)

## Performance figures, each beside a baseline of the same run (docs/performance.md);
## BENCH_ARGS=--quick for a 2-minute version, --help for the options.
bench: $(BENCH_STAMP)
	$(BIN)/python -m scripts.bench $(BENCH_ARGS)

## The container deployment, run for real (needs Docker; not part of `make test`): from `down -v`,
## up --build, every healthcheck, the acceptance suite against it, service and broker restarts,
## `financing status` in the container, down -v (docs/deployment.md). PROFILE=scale checks three
## instances on a three-node RabbitMQ cluster with quorum queues instead (docs/scaling.md).
compose-check: $(STAMP)
	COMPOSE_CHECK_PROFILE=$(PROFILE) $(BIN)/python -m scripts.compose_check
