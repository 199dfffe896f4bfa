"""Int4KernelLinear (tandem's int4 x int8 kernel) vs Int4Linear (aten int4pack) on CPU.

Weighted like a whole model: per token, `layers` x each per-layer shape + one LM head.
Each shape cycles through enough copies of its weights to overflow the L3 cache, so the
times are for weights streamed from memory as in decode. A/B runs are interleaved in short
rounds and the fastest round is kept, which tolerates a shared (intermittently loaded) machine.

    python -m bench.int4_kernel [--threads 2] [--rounds 5] [--prefill]
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
from torch import nn

from tandem.runtime.kernels.int4 import Int4KernelLinear
from tandem.runtime.quant import Int4Linear

# (in_features, out_features); the last one is the LM head
MODELS: dict[str, tuple[int, list[tuple[int, int]]]] = {
    "qwen15": (28, [(1536, 2048), (1536, 1536), (1536, 17920), (8960, 1536), (1536, 151936)]),
    "qwen05": (24, [(896, 1152), (896, 896), (896, 9728), (4864, 896), (896, 151936)]),
}
WORKING_SET = 96 << 20  # bytes of weights cycled per shape (> L3)


def weight_bytes(k: int, n: int) -> int:
    # 4-bit q + 8-bit scale and min codes per 32 + fp16 units per 256
    return n * k // 2 + n * (k // 32) * 2 + n * -(-k // 256) * 4


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
    copies = max(1, min(16, WORKING_SET // weight_bytes(k, n)))
    ref = copies_of(Int4Linear(lin), copies)
    new = copies_of(Int4KernelLinear(lin), copies)
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


def report(model: str, rows: list[int], rounds: int, head: bool) -> None:
    layers, shapes = MODELS[model]
    if not head:
        shapes = shapes[:-1]
    per_shape = {s: bench_shape(*s, rows, rounds) for s in shapes}
    for m in rows:
        tot_a = tot_b = tot_bytes = 0.0
        print(f"\n{model} M={m}")
        for i, (k, n) in enumerate(shapes):
            weight = 1 if head and i == len(shapes) - 1 else layers
            ta, tb = per_shape[(k, n)][m]
            nbytes = weight_bytes(k, n)
            tot_a += weight * ta
            tot_b += weight * tb
            tot_bytes += weight * nbytes
            print(
                f"  K={k:5d} N={n:6d} x{weight:2d}:"
                f" aten {ta * 1e3:7.3f} ms ({nbytes / ta / 1e9:5.1f} GB/s)"
                f"  tandem {tb * 1e3:7.3f} ms ({nbytes / tb / 1e9:5.1f} GB/s)  x{ta / tb:4.2f}"
            )
        head_note = "" if head else " (no LM head)"
        print(
            f"  whole model{head_note}:"
            f" aten {tot_a * 1e3:.2f} ms/step ({tot_bytes / tot_a / 1e9:.1f} GB/s)"
            f"  tandem {tot_b * 1e3:.2f} ms/step ({tot_bytes / tot_b / 1e9:.1f} GB/s)"
            f"  speedup x{tot_a / tot_b:.2f}  [per token: aten {tot_a * 1e3 / m:.2f} ms,"
            f" tandem {tot_b * 1e3 / m:.2f} ms]"
        )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--models", default="qwen15,qwen05")
    ap.add_argument("--rows", default="1,8")
    ap.add_argument("--prefill", action="store_true", help="also M=512 (layers only, no head)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"threads={args.threads} cpu={torch.backends.cpu.get_cpu_capability()}")
    rows = [int(r) for r in args.rows.split(",")]
    for model in args.models.split(","):
        report(model, rows, args.rounds, head=True)
        if args.prefill:
            report(model, [512], max(1, args.rounds // 2), head=False)


if __name__ == "__main__":
    main()
