"""What machine a benchmark ran on, for its report."""

from __future__ import annotations

import os
import platform
from pathlib import Path


def cpu_name() -> str:
    """e.g. 'AMD EPYC 7B13 (2 cores, AVX2 only)': the vector ISA matters here (the int4
    kernels and llama.cpp both pick AVX-512 paths where the CPU has them)."""
    try:
        info = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor() or platform.machine()
    name = next((x.split(":", 1)[1].strip() for x in info if x.startswith("model name")), "")
    flags = set(next((x.split(":", 1)[1].split() for x in info if x.startswith("flags")), []))
    isa = (
        "AVX-512 VNNI"
        if {"avx512f", "avx512_vnni"} <= flags
        else ("AVX2 only" if "avx2" in flags else "no AVX2")
    )
    return f"{name or platform.machine()} ({os.cpu_count()} cores, {isa})"


def read_bandwidth_gbs(mbytes: int = 512, threads: int = 2, repeats: int = 7) -> float:
    """Measured memory read bandwidth in GB/s (1e9 bytes/s): a `threads`-thread torch sum
    over a `mbytes` MB float32 tensor (far larger than any cache), best of `repeats`.
    The figure a memory-bound decode step is held to: weight bytes per token / this."""
    import time

    import torch

    prev = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        x = torch.ones(mbytes * (1 << 20) // 4, dtype=torch.float32)
        x.sum()  # fault the pages in
        best = float("inf")
        for _ in range(repeats):
            t = time.perf_counter()
            x.sum()
            best = min(best, time.perf_counter() - t)
        return x.nbytes / best / 1e9
    finally:
        torch.set_num_threads(prev)
