# Tandem developer entry points. Everything works from a fresh clone: `make test` runs setup first.
SHELL := /bin/bash
PY := .venv/bin/python
PORT ?= 8000
export PORT

.PHONY: setup run test proto calibrate bench-edge bench-batch lint fmt

setup:
	bash scripts/bootstrap.sh

proto: setup
	bash scripts/gen_proto.sh

run: setup proto
	$(PY) -m services.edge_node.main

test: setup proto
	$(PY) -m pytest -q tests

calibrate: setup
	$(PY) -m tandem.calibration --models smollm2,gemma3,qwen05,qwen15 --out artifacts/exits --report docs/bench

bench-edge: setup proto
	$(PY) -m bench.edge

bench-batch: setup
	$(PY) -m bench.batch

lint: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

fmt: setup
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .
