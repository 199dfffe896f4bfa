"""What machine this process runs on, in the words reports use."""

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
