"""tests/gpu run alone on a bare CUDA machine (`make gpu-check` passes --confcutdir so
tests/conftest.py, which needs redis, is not loaded): the fixtures they use live here."""

from __future__ import annotations

import pytest


@pytest.fixture(params=["llama", "qwen2", "gemma3"])
def arch(request) -> str:
    return request.param
