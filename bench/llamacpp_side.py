"""The llama.cpp side of `make bench-edge`, run as its own process by .venv-llamacpp's python.

Reads one JSON job on stdin, prints one JSON result on stdout. It never imports tandem (the
project's venv never imports llama_cpp), so each side's RSS is its own process's.

Job: {"gguf": path, "threads": 2, "new_tokens": 64, "repeats": 3,
      "decode_prompt": [ids], "prefill_prompt": [ids]}  (token ids from the same GGUF vocab)

Timing, the same protocol as the Tandem side (bench/edge.py):
- decode: `Llama.generate` at temperature 0 (greedy sampler chain), EOS ignored (the iterator
  never stops on EOS; `create_completion` would). The clock starts when the first generated
  token is yielded (the prompt has been evaluated and sampled) and stops when the
  (new_tokens + 1)-th is yielded: exactly `new_tokens` single-token decode steps, each an
  eval of the previous token plus sampling. tok/s = new_tokens / elapsed, best of `repeats`
  after one untimed warm-up pass.
- prefill: `Llama.eval` of the prefill prompt (one batch, n_batch = its length) from an empty
  KV cache, tok/s = prompt length / elapsed, best of `repeats` after the warm-up.
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
    from llama_cpp import Llama, __version__, llama_print_system_info

    decode_prompt: list[int] = job["decode_prompt"]
    prefill_prompt: list[int] = job["prefill_prompt"]
    new_tokens: int = job["new_tokens"]
    n_ctx = max(len(prefill_prompt), len(decode_prompt) + new_tokens + 1) + 64
    t = time.perf_counter()
    llm = Llama(
        model_path=job["gguf"],
        n_threads=job["threads"],
        n_threads_batch=job["threads"],
        n_ctx=n_ctx,
        n_batch=max(512, len(prefill_prompt)),
        n_ubatch=max(512, len(prefill_prompt)),
        verbose=False,
    )
    load_s = time.perf_counter() - t

    def decode_once() -> tuple[float, list[int]]:
        llm.reset()  # no prefix reuse from the previous pass
        out: list[int] = []
        t0 = 0.0
        for tok in llm.generate(decode_prompt, temp=0.0, top_k=1, repeat_penalty=1.0):
            if not out:
                t0 = time.perf_counter()
            out.append(tok)
            if len(out) == new_tokens + 1:
                break
        return time.perf_counter() - t0, out

    def prefill_once() -> float:
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(prefill_prompt)
        return time.perf_counter() - t0

    t = time.perf_counter()
    decode_once()
    prefill_once()
    warmup_s = time.perf_counter() - t
    decode_best, tokens = float("inf"), []
    prefill_best = float("inf")
    for _ in range(job["repeats"]):
        dt, tokens = decode_once()
        decode_best = min(decode_best, dt)
        prefill_best = min(prefill_best, prefill_once())
    return {
        "version": __version__,
        "system_info": llama_print_system_info().decode().strip(),
        "load_s": load_s,
        "warmup_s": warmup_s,
        "decode_tok_s": new_tokens / decode_best,
        "prefill_tok_s": len(prefill_prompt) / prefill_best,
        "tokens": tokens,
        "rss_mb": _status_kb("VmRSS") / 1024,
        "peak_rss_mb": _status_kb("VmHWM") / 1024,
    }


if __name__ == "__main__":
    print(json.dumps(run(json.loads(sys.stdin.read()))))
