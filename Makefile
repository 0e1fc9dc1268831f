# Every target CI needs is here; `.ci/run` calls `make test`.
SHELL := /bin/bash
PY := .venv/bin/python
export PYTHONPATH := src:.
EVENT ?= events/burst-3-tenants.json

.PHONY: help venv lint typecheck template test test-unit test-integration invoke demo bench bench-freshness bench-overload scale scale-overload bench-sim \
        bench-cube-worker stack-start stack-stop stack-status clean deploy grafana

help:
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/' | sort

# The dev venv runs the function's Python (python3.13 in template.yaml), found by scripts/find-python.sh.
# A .venv of another minor version (an older checkout's 3.11) is rebuilt: its stamp has another name.
PYTHON_VERSION := 3.13
VENV_STAMP := .venv/.installed-$(PYTHON_VERSION)

$(VENV_STAMP): requirements-dev.txt src/requirements.txt pyproject.toml
	@base="$$(scripts/find-python.sh $(PYTHON_VERSION))" || exit 1; \
	if [ -x $(PY) ] && ! $(PY) -c 'import sys; sys.exit(sys.version_info[:2] != tuple(map(int, "$(PYTHON_VERSION)".split("."))))'; then \
	  echo "make: .venv runs $$($(PY) -V 2>&1), not $(PYTHON_VERSION): rebuilding it"; rm -rf .venv; \
	fi; \
	[ -x $(PY) ] || "$$base" -m venv .venv
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps -e .
	@touch $@

venv: $(VENV_STAMP) ## create .venv (Python 3.13) with everything the tests and tools need

lint: venv ## ruff (lint + format check) on all Python
	.venv/bin/ruff check src tests bench devstack
	.venv/bin/ruff format --check src tests bench devstack

typecheck: venv ## mypy --strict on the Lambda code, the operator CLI and the dev stack
	.venv/bin/mypy --strict src/handler src/preagg_cli devstack

template: venv ## sam validate (every branch), sam build without Docker, the translated template's tests, checkov
	scripts/check-template.sh

test-unit: venv ## unit, adapter (moto) and functional tests, the model check: no network
	$(PY) -m pytest tests/unit

test-integration: venv ## real PostgreSQL + Cube + dynalite + moto server, started by the fixtures
	$(PY) -m pytest tests/integration

test: lint typecheck template test-unit test-integration ## everything CI runs

# A misspelt variable (`make invoke EVENTS=...`) would silently run the default: name it instead.
# $(call only_vars,VAR ...) fails when the command line sets any variable but these.
only_vars = $(foreach v,$(filter-out $(1),$(foreach a,$(MAKEOVERRIDES),$(firstword $(subst =, ,$(a))))),\
  $(error make $@ takes $(1), not $(v)))

invoke: venv ## run the handler on EVENT with in-memory stand-ins (STACK=1: against the local stack)
	$(call only_vars,EVENT STACK)
	$(PY) -m preagg_cli.local invoke $(EVENT) $(if $(STACK),--stack)

demo: venv ## start the local stack, play the sample events through the handler, tell the story
	$(PY) -m devstack.demo

bench: venv ## benchmarks (on demand): handler throughput/memory, cold import, deadline bound, with baselines
	$(PY) bench/bench_handler.py
	$(PY) bench/bench_cold_import.py
	$(PY) bench/bench_deadline.py
	$(PY) bench/bench_precise.py

bench-freshness: venv ## freshness end to end on the local stack, this worker vs Cube's refresh worker (~5 min)
	$(PY) bench/bench_freshness.py

# BEHAVIOURS: name=code[+VAR=value...] each, code being src, a directory with src/handler or a commit.
BEHAVIOURS ?= today=src
bench-overload: venv ## Cube's build queue saturated for minutes, behaviours side by side (~6 min each)
	$(PY) bench/bench_overload.py $(foreach b,$(BEHAVIOURS),--behaviour $(b)) $(BENCH_ARGS)

.venv/.bench-installed: requirements-bench.txt $(VENV_STAMP)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements-bench.txt
	@touch $@

scale: .venv/.bench-installed ## docs/scale.md's tables and plots by simulation (CONFIG=ours.yaml: your own numbers, into scale-out/)
	$(PY) -m bench.sim.report $(if $(CONFIG),--config $(CONFIG))

scale-overload: .venv/.bench-installed ## docs/scale.md's overload table and docs/scale-overload.png: today's code (8feeac0) vs the load-aware one at 1x/3x/10x Cube's capacity (~5 min)
	$(PY) -m bench.sim.overload

bench-sim: venv ## the simulation's smallest scenario against the real local stack, handler driven directly and through the local event sources (~3 min)
	$(PY) -m bench.sim.agreement
	$(PY) -m bench.sim.agreement --event-sources

bench-cube-worker: venv ## Cube's own refresh worker vs its model (bench/sim/cube_worker.py), statements per tick, 4 refresh key kinds (~5 min)
	$(PY) -m bench.sim.cube_worker_check

stack-start: venv ## start PostgreSQL, Cube, dynalite, moto, Kafka, the event sources (idempotent); function settings given (CUBE_PREAGG_DEBOUNCE_MS=5000 ...) are kept until stack-stop; PRECISE=1: the partition-precise map, PRECISE=0: the default
	$(call only_vars,PRECISE CUBE_% ENTITY_CUBE_MAP)
	$(PY) -m devstack start $(if $(PRECISE),$(if $(filter 0 no false,$(PRECISE)),--no-precise,--precise))

# stop and status need only the standard library: they work before .venv exists.
STACK_PY = $(if $(wildcard $(PY)),$(PY),python3)

stack-stop: ## stop the local stack (says what it stopped)
	@$(STACK_PY) -m devstack stop

stack-status: ## show each local service and the function's settings (fails only when the stack is partly up)
	@$(STACK_PY) -m devstack status

deploy: venv ## sam build, the pre-deploy checks, sam deploy of samconfig.toml's ENV with FunctionDigest (ARGS="Name=Value ...", GUIDED=1)
	@[ -n "$(ENV)" ] || { echo "make deploy: name a samconfig.toml environment: make deploy ENV=dev" >&2; exit 2; }
	@[ -x .venv-sam/bin/sam ] || { echo "make deploy: no SAM CLI in .venv-sam yet: run make template once (it installs the pinned one)" >&2; exit 2; }
	.venv-sam/bin/sam build
	$(PY) -m preagg_cli.predeploy --config-env $(ENV) --deploy $(if $(GUIDED),--guided) $(ARGS)

grafana: venv ## the Grafana dashboard (CloudWatch data source) as JSON, validated: build/grafana/preagg-refresh.json
	$(PY) -m preagg_cli.grafana

clean: ## remove build output and caches (keeps venvs and the stack)
	rm -rf .aws-sam .pytest_cache .mypy_cache .ruff_cache .hypothesis
