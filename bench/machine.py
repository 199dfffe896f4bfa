"""What machine a benchmark ran on, for its report."""

from __future__ import annotations

from tandem.machine import cpu_name

__all__ = ["cpu_name", "read_bandwidth_gbs"]


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
