"""Shared fixtures."""

from __future__ import annotations

import pytest


@pytest.fixture(params=["llama", "qwen2", "gemma3"])
def arch(request) -> str:
    return request.param
