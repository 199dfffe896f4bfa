"""The Tandem side of `make bench-edge`: one model, in its own process (so its RSS is its own).

Also the Tandem side of `make bench-batch` (a job with "mode": "batch", see `run_batch`).

Reads one JSON job on stdin, prints one JSON result on stdout:
  .venv/bin/python -m bench.tandem_side < job.json

Job: {"model": id, "threads": 2, "new_tokens": 64, "repeats": 3, "compiled": true,
      "check_eager": true, "decode_prompt": [ids], "prefill_prompt": [ids], "quality_texts": 8}

Compiled: the decode graphs are compiled first, as the edge node does at start (`compile_s`,
part of `warmup_s`). `check_eager`: afterwards, the eager reference path decodes the same
prompt greedily (`eager_tokens`, to compare with `tokens`).

Loaded as served: `spec.default_quant`, exits on where `spec.default_tau` < 1 and decoded at
that tau. Timing (the same protocol as bench/llamacpp_side.py):
- warm-up: one untimed pass; `warmup_s` is the wall time of the first prefill and decode
  calls of the process (the first short-prompt prefill, the first decode step, the first
  512-token prefill), where a compiled path compiles.
- decode: prefill the decode prompt (not timed), pick the greedy token, then time
  `new_tokens` calls of `dec.decode([seq], [tok], tau)`, each followed by the greedy pick of
  its result: tok/s = new_tokens / elapsed, best of `repeats`. EOS is ignored.
- prefill: `dec.prefill` of the 512-token prompt into a fresh sequence, tok/s = its length
  / elapsed, best of `repeats`.
"""

from __future__ import annotations

import json
import sys
import time

import torch

from bench.weight_bytes import WeightBytes


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _greedy(step) -> int:
    idx = int(step.logits.max(-1).indices)  # the engine's greedy pick (Sampler)
    return int(step.shortlist[idx]) if step.shortlist is not None else idx


def _compile(dec, tau: float, opts: dict) -> float:
    """Compile the decode graphs as a server does at start (seconds; 0 on the eager path)."""
    if not opts.get("compiled"):
        return 0.0
    return dec.warm_up(use_exits=tau < 1.0)


def run(job: dict) -> dict:
    from tandem.models.loader import LoadOptions, load_model
    from tandem.models.registry import ModelRegistry

    torch.set_num_threads(job["threads"])
    spec = ModelRegistry().get(job["model"])
    tau = spec.default_tau
    opts = {"quant": spec.default_quant, "exits": tau < 1.0}
    if "compiled" in LoadOptions.__dataclass_fields__:
        opts["compiled"] = job["compiled"]
    elif job["compiled"]:
        print("[tandem_side] LoadOptions has no `compiled`: running eager", file=sys.stderr)
    t = time.perf_counter()
    lm = load_model(spec, LoadOptions(**opts))
    load_s = time.perf_counter() - t
    dec = lm.decoder()
    compile_s = _compile(dec, tau, opts)
    decode_prompt: list[int] = job["decode_prompt"]
    prefill_prompt: list[int] = job["prefill_prompt"]
    n = job["new_tokens"]
    wb = WeightBytes.of(lm.model, lm.heads)

    first_calls = 0.0

    def decode_once(first: bool = False) -> tuple[float, list[int], list[int]]:
        nonlocal first_calls
        seq = dec.new_sequence()
        t0 = time.perf_counter()
        tok = _greedy(dec.prefill([seq], [decode_prompt])[0])
        t1 = time.perf_counter()
        toks, exits = [tok], []
        for i in range(n):
            step = dec.decode([seq], [tok], tau)[0]
            tok = _greedy(step)
            toks.append(tok)
            exits.append(step.exit_layer)
            if first and i == 0:
                first_calls += time.perf_counter() - t0
        return time.perf_counter() - t1, toks, exits

    def prefill_once(first: bool = False) -> float:
        nonlocal first_calls
        seq = dec.new_sequence()
        t0 = time.perf_counter()
        dec.prefill([seq], [prefill_prompt])
        dt = time.perf_counter() - t0
        if first:
            first_calls += dt
        return dt

    t = time.perf_counter()
    decode_once(first=True)
    prefill_once(first=True)
    warmup_pass_s = time.perf_counter() - t
    decode_best, prefill_best = float("inf"), float("inf")
    toks: list[int] = []
    exits: list[int] = []
    for _ in range(job["repeats"]):
        dt, toks, exits = decode_once()
        decode_best = min(decode_best, dt)
        prefill_best = min(prefill_best, prefill_once())
    use_exits = tau < 1.0
    step_bytes = [wb.step(e, use_exits) for e in exits]
    out = {
        "quant": spec.default_quant,
        "tau": tau,
        "compiled": bool(opts.get("compiled", False)),
        "load_s": load_s,
        "compile_s": compile_s,
        "warmup_s": compile_s + first_calls,
        "warmup_pass_s": warmup_pass_s,
        "decode_tok_s": n / decode_best,
        "prefill_tok_s": len(prefill_prompt) / prefill_best,
        "tokens": toks,
        "exit_fraction": sum(e < lm.model.cfg.n_layers for e in exits) / max(len(exits), 1),
        "bytes_per_token": sum(step_bytes) / max(len(step_bytes), 1),
        "bytes_full_depth": wb.full_depth,
        "rss_mb": _status_kb("VmRSS") / 1024,
        "peak_rss_mb": _status_kb("VmHWM") / 1024,
        "bpc": None,
        "eager_tokens": None,
    }
    if job.get("check_eager") and out["compiled"]:  # the same greedy tokens on the reference
        ref = load_model(spec, LoadOptions(**{**opts, "compiled": False})).decoder()
        seq = ref.new_sequence()
        tok = _greedy(ref.prefill([seq], [decode_prompt])[0])
        out["eager_tokens"] = [tok]
        for _ in range(n):
            tok = _greedy(ref.decode([seq], [tok], tau)[0])
            out["eager_tokens"].append(tok)
        del ref
    if job.get("quality_texts"):
        from bench.quality import bits_per_char
        from tandem.data.corpus import load_corpus

        texts = [s.text for s in load_corpus("heldout", job["quality_texts"])]
        out["bpc"], _ = bits_per_char(lm, texts, tau)
    return out


def run_batch(job: dict) -> dict:
    """Batched decode (`make bench-batch`). Job: {"mode": "batch", "model", "threads",
    "new_tokens", "repeats", "compiled", "prompts": [[ids], ...], "batch_sizes": [...]}.

    Per batch size B (the first B prompts), after one untimed warm-up pass: `dec.prefill`
    of the B prompts into fresh sequences (not timed), greedy picks, then `new_tokens` calls
    of `dec.decode(seqs, tokens, tau)` each followed by the B greedy picks, timed; total
    decode tok/s = B * new_tokens / elapsed, best of `repeats`."""
    from tandem.models.loader import LoadOptions, load_model
    from tandem.models.registry import ModelRegistry

    torch.set_num_threads(job["threads"])
    spec = ModelRegistry().get(job["model"])
    tau = spec.default_tau
    opts = {"quant": spec.default_quant, "exits": tau < 1.0}
    if "compiled" in LoadOptions.__dataclass_fields__:
        opts["compiled"] = job["compiled"]
    t = time.perf_counter()
    lm = load_model(spec, LoadOptions(**opts))
    load_s = time.perf_counter() - t
    dec = lm.decoder()
    compile_s = _compile(dec, tau, opts)
    wb = WeightBytes.of(lm.model, lm.heads)
    n = job["new_tokens"]

    def once(prompts: list[list[int]]) -> tuple[float, list[list[int]], list[int]]:
        seqs = [dec.new_sequence() for _ in prompts]
        toks = [_greedy(r) for r in dec.prefill(seqs, prompts)]
        out = [[x] for x in toks]
        step_bytes = []
        t0 = time.perf_counter()
        for _ in range(n):
            steps = dec.decode(seqs, toks, tau)
            toks = [_greedy(r) for r in steps]
            for o, x in zip(out, toks, strict=True):
                o.append(x)
            step_bytes.append(wb.step(max(r.exit_layer for r in steps), tau < 1.0))
        return time.perf_counter() - t0, out, step_bytes

    results = []
    for b in job["batch_sizes"]:
        prompts = job["prompts"][:b]
        t0 = time.perf_counter()
        once(prompts)
        warmup_s = time.perf_counter() - t0
        best, tokens, step_bytes = float("inf"), [], []
        for _ in range(job["repeats"]):
            dt, tokens, step_bytes = once(prompts)
            best = min(best, dt)
        results.append(
            {
                "batch": b,
                "decode_tok_s": b * n / best,
                "warmup_s": warmup_s,
                "bytes_per_step": sum(step_bytes) / len(step_bytes),
                "tokens": tokens,
            }
        )
        print(f"[tandem_side] B={b}: {results[-1]['decode_tok_s']:.1f} tok/s", file=sys.stderr)
    return {
        "quant": spec.default_quant,
        "tau": tau,
        "compiled": bool(opts.get("compiled", False)),
        "load_s": load_s,
        "compile_s": compile_s,
        "results": results,
        "rss_mb": _status_kb("VmRSS") / 1024,
        "peak_rss_mb": _status_kb("VmHWM") / 1024,
    }


if __name__ == "__main__":
    _job = json.loads(sys.stdin.read())
    print(json.dumps(run_batch(_job) if _job.get("mode") == "batch" else run(_job)))
