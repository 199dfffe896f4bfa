"""The cloud context service on the tiny random llama (tests/tiny.py), for tests:

    python -m tests.services.cloud_ctx.tiny_cloud --grpc-port 0 --metrics-port 0 ...

takes the flags of `services.cloud_ctx.main` and serves the same way (settings, Redis,
gRPC, /metrics), with the tiny model's upper layers instead of a registry model.
"""

from __future__ import annotations

import asyncio
import logging
import sys

from services.cloud_ctx.main import connect_redis, parse_settings, serve
from services.cloud_ctx.weights import UpperHalf, drop_lower_layers, tensor_bytes
from tandem.models.registry import LocalFile, ModelRegistry, ModelSpec
from tests.tiny import tiny_model

SPLIT = 3
TINY = ModelSpec(
    id="tiny-llama",
    upstream="random weights (tests/tiny.py)",
    architecture="llama",
    file_name="",
    source=LocalFile(""),
    tokenizer="bytes",
    chat_template="plain",
    license="none",
    exit_layers=(),
)
REGISTRY = ModelRegistry((TINY,))


def tiny_upper_half(split: int = SPLIT) -> UpperHalf:
    model = tiny_model("llama")
    full = tensor_bytes(model)
    drop_lower_layers(model, split)
    return UpperHalf(model, split, tensor_bytes(model), full)


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO)
    args = sys.argv[1:] if argv is None else argv
    settings = parse_settings(REGISTRY, ["--model", TINY.id, *args])
    client = connect_redis(settings.redis_url) if settings.redis_url else None
    asyncio.run(serve(settings, tiny_upper_half(settings.split or SPLIT), client))


if __name__ == "__main__":
    main()
