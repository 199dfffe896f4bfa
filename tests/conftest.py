"""Shared fixtures."""

from __future__ import annotations

import os

import pytest

# Services started by tests run the eager decode path: compiling each one's decode graphs
# would cost tens of seconds to minutes per start. tests/runtime/test_compiled.py covers
# the compiled path (tiny models, and smollm2 / qwen05 as served).
os.environ.setdefault("TANDEM_COMPILE", "0")

pytest_plugins = ["tests.redis_fixture"]  # redis_url, redis_client, redis_prefix


@pytest.fixture(params=["llama", "qwen2", "gemma3"])
def arch(request) -> str:
    return request.param
