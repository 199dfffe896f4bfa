"""`make bench-batch`: batched decode throughput of the edge runtime, B = 1, 4, 8.

Dense layers run once for the whole batch; attention runs per sequence. Each model uses
its serving default quantization, exits off, a short prompt, 32 decode steps after four warm-up
steps, best of two. Writes docs/bench/batch.md next to vLLM CPU's numbers from models.md.
"""

from __future__ import annotations

import argparse
import time

import torch

from bench.edge import OUT
from bench.machine import cpu_name
from tandem.models.loader import LoadOptions, load_model
from tandem.models.registry import ModelRegistry

VLLM_CPU_ANCHOR = {"qwen05": (15.8, 98.5), "qwen15": (4.9, 33.8)}  # bf16, batch 1 / batch 8
STEPS = 32


def throughput(model_id: str, batch_sizes: tuple[int, ...]) -> list[tuple[int, float]]:
    spec = ModelRegistry().get(model_id)
    lm = load_model(spec, LoadOptions(quant=spec.default_quant, exits=False))
    dec = lm.decoder()
    prompt = lm.codec.encode("The capital of France is")
    out = []
    for b in batch_sizes:
        seqs = [dec.new_sequence() for _ in range(b)]
        dec.prefill(seqs, [prompt] * b)
        for _ in range(4):
            dec.decode(seqs, [prompt[-1]] * b)
        best = float("inf")
        for _ in range(2):
            t = time.perf_counter()
            for _ in range(STEPS):
                dec.decode(seqs, [prompt[-1]] * b)
            best = min(best, time.perf_counter() - t)
        out.append((b, b * STEPS / best))
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--models", default="smollm2,gemma3,qwen05")
    a = p.parse_args(argv)
    torch.set_num_threads(2)
    sizes = (1, 4, 8)
    lines = [
        "# Batched decode throughput (`make bench-batch`)",
        "",
        f"Machine: {cpu_name()}, torch {torch.__version__}, 2 threads. Serving-default "
        f"quantization, exits off, {STEPS} decode steps per batch size (best of 2), total "
        "tokens/s over "
        "the batch. vLLM CPU anchor (bf16, from shared/research/models.md): qwen05 15.8 "
        "(batch 1) / 98.5 (batch 8) tok/s.",
        "",
        "| model | quant | " + " | ".join(f"B={b} tok/s" for b in sizes) + " | B=8 / B=1 |",
        "|---|---|" + "---|" * (len(sizes) + 1),
    ]
    for m in a.models.split(","):
        res = throughput(m, sizes)
        quant = ModelRegistry().get(m).default_quant
        cells = " | ".join(f"{t:.1f}" for _, t in res)
        lines.append(f"| {m} | {quant} | {cells} | {res[-1][1] / res[0][1]:.2f}× |")
        print(lines[-1], flush=True)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "batch.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
