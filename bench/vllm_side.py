"""The vLLM CPU side of `make bench-batch`, run as its own process by .venv-vllm's python.

Reads one JSON job on stdin, prints one JSON result on stdout. It never imports tandem.

Job: {"model_dir": converted bf16 safetensors dir, "prompts": [[ids], ...] (one per sequence),
      "batch_sizes": [1, 4, 8], "new_tokens": 64, "repeats": 3, "threads": 2,
      "enforce_eager": false, "max_model_len": 512}

vLLM's offline `LLM` engine, bf16, greedy (temperature 0), ignore_eos, no detokenization,
prefix caching off (every call prefills its prompts), the engine core in this process
(VLLM_ENABLE_V1_MULTIPROCESSING=0) with its OpenMP threads bound to CPUs 0..threads-1
(VLLM_CPU_OMP_THREADS_BIND; the default "auto" would reserve one of two cores for a separate
scheduler process). Environment set by the caller (bench/batch.py).

Timing, per batch size B (the first B prompts), after one untimed warm-up call: each repeat
times `generate` with max_tokens = 1 (prefill and the first token) and with max_tokens =
new_tokens + 1 (the same prefill, then `new_tokens` decode steps); decode time = best full
call - best prefill-only call, total decode tok/s = B * new_tokens / decode time.
"""

from __future__ import annotations

import json
import sys
import time


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def run(job: dict) -> dict:
    import vllm
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    n = job["new_tokens"]
    t = time.perf_counter()
    llm = LLM(
        model=job["model_dir"],
        dtype="bfloat16",
        max_model_len=job["max_model_len"],
        max_num_seqs=max(job["batch_sizes"]),
        enforce_eager=job["enforce_eager"],
        enable_prefix_caching=False,
        seed=0,
    )
    load_s = time.perf_counter() - t

    def call(prompts: list[list[int]], max_tokens: int) -> tuple[float, list[list[int]]]:
        params = SamplingParams(
            temperature=0.0, max_tokens=max_tokens, ignore_eos=True, detokenize=False
        )
        t0 = time.perf_counter()
        outs = llm.generate(
            [TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False
        )
        dt = time.perf_counter() - t0
        return dt, [list(o.outputs[0].token_ids) for o in outs]

    results = []
    for b in job["batch_sizes"]:
        prompts = job["prompts"][:b]
        t0 = time.perf_counter()
        call(prompts, n + 1)
        warmup_s = time.perf_counter() - t0
        best_pre, best_full, tokens = float("inf"), float("inf"), []
        for _ in range(job["repeats"]):
            best_pre = min(best_pre, call(prompts, 1)[0])
            dt, tokens = call(prompts, n + 1)
            best_full = min(best_full, dt)
        if any(len(t) != n + 1 for t in tokens):
            raise RuntimeError(f"vLLM returned {[len(t) for t in tokens]} tokens, not {n + 1}")
        decode_s = best_full - best_pre
        results.append(
            {
                "batch": b,
                "decode_tok_s": b * n / decode_s,
                "prefill_call_s": best_pre,
                "full_call_s": best_full,
                "warmup_s": warmup_s,
                "tokens": tokens,
            }
        )
        print(f"[vllm_side] B={b}: {results[-1]['decode_tok_s']:.1f} tok/s", file=sys.stderr)
    return {
        "version": vllm.__version__,
        "load_s": load_s,
        "results": results,
        "rss_mb": _status_kb("VmRSS") / 1024,
        "peak_rss_mb": _status_kb("VmHWM") / 1024,
    }


if __name__ == "__main__":
    print(json.dumps(run(json.loads(sys.stdin.read()))))
