"""release_free_memory gives freed heap pages back: the RSS of a process falls.

Run in a child process, which pins glibc's allocator the way a loaded model leaves it: the
mmap threshold at its 32 MB cap (so layer-sized tensors come from the heap) and no automatic
trimming. The child checks that freeing alone keeps the pages, then that the trim returns them.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from tandem.runtime.config import ArchConfig
from tandem.runtime.memory import own_mapped_tensors, release_free_memory
from tandem.runtime.model import DecoderModel
from tandem.runtime.quant import quantize_model
from tests.tiny import tiny_reference

CHILD = """
import ctypes, ctypes.util
import torch
from tandem.runtime.memory import release_free_memory

MB = 1 << 20
libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.mallopt(-3, 32 * MB)  # M_MMAP_THRESHOLD
libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD: free() alone never trims


def rss():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmRSS:"))


base = rss()
blocks = [torch.ones(16 * MB, dtype=torch.uint8) for _ in range(24)]
pin = torch.ones(1024, dtype=torch.uint8)  # keeps the heap's top in use
del blocks
freed = rss()
release_free_memory()
print((freed - base) // MB, (rss() - base) // MB)
"""


@pytest.mark.skipif(not release_free_memory(), reason="no glibc malloc_trim here")
def test_freed_heap_pages_go_back() -> None:
    out = subprocess.run(
        [sys.executable, "-c", CHILD], capture_output=True, text=True, check=True, timeout=120
    ).stdout
    kept_mb, after_trim_mb = map(int, out.split())
    assert kept_mb > 300, "freeing alone returned the pages: the test would prove nothing"
    assert after_trim_mb < 64, (kept_mb, after_trim_mb)


def test_own_mapped_tensors_lets_the_weights_file_go(tmp_path) -> None:
    """After loading from safetensors and quantizing, the embedding, norms and biases still
    view the file's map; owning copies of them changes no output."""
    ref = tiny_reference("qwen2")
    save_file({k: v.bfloat16() for k, v in ref.state_dict().items()}, tmp_path / "w.st")
    model = DecoderModel.from_state_dict(
        ArchConfig.from_hf(ref.config.to_dict()), load_file(tmp_path / "w.st"), torch.bfloat16
    )
    quantize_model(model, "int8", skip=("embed_tokens", "lm_head"))
    mapped = [n for n, t in model.state_dict().items() if not t.untyped_storage().resizable()]
    assert "embed_tokens.weight" in mapped
    ids = torch.tensor([5, 9, 11, 3])
    before = model.logits(model.run_sequence(model.embed(ids), model.new_kv(), 0, 0, 2))
    assert own_mapped_tensors(model) > 0
    assert all(t.untyped_storage().resizable() for t in model.state_dict().values())
    after = model.logits(model.run_sequence(model.embed(ids), model.new_kv(), 0, 0, 2))
    assert torch.equal(before, after)


def test_tied_lm_head_keeps_one_copy(tmp_path) -> None:
    """A tied LM head left in bf16 views the same bytes as the embedding: one copy serves both."""
    ref = tiny_reference("llama")  # tie_word_embeddings
    state = {k: v.bfloat16() for k, v in ref.state_dict().items() if k != "lm_head.weight"}
    save_file(state, tmp_path / "w.st")
    model = DecoderModel.from_state_dict(
        ArchConfig.from_hf(ref.config.to_dict()), load_file(tmp_path / "w.st"), torch.bfloat16
    )
    assert model.lm_head.weight.data_ptr() == model.embed_tokens.weight.data_ptr()
    mapped = {
        t.data_ptr(): t.numel() * t.element_size()
        for t in model.state_dict().values()
        if not t.untyped_storage().resizable()
    }
    assert model.embed_tokens.weight.data_ptr() in mapped
    assert own_mapped_tensors(model) == sum(mapped.values())
    assert model.embed_tokens.weight.untyped_storage().resizable()
    assert model.lm_head.weight.data_ptr() == model.embed_tokens.weight.data_ptr()
