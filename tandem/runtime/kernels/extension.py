"""Build and load Tandem's CPU kernel extension (int4_gemv.cpp, int8_gemv.cpp, attention.cpp
and norm.cpp, one library).

The sources register ops in the `tandem_kernels` namespace; `load` builds them once with
torch.utils.cpp_extension (cached on disk, see `build_dir`) and registers the fake
implementations that let torch.compile treat the ops as opaque.
"""

from __future__ import annotations

import functools
import logging
import os
import platform
from pathlib import Path

import torch

log = logging.getLogger(__name__)

INT4_GROUP = 32
_SOURCES = [
    Path(__file__).with_name(f)
    for f in ("int4_gemv.cpp", "int8_gemv.cpp", "attention.cpp", "norm.cpp")
]
# -fopenmp: at::parallel_for is a header template that runs serially without it. The link
# resolves to the libgomp.so.1 torch has already loaded (same soname), so one thread pool.
_CFLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp"]
_LDFLAGS = ["-fopenmp"]


def build_dir() -> Path:
    """TANDEM_KERNELS_DIR, else TORCH_EXTENSIONS_DIR, else ~/.cache/tandem_kernels."""
    root = os.environ.get("TANDEM_KERNELS_DIR") or os.environ.get("TORCH_EXTENSIONS_DIR")
    base = Path(root) if root else Path.home() / ".cache" / "tandem_kernels"
    path = base / f"torch{torch.__version__.split('+')[0]}"
    path.mkdir(parents=True, exist_ok=True)
    return path


@functools.cache
def load() -> None:
    """Build (once, cached on disk) and load the extension; registers the fake kernels."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        raise RuntimeError(f"tandem kernels need x86-64, not {platform.machine()}")
    if torch.backends.cpu.get_cpu_capability() == "DEFAULT":
        raise RuntimeError("tandem kernels need a CPU with AVX2 + FMA + F16C")
    from torch.utils import cpp_extension

    try:
        cpp_extension.load(
            name="tandem_kernels",
            sources=[str(s) for s in _SOURCES],
            extra_cflags=_CFLAGS,
            extra_ldflags=_LDFLAGS,
            build_directory=str(build_dir()),
            is_python_module=False,
            verbose=False,
        )
    except (OSError, RuntimeError, ImportError) as err:
        raise RuntimeError(
            "could not build tandem's CPU kernels (needs g++ and ninja): " + str(err)
        ) from err

    @torch.library.register_fake("tandem_kernels::int4_mm")
    def _int4_mm_fake(x, qweight, scodes, mcodes, supers, n, bias=None, isa=0):  # noqa: ANN001, ANN202
        return x.new_empty(x.shape[0], n)

    @torch.library.register_fake("tandem_kernels::int4_dequant")
    def _int4_dequant_fake(qweight, scodes, mcodes, supers, n):  # noqa: ANN001, ANN202
        return qweight.new_empty(n, qweight.shape[1] * INT4_GROUP, dtype=torch.float32)

    @torch.library.register_fake("tandem_kernels::int8_mm")
    def _int8_mm_fake(x, qweight, scales, n, bias=None, isa=0, xblock=0):  # noqa: ANN001, ANN202
        return x.new_empty(x.shape[0], n)

    @torch.library.register_fake("tandem_kernels::int8_dequant")
    def _int8_dequant_fake(qweight, scales, n):  # noqa: ANN001, ANN202
        return qweight.new_empty(n, qweight.shape[1] * 4, dtype=torch.float32)

    @torch.library.register_fake("tandem_kernels::decode_attention")
    def _decode_attention_fake(q, k, v, slot, pos, scale, window=-1):  # noqa: ANN001, ANN202
        return torch.empty_like(q, memory_format=torch.contiguous_format)

    @torch.library.register_fake("tandem_kernels::rms_norm")
    def _rms_norm_fake(x, weight, eps, unit_offset):  # noqa: ANN001, ANN202
        return torch.empty_like(x, memory_format=torch.contiguous_format)


@functools.cache
def available() -> bool:
    """Whether the extension builds and loads here (asked once per process); where it does
    not, its callers use torch ops instead."""
    try:
        load()
    except RuntimeError as exc:
        log.warning("tandem CPU kernels unavailable, using torch ops: %s", exc)
        return False
    return True


def best_isa() -> int:
    """The SIMD path the kernels pick on this CPU: 1 scalar, 2 AVX2, 3 AVX-512 VNNI."""
    load()
    return int(torch.ops.tandem_kernels.best_isa())
