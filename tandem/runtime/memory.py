"""Give the memory freed while loading a model back to the operating system.

`own_mapped_tensors`: safetensors' `load_file` returns tensors that view the weights file's
memory map, and the map lives as long as any of them does. After quantization only the
embedding, norms and biases are left of them, but they keep the whole file mapped, and every
page that quantization read stays resident (qwen05: 942 MB of its 1.7 GB RSS). Copying the
survivors into memory of their own lets the map go.

Loading reads every weight in bf16 and then replaces the quantized layers' weights. Most of
those tensors are under glibc's mmap threshold (which grows to 32 MB once a larger block has
been freed), so they come from the heap, and the heap keeps freed pages mapped: the process
would hold on to about the bf16 model's size for good. `malloc_trim(0)` returns every free
page of the heap (glibc >= 2.8 also releases pages in the middle of it).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

import torch
from torch import nn


def own_mapped_tensors(module: nn.Module) -> int:
    """Replace every CPU parameter and buffer of `module` whose storage it does not own (a
    view of a memory map: not resizable) with a copy; returns the bytes copied. Tensors that
    viewed the same bytes (a tied LM head) share one copy."""
    copies: dict[tuple, torch.Tensor] = {}
    copied = 0
    for mod in module.modules():
        for table in (mod._parameters, mod._buffers):
            for name, t in table.items():
                if t is None or t.device.type != "cpu" or t.untyped_storage().resizable():
                    continue
                key = (t.data_ptr(), t.dtype, tuple(t.shape), t.stride())
                if key not in copies:
                    copies[key] = t.detach().clone()
                    copied += t.numel() * t.element_size()
                if isinstance(t, nn.Parameter):
                    t.data = copies[key]
                else:
                    table[name] = copies[key]
    return copied


@functools.cache
def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        lib = ctypes.CDLL(name)
        lib.malloc_trim.argtypes = [ctypes.c_size_t]
        lib.malloc_trim.restype = ctypes.c_int
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to trim
        return None
    return lib


def release_free_memory() -> bool:
    """Return the heap's free pages to the OS; False where the C library has no
    malloc_trim (then this does nothing)."""
    lib = _libc()
    if lib is None:
        return False
    lib.malloc_trim(0)
    return True
