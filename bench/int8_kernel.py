"""Int8KernelLinear (tandem's int8 x int8 kernel) vs Int8Linear (aten _weight_int8pack_mm).

Weighted like a whole model's int8 layers: per token, `layers` x each per-layer shape (the
LM head is not int8 where these models are served). Each shape cycles through enough copies
of its weights to overflow the L3 cache, so the times are for weights streamed from memory
as in decode. A/B runs are interleaved in short rounds and the fastest round is kept, which
tolerates a shared (intermittently loaded) machine. Writes docs/bench/int8_kernel.md with
--write.

    python -m bench.int8_kernel [--threads 2] [--rounds 9] [--rows 1,8] [--prefill] [--write]
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import torch
from torch import nn

from bench.machine import cpu_name
from tandem.runtime.kernels.int8 import Int8KernelLinear, best_isa
from tandem.runtime.quant import Int8Linear

# (in_features, out_features) of one layer's linears (q/k/v and gate/up fused)
MODELS: dict[str, tuple[int, list[tuple[int, int]]]] = {
    "gemma3": (18, [(640, 1536), (1024, 640), (640, 4096), (2048, 640)]),
    "qwen05": (24, [(896, 1152), (896, 896), (896, 9728), (4864, 896)]),
}
WORKING_SET = 96 << 20  # bytes of weights cycled per shape (> L3)
ISA_NAMES = {1: "scalar", 2: "AVX2", 3: "AVX-512 VNNI"}


def weight_bytes(k: int, n: int) -> int:
    return n * k + n * 4  # int8 q + an fp32 scale per row


def copies_of(layer: nn.Module, count: int) -> list[nn.Module]:
    return [layer] + [copy.deepcopy(layer) for _ in range(count - 1)]


def time_cycle(layers: list[nn.Module], x: torch.Tensor, calls: int) -> float:
    """Seconds per call, cycling through the layer copies."""
    for lay in layers[:2]:
        lay(x)
    t0 = time.perf_counter()
    for i in range(calls):
        layers[i % len(layers)](x)
    return (time.perf_counter() - t0) / calls


def bench_shape(k: int, n: int, rows: list[int], rounds: int) -> dict[int, tuple[float, float]]:
    lin = nn.Linear(k, n, bias=False, dtype=torch.float32)
    copies = max(1, min(32, WORKING_SET // weight_bytes(k, n)))
    ref = copies_of(Int8Linear(lin), copies)
    new = copies_of(Int8KernelLinear(lin), copies)
    del lin
    out: dict[int, tuple[float, float]] = {}
    for m in rows:
        x = torch.randn(m, k, dtype=torch.bfloat16)
        calls = max(copies, 3 if m > 16 else 2 * copies)
        ta, tb = [], []
        for _ in range(rounds):
            ta.append(time_cycle(ref, x, calls))
            tb.append(time_cycle(new, x, calls))
        out[m] = (min(ta), min(tb))
    return out


def report(model: str, rows: list[int], rounds: int) -> list[str]:
    layers, shapes = MODELS[model]
    per_shape = {s: bench_shape(*s, rows, rounds) for s in shapes}
    lines = []
    for m in rows:
        tot_a = tot_b = tot_bytes = 0.0
        for k, n in shapes:
            ta, tb = per_shape[(k, n)][m]
            nbytes = weight_bytes(k, n)
            tot_a += layers * ta
            tot_b += layers * tb
            tot_bytes += layers * nbytes
            lines.append(
                f"| {model} | {m} | {k}×{n} (×{layers}) | {ta * 1e3:.3f} ({nbytes / ta / 1e9:.1f})"
                f" | {tb * 1e3:.3f} ({nbytes / tb / 1e9:.1f}) | {ta / tb:.2f}× |"
            )
        lines.append(
            f"| {model} | {m} | **all layers** | **{tot_a * 1e3:.2f}**"
            f" ({tot_bytes / tot_a / 1e9:.1f}) | **{tot_b * 1e3:.2f}**"
            f" ({tot_bytes / tot_b / 1e9:.1f}) | **{tot_a / tot_b:.2f}×** |"
        )
        print("\n".join(lines[-len(shapes) - 1 :]), flush=True)
    return lines


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--models", default="gemma3,qwen05")
    ap.add_argument("--rows", default="1,8")
    ap.add_argument("--prefill", action="store_true", help="also M=512")
    ap.add_argument("--write", action="store_true", help="write docs/bench/int8_kernel.md")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    isa = best_isa()
    head = (
        f"Machine: {cpu_name()}, torch {torch.__version__}, {args.threads} threads, "
        f"kernel path {ISA_NAMES.get(isa, isa)}. Best of {args.rounds} interleaved rounds."
    )
    print(head)
    table = [
        "| model | rows M | K×N | aten ms (GB/s) | tandem ms (GB/s) | speedup |",
        "|---|---|---|---|---|---|",
    ]
    rows = [int(r) for r in args.rows.split(",")]
    for model in args.models.split(","):
        table += report(model, rows, args.rounds)
        if args.prefill:
            table += report(model, [512], max(1, args.rounds // 3))
    if args.write:
        doc = [
            "# Int8 weight kernel vs aten (`make bench-int8`)",
            "",
            head,
            "",
            "Int8KernelLinear (tandem.runtime.kernels.int8: int8 weights with a scale per "
            "output channel, activations quantized per row to int8, integer dot products with "
            "AVX-512 VNNI vpdpbusd or AVX2 maddubs) against Int8Linear "
            "(aten `_weight_int8pack_mm`: the same weights, bf16 activations). Per-layer "
            "shapes of each model, time per call with weights streamed from memory (copies "
            "cycled past the L3 cache); GB/s = weight bytes / time. 'all layers' weights each "
            "shape by the model's layer count: the int8 matmul time of one decode step.",
            "",
            *table,
        ]
        Path("docs/bench/int8_kernel.md").write_text("\n".join(doc) + "\n")


if __name__ == "__main__":
    main()
