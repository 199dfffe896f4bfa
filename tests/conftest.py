"""Shared fixtures."""

from __future__ import annotations

import pytest

pytest_plugins = ["tests.redis_fixture"]  # redis_url, redis_client, redis_prefix


@pytest.fixture(params=["llama", "qwen2", "gemma3"])
def arch(request) -> str:
    return request.param
