# kling-relay: every target sets itself up (deploy/bootstrap.sh: Python venv in .venv/, redis-server).
.DEFAULT_GOAL := help
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: help setup demo test scale-test lint fmt bench lock clean

help: ## List the targets
	@grep -hE '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | \
		awk 'BEGIN {FS = ":.*?## "}; {printf "  %-10s %s\n", $$1, $$2}'

setup: ## Create .venv/ and install the project, its test tools and redis-server if missing
	@deploy/bootstrap.sh

demo: setup ## Run three jobs end to end (simulator, local Redis and S3); MP4s land in demo-output/ (KEEP=1: stay up)
	@KEEP=$(KEEP) $(PY) -m deploy.demo

test: setup ## Run the whole test suite on two processes (starts its own redis-server, moto S3, simulator, workers)
	@$(PY) -m pytest -n 2 --dist loadscope --no-loadscope-reorder $(PYTEST_ARGS)

scale-test: setup ## Only the multi-host test: network namespaces, 500 jobs, a worker host cut off (needs root)
	@$(PY) -m pytest tests/e2e/test_hosts.py $(PYTEST_ARGS)

lint: setup ## ruff and mypy
	@$(VENV)/bin/ruff check .
	@mkdir -p .lint/kling_relay && for d in shared worker webhook simulator; do ln -sfn ../../$$d .lint/kling_relay/$$d; done
	@$(VENV)/bin/mypy

fmt: setup ## Sort imports and fix what ruff can fix
	@$(VENV)/bin/ruff check --fix .

bench: setup ## Benchmarks against bare baselines, one table (BENCH_ARGS="--reps 3", "--quick"; not part of test)
	@$(PY) bench/run_all.py $(BENCH_ARGS)

lock: setup ## Re-resolve every dependency into requirements.lock (then `make setup` installs it)
	@$(PY) -m pip install --disable-pip-version-check -q uv
	@$(VENV)/bin/uv pip compile pyproject.toml --extra dev --python-version 3.11 --universal --upgrade \
		-o requirements.lock

clean: ## Remove .venv/, caches and demo output
	rm -rf $(VENV) .lint .pytest_cache .mypy_cache .ruff_cache .hypothesis demo-output .demo .bench *.egg-info
